"""Peak resident memory of loading a random 1B-shape bf16 checkpoint, against its size on disk.

    python benchmarks/load_memory.py [--shape llama3-1b] [--workdir /tmp/slimtune_load]

Writes the checkpoint once (sharded, 1 GB shards), then loads it with `slimtune.checkpoint.load_model` in a fresh
process and prints one JSON line: bytes on disk, peak RSS of the loading process, RSS before loading (interpreter +
torch), and the ratios. The target (issue 2) is peak RSS <= 1.3 x the checkpoint's size. Run it twice: Linux
carries ru_maxrss across exec, so the first run's child may report the parent's peak from writing the checkpoint.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time, psutil, torch
from slimtune.models.load import load_model
base = psutil.Process().memory_info().rss
t0 = time.time()
model, cfg = load_model(sys.argv[1])
dt = time.time() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
n = sum(p.numel() for p in model.parameters())
print(json.dumps({"baseline_rss": base, "peak_rss": peak, "load_s": round(dt, 2), "params": n}))
"""


def write_checkpoint(shape: str, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from slimtune.models.shapes import build_meta, get_shape

    cfg = get_shape(shape)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.replace(dtype="bfloat16").to_hf()))
    model = build_meta(cfg)
    g = torch.Generator().manual_seed(0)
    shard, size, files, weight_map = {}, 0, [], {}

    def flush():
        nonlocal shard, size
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        files.append(name)
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for k, p in model.state_dict().items():
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue
        t = torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02).to(torch.bfloat16)
        shard[k] = t
        size += t.numel() * 2
        if size > 1e9:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-1b")
    ap.add_argument("--workdir", default="/tmp/slimtune_load")
    a = ap.parse_args()
    folder = Path(a.workdir) / a.shape
    if not (folder / "model.safetensors.index.json").exists():
        write_checkpoint(a.shape, folder)
    disk = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r.update(shape=a.shape, disk_bytes=disk, peak_over_disk=round(r["peak_rss"] / disk, 3),
             peak_minus_baseline_over_disk=round((r["peak_rss"] - r["baseline_rss"]) / disk, 3))
    print(json.dumps(r))


if __name__ == "__main__":
    main()
