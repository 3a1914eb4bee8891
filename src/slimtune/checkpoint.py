"""Read and write Hugging Face checkpoint folders: config.json, safetensors (one file or shards), tokenizer files.

Loading builds the model on the `meta` device and assigns each tensor as it is read straight from the file into its
final buffer, so the weights are never held twice. A cast into a narrower format goes through the precision guard.
Saving writes into a temporary folder and renames it, so a failed save never leaves a half-written checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from slimtune.errors import CheckpointError, PrecisionError
from slimtune.models.config import ModelConfig

ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
               "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp8": torch.float8_e4m3fn, "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; recomputed here
DEFAULT_SHARD = 5 * 2**30


def parse_dtype(d: str | torch.dtype | None) -> torch.dtype | None:
    """'bf16' / 'bfloat16' / torch.bfloat16 -> torch.bfloat16; None or 'auto' -> None (the checkpoint's own)."""
    if d is None or isinstance(d, torch.dtype):
        return d
    if d == "auto":
        return None
    if d not in DTYPE_NAMES:
        raise CheckpointError(f"unknown dtype {d!r}; choose one of {', '.join(sorted(DTYPE_NAMES))} or auto")
    return DTYPE_NAMES[d]


# ---- precision guard ------------------------------------------------------------------------------------------------
def check_cast(name: str, t: Tensor, dtype: torch.dtype) -> None:
    """Refuse a cast of tensor `name` into `dtype` that would overflow to inf or flush the whole tensor to zero.

    Only casts into a narrower range are scanned (fp32/bf16 -> fp16, anything -> fp8); widening is always safe.

    Raises:
        PrecisionError: naming the tensor, its max |value| and a dtype that would hold it.
    """
    if not (t.is_floating_point() and dtype.is_floating_point) or t.numel() == 0:
        return
    src, dst = torch.finfo(t.dtype), torch.finfo(dtype)
    if dst.max >= src.max and dst.smallest_normal <= src.smallest_normal:
        return
    a = t.detach().abs()
    amax = a.max().float().item()
    if not math.isfinite(amax):
        raise PrecisionError(f"tensor {name} already holds NaN or inf; the checkpoint is damaged")
    if amax > dst.max:
        holder = "bfloat16" if amax <= torch.finfo(torch.bfloat16).max else "float32"
        raise PrecisionError(f"tensor {name}: max |value| {amax:.6g} overflows {str(dtype)[6:]} (max {dst.max:.6g}); "
                             f"load it as {holder} instead, or pass --force to cast anyway")
    tiny = dst.smallest_normal * dst.eps  # the smallest subnormal; below half of it a value rounds to 0
    if amax > 0 and amax < tiny / 2:
        raise PrecisionError(f"tensor {name}: every value (max |value| {amax:.3g}) would flush to zero in "
                             f"{str(dtype)[6:]}; load it as float32 instead, or pass --force")


# ---- reading safetensors --------------------------------------------------------------------------------------------
def read_safetensors_header(path: str | Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data begins.

    Layout: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}}, then data.

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
    """The weight files of a checkpoint folder: the shards named by the index, or the single file."""
    index = folder / "model.safetensors.index.json"
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
    raise CheckpointError(f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def iter_tensors(folder: str | Path, device: str | torch.device = "cpu") -> Iterator[tuple[str, Tensor]]:
    """Yield (name, tensor) for every tensor of a checkpoint folder, one at a time, read into fresh memory.

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
                if info["dtype"] not in ST_DTYPES:
                    raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
                b, e = info["data_offsets"]
                t = torch.empty(info["shape"], dtype=ST_DTYPES[info["dtype"]])
                if e > b:
                    f.seek(start + b)
                    buf = memoryview(t.reshape(-1).view(torch.uint8).numpy())
                    got = f.readinto(buf)
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
            if info["dtype"] not in ST_DTYPES:
                raise CheckpointError(f"{f}: tensor {name} has unsupported dtype {info['dtype']}")
            b, e = info["data_offsets"]
            out[name] = TensorLoc(f, ST_DTYPES[info["dtype"]], tuple(info["shape"]), start + b, start + e)
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


def resolve(path: str | Path) -> Path:
    """A local model folder; a hub id (org/name) goes through huggingface_hub's cache when a network exists."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: is a file; pass the model folder that holds config.json")
    s = str(path)
    if s.count("/") == 1 and not s.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(s, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
        except Exception as e:  # network or auth: the user's environment, not a bug
            raise CheckpointError(f"{s}: not a local folder, and the Hugging Face hub could not be reached "
                                  f"({type(e).__name__}); download it first or pass a local folder") from None
    raise CheckpointError(f"{p}: model folder not found; pass a Hugging Face model folder, a hub id, or 'builtin'")


# ---- loading --------------------------------------------------------------------------------------------------------
def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               force: bool = False, quantize: str | None = None, group_size: int | None = None,
               double_quant: bool | None = None, quant_skip: tuple[str, ...] = ("lm_head",)):
    """Load a Hugging Face checkpoint folder (or 'builtin') into a `Decoder`.

    Args:
        path: a folder with config.json and safetensors, a hub id, or 'builtin' (the tiny built-in model).
        dtype: None or 'auto' keeps the checkpoint's declared torch_dtype; otherwise cast (precision-guarded).
        device: where the weights go; each tensor is moved as it is read.
        force: cast even when the precision guard refuses.
        quantize: a `slimtune.quant` format (nf4 for QLoRA, int8, int4, ...): each linear weight but `quant_skip`
            is quantized on `device` as soon as it is read, so the 16-bit model is never in memory at once (peak:
            the quantized model plus one 16-bit tensor). double_quant defaults to True for nf4/fp4.
    Returns:
        (model, config), the model in eval mode.
    Raises:
        CheckpointError: missing folder or shard, truncated file, unsupported architecture, name/shape mismatch.
        PrecisionError: a tensor that the requested dtype cannot hold (unless force).
    """
    from slimtune.models.decoder import Decoder
    from slimtune.models.tiny import BUILTIN_NAMES, builtin_model

    dtype = parse_dtype(dtype)
    if str(path) in BUILTIN_NAMES:
        model = builtin_model(0)
        if dtype is not None:
            model.config.dtype = str(dtype)[6:]
        model = model.to(device=device, dtype=dtype).eval()
        if quantize:
            from slimtune.quant.linear import quantize_model

            quantize_model(model, quantize, group_size, double_quant, skip=quant_skip)
        return model, model.config
    folder = resolve(path)
    cfg = ModelConfig.from_file(folder / "config.json")
    qc = cfg.hf.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "slimtune":  # written by `slimtune quantize`
        from slimtune.quant.ptq import load_quantized

        return load_quantized(folder, cfg, dtype, device, force)
    target = dtype or cfg.torch_dtype
    cfg.dtype = str(target)[6:]
    with torch.device("meta"):
        model = Decoder(cfg)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    quantized: set[str] = set()  # names of linear modules to quantize while loading
    if quantize:
        from slimtune.quant.linear import QuantLinear, linear_names

        quantized = set(linear_names(model, tuple(quant_skip)))
        if double_quant is None:
            double_quant = quantize in ("nf4", "fp4")  # QLoRA's default
    sd: dict[str, Tensor] = {}
    for name, t in iter_tensors(folder):
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name not in expected:
            raise CheckpointError(f"{folder}: tensor {name} is not part of a {cfg.model_type} model of this config "
                                  "(is config.json from another model?)")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{folder}: tensor {name} has shape {tuple(t.shape)}, config.json implies "
                                  f"{tuple(expected[name].shape)}")
        if t.is_floating_point() and t.dtype != target:
            if not force:
                check_cast(name, t, target)
            t = t.to(target)
        module, _, leaf = name.rpartition(".")
        if module in quantized and leaf == "weight":
            lin = model.get_submodule(module)
            q = QuantLinear.from_weight(t.to(device), None, quantize, group_size, double_quant, name)
            if lin.bias is not None:  # the bias (read before or after) stays 16-bit and loads below
                q.bias = torch.nn.Parameter(torch.empty_like(lin.bias, dtype=target), requires_grad=False)
            model.set_submodule(module, q)
            sd.update({f"{module}.{k}": v for k, v in q.state_dict().items() if k != "bias"})  # packed + scales
            continue
        sd[name] = t.to(device)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
        expected.pop("lm_head.weight")
    missing = [k for k in expected if k not in sd]
    if missing:
        raise CheckpointError(f"{folder}: tensor {missing[0]} is missing ({len(missing)} missing in all); the "
                              "checkpoint is incomplete or of another architecture")
    model.load_state_dict(sd, assign=True, strict=not (cfg.tie_word_embeddings or quantized))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval(), cfg


