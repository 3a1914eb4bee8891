"""FSDP2 through torchrun on the CPU (gloo, 2 processes): full, LoRA and QLoRA runs on 2 processes give the losses and
results of one process on the same global batches (fp32: within 1e-6; QLoRA under bf16-mixed, where nothing of a
4-bit model is cast when gathered, too), with each block's gathers freed after its forward or kept to its backward
(`fsdp_reshard`); a torchrun job killed with SIGKILL mid-run resumes with the same losses, on 2 processes and on 1;
bad input stops with one line and exit 2, nothing lost."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slimtune.cli import main
from slimtune.data import sample_path
from slimtune.train import load_config, train
from slimtune.train.metrics import read_metrics

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo")

RUNNER = r'''
import os, sys, time
import slimtune.train.dist_run as dr
open(os.path.join(sys.argv[1], f"pid-{os.environ['RANK']}"), "w").write(str(os.getpid()))
orig = dr.DistRun.train_micro
def slow(self, micro):  # widen each step so that the test can kill the job mid-run
    r = orig(self, micro)
    time.sleep(0.3)
    return r
dr.DistRun.train_micro = slow
from slimtune.cli import main
sys.exit(main(["finetune"] + sys.argv[2:]))
'''


def make_model(folder: Path, hidden: int = 64) -> Path:
    from slimtune.models.config import ModelConfig
    from slimtune.models.decoder import Decoder, init_weights
    from slimtune.models.save import save_model
    from slimtune.models.tiny import builtin_tokenizer

    cfg = ModelConfig(vocab_size=320, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=[2, 6],
                      pad_token_id=0)
    save_model(init_weights(Decoder(cfg), 0), folder, tokenizer=builtin_tokenizer())
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("fsdp") / "model")


def keys(model_dir: Path, out: Path, **kw) -> list[str]:
    # 15 training rows in batches of 4: the last batch of each epoch has 3 rows (rank 1 gets a filler row)
    base = dict(model=str(model_dir), data=str(sample_path()), data_limit=40, max_length=64, val_fraction=0.1,
                method="lora", rank=4, targets="all-linear", batch_size=4, grad_accum=2, max_steps=3, lr=5e-3,
                warmup_steps=1, save_every=2, keep_last=2, eval_every=2, out_dir=str(out), progress=False,
                plot=False, seed=3)
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


def losses(out: Path) -> list[float]:
    return [r.get("loss", r.get("val_loss")) for r in read_metrics(out / "metrics.jsonl")]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def finetune(args: list[str], nproc: int | None = 2) -> subprocess.CompletedProcess:
    """`slimtune finetune ARGS --nproc-per-node N` in a subprocess (the launcher starts N worker processes)."""
    extra = ["--nproc-per-node", str(nproc)] if nproc else []
    return subprocess.run([sys.executable, "-m", "slimtune", "finetune", *args, *extra], capture_output=True,
                          text=True, env=env(), timeout=300)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_two_processes_match_one(model_dir, tmp_path, method):
    extra = {"method": method} if method != "full" else {"method": "full", "rank": None, "targets": None,
                                                          "lr": 1e-3}
    one, two = tmp_path / "one", tmp_path / "two"
    k1, k2 = keys(model_dir, one, **extra), keys(model_dir, two, **extra)
    k1, k2 = [k for k in k1 if not k.endswith("=None")], [k for k in k2 if not k.endswith("=None")]
    train(load_config(None, k1), log=lambda s: None)
    r = finetune(k2)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 3 + 3 and all(x is not None for x in a)  # 3 steps, validation at 0, 2 and 3
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6, (a, b)
    assert a[1] != a[2]  # it trains
    held, total = map(float, re.search(r"this one holds ([\d.]+) of ([\d.]+) MiB", r.stdout).groups())
    assert 0.45 < held / total < 0.55  # each process holds half of every weight (NF4 bytes included)
    ckpt = two / "checkpoints" / "step-3"
    assert json.loads((ckpt / "state.json").read_text())["layout"] == "dcp"
    assert sorted(p.name for p in ckpt.glob("*.safetensors")) == [f"shard-0000{i}-model-00001-of-00001.safetensors"
                                                                  for i in (1, 2)]
    name = "model/model.safetensors" if method == "full" else "adapter/adapter_model.safetensors"
    ta, tb = tensors(one / name), tensors(two / name)
    assert sorted(ta) == sorted(tb)
    assert max((ta[k] - tb[k]).abs().max().item() for k in ta) < 1e-5
    if method != "full":
        cfg_a = json.loads((one / "adapter/adapter_config.json").read_text())
        assert cfg_a == json.loads((two / "adapter/adapter_config.json").read_text())


def test_qlora_bf16_mixed_with_kept_gathers(model_dir, tmp_path):
    """Under bf16-mixed the 4-bit bytes and fp32 scales must come through the gathers untouched (stored as fp32
    elements, gathered uncast: `gather_dtype`), so the loss before training is the one-process loss."""
    extra = dict(method="qlora", precision="bf16-mixed", fsdp_reshard=False, max_steps=2)
    one, two = tmp_path / "one", tmp_path / "two"
    train(load_config(None, keys(model_dir, one, **extra)), log=lambda s: None)
    r = finetune(keys(model_dir, two, **extra))
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 2 + 2
    assert abs(a[0] - b[0]) < 1e-5, (a, b)  # validation at step 0: the base alone (B = 0), bf16 sums in another order
    assert max(abs(x - y) for x, y in zip(a, b)) < 2e-3, (a, b)


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("method,extra", [("lora", {}), ("qlora", {"fsdp_reshard": False})])
def test_killed_job_resumes_on_two_and_on_one_process(tmp_path, capsys, method, extra):
    model_dir = make_model(tmp_path / "model")
    ref, out = tmp_path / "ref", tmp_path / "out"
    k = dict(max_steps=6, eval_every=3, save_final=False, method=method, **extra)
    train(load_config(None, keys(model_dir, ref, **k)), log=lambda s: None)
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    job = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                            str(script), str(tmp_path), *keys(model_dir, out, **k)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, env=env(), start_new_session=True)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "step-2" / "state.json").exists():
        assert job.poll() is None and time.time() < deadline, job.communicate()[1][-3000:]
        time.sleep(0.05)
    pids = [job.pid] + [int((tmp_path / f"pid-{r}").read_text()) for r in (0, 1)]
    for pid in pids:  # the whole job at once: torchrun and its two workers
        os.kill(pid, signal.SIGKILL)
    job.wait()
    done = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert 2 <= max(done) < 6  # killed mid-run
    one = tmp_path / "one"
    shutil.copytree(out, one)
    r = finetune(keys(model_dir, out, resume="latest", **k))
    assert r.returncode == 0, r.stderr[-3000:]
    train(load_config(None, keys(model_dir, one, resume="latest", **k)), log=lambda s: None)  # one plain process
    want = losses(ref)
    for got in (losses(out), losses(one)):
        assert len(got) == len(want) and max(abs(x - y) for x, y in zip(got, want)) < 1e-6, (got, want)
    if method != "lora":
        return
    # resuming from a checkpoint of another shape (same path and settings, a wider model): one line, nothing lost
    shutil.rmtree(model_dir)
    make_model(model_dir, hidden=96)
    before = _digest(out)
    capsys.readouterr()
    assert main(["finetune", *keys(model_dir, out, resume="latest", **{**k, "max_steps": 8})]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "step-6" in err[0], err
    assert "has shape (4, 64) in the checkpoint, (4, 96) in the model" in err[0], err
    assert _digest(out) == before


def test_world_size_that_does_not_divide_the_batch(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["finetune", *keys(model_dir, out, batch_size=3), "--nproc-per-node", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch_size=3 is not a multiple of the 2 processes; fix: batch_size=4" in err[0]
    assert not out.exists()
    # the same under torchrun itself: each worker stops before loading anything, rank 0 says why (once)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                        "slimtune", "finetune", *keys(model_dir, out, batch_size=3)], capture_output=True, text=True,
                       env=env(), timeout=300)
    assert r.returncode != 0 and r.stderr.count("batch_size=3 is not a multiple of the 2 processes") == 1
    assert r.stderr.count("Traceback (most recent call last)") == 1  # torchrun's own report, none from the workers
    assert not out.exists()


def test_cuda_without_gpus_and_missing_nccl(model_dir, tmp_path, capsys, monkeypatch):
    from slimtune.errors import ConfigError
    from slimtune.train.distributed import check_distributed

    out = tmp_path / "out"
    if not torch.cuda.is_available():
        assert main(["finetune", *keys(model_dir, out, device="cuda"), "--nproc-per-node", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "device=cuda but no CUDA GPU is visible" in err[0]
        assert not out.exists()
    cfg = load_config(None, keys(model_dir, out, device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    with pytest.raises(ConfigError, match="needs NCCL, which this torch build lacks"):
        check_distributed(cfg, 2, 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    for method in ("qlora", "lora"):  # (QLoRA on any torch: its 4-bit bytes are float parameters, quant/shard.py)
        check_distributed(load_config(None, keys(model_dir, out, device="cuda", method=method)), 2, 2)
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    with pytest.raises(ConfigError, match="3 processes per node but 2 GPU"):
        check_distributed(load_config(None, keys(model_dir, out, device="cuda", batch_size=3)), 3, 3)
    for bad, what in (({"method": "dora"}, "method=dora"), ({"use_dora": True}, "use_dora=True"),
                      ({"precision": "fp16-mixed"}, "precision=fp16-mixed"), ({"grad_ckpt": "offload"}, "grad_ckpt"),
                      ({"method": "qlora", "quant": "int8"}, "quant=int8"), ({"device": "cuda:1"}, "cuda:LOCAL_RANK"),
                      ({"host_embedding": True}, "host_embedding"),
                      ({"grad_ckpt": True, "ckpt_blocks": "auto"}, "ckpt_blocks=auto")):
        with pytest.raises(ConfigError, match=what):
            check_distributed(load_config(None, keys(model_dir, out, **bad)), 2, 2)
