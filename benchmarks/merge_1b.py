"""Time and peak resident memory of a streamed TIES merge of three random 1B-shape (llama3-1b, bf16) fine-tunes.

    python benchmarks/merge_1b.py [--shape llama3-1b] [--workdir /tmp/slimtune_merge] [--keep]
    python benchmarks/merge_1b.py --shape tiny          # smoke test, seconds

Writes a random base (normal(0, 0.02)) and three fine-tunes (base + normal(0, 0.002), own seeds) as sharded bf16
checkpoints, then runs `slimtune merge` (ties, densities 0.5/0.3/0.7) in a fresh process and prints one JSON line: the
merge's wall time, the RSS after imports (the baseline), the peak RSS (ru_maxrss), and peak - baseline, whose target
(issue 7) is < 2 GiB. The work folder (~12.5 GB for llama3-1b) is deleted afterwards unless --keep.
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, threading, time, psutil, torch
from slimtune.merge import load_config, merge
proc = psutil.Process()
base = proc.memory_info().rss
peak, done = [base], threading.Event()

def sample():  # ru_maxrss is kept, but also sample RSS every 10 ms in case a parent's peak leaked into ru_maxrss
    while not done.wait(0.01):
        peak[0] = max(peak[0], proc.memory_info().rss)

threading.Thread(target=sample, daemon=True).start()
t0 = time.time()
r = merge(load_config(sys.argv[1]), sys.argv[2], seed=0)
dt = time.time() - t0
done.set()
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline_rss": base, "peak_rss": maxrss, "peak_rss_sampled": peak[0], "merge_s": round(dt, 1),
                  "out_bytes": r["bytes"], "tensors": r["tensors"], "threads": torch.get_num_threads()}))
"""


def write_checkpoints(shape: str, root: Path, n: int = 3) -> list[Path]:
    """A base and n fine-tunes of it, written together tensor by tensor with slimtune's streaming shard writer."""
    import torch

    from slimtune.merge.stream import ShardWriter
    from slimtune.models.shapes import build_meta, get_shape

    cfg = get_shape(shape).replace(dtype="bfloat16")
    specs = [(k, tuple(p.shape), torch.bfloat16) for k, p in build_meta(cfg).state_dict().items()
             if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    folders = [root / f"m{i}" for i in range(n + 1)]
    writers = []
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
        (f / "config.json").write_text(json.dumps(cfg.to_hf()))
        writers.append(ShardWriter(f, specs, 2 * 10**9))
    gens = [torch.Generator().manual_seed(i) for i in range(n + 1)]
    for name, shp, _ in specs:
        base = torch.randn(shp, generator=gens[0]).mul_(0.02)
        writers[0].write(name, base.to(torch.bfloat16))
        for w, g in zip(writers[1:], gens[1:]):
            w.write(name, (base + torch.randn(shp, generator=g).mul_(0.002)).to(torch.bfloat16))
    for w in writers:
        w.close()
    return folders


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-1b")
    ap.add_argument("--workdir", default="/tmp/slimtune_merge")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and the output")
    a = ap.parse_args()
    root = Path(a.workdir) / a.shape
    try:
        if not (root / "m3" / "config.json").exists():  # in a child: ru_maxrss survives exec, so the parent stays small
            code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import merge_1b; " \
                   f"merge_1b.write_checkpoints({a.shape!r}, merge_1b.Path({str(root)!r}))"
            subprocess.run([sys.executable, "-c", code], check=True)
        doc = {"merge_method": "ties", "base_model": str(root / "m0"), "dtype": "bfloat16",
               "parameters": {"normalize": True},
               "models": [{"model": str(root / f"m{i}"), "parameters": {"weight": w, "density": d}}
                          for i, w, d in ((1, 0.5, 0.5), (2, 0.3, 0.3), (3, 0.2, 0.7))]}
        (root / "ties.yaml").write_text(json.dumps(doc))  # JSON is YAML
        disk = sum(f.stat().st_size for f in (root / "m1").glob("*.safetensors"))
        out = subprocess.run([sys.executable, "-c", CHILD, str(root / "ties.yaml"), str(root / "out")],
                             capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        extra = r["peak_rss"] - r["baseline_rss"]
        r.update(shape=a.shape, method="ties", models=3, checkpoint_bytes=disk, peak_minus_baseline=extra,
                 peak_minus_baseline_gib=round(extra / 2**30, 3), target_met=extra < 2 * 2**30)
        print(json.dumps(r))
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
