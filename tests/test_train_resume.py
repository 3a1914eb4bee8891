"""Exact resume: a run killed with SIGKILL (mid-run, or in the middle of writing a checkpoint) and resumed gives the
same per-step losses as an uninterrupted run, bitwise, on the CPU; Ctrl-C saves and exits; a NaN loss stops the run
and leaves the last good checkpoint intact."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slimtune.data import sample_path
from slimtune.train import TrainingError, list_checkpoints, load_checkpoint, load_config, train
from slimtune.train import step
from slimtune.train.build import build_model, build_optimizer
from slimtune.train.metrics import read_metrics

RUNNER = r'''
import sys, time
import slimtune.train.loop as loop
import slimtune.train.checkpoint as ck
mode, flag_dir, args = sys.argv[1], sys.argv[2], sys.argv[3:]
orig_step = loop.train_step
def slow_step(*a, **k):  # widen each step so that the test can signal mid-run
    r = orig_step(*a, **k)
    time.sleep(0.25)
    return r
loop.train_step = slow_step
if mode == "hang-in-save":
    orig_write = ck.write_tensors
    def write(tensors, path):
        orig_write(tensors, path)
        if path.parent.name.startswith(".step-4.tmp"):  # half of step-4 is on disk: stop here until killed
            open(flag_dir + "/in-save", "w").close()
            time.sleep(300)
    ck.write_tensors = write
from slimtune.cli import main
sys.exit(main(["finetune"] + args))
'''


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from slimtune.models.save import save_model
    from slimtune.models.config import ModelConfig
    from slimtune.models.decoder import Decoder, init_weights
    from slimtune.models.tiny import builtin_tokenizer

    cfg = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=[2, 6],
                      pad_token_id=0)
    d = tmp_path_factory.mktemp("tiny") / "model"
    save_model(init_weights(Decoder(cfg), 0), d, tokenizer=builtin_tokenizer())
    return d


def overrides(model_dir: Path, out: Path, **kw) -> list[str]:
    base = dict(model=str(model_dir), data=str(sample_path()), data_limit=40, max_length=64, val_fraction=0.1,
                method="lora", rank=4, dropout=0.1, targets="all-linear", batch_size=4, grad_accum=2, max_steps=8,
                lr=5e-3, warmup_steps=2, save_every=2, keep_last=2, eval_every=4, out_dir=str(out), progress=False,
                plot=False, save_final=False, seed=3)
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def losses(out: Path) -> tuple[list[float], list[float]]:
    rows = read_metrics(out / "metrics.jsonl")
    return [r["loss"] for r in rows if "loss" in r], [r["val_loss"] for r in rows if "val_loss" in r]


def spawn(mode: str, args: list[str], tmp_path: Path) -> subprocess.Popen:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    return subprocess.Popen([sys.executable, str(script), mode, str(tmp_path)] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(pred, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    t0 = time.time()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"runner exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the runner")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """Losses of an uninterrupted run (in this process, one thread, as the runners)."""
    out = tmp_path_factory.mktemp("ref")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = train(load_config(None, overrides(model_dir, out)), log=lambda m: None)
    finally:
        torch.set_num_threads(n)
    assert s["steps"] == 8 and not s["interrupted"]
    tr, va = losses(out)
    assert len(tr) == 8 and len(va) == 3  # before, at step 4, after
    return tr, va


def resume_here(model_dir: Path, out: Path) -> dict:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(load_config(None, overrides(model_dir, out, resume="latest")), log=lambda m: None)
    finally:
        torch.set_num_threads(n)


def test_sigkill_mid_run_then_resume_is_bitwise_equal(model_dir, reference, tmp_path):
    out = tmp_path / "run"
    proc = spawn("slow", overrides(model_dir, out), tmp_path)
    wait_for(lambda: len(losses(out)[0]) >= 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps = [s for s, _ in list_checkpoints(out)]
    assert steps and max(steps) < 8  # killed mid-run
    s = resume_here(model_dir, out)
    assert s["steps"] == 8
    assert losses(out) == reference  # every per-step loss and validation loss, exactly


def test_sigkill_during_checkpoint_write_keeps_previous(model_dir, reference, tmp_path):
    out = tmp_path / "run"
    proc = spawn("hang-in-save", overrides(model_dir, out), tmp_path)
    wait_for(lambda: (tmp_path / "in-save").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = out / "checkpoints"
    assert [s for s, _ in list_checkpoints(out)] == [2]
    assert any(p.name.startswith(".step-4.tmp") for p in root.iterdir())  # the half-written one, out of sight
    # the previous checkpoint loads into a freshly built model and optimizer
    cfg = load_config(None, overrides(model_dir, out))
    model, prec, _ = build_model(cfg, torch.device("cpu"))
    opt = build_optimizer(model, cfg)
    state = load_checkpoint(root / "step-2", model, opt)
    assert state["step"] == 2 and len(opt.state) > 0
    s = resume_here(model_dir, out)
    assert s["steps"] == 8 and losses(out) == reference
    assert not any(p.name.startswith(".step-") for p in root.iterdir())  # stale temp folders swept


def test_ctrl_c_saves_and_exits_cleanly(model_dir, tmp_path):
    out = tmp_path / "run"
    proc = spawn("slow", overrides(model_dir, out, save_every=0, max_steps=40), tmp_path)
    wait_for(lambda: len(losses(out)[0]) >= 3, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted at step" in stdout
    (step, ckpt), = list_checkpoints(out)
    assert 3 <= step < 40 and json.loads((ckpt / "state.json").read_text())["step"] == step


def test_nan_loss_stops_and_keeps_last_good_checkpoint(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    orig = step.forward_loss

    def poisoned(*a, **k):
        loss, n = orig(*a, **k)
        calls["n"] += 1
        if a[0].training and calls["n"] > 4:  # 2 micro-batches per step: step 3 turns NaN
            loss = loss * float("nan")
        return loss, n

    monkeypatch.setattr(step, "forward_loss", poisoned)
    with pytest.raises(TrainingError, match=r"step 3: loss is nan.*last good checkpoint is .*step-2"):
        train(load_config(None, overrides(model_dir, out, save_every=1, eval_every=0, val_fraction=0.0)),
              log=lambda m: None)
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]
    monkeypatch.setattr(step, "forward_loss", orig)
    cfg = load_config(None, overrides(model_dir, out, val_fraction=0.0))
    model, prec, _ = build_model(cfg, torch.device("cpu"))
    assert load_checkpoint(out / "checkpoints" / "step-2", model, build_optimizer(model, cfg))["step"] == 2


def test_resume_with_other_settings_refused(model_dir, reference, tmp_path):
    from slimtune.errors import ConfigError

    out = tmp_path / "run"
    train(load_config(None, overrides(model_dir, out, max_steps=2)), log=lambda m: None)
    with pytest.raises(ConfigError, match="lr was 0.005 in the checkpoint"):
        train(load_config(None, overrides(model_dir, out, lr=1e-3, resume="latest")), log=lambda m: None)
