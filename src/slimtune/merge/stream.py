"""Run a merge tensor by tensor: read each tensor's rows from every input's safetensors, merge, and write them straight
into pre-planned safetensors shards, so peak memory is a few row chunks, never a model.

Inputs are checkpoint folders or PEFT LoRA adapters on the base (their full update scale * B @ A is that model's
delta). Everything is validated before the first byte is written (`plan.py`), and the output folder appears only
when complete, with its config.json (layer count, vocabulary size) and tokenizer (`tokenizer.py`).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from slimtune.errors import ConfigError
from slimtune.io.folders import write_folder_atomically
from slimtune.io.safetensors import DEFAULT_SHARD, ST_DTYPES, read_tensor, split_shards
from slimtune.precision.guard import check_cast, check_finite
from slimtune.merge.config import MergeConfig
from slimtune.merge.context import CHUNK_ELEMS
from slimtune.merge.lora import write_adapter
from slimtune.merge.plan import Plan, plan_merge
from slimtune.merge.tensor import merge_tensor
from slimtune.merge.tokenizer import build_vocab, write_tokenizer

ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


# ---- writing safetensors shards as the chunks arrive ----------------------------------------------------------------
class ShardWriter:
    """Write tensors of known names, shapes and dtypes into safetensors shards, chunk by chunk, in plan order.

    The headers (with every data offset) are written first, since all shapes are known; then each tensor's bytes are
    appended as they are produced. Same shard split and names as `save_state_dict`, plus the index for > 1 shard.
    """

    def __init__(self, folder: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int,
                 prefix: str = "model"):
        meta = {n: torch.empty(s, dtype=d, device="meta") for n, s, d in specs}
        shards = split_shards(meta, max_bytes)
        self.files, self.where, weight_map, total = [], {}, {}, 0
        for i, shard in enumerate(shards):
            fname = (f"{prefix}.safetensors" if len(shards) == 1 else
                     f"{prefix}-{i + 1:05d}-of-{len(shards):05d}.safetensors")
            header, off = {}, 0
            for n, t in shard.items():
                nb = t.numel() * t.element_size()
                header[n] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nb]}
                self.where[n] = (len(self.files), nb)
                weight_map[n] = fname
                off += nb
                total += nb
            header["__metadata__"] = {"format": "pt"}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the data must start 8-byte aligned
            f = open(folder / fname, "wb")
            f.write(len(raw).to_bytes(8, "little") + raw)
            self.files.append(f)
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        self.names = [n for n, _, _ in specs]

    def write(self, name: str, chunk: Tensor) -> None:
        f, _ = self.where[name]
        self.files[f].write(memoryview(chunk.contiguous().reshape(-1).view(torch.uint8).numpy()))

    def close(self) -> None:
        for f in self.files:
            f.close()


NOT_WRITTEN = "the merge would write NaN or inf (a NaN input, or a weight of NaN / inf); nothing was written"


def _write_tensors(tmp: Path, plan: Plan, names: list[str], seed: int, shard_size: int, chunk: int, bar) -> None:
    def out_dtype(name: str) -> torch.dtype:
        return plan.out_dtype or plan.jobs[name].dtype

    writer = ShardWriter(tmp, [(n, plan.jobs[n].shape, out_dtype(n)) for n in names], shard_size)
    try:
        for n in names:
            job, dt = plan.jobs[n], out_dtype(n)
            if not job.dtype.is_floating_point:  # integer buffers: the base's (or first input's), unchanged
                src = job.base or job.members[0]
                writer.write(n, read_tensor(src.input.index[src.name]))
            else:
                for c in merge_tensor(plan, n, seed, chunk):
                    check_finite(n, c, fix=NOT_WRITTEN)
                    if dt != torch.float32:
                        check_cast(n, c, dt)
                    writer.write(n, c.to(dt))
            bar.update(1)
    finally:
        writer.close()


def merge(cfg: MergeConfig, out: str | Path, seed: int = 0, shard_size: int = DEFAULT_SHARD,
          adapter_rank: int | None = None, progress: bool = False, chunk: int = CHUNK_ELEMS) -> dict:
    """Merge as `cfg` says and write a Hugging Face folder (or, with adapter_rank, a PEFT LoRA adapter) to `out`.

    Args:
        cfg: the parsed config (`load_config`).
        out: output folder, written atomically (nothing is left behind on an error); may not be an input folder.
        seed: the global seed of random drops (DARE, DELLA): each tensor's mask derives from it and the tensor's name.
        shard_size: bytes per safetensors shard.
        adapter_rank: write the merged update (merged - base) of the adapters' target modules as a rank-r LoRA.
        progress: show a tqdm bar over tensors on stderr.
        chunk: elements per row chunk (memory knob).
    Returns:
        A summary: out, method, models, tensors, layers, bytes, seconds, files, notes.
    Raises:
        CheckpointError, ConfigError, PrecisionError: bad input, before anything is written where it can be seen.
    """
    from tqdm import tqdm

    t0 = time.time()
    plan = plan_merge(cfg, adapter_out=adapter_rank is not None)
    if cfg.tokenizer is not None:
        plan.vocab = build_vocab(plan)
    out = Path(out)
    for x in [plan.base, *plan.inputs.values()]:
        if out.resolve() == x.folder.resolve() or (x.lora and out.resolve() == x.lora.folder.resolve()):
            raise ConfigError(f"output folder {out} is one of the inputs ({x.label}); choose a new folder")
    if adapter_rank is not None:
        names = [n for n in plan.names if any(x.lora and n in x.lora.targets for x in plan.inputs.values())]
    else:
        names = plan.names

    def fill(tmp: Path) -> None:
        bar = tqdm(total=len(names), unit="tensor", file=sys.stderr, disable=not progress, desc="merge")
        try:
            if adapter_rank is not None:
                write_adapter(tmp, plan, names, adapter_rank, seed, merge_tensor, bar, shard_size)
                return
            _write_tensors(tmp, plan, names, seed, shard_size, chunk, bar)
            hf = dict(plan.hf)
            if plan.out_dtype is not None:
                hf["torch_dtype"] = str(plan.out_dtype)[6:]
                hf.pop("dtype", None)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2))
            write_tokenizer(plan, tmp)
        finally:
            bar.close()

    write_folder_atomically(out, fill)
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"out": str(out), "method": cfg.merge_method, "models": len(cfg.models), "tensors": len(names),
            "layers": plan.num_layers, "bytes": size, "seconds": round(time.time() - t0, 2), "files": files,
            "notes": plan.notes}