def load_tokenizer(path: str | Path):
    """The tokenizer of a model folder (transformers AutoTokenizer, local files, no remote code), or the built-in one.

    Raises:
        CheckpointError: the folder has no tokenizer files.
    """
    from slimtune.models.tiny import BUILTIN_NAMES, builtin_tokenizer

    if str(path) in BUILTIN_NAMES:
        return builtin_tokenizer()
    folder = resolve(path)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise CheckpointError(f"{folder}: no tokenizer files (tokenizer.json or tokenizer.model); copy them from "
                              "the original model folder")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)


# ---- saving ---------------------------------------------------------------------------------------------------------
def _shards(sd: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
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


def write_folder_atomically(path: Path, fill) -> Path:
    """Call fill(tmpdir) and then move tmpdir to `path`, replacing what was there only once fill succeeded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        fill(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def save_state_dict(sd: dict[str, Tensor], folder: Path, max_shard_size: int = DEFAULT_SHARD) -> None:
    """Write tensors as model.safetensors, or as model-0000i-of-0000n.safetensors + index above max_shard_size."""
    write_shards(_shards(sd, max_shard_size), folder)


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
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_model(model, path: str | Path, dtype: str | torch.dtype | None = None,
               max_shard_size: int = DEFAULT_SHARD, tokenizer=None, tokenizer_dir: str | Path | None = None,
               force: bool = False) -> Path:
    """Save a `Decoder` as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads.

    Args:
        model: the decoder (its `config` supplies config.json).
        path: output folder; written atomically (a failed save leaves the old folder as it was).
        dtype: cast the weights (precision-guarded) and declare it as torch_dtype; default: as they are.
        max_shard_size: bytes per safetensors shard; above it, shards plus model.safetensors.index.json.
        tokenizer: a transformers tokenizer to save beside, or tokenizer_dir: a folder whose tokenizer files to copy.
    """
    dtype = parse_dtype(dtype)
    cfg = model.config
    sd = {}
    for k, t in model.state_dict().items():
        if cfg.tie_word_embeddings and k == "lm_head.weight":
            continue  # tied: transformers re-ties it from the embeddings
        t = t.detach()
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            if not force:
                check_cast(k, t, dtype)
            t = t.to(dtype)
        sd[k] = t.to("cpu").contiguous()
    out_dtype = dtype or next(iter(sd.values())).dtype
    hf = cfg.replace(dtype=str(out_dtype)[6:]).to_hf()

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        save_state_dict(sd, tmp, max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        elif tokenizer_dir is not None:
            copy_tokenizer_files(Path(tokenizer_dir), tmp)

    return write_folder_atomically(Path(path), fill)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "chat_template.jinja", "generation_config.json")


def copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
