"""Safetensors files and checkpoint folders, read tensor by tensor without a second copy, and written in shards.

File layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then the
data. Reading puts each tensor with one `readinto` straight into its final buffer; `tensor_index` + `read_tensor` read
single tensors (or row ranges of them) for streaming jobs. Writing splits a state dict into shards of at most
`max_shard_size` bytes, in the Hugging Face layout (model-0000i-of-0000n.safetensors + model.safetensors.index.json).
"""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from slimtune.errors import CheckpointError
from slimtune.io.jsonfile import parse_json, read_json

# safetensors dtype codes (the file format's names)
ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DEFAULT_SHARD = 5 * 2**30  # bytes per shard, as transformers' save_pretrained
INDEX_NAME = "model.safetensors.index.json"
MAX_HEADER = 100_000_000  # bytes; the safetensors library refuses larger headers too


def read_safetensors_header(path: str | Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data begins, checked (`check_header`).

    Raises:
        CheckpointError: a missing, truncated or malformed file (naming it, and the tensor at fault).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes); re-download or re-save it")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > MAX_HEADER:
                raise CheckpointError(f"{path}: truncated safetensors file (header says {n} bytes, file has "
                                      f"{size}); re-download or re-save it")
            text = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found; the checkpoint is incomplete (re-download the missing "
                              "shard)") from None
    try:
        header = parse_json(text, str(path))
    except CheckpointError:
        raise CheckpointError(f"{path}: not a safetensors file (unreadable header); re-download or re-save "
                              "it") from None
    check_header(path, header, size - 8 - n)
    return header, 8 + n


def check_header(path: Path, header: object, data_size: int) -> None:
    """A safetensors header must be an object of {name: {dtype, shape, data_offsets}} (plus a string-to-string
    `__metadata__`): known dtypes, shapes of non-negative integers, offsets [begin, end) of exactly shape x itemsize
    bytes that neither overlap nor run past the data.

    Raises:
        CheckpointError: naming the file, the tensor and what is wrong with it.
    """
    fix = "the file is damaged; re-download or re-save it"
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object); {fix}")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings; {fix}")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise CheckpointError(f"{path}: tensor {name}: header entry is not an object; {fix}")
        shape, offs = info.get("shape"), info.get("data_offsets")
        dtype = _dtype(path, name, info.get("dtype"))
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{path}: tensor {name}: shape {shape!r} is not a list of non-negative integers; "
                                  f"{fix}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise CheckpointError(f"{path}: tensor {name}: data_offsets {offs!r} is not [begin, end] with "
                                  f"0 <= begin <= end; {fix}")
        need = math.prod(shape) * dtype.itemsize
        if offs[1] - offs[0] != need:
            raise CheckpointError(f"{path}: tensor {name}: data_offsets span {offs[1] - offs[0]} bytes, its shape "
                                  f"{shape} and dtype need {need}; {fix}")
        if offs[1] > data_size:
            raise CheckpointError(f"{path}: truncated safetensors file (tensor {name} ends at byte {offs[1]} of the "
                                  f"data, which has {data_size}); re-download or re-save it")
        spans.append((offs[0], offs[1], name))
    spans.sort()
    for (_, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise CheckpointError(f"{path}: tensors {n0} and {n1} overlap in the file; {fix}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def checkpoint_files(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: the shards named by the index, or the single file.

    Raises:
        CheckpointError: a malformed index, a missing shard, no weights at all, or only a pickle file (.bin).
    """
    index = folder / INDEX_NAME
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: malformed index (needs a 'weight_map' object of tensor name: shard file "
                                  "name); re-download it")
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if f.parent != folder or not f.name.endswith(".safetensors"):
                raise CheckpointError(f"{index}: shard {f.relative_to(folder)} is not a .safetensors file in this "
                                      "folder; re-download the index")
            if not f.exists():
                raise CheckpointError(f"{f}: shard named in {index.name} is missing; re-download it")
        return files
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins:
        raise CheckpointError(refuse_pickle(bins[0]))
    raise CheckpointError(f"{folder}: no model.safetensors or {INDEX_NAME}; pass a Hugging Face model folder")


def refuse_pickle(path: Path) -> str:
    """The refusal of a pickle checkpoint: slimtune reads safetensors only, and converts a trusted .bin once."""
    return (f"{path}: a pickle checkpoint; slimtune reads only safetensors, since loading a pickle can run code. "
            f"If you trust where it came from, convert it once: slimtune convert {path.parent} NEW_FOLDER "
            "--trust-pickle")


def read_pickle_checkpoint(folder: Path) -> Iterator[tuple[str, Tensor]]:
    """The tensors of a trusted pytorch_model*.bin folder (new zip or legacy format), through torch's weights-only
    unpickler: plain tensors only, nothing else is constructed. Only `slimtune convert --trust-pickle` calls this.

    Raises:
        CheckpointError: no .bin file, or one that holds anything but a flat dict of tensors.
    """
    import warnings
    import zipfile

    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(f"{folder}: no pytorch_model.bin to convert")
    for path in bins:
        try:
            with warnings.catch_warnings():  # torch's notes on pickle protocols: the refusal below says enough
                warnings.simplefilter("ignore")
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as e:  # the unpickler refuses what is not a tensor; torch's message advises what we won't
            kind = type(e).__name__
            raise CheckpointError(f"{path}: holds objects other than tensors, or is damaged ({kind}); slimtune will "
                                  "not unpickle it; save its tensors with safetensors where it was made") from None
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
            raise CheckpointError(f"{path}: not a flat dict of tensors (a state_dict); slimtune reads no other pickle")
        yield from sd.items()


def _dtype(path: Path, name: str, code: object) -> torch.dtype:
    if not isinstance(code, str) or code not in ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {code}")
    return ST_DTYPES[code]


def iter_tensors(folder: str | Path, trust_pickle: bool = False) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) for every tensor of a checkpoint folder, one at a time, read into fresh CPU memory.

    Each tensor is read with one `readinto` into its own buffer (no mmap, no second copy). Pickle files (.bin) are
    refused, unless `trust_pickle` (`slimtune convert --trust-pickle`) and the folder has no safetensors: then
    `read_pickle_checkpoint` reads them.
    """
    folder = Path(folder)
    if trust_pickle and not (folder / "model.safetensors").exists() and not (folder / INDEX_NAME).exists():
        yield from read_pickle_checkpoint(folder)
        return
    for path in checkpoint_files(folder):
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
            raise CheckpointError(refuse_pickle(f))
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


def write_safetensors(tensors: dict[str, Tensor], path: Path) -> None:
    """One safetensors file (metadata format=pt). A failed write (disk full, permission denied) is an OSError naming
    `path` (the safetensors library reports it as its own error type, without the path)."""
    import errno
    import re

    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as e:
        m = re.search(r"os error (\d+)", str(e))
        code = int(m.group(1)) if m else errno.EIO
        raise OSError(code, os.strerror(code), str(path)) from None


def write_shards(shards: list[dict[str, Tensor]], folder: Path) -> None:
    """Write the given shards (one dict of tensors each) in the Hugging Face layout, with an index if several."""
    if len(shards) == 1:
        write_safetensors(shards[0], folder / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(shard, folder / fname)
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2))


def save_state_dict(sd: dict[str, Tensor], folder: Path, max_shard_size: int = DEFAULT_SHARD) -> None:
    """Write tensors as model.safetensors, or as model-0000i-of-0000n.safetensors + index above max_shard_size."""
    write_shards(split_shards(sd, max_shard_size), folder)
