"""Plan a merge: open every input (headers and config files only), check them, and list the output tensors.

Each output tensor is a `Job`: the input tensors it merges (one per slice source, with the layer index of that
source), its position t for gradients and the scopes its parameters are read from, as mergekit 0.1.5's planner
(plan.py) lays them out: embeddings from the first slice's sources at t = 0, each slice's layers at t = i / (n - 1),
the final norm and lm_head from the last slice's sources at t = 0.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from slimtune.io.hub import resolve
from slimtune.io.jsonfile import read_json
from slimtune.io.safetensors import TensorLoc, read_tensor, tensor_index
from slimtune.models.load import IGNORED_SUFFIXES
from slimtune.precision.formats import parse_dtype
from slimtune.precision.guard import require_float
from slimtune.errors import CheckpointError, ConfigError
from slimtune.merge.config import MergeConfig, ModelEntry
from slimtune.merge.lora import Lora, load_lora
from slimtune.merge.settings import LAYER, layer_of

SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings")
VOCAB_TENSORS = ("embed_tokens", "lm_head")  # tensors with one row per token (mergekit: vocabulary_axis 0)


@dataclass
class Input:
    label: str  # "models[i] (PATH)", for messages
    folder: Path  # the checkpoint holding its tensors (an adapter's base)
    index: dict[str, TensorLoc]
    hf: dict  # config.json
    lora: Lora | None = None

    @property
    def num_layers(self) -> int:
        return int(self.hf.get("num_hidden_layers") or 1)

    def rows(self, name: str, span: tuple[int, int] | None) -> Tensor:
        """fp32 rows [r0, r1) of tensor `name` of this model (the whole tensor when span is None)."""
        rows = read_tensor(self.index[name], span).float()
        return rows if self.lora is None else self.lora.apply(name, span, rows)


@dataclass
class Member:
    """One input tensor of a job."""

    input: Input
    name: str  # the tensor's name in that input (its layer index is the source's)
    chain: list[dict[str, Any] | None]  # parameter scopes, first wins: the source's, its slice's, the top level
    index: int  # the source's position in its slice (keys DARE / DELLA drop masks)
    is_base: bool = False
    model: str = ""  # the model as written in the config


@dataclass
class Job:
    """One output tensor: what it merges and how its parameters are read."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # of the inputs (the output's unless out_dtype is set)
    members: list[Member]  # every source, in slice order (the base included where it is a source)
    t: float  # position for gradients
    shared: list[dict[str, Any] | None]  # scopes of the shared parameters
    vocab: bool = False  # rows are tokens (re-indexed when a tokenizer is built)

    @property
    def base(self) -> Member | None:
        return next((m for m in self.members if m.is_base), None)

    @property
    def others(self) -> list[Member]:
        return [m for m in self.members if not m.is_base]


@dataclass
class Plan:
    cfg: MergeConfig
    base: Input  # supplies config.json and the tokenizer (mergekit's donor: base_model, else the first model)
    inputs: dict[str, Input]  # by the model string of the config
    jobs: dict[str, Job]  # output tensor name -> job, in write order
    num_layers: int  # of the output
    out_dtype: torch.dtype | None
    hf: dict = field(default_factory=dict)  # the output's config.json
    vocab: Any = None  # a `tokenizer.Vocab` when the config builds a tokenizer
    notes: list[str] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return list(self.jobs)


