"""The kill test: a run is killed with SIGKILL at a random point - inside a random optimizer step, in the middle of a
checkpoint write (after one of its files, before or after its rename, while an old checkpoint is pruned), or after a
random delay from outside - then resumed with resume=latest (sometimes killed and resumed once more). Every trial
must leave only whole checkpoints and end with per-step losses, gradient norms and validation losses bitwise equal to
an uninterrupted run's (CPU, one thread per process).

24 trials: a failure that strikes one resume in 8 escapes them all with probability (7/8)^24 = 4%. Runs are children
forked from one zygote, two at a time; the trial seed is printed so that a failure can be replayed (KILL_SEED=...).
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from safetensors.torch import load_file

from reliability_assets import run_overrides
from reliability_harness import Zygote

TRIALS = 24
STEPS, SAVE_EVERY = 8, 2
# self-kill hooks: (what is patched, which call of it kills). Steps: before a step, after its backward (in the
# gradient clipping), after its optimizer update (before the metrics line); checkpoint writes: after the weights
# file, after state.json (before the folder is renamed in), after the rename (before pruning), while pruning.
HOOKS = {
    "before-step": ("slimtune.train.loop", "train_step", "before"),
    "after-backward": ("torch.nn.utils", "clip_grad_norm_", "before"),
    "after-update": ("slimtune.train.loop", "train_step", "after"),
    "after-weights-file": ("slimtune.train.checkpoint", "write_tensors", "after"),
    "after-state-json": ("slimtune.train.checkpoint", "write_json", "after"),
    "after-rename": ("slimtune.train.checkpoint", "list_checkpoints", "before"),
    "while-pruning": ("slimtune.train.checkpoint", "remove_folder", "before"),
}
CALLS = {"before-step": STEPS - 1, "after-backward": STEPS - 1, "after-update": STEPS - 1,
         "after-weights-file": 2 * (STEPS // SAVE_EVERY), "after-state-json": STEPS // SAVE_EVERY,
         "after-rename": STEPS // SAVE_EVERY - 1, "while-pruning": 2}
KILL_AT = """
import os, signal, importlib
mod = importlib.import_module({mod!r})
orig, calls = getattr(mod, {name!r}), [0]
def hooked(*a, **k):
    calls[0] += 1
    if {when!r} == "before" and calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    r = orig(*a, **k)
    if {when!r} == "after" and calls[0] == {n}:
        os.kill(os.getpid(), signal.SIGKILL)
    return r
setattr(mod, {name!r}, hooked)
"""




def args(ws: Path, out: Path, **kw) -> list[str]:
    return ["finetune", *run_overrides(ws, out, max_steps=STEPS, save_every=SAVE_EVERY, keep_last=2, grad_accum=2,
                                       dropout=0.1, val_fraction=0.15, eval_every=3, **kw)]


def metrics(out: Path) -> list[tuple]:
    from slimtune.train.metrics import read_metrics

    return [(r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss")) for r in read_metrics(out / "metrics.jsonl")]


def whole_checkpoints(out: Path) -> None:
    """Every visible step-N folder is complete and readable (a killed write leaves only hidden temp folders)."""
    root = out / "checkpoints"
    for d in root.iterdir() if root.exists() else []:
        if d.name.startswith("."):
            continue
        assert (d / "state.json").is_file(), d
        for f in ("weights", "state"):
            load_file(str(d / f"{f}.safetensors"))


def kill_once(z: Zygote, ws: Path, out: Path, rng: random.Random, resume: bool) -> str:
    """Start (or resume) the run and kill it at a random point; returns where."""
    extra = {"resume": "latest"} if resume else {}
    kind = rng.choice([*HOOKS, "timer", "timer"])
    if kind == "timer":
        pid, _, err = z.spawn(args(ws, out, **extra), out.parent)
        time.sleep(rng.uniform(0.0, 1.5))
        os.kill(pid, signal.SIGKILL)
        code = z.wait(pid)
        return f"timer -> {code}"
    mod, name, when = HOOKS[kind]
    n = rng.randint(1, CALLS[kind])
    pid, _, err = z.spawn(args(ws, out, **extra), out.parent, setup=KILL_AT.format(mod=mod, name=name, when=when, n=n))
    code = z.wait(pid)
    assert code in (-signal.SIGKILL, 0), (kind, n, code, err.read_text()[-2000:])
    return f"{kind}#{n} -> {code}"


def trial(z: Zygote, ws: Path, root: Path, seed: int, reference: list) -> str:
    rng = random.Random(seed)
    out = root / f"t{seed}" / "run"
    out.parent.mkdir(parents=True)
    story = [kill_once(z, ws, out, rng, resume=False)]
    whole_checkpoints(out)
    if rng.random() < 0.25:  # kill the resumed run too
        story.append(kill_once(z, ws, out, rng, resume=True))
        whole_checkpoints(out)
    r = z.run(args(ws, out, resume="latest"), out.parent)
    assert r.code == 0, (seed, story, r.err[-2000:])
    got = metrics(out)
    assert got == reference, (seed, story, [(a, b) for a, b in zip(reference, got) if a != b][:3])
    shutil.rmtree(out.parent)
    return f"seed {seed}: {' then '.join(story)}: equal"


def test_sigkill_anywhere_then_resume_is_bitwise_equal(zygote, ws, tmp_path):
    ref = zygote.run(args(ws, tmp_path / "ref"), tmp_path)
    assert ref.code == 0, ref.err
    reference = metrics(tmp_path / "ref")
    assert len([r for r in reference if r[1] is not None]) == STEPS and len(reference) > STEPS  # + evaluations
    base = int(os.environ.get("KILL_SEED", random.SystemRandom().randrange(10**6)))
    print(f"KILL_SEED={base}")
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda i: trial(zygote, ws, tmp_path, base + i, reference), range(TRIALS)))
    print("\n".join(done))
    assert len(done) == TRIALS


def test_a_resume_with_another_thread_count_says_so(zygote, ws, tmp_path):
    """The one known way a resume on the CPU can differ in the last digits: another intra-op thread count (ATen's
    large reductions sum one partial per thread). The checkpoint records it, and the resumed run says so."""
    import json

    from reliability_assets import copy_of

    run = copy_of(ws / "run", tmp_path / "run")
    saved = json.loads((run / "checkpoints" / "step-2" / "state.json").read_text())["numerics"]
    other = saved["threads"] + 1
    r = zygote.run(["finetune", *run_overrides(ws, run, resume="latest", max_steps=3)], tmp_path,
                   setup=f"import torch\ntorch.set_num_threads({other})\n")
    assert r.code == 0, r.err
    assert f"written with threads={saved['threads']}, this run has threads={other}" in r.out, r.out
    r = zygote.run(["finetune", *run_overrides(ws, run, resume="latest", max_steps=4)], tmp_path,
                   setup=f"import torch\ntorch.set_num_threads({other})\n")
    assert r.code == 0 and "note:" not in r.out, r.out  # step-3 was written with the same count
