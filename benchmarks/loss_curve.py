"""200 QLoRA steps on the bundled Alpaca sample with the fused kernels on and with them off (the PyTorch reference
path): the two loss curves, their largest difference, and a plot (issue 11: the kernels change no numerics beyond
bf16 rounding).

The model is a random Llama-3.2-1B-shape checkpoint (no hub here) with the built-in byte-level tokenizer (its ids are
valid in the 128k vocabulary); QLoRA r=16 on all linear layers, bf16-mixed, packed rows of 512 tokens, batch 4,
gradient checkpointing, each run through `slimtune.train.train` (CUDA graphs where the run allows them).

    python benchmarks/loss_curve.py [--steps 200]      # writes $OUT/loss_curve.json and $OUT/loss_curve.png
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--workdir", default="/tmp/slimtune_curve")
    a = ap.parse_args()
    out = Path(os.environ.get("OUT", "/tmp"))
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from qlora_8b import write_random_checkpoint

    from slimtune.data import sample_path
    from slimtune.models.shapes import get_shape
    from slimtune.models.tiny import builtin_tokenizer
    from slimtune.train.config import load_config
    from slimtune.train.loop import train
    from slimtune.train.metrics import read_metrics

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    shape = "llama3-1b" if dev == "cuda" else "tiny"
    model = write_random_checkpoint(get_shape(shape), Path(a.workdir) / shape, dev)
    builtin_tokenizer().save_pretrained(str(model))
    curves = {}
    for kernels in ("auto", "off"):
        run = Path(a.workdir) / f"run-{kernels}"
        cfg = load_config(None, [f"model={model}", f"data={sample_path()}", "method=qlora", "rank=16", "alpha=16",
                                 "targets=all-linear", "max_length=512", "batch_size=4", f"max_steps={a.steps}",
                                 "lr=2e-4", "warmup_steps=10", "grad_ckpt=true", f"kernels={kernels}",
                                 f"out_dir={run}", "progress=false", "plot=false", "save_final=false", "seed=0"])
        s = train(cfg, log=lambda m: None)
        curves[kernels] = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
        curves[kernels + "_tokens_per_s"] = s["tokens_per_s"]
    on, off = curves["auto"], curves["off"]
    diffs = [abs(x - y) for x, y in zip(on, off)]
    res = {"steps": len(on), "max_abs_diff": max(diffs), "mean_abs_diff": sum(diffs) / len(diffs),
           "max_rel_diff": max(d / abs(y) for d, y in zip(diffs, off)), "first": [on[0], off[0]],
           "last": [on[-1], off[-1]], "tokens_per_s": [curves["auto_tokens_per_s"], curves["off_tokens_per_s"]],
           "shape": shape, "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    print(json.dumps(res))
    (out / "loss_curve.json").write_text(json.dumps({**res, "kernels_on": on, "kernels_off": off}))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(1, len(off) + 1), off, label="kernels off (PyTorch reference)", lw=1)
    ax.plot(range(1, len(on) + 1), on, "--", label="kernels on", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"QLoRA {shape} random, Alpaca sample: max |diff| {res['max_abs_diff']:.4f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png")


if __name__ == "__main__":
    main()