def find_path(path: str, cfg_source: str) -> Path:
    """A path as written in the config: relative to the working directory, else to the config file's folder."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and (Path(cfg_source).parent / p).exists():
        return Path(cfg_source).parent / p
    return resolve(path)


def _open(path: str, label: str, cfg_source: str) -> Input:
    folder = find_path(path, cfg_source)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{label}: {folder} has no config.json; pass a Hugging Face model folder")
    hf = read_json(folder / "config.json")
    index = {k: v for k, v in tensor_index(folder).items() if not k.endswith(IGNORED_SUFFIXES)}
    return Input(label, folder, index, hf)


def _label(cfg: MergeConfig, model: str) -> str:
    for i, e in enumerate(cfg.models):
        if e.model == model:
            return f"model {model}" if cfg.slices else f"models[{i}] ({model})"
    return f"base_model ({model})"


def _inputs(cfg: MergeConfig, base_path: str) -> tuple[Input, dict[str, Input]]:
    src = cfg.source
    if (find_path(base_path, src) / "adapter_config.json").exists():
        what = f"base_model {base_path}" if cfg.base_model else f"models[0] ({base_path})"
        raise ConfigError(f"{src}: {what} is a LoRA adapter; give base_model: the model the adapters were trained on")
    base = _open(base_path, f"base_model ({base_path})", src)
    inputs: dict[str, Input] = {}
    for sl in cfg.out_slices():
        for e in sl.sources:
            if e.model in inputs:
                continue
            label = _label(cfg, e.model)
            path, adapter = e.model, None
            if "+" in path and not Path(path).exists():  # mergekit's BASE+ADAPTER
                path, adapter = path.split("+", 1)
            elif (find_path(path, src) / "adapter_config.json").exists():
                path, adapter = base_path, path
            if adapter is None:
                inputs[e.model] = base if e.model == base_path else _open(path, label, src)
                if e.model != base_path:
                    _same_architecture(base, inputs[e.model], cfg)
                continue
            if find_path(path, src).resolve() != base.folder.resolve():
                raise ConfigError(f"{src}: {label}: adapter on {path}, but the base model is {base_path}; all "
                                  "adapters must be on the base model")
            lora = load_lora(find_path(adapter, src), label)
            lora.check(base.index, label)
            inputs[e.model] = Input(label, base.folder, base.index, base.hf, lora)
    return base, inputs


def _same_architecture(base: Input, x: Input, cfg: MergeConfig) -> None:
    if x.hf.get("model_type") != base.hf.get("model_type"):
        raise CheckpointError(f"{x.label}: model_type {x.hf.get('model_type')!r} differs from {base.label}'s "
                              f"{base.hf.get('model_type')!r}; only models of one architecture can be merged")
    free = (("num_hidden_layers",) if cfg.slices else ()) + (("vocab_size",) if cfg.tokenizer else ())
    for k in SHAPE_KEYS:
        if k not in free and x.hf.get(k) != base.hf.get(k):
            raise CheckpointError(f"{x.label}: config.json {k} = {x.hf.get(k)!r} differs from {base.label}'s "
                                  f"{base.hf.get(k)!r}; only models of the same shape can be merged")
    if not cfg.slices:
        for name in x.index:
            if name not in base.index:
                raise CheckpointError(f"{x.label}: has tensor {name} that {base.label} does not; merging needs the "
                                      "same tensor names")


def _rename(name: str, layer: int) -> str:
    return LAYER.sub(f".layers.{layer}.", name, count=1)


def _jobs(cfg: MergeConfig, base: Input, inputs: dict[str, Input]) -> tuple[dict[str, Job], list[tuple]]:
    """The output tensors in mergekit's order (embeddings, layers, final norm / lm_head), and for each output layer
    its (input, layer) origin."""
    slices = cfg.out_slices()
    method = cfg.method
    jobs: dict[str, Job] = {}
    origins = []

    def add(out: str, pairs: list[tuple[ModelEntry, str]], t: float, sl) -> None:
        members = [Member(inputs[e.model], n, [e.parameters, sl.parameters, cfg.parameters], j,
                          method.base != "ignored" and cfg.is_base(e), e.model) for j, (e, n) in enumerate(pairs)]
        ref = next((m for m in members if m.is_base), members[0])
        vocab = cfg.tokenizer is not None and any(v in out for v in VOCAB_TENSORS)
        for m in members:
            loc = m.input.index.get(m.name)
            if loc is None:
                raise CheckpointError(f"{m.input.label}: tensor {m.name} is missing ({ref.input.label} has it); the "
                                      "checkpoint is incomplete or of another model")
            want = ref.input.index[ref.name].shape
            if (loc.shape[1:] if vocab else loc.shape) != (want[1:] if vocab else want):
                raise CheckpointError(f"{m.input.label}: tensor {m.name} has shape {list(loc.shape)}, "
                                      f"{ref.input.label} has {list(want)}")
        loc = ref.input.index[ref.name]
        jobs[out] = Job(out, loc.shape, loc.dtype, members, t, [sl.parameters, cfg.parameters], vocab)

    outside = [n for n in base.index if layer_of(n) is None]
    pre = [n for n in outside if "embed_tokens" in n]
    for n in pre:
        add(n, [(e, n) for e in slices[0].sources], 0.0, slices[0])
    out_layer = 0
    for s, sl in enumerate(slices):
        ranges = [e.layer_range or (0, inputs[e.model].num_layers) for e in sl.sources]
        for e, (a, b) in zip(sl.sources, ranges):
            if b > inputs[e.model].num_layers:
                raise ConfigError(f"{cfg.source}: layer_range {[a, b]} of {e.model} in slices[{s}] goes past its "
                                  f"{inputs[e.model].num_layers} layers")
        n_layers = ranges[0][1] - ranges[0][0]
        # the tensors of a layer: those of the base's layer (else the first source's), then any other source's
        order = sorted(range(len(sl.sources)), key=lambda j: not cfg.is_base(sl.sources[j]))
        for i in range(n_layers):
            t = i / (n_layers - 1) if n_layers > 1 else 1.0
            names: dict[str, None] = {}
            for j in order:
                x, at = inputs[sl.sources[j].model], ranges[j][0] + i
                names.update({_rename(n, 0): None for n in x.index if layer_of(n) == at})
            for n in names:
                add(_rename(n, out_layer), [(e, _rename(n, r[0] + i)) for e, r in zip(sl.sources, ranges)], t, sl)
            origins.append((inputs[sl.sources[order[0]].model], ranges[order[0]][0] + i))
            out_layer += 1
    for n in outside:
        if n not in pre:
            add(n, [(e, n) for e in slices[-1].sources], 0.0, slices[-1])
    return jobs, origins


def _out_config(cfg: MergeConfig, base: Input, origins: list[tuple]) -> dict:
    """config.json of the output: the base's, with the layer count (and per-layer lists) of the stacked slices."""
    hf = dict(base.hf)
    if cfg.slices:
        hf["num_hidden_layers"] = len(origins)
        for key in ("layer_types",):  # per-layer lists (transformers 5: sliding / full attention per layer)
            if isinstance(hf.get(key), list):
                hf[key] = [x.hf[key][i] if isinstance(x.hf.get(key), list) and i < len(x.hf[key]) else hf[key][-1]
                           for x, i in origins]
    return hf


