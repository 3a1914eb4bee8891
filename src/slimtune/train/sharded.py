"""Building a model straight into FSDP2 shards: the decoder is made on the meta device, adapted (LoRA / QLoRA) and
sharded there; then each rank allocates only its shards and fills them with the rows it owns, read from the
checkpoint (`tensor_index` + `read_tensor(rows=...)`), cast as a one-process run casts them, 4-bit layers quantized
from their rows (`quant.shard`). LoRA factors start from the same random draws as in a one-process run. No rank ever
holds a whole weight, in device or in host memory.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from slimtune.errors import CheckpointError
from slimtune.io.safetensors import read_tensor, tensor_index
from slimtune.models.config import ModelConfig
from slimtune.models.decoder import Decoder
from slimtune.models.load import IGNORED_SUFFIXES
from slimtune.precision.formats import dtype_name
from slimtune.precision.guard import check_cast
from slimtune.precision.policy import Precision
from slimtune.quant.linear import QuantLinear, prepare_quantized
from slimtune.quant.shard import chunk_range, fourbit_shard, to_byte_params
from slimtune.train.build import method_config
from slimtune.train.config import TrainConfig
from slimtune.train.distributed import DistEnv, agreed, gather_pieces, wrap_fsdp


class TensorSource:
    """Named full-size tensors read by rows: a checkpoint folder (read from the files, row range by row range) or
    tensors held in memory (the built-in tiny model; a benchmark's generator may subclass it)."""

    def __init__(self, where: str, tensors: dict[str, Tensor] | None = None, folder: Path | None = None) -> None:
        self.where, self.tensors = where, tensors
        self.index = tensor_index(folder) if folder is not None else None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self.index is not None:
            return {k: loc.shape for k, loc in self.index.items()}
        return {k: tuple(t.shape) for k, t in self.tensors.items()}

    def rows(self, name: str, r0: int, r1: int) -> Tensor:
        """Rows [r0, r1) along dim 0 of tensor `name`, in its stored dtype, on the CPU."""
        if self.index is not None:
            return read_tensor(self.index[name], (r0, r1))
        return self.tensors[name][r0:r1]


def model_source(path: str) -> tuple[ModelConfig, TensorSource]:
    """The model's config and its tensors, for 'builtin' or a Hugging Face folder of safetensors files.

    Raises:
        CheckpointError: no folder, no safetensors (a .bin cannot be read by rows), a slimtune-quantized folder.
    """
    from slimtune.io.hub import resolve
    from slimtune.models.tiny import BUILTIN_NAMES, builtin_model

    if path in BUILTIN_NAMES:
        m = builtin_model(0)
        return m.config, TensorSource("builtin", tensors=m.state_dict())
    folder = resolve(path)
    mc = ModelConfig.from_file(folder / "config.json")
    qc = mc.hf.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "slimtune":
        raise CheckpointError(f"{folder}: a slimtune-quantized folder cannot be sharded over several processes; fix: "
                              "give the 16-bit model (method=qlora quantizes it while loading)")
    return mc, TensorSource(str(folder), folder=folder)


def _source_name(param: str) -> str:
    """The checkpoint name of a model parameter (an adapted linear holds the original as `base_layer`)."""
    return param.replace(".base_layer", "")


def _adapter_starts(model: nn.Module, init: bool | str, device: torch.device) -> dict[str, Tensor]:
    """The starting value of every LoRA factor, whole, drawn in the order and on the device of a one-process run."""
    from slimtune.peft.lora import LoraLinear, new_factors

    out = {}
    for path, m in model.named_modules():
        if not isinstance(m, LoraLinear):
            continue
        for name in m.adapter_names():
            A, B = m.lora_A[name], m.lora_B[name]
            a, b = new_factors(m.in_features, m.out_features, A.weight.shape[0], B.bias is not None, init, device,
                               A.weight.dtype)
            out[f"{path}.lora_A.{name}.weight"], out[f"{path}.lora_B.{name}.weight"] = a.weight, b.weight
            if b.bias is not None:
                out[f"{path}.lora_B.{name}.bias"] = b.bias
    return {k: v.detach() for k, v in out.items()}


def _meta_model(cfg: TrainConfig, prec: Precision, mc: ModelConfig) -> tuple[nn.Module, dict, dict]:
    """The adapted model on the meta device with every parameter in its final dtype.

    Returns:
        (model, counts as `trainable_report`, {parameter name: the dtype its checkpoint rows are first cast to}).
    """
    from slimtune.peft.api import apply_method, freeze_base, trainable_report

    full, qlora = cfg.method == "full", cfg.method == "qlora"
    load = prec.weight_dtype if full else (prec.compute_dtype or torch.float32) if qlora else prec.frozen_dtype
    mc.dtype = dtype_name(load)
    mcfg = method_config(cfg)
    with torch.device("meta"):
        model = Decoder(mc).to(load)
    if qlora:
        prepare_quantized(model, cfg.quant, None, None, ("lm_head",), "meta")
    if full:
        model.requires_grad_(True)
    else:
        apply_method(model, mcfg)
        freeze_base(model)
    load_dtypes = {n: p.dtype for n, p in model.named_parameters()}
    for p in model.parameters():  # as `apply_precision` (its guard runs on the rows as they are read)
        if p.is_floating_point():
            p.data = p.data.to(prec.weight_dtype if p.requires_grad else prec.frozen_dtype)
    return model, trainable_report(model, print_line=False), load_dtypes


def _check_source(model: nn.Module, src: TensorSource, adapters: set[str]) -> None:
    """Every tensor the model needs is in the checkpoint with its shape, and nothing else is (as `load_model`)."""
    need = {_source_name(n): tuple(p.shape) for n, p in model.named_parameters() if n not in adapters}
    for path, m in model.named_modules():
        if isinstance(m, QuantLinear):
            need[_source_name(f"{path}.weight")] = (m.out_features, m.in_features)  # its buffers: not parameters
    have = src.shapes()
    for k, shape in need.items():
        if k not in have:
            raise CheckpointError(f"{src.where}: tensor {k} is missing; the checkpoint is incomplete or of another "
                                  "architecture")
        if tuple(have[k]) != shape:
            raise CheckpointError(f"{src.where}: tensor {k} has shape {tuple(have[k])}, config.json implies {shape}")
    extra = [k for k in have if k not in need and not k.endswith(IGNORED_SUFFIXES)
             and not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if extra:
        raise CheckpointError(f"{src.where}: tensor {extra[0]} is not part of a {model.config.model_type} model of "
                              "this config (is config.json from another model?)")


def _reader(src: TensorSource, key: str, load: torch.dtype, final: torch.dtype,
            device: torch.device) -> Callable[[int, int], Tensor]:
    """rows(r0, r1) of `key` cast as a one-process run casts the whole tensor (to the load dtype, then the
    policy's; each cast precision-guarded), on `device`."""
    def rows(r0: int, r1: int) -> Tensor:
        t = src.rows(key, r0, r1)
        for dt in (load, final):
            if t.is_floating_point() and t.dtype != dt:
                check_cast(key, t, dt)
                t = t.to(dt)
        return t.to(device)
    return rows


def build_sharded(cfg: TrainConfig, prec: Precision, device: torch.device, mesh, env: DistEnv,
                  source: tuple[ModelConfig, TensorSource] | None = None) -> tuple[nn.Module, dict]:
    """The run's model, FSDP2-sharded over the mesh, each rank holding and reading only its shards.

    Args:
        source: (config, tensors) instead of `cfg.model` (benchmarks generate weights).
    Returns:
        (model in train mode, {'trainable', 'total', 'percent'}).
    Raises:
        CheckpointError, PrecisionError, ConfigError: as `build_model`, on every rank (the lowest failing rank
            reports it).
    """
    mc, src = source or model_source(cfg.model)
    model, counts, load_dtypes = _meta_model(cfg, prec, mc)
    init = method_config(cfg).init_lora_weights if cfg.method != "full" else True
    starts = _adapter_starts(model, init, device)
    agreed(lambda: _check_source(model, src, set(starts)), env.rank, env.world)
    quant = {path: m for path, m in model.named_modules() if isinstance(m, QuantLinear)}
    to_byte_params(model)  # fp32 storage, gathered uncast (train.distributed.gather_dtype)
    model.grad_ckpt, model.mlp_tile, model.ckpt_blocks = cfg.grad_ckpt, cfg.mlp_tile or None, cfg.ckpt_blocks
    wrap_fsdp(model, prec, mesh, cfg.fsdp_reshard)
    model.to_empty(device=device)
    skip = {f"{path}.{k}" for path, m in quant.items() for k in m.byte_layout}

    def fill_plain() -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in skip:
                    continue
                s, e = chunk_range(p.shape[0], env.rank, env.world)
                local = p.to_local()
                assert local.shape[0] == e - s, (name, tuple(local.shape), s, e)
                if name in starts:
                    local.copy_(starts[name][s:e])
                else:
                    key = _source_name(name)
                    local.copy_(_reader(src, key, load_dtypes[name], p.dtype, device)(s, e))

    agreed(fill_plain, env.rank, env.world)
    gather = gather_pieces if env.world > 1 else (lambda piece, counts: piece)

    def fill_quant() -> None:
        with torch.no_grad():
            for path, m in quant.items():
                key = _source_name(f"{path}.weight")
                rows = _reader(src, key, m.compute_dtype, m.compute_dtype, device)
                for k, v in fourbit_shard(m, rows, env.rank, env.world, gather, key).items():
                    getattr(m, k).to_local().view(torch.uint8).copy_(v)

    agreed(fill_quant, env.rank, env.world)
    return model.train(), counts
