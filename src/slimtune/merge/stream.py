"""Run a merge tensor by tensor: read each tensor's rows from every input's safetensors, merge, and write them straight
into pre-planned safetensors shards, so peak memory is a few row chunks, never a model.

Inputs are checkpoint folders or PEFT LoRA adapters on the base (their full update scale * B @ A is that model's
delta). Everything is validated before the first byte is written, and the output folder appears only when complete.
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from slimtune.io.folders import write_folder_atomically
from slimtune.io.hub import resolve
from slimtune.io.safetensors import DEFAULT_SHARD, ST_DTYPES, TensorLoc, read_tensor, split_shards, tensor_index
from slimtune.models.load import IGNORED_SUFFIXES
from slimtune.models.save import copy_tokenizer_files
from slimtune.precision.formats import parse_dtype
from slimtune.io.jsonfile import read_json
from slimtune.precision.guard import check_cast, check_finite, require_float
from slimtune.errors import CheckpointError, ConfigError
from slimtune.merge import methods as M
from slimtune.merge.config import MergeConfig
from slimtune.merge.lora import Lora, load_lora, write_adapter

NOT_WRITTEN = "the merge would write NaN or inf (a NaN input, or a weight of NaN / inf); nothing was written"
CHUNK_ELEMS = 2**23  # rows are read and merged in chunks of about this many elements (32 MiB in fp32)
SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings")
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


@dataclass
class Input:
    label: str  # "models[i] (PATH)", for messages
    folder: Path  # the checkpoint holding its tensors (an adapter's base)
    index: dict[str, TensorLoc]
    hf: dict  # config.json
    lora: Lora | None = None

    def rows(self, name: str, span: tuple[int, int] | None, base_rows: Tensor | None) -> Tensor:
        """fp32 rows [r0, r1) of tensor `name` (the whole tensor when span is None)."""
        if self.lora is None:
            return read_tensor(self.index[name], span).float()
        return self.lora.apply(name, span, base_rows)


@dataclass
class Plan:
    cfg: MergeConfig
    base: Input  # supplies config.json, the tokenizer and the output tensor names
    inputs: list[Input]  # one per cfg.models entry
    names: list[str]
    num_layers: int
    out_dtype: torch.dtype | None
    notes: list[str] = field(default_factory=list)


def _open(path: str, label: str, cfg_source: str) -> tuple[Path, dict, dict[str, TensorLoc]]:
    folder = _find(path, cfg_source)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{label}: {folder} has no config.json; pass a Hugging Face model folder")
    hf = read_json(folder / "config.json")
    index = {k: v for k, v in tensor_index(folder).items() if not k.endswith(IGNORED_SUFFIXES)}
    return folder, hf, index


def _find(path: str, cfg_source: str) -> Path:
    """A path as written in the config: relative to the working directory, else to the config file's folder."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (Path(cfg_source).parent / p).exists():
        return Path(cfg_source).parent / p
    return resolve(path)


def plan_merge(cfg: MergeConfig, adapter_out: bool = False) -> Plan:
    """Open every input and check that they can be merged, reading only headers and config files.

    Raises:
        CheckpointError: a missing folder or file, a different architecture or shape, a missing or extra tensor.
        ConfigError: an adapter without a base, slerp t out of range for a tensor, a bad dtype.
    """
    src = cfg.source
    base_path = cfg.base_model
    if base_path is None:  # linear without base_model: the first model (or the first adapter's base) is the reference
        first = cfg.models[0].model
        base_path = first.split("+")[0] if "+" in first and not Path(first).exists() else first
    if (_find(base_path, src) / "adapter_config.json").exists():
        what = f"base_model {base_path}" if cfg.base_model else f"models[0] ({base_path})"
        raise ConfigError(f"{src}: {what} is a LoRA adapter; give base_model: the model the adapters were trained on")
    bfolder, bhf, bindex = _open(base_path, f"base_model ({base_path})", src)
    base = Input(f"base_model ({base_path})", bfolder, bindex, bhf)
    inputs = []
    for i, e in enumerate(cfg.models):
        label = f"models[{i}] ({e.model})"
        path, adapter = e.model, None
        if "+" in path and not Path(path).exists():  # mergekit's BASE+ADAPTER
            path, adapter = path.split("+", 1)
        elif (_find(path, src) / "adapter_config.json").exists():
            path, adapter = base_path, path
        if adapter is not None:
            if _find(path, src).resolve() != bfolder.resolve():
                raise ConfigError(f"{src}: {label}: adapter on {path}, but the base model is {base_path}; all "
                                  "adapters must be on the base model")
            lora = load_lora(_find(adapter, src), label)
            lora.check(bindex, label)
            inputs.append(Input(label, bfolder, bindex, bhf, lora))
            continue
        folder, hf, index = _open(path, label, src)
        _same_architecture(base, hf, label)
        _same_tensors(base, index, label)
        inputs.append(Input(label, folder, index, hf))
    num_layers = int(bhf.get("num_hidden_layers") or 1)
    for i, e in enumerate(cfg.models):
        if e.layer_range is not None and tuple(e.layer_range) != (0, num_layers):
            raise ConfigError(f"{src}: models[{i}] layer_range {list(e.layer_range)} must cover all {num_layers} "
                              f"layers ([0, {num_layers}]); layer stacking is not supported")
    if adapter_out:
        full = [x.label for x, e in zip(inputs, cfg.models) if x.lora is None and not cfg.is_base(e)]
        if full:
            raise ConfigError(f"{src}: --adapter-rank writes the merge as an adapter, which needs every model to be "
                              f"a LoRA adapter on the base; {full[0]} is a full model")
    out_dtype = parse_dtype(cfg.out_dtype or cfg.dtype)
    if out_dtype is not None:
        require_float(out_dtype, f"{src}: out_dtype {out_dtype}")
    notes = list(cfg.notes) + ["computed in float32"]
    return Plan(cfg, base, inputs, list(bindex), num_layers, out_dtype, notes)