def plan_merge(cfg: MergeConfig, adapter_out: bool = False) -> Plan:
    """Open every input and check that they can be merged, reading only headers and config files.

    Raises:
        CheckpointError: a missing folder or file, a different architecture or shape, a missing tensor.
        ConfigError: an adapter without a base, a layer range past a model's layers, a bad dtype or tokenizer.
    """
    base_path = cfg.base_model
    if base_path is None:  # no base_model: the first model (or the first adapter's base) is the reference
        first = cfg.out_slices()[0].sources[0].model
        base_path = first.split("+")[0] if "+" in first and not Path(first).exists() else first
    base, inputs = _inputs(cfg, base_path)
    jobs, origins = _jobs(cfg, base, inputs)
    if adapter_out:
        full = [x.label for e in cfg.models if (x := inputs[e.model]).lora is None and not cfg.is_base(e)]
        if full or cfg.slices:
            raise ConfigError(f"{cfg.source}: --adapter-rank writes the merge as an adapter, which needs every model "
                              f"to be a LoRA adapter on the base{f'; {full[0]} is a full model' if full else ''}")
    out_dtype = parse_dtype(cfg.out_dtype or cfg.dtype)
    if out_dtype is not None:
        require_float(out_dtype, f"{cfg.source}: out_dtype {out_dtype}")
    notes = list(cfg.notes) + ["computed in float32"]
    return Plan(cfg, base, inputs, jobs, len(origins), out_dtype,
                _out_config(cfg, base, origins), notes=notes)  # a tokenizer: block adds plan.vocab (merge.tokenizer)
