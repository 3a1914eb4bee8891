"""Safetensors files and checkpoint folders, read tensor by tensor without a second copy, and written in shards.

File layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then the
data. Reading puts each tensor with one `readinto` straight into its final buffer; `tensor_index` + `read_tensor` read
single tensors (or row ranges of them) for streaming jobs. Writing splits a state dict into shards of at most
`max_shard_size` bytes, in the Hugging Face layout (model-0000i-of-0000n.safetensors + model.safetensors.index.json).
"""
from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from slimtune.errors import CheckpointError

# safetensors dtype codes (the file format's names)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DEFAULT_SHARD = 5 * 2**30  # bytes per shard, as transformers' save_pretrained
INDEX_NAME = "model.safetensors.index.json"


def read_safetensors_header(path: str | Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data begins.

    Raises:
        CheckpointError: a missing, truncated or malformed file (naming it).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes); re-download or re-save it")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8:
                raise CheckpointError(f"{path}: truncated safetensors file (header says {n} bytes, file has "
                                      f"{size}); re-download or re-save it")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found; the checkpoint is incomplete (re-download the missing "
                              "shard)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, its header needs {8 + n + end}); "
                              "re-download or re-save it")
    return header, 8 + n


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: the shards named by the index, or the single file.

    Raises:
        CheckpointError: a malformed index, a missing shard, or no weights at all.
    """
    index = folder / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index}: malformed index (needs a 'weight_map' object)") from None
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"{f}: shard named in {index.name} is missing; re-download it")
        return files
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).exists():
            return [folder / name]
    raise CheckpointError(f"{folder}: no model.safetensors, {INDEX_NAME} or pytorch_model.bin")


def _dtype(path: Path, name: str, code: str) -> torch.dtype:
    if code not in ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {code}")
    return ST_DTYPES[code]


def iter_tensors(folder: str | Path) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) for every tensor of a checkpoint folder, one at a time, read into fresh CPU memory.

    Each tensor is read with one `readinto` into its own buffer (no mmap, no second copy). `.bin` files are read
    only through `torch.load(weights_only=True)`.
    """
    for path in checkpoint_files(Path(folder)):
        if path.suffix == ".bin":
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            yield from sd.items()
            continue
        header, start = read_safetensors_header(path)
        with open(path, "rb", buffering=0) as f:
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                b, e = info["data_offsets"]
                t = torch.empty(info["shape"], dtype=_dtype(path, name, info["dtype"]))
                if e > b:
                    f.seek(start + b)
                    got = f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
                    if got != e - b:
                        raise CheckpointError(f"{path}: truncated while reading {name}; re-download or re-save it")
                yield name, t


@dataclass(frozen=True)
class TensorLoc:
    """Where one tensor lies in a safetensors file: its absolute byte range [start, end), dtype and shape."""
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def tensor_index(path: str | Path) -> dict[str, TensorLoc]:
    """Name -> `TensorLoc` for every tensor of a checkpoint folder (all shards) or of one .safetensors file.

    Only headers are read, so this is cheap for any model size; `read_tensor` then reads one tensor (or rows of it).

    Raises:
        CheckpointError: no weights, a .bin checkpoint (not readable tensor by tensor), a damaged header.
    """
    path = Path(path)
    files = [path] if path.is_file() else checkpoint_files(path)
    out: dict[str, TensorLoc] = {}
    for f in files:
        if f.suffix == ".bin":
            raise CheckpointError(f"{f}: a pytorch_model.bin cannot be read tensor by tensor; convert it to "
                                  "safetensors first (slimtune convert MODEL OUT)")
        header, start = read_safetensors_header(f)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            b, e = info["data_offsets"]
            out[name] = TensorLoc(f, _dtype(f, name, info["dtype"]), tuple(info["shape"]), start + b, start + e)
    return out


def read_tensor(loc: TensorLoc, rows: tuple[int, int] | None = None) -> Tensor:
    """Read one tensor, or only its rows [r0, r1) along dim 0 (contiguous in the file), into fresh memory.

    Raises:
        CheckpointError: the file is shorter than its header says.
    """
    shape = list(loc.shape)
    start, end = loc.start, loc.end
    if rows is not None and shape:
        row_bytes = (end - start) // max(shape[0], 1)
        r0, r1 = rows
        start, end = loc.start + r0 * row_bytes, loc.start + r1 * row_bytes
        shape[0] = r1 - r0
    t = torch.empty(shape, dtype=loc.dtype)
    if end > start:
        with open(loc.path, "rb", buffering=0) as f:
            f.seek(start)
            got = f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        if got != end - start:
            raise CheckpointError(f"{loc.path}: truncated while reading a tensor; re-download or re-save it")
    return t


# ---- writing --------------------------------------------------------------------------------------------------------
def split_shards(sd: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """Cut a state dict, in order, into shards of at most `max_bytes` (a larger single tensor gets its own shard)."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, t in sd.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = t
        size += n
    return shards


def write_shards(shards: list[dict[str, Tensor]], folder: Path) -> None:
    """Write the given shards (one dict of tensors each) in the Hugging Face layout, with an index if several."""
    from safetensors.torch import save_file

    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / fname), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def save_state_dict(sd: dict[str, Tensor], folder: Path, max_shard_size: int = DEFAULT_SHARD) -> None:
    """Write tensors as model.safetensors, or as model-0000i-of-0000n.safetensors + index above max_shard_size."""
    write_shards(split_shards(sd, max_shard_size), folder)