def _same_architecture(base: Input, hf: dict, label: str) -> None:
    if hf.get("model_type") != base.hf.get("model_type"):
        raise CheckpointError(f"{label}: model_type {hf.get('model_type')!r} differs from {base.label}'s "
                              f"{base.hf.get('model_type')!r}; only models of one architecture can be merged")
    for k in SHAPE_KEYS:
        if hf.get(k) != base.hf.get(k):
            raise CheckpointError(f"{label}: config.json {k} = {hf.get(k)!r} differs from {base.label}'s "
                                  f"{base.hf.get(k)!r}; only models of the same shape can be merged")


def _same_tensors(base: Input, index: dict[str, TensorLoc], label: str) -> None:
    for name, loc in base.index.items():
        if name not in index:
            raise CheckpointError(f"{label}: tensor {name} is missing ({base.label} has it); the checkpoint is "
                                  "incomplete or of another model")
        if index[name].shape != loc.shape:
            raise CheckpointError(f"{label}: tensor {name} has shape {list(index[name].shape)}, {base.label} has "
                                  f"{list(loc.shape)}")
    for name in index:
        if name not in base.index:
            raise CheckpointError(f"{label}: has tensor {name} that {base.label} does not; merging needs the same "
                                  "tensor names")


# ---- merging one tensor -------------------------------------------------------------------------------------------
def _spans(shape: tuple[int, ...], chunk: int) -> list[tuple[int, int] | None]:
    if len(shape) == 0:
        return [None]
    rows = shape[0]
    row = max(1, (torch.Size(shape).numel() // rows) if rows else 1)
    per = max(1, chunk // row)
    return [(r, min(r + per, rows)) for r in range(0, rows, per)] or [(0, 0)]


def merge_tensor(plan: Plan, name: str, seed: int, chunk: int = CHUNK_ELEMS):
    """Yield the merged tensor `name` in fp32 row chunks (in order), following the plan's method and parameters."""
    cfg, L = plan.cfg, plan.num_layers
    loc = plan.base.index[name]
    spans = _spans(loc.shape, chunk)
    numel = torch.Size(loc.shape).numel()
    row = numel // loc.shape[0] if loc.shape and loc.shape[0] else 1
    method = cfg.merge_method
    if method == "linear":
        members = list(range(len(cfg.models)))
    else:  # the base's own entry adds a zero delta (mergekit skips it); slerp keeps the one other model
        members = [i for i, e in enumerate(cfg.models) if not cfg.is_base(e)]
    need_base = method != "linear" or any(plan.inputs[i].lora for i in members)
    cache: dict = {}

    def load(span):
        """(base rows or None, [rows of each member]) for one span, kept for a second pass over the same span."""
        if span not in cache:
            cache.clear()
            b = read_tensor(loc, span).float() if need_base else None
            cache[span] = (b, [plan.inputs[i].rows(name, span, b) for i in members])
        return cache[span]

    if method == "linear":
        w = [cfg.value("weight", name, L, i) for i in members]
        norm = cfg.value("normalize", name, L)
        if norm and abs(sum(w)) < 1e-8:
            raise ConfigError(f"{cfg.source}: the weights for {name} sum to {sum(w):g}, and normalize divides by "
                              "that sum; fix: weights that do not cancel, or normalize: false")
        for s in spans:
            yield M.linear(load(s)[1], w, norm)
        return
    if method == "slerp":
        t = cfg.value("t", name, L)
        if not 0 <= t <= 1:
            raise ConfigError(f"{cfg.source}: t = {t} for {name} is outside [0, 1]")
        dot = n0 = n1 = 0.0
        for s in spans:  # pass 1: the angle between the whole tensors, accumulated in float64
            b, (m,) = load(s)
            b64, m64 = b.double(), m.double()
            dot += float((b64 * m64).sum())
            n0 += float((b64 * b64).sum())
            n1 += float((m64 * m64).sum())
        s0, s1 = M.slerp_factors(t, dot, n0 ** 0.5, n1 ** 0.5)
        for s in spans:
            b, (m,) = load(s)
            yield b * s0 + m * s1
        return
    # task_arithmetic, ties, dare_linear, dare_ties
    w = [cfg.value("weight", name, L, i) for i in members]
    dens = [cfg.value("density", name, L, i) or 1.0 for i in members]
    for i, d in zip(members, dens):
        if not 0 < d <= 1:
            raise ConfigError(f"{cfg.source}: density {d} for {name} in models[{i}] is outside (0, 1]")
    norm, lam = cfg.value("normalize", name, L), cfg.value("lambda", name, L)
    consensus = method in ("ties", "dare_ties")
    thresholds = [None] * len(members)
    if method == "ties":
        trim = [j for j, d in enumerate(dens) if M.trim_count(d, numel) is not None]
        if trim:  # pass 1 (twice over the chunks): each model's exact k-th largest |delta|

            def passes():
                for s in spans:
                    b, ms = load(s)
                    yield [(ms[j] - b).abs_() for j in trim]

            for j, thr in zip(trim, M.topk_thresholds(passes, [M.trim_count(dens[j], numel) for j in trim])):
                thresholds[j] = thr
    for s in spans:
        b, ms = load(s)
        deltas = []
        for j, (i, m) in enumerate(zip(members, ms)):
            d = m - b
            if thresholds[j] is not None:
                d = d * (d.abs() >= thresholds[j])
            elif method.startswith("dare") and dens[j] < 1:
                start = s[0] * row if s else 0
                keep = M.dare_keep(seed, f"{name}#{i}", numel, start, d.numel(), dens[j])
                d = M.dare_drop(d, keep, dens[j], cfg.value("rescale", name, L))
            deltas.append(d)
        yield M.combine(b, deltas, w, consensus=consensus, normalize=norm, lam=lam)


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


def merge(cfg: MergeConfig, out: str | Path, seed: int = 0, shard_size: int = DEFAULT_SHARD,
          adapter_rank: int | None = None, progress: bool = False, chunk: int = CHUNK_ELEMS) -> dict:
    """Merge as `cfg` says and write a Hugging Face folder (or, with adapter_rank, a PEFT LoRA adapter) to `out`.

    Args:
        cfg: the parsed config (`load_config`).
        out: output folder, written atomically (nothing is left behind on an error); may not be an input folder.
        seed: DARE's global seed (the drop mask of each tensor derives from it and the tensor's name).
        shard_size: bytes per safetensors shard.
        adapter_rank: write the merged update (merged - base) of the adapters' target modules as a rank-r LoRA.
        progress: show a tqdm bar over tensors on stderr.
        chunk: elements per row chunk (memory knob).
    Returns:
        A summary: out, method, tensors, bytes, seconds, files, notes.
    Raises:
        CheckpointError, ConfigError, PrecisionError: bad input, before anything is written where it can be seen.
    """
    from tqdm import tqdm

    t0 = time.time()
    plan = plan_merge(cfg, adapter_out=adapter_rank is not None)
    out = Path(out)
    for x in [plan.base, *plan.inputs]:
        if out.resolve() == x.folder.resolve() or (x.lora and out.resolve() == x.lora.folder.resolve()):
            raise ConfigError(f"output folder {out} is one of the inputs ({x.label}); choose a new folder")
    if adapter_rank is not None:
        names = [n for n in plan.names if any(x.lora and n in x.lora.targets for x in plan.inputs)]
    else:
        names = plan.names

    def out_dtype(name: str) -> torch.dtype:
        return plan.out_dtype or plan.base.index[name].dtype

    def fill(tmp: Path) -> None:
        bar = tqdm(total=len(names), unit="tensor", file=sys.stderr, disable=not progress, desc="merge")
        try:
            if adapter_rank is not None:
                write_adapter(tmp, plan, names, adapter_rank, seed, merge_tensor, bar, shard_size)
                return
            specs = [(n, plan.base.index[n].shape, out_dtype(n)) for n in names]
            writer = ShardWriter(tmp, specs, shard_size)
            try:
                for n in names:
                    loc, dt = plan.base.index[n], out_dtype(n)
                    if not loc.dtype.is_floating_point:  # integer buffers: the base's, unchanged
                        writer.write(n, read_tensor(loc))
                    else:
                        for c in merge_tensor(plan, n, seed, chunk):
                            check_finite(n, c, fix=NOT_WRITTEN)
                            if dt != torch.float32:
                                check_cast(n, c, dt)
                            writer.write(n, c.to(dt))
                    bar.update(1)
            finally:
                writer.close()
            hf = dict(plan.base.hf)
            if plan.out_dtype is not None:
                hf["torch_dtype"] = str(plan.out_dtype)[6:]
                hf.pop("dtype", None)
            (tmp / "config.json").write_text(json.dumps(hf, indent=2))
            copy_tokenizer_files(plan.base.folder, tmp)
        finally:
            bar.close()

    write_folder_atomically(out, fill)
    files = sorted(p.name for p in out.iterdir())
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return {"out": str(out), "method": cfg.merge_method, "models": len(cfg.models), "tensors": len(names),
            "bytes": size, "seconds": round(time.time() - t0, 2), "files": files, "notes": plan.notes}
