"""GaLore and ReLoRA resume exactly: a run killed with SIGKILL mid-run and resumed from its last checkpoint gives the
per-step losses of an uninterrupted run, bitwise, on the CPU (GaLore: its projections and projected moments are in
the optimizer state; ReLoRA: the merged base weights are in the checkpoint, and a restart falls after the resume).
The runner and helpers are those of tests/test_train_resume.py."""
from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from test_train_resume import losses, model_dir, spawn, wait_for  # noqa: F401  (model_dir: a fixture)

from slimtune.data import sample_path
from slimtune.train import list_checkpoints, load_config, train

METHODS = {
    "galore": dict(method="full", optimizer="galore", galore_rank=4, galore_update_interval=3, galore_scale=0.5),
    "relora": dict(method="relora", rank=4, dropout=0.1, relora_every=3, relora_warmup=1, relora_prune=0.9,
                   from_scratch=True),
}


def args(model: Path, out: Path, case: str, **kw) -> list[str]:
    base = dict(model=str(model), data=str(sample_path()), data_limit=40, max_length=64, val_fraction=0.1,
                batch_size=4, grad_accum=2, max_steps=8, lr=5e-3, warmup_steps=2, save_every=2, keep_last=2,
                eval_every=4, out_dir=str(out), progress=False, plot=False, save_final=False, seed=3)
    base.update(METHODS[case], **kw)
    return [f"{k}={v}" for k, v in base.items()]


def run_here(argv: list[str]) -> dict:
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runner (OMP_NUM_THREADS=1): the same float sums
    try:
        return train(load_config(None, argv), log=lambda m: None)
    finally:
        torch.set_num_threads(n)


@pytest.mark.parametrize("case", list(METHODS))
def test_sigkill_mid_run_then_resume_is_bitwise_equal(case, model_dir, tmp_path):  # noqa: F811
    ref = tmp_path / "ref"
    s = run_here(args(model_dir, ref, case))
    assert s["steps"] == 8
    want = losses(ref)
    assert len(want[0]) == 8 and len(want[1]) == 3
    out = tmp_path / "run"
    proc = spawn("slow", args(model_dir, out, case), tmp_path)
    wait_for(lambda: len(losses(out)[0]) >= 5, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    steps = [st for st, _ in list_checkpoints(out)]
    assert steps and max(steps) < 8
    assert run_here(args(model_dir, out, case, resume="latest"))["steps"] == 8
    assert losses(out) == want
