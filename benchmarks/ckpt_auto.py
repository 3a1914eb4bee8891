"""`ckpt_blocks=auto` on a GPU: a real `slimtune.train.train` run whose activations do not all fit, the number of
checkpointed blocks the run chose, its predicted peak and the measured one against the memory it was given.

A ballast tensor takes all but `--free-gib` of the GPU first (the H200 would fit every block un-checkpointed), so
the run sees a smaller card: `ckpt_blocks=auto` plans for 85% of the free memory (`train.build.AUTO_SHARE`). The model
is a random Llama-3.2-1B-shape checkpoint with the built-in byte-level tokenizer, LoRA r=16 on all linear layers,
bf16-mixed, packed rows of `--seq` tokens, batch `--batch`, on the bundled Alpaca sample.

    python benchmarks/ckpt_auto.py [--free-gib 14] [--batch 8] [--seq 2048] [--steps 8]   # JSON line + $OUT file
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--free-gib", type=float, default=14.0, help="GPU memory left free for the run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--workdir", default="/tmp/slimtune_ckpt_auto")
    a = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from qlora_8b import write_random_checkpoint

    from slimtune.data import sample_path
    from slimtune.models.shapes import get_shape
    from slimtune.models.tiny import builtin_tokenizer
    from slimtune.train.config import load_config
    from slimtune.train.loop import train

    model = write_random_checkpoint(get_shape("llama3-1b"), Path(a.workdir) / "llama3-1b", "cuda")
    builtin_tokenizer().save_pretrained(str(model))
    free, _ = torch.cuda.mem_get_info()
    ballast = torch.empty(int(free - a.free_gib * 2**30), dtype=torch.uint8, device="cuda")
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    lines: list[str] = []
    cfg = load_config(None, [f"model={model}", f"data={sample_path()}", "method=lora", "rank=16", "alpha=16",
                             "targets=all-linear", f"max_length={a.seq}", f"batch_size={a.batch}",
                             f"max_steps={a.steps}", "grad_ckpt=true", "ckpt_blocks=auto", f"out_dir={a.workdir}/run",
                             "progress=false", "plot=false", "save_final=false", "seed=0"])
    s = train(cfg, log=lines.append)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    chosen = next((x for x in lines if x.startswith("ckpt_blocks=auto")), None)
    predicted = next((x for x in lines if "predicted" in x), None)
    res = {"free_gib": a.free_gib, "budget_gib": round(0.85 * a.free_gib, 2), "chosen": chosen,
           "prediction_line": predicted, "measured_peak_gib": round(peak, 2), "batch": a.batch, "seq": a.seq,
           "tokens_per_s": s.get("tokens_per_s"), "steps": a.steps, "device": torch.cuda.get_device_name()}
    del ballast
    print(json.dumps(res))
    Path(os.environ.get("OUT", "/tmp"), "ckpt_auto.json").write_text(json.dumps({**res, "log": lines}))


if __name__ == "__main__":
    main()
