"""The fallback for a causal LM that slimtune's decoder does not cover: transformers' own implementation, loaded from
the folder's safetensors (no pickle, no remote code) and trained by the same methods and loop at its own speed (no
fused kernels); with the few adapters the loop needs (its logits from packed rows, checkpointing, saving).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.errors import CheckpointError, ConfigError
from slimtune.io.safetensors import checkpoint_files, read_safetensors_header
from slimtune.precision.guard import check_cast

NOTE = ("model_type {} is not one of slimtune's decoders; training it through transformers' own implementation "
        "(slower, no fused kernels)")


def is_transformers_model(model: nn.Module) -> bool:
    """True for a model whose config is transformers' (the fallback), False for slimtune's `Decoder`."""
    from slimtune.models.config import ModelConfig

    return not isinstance(getattr(model, "config", None), ModelConfig)


def fallback_note(model: nn.Module) -> str | None:
    """The one log line a run prints when it trains through transformers' implementation; None for the decoder."""
    return NOTE.format(model.config.model_type) if is_transformers_model(model) else None


def require_decoder(model: nn.Module, what: str) -> None:
    """Refuse, in one line, a feature that needs slimtune's own decoder for a model loaded through transformers.

    Raises:
        ConfigError: naming the feature and the model type.
    """
    if is_transformers_model(model):
        raise ConfigError(f"{what} needs one of slimtune's decoders; model_type {model.config.model_type} runs through "
                          "transformers' own implementation (fine-tuning, adapters, merging and generation work)")


class TransposedLinear(nn.Linear):
    """transformers' Conv1D (GPT-2: y = x W + b with W stored (in, out)) as an nn.Linear (weight (out, in)), so that
    LoRA and every other method adapt it as a linear layer; its state dict keeps the stored (in, out) layout, so
    checkpoints and `save_pretrained` write what the original checkpoint holds."""

    @classmethod
    def from_conv1d(cls, conv: nn.Module) -> "TransposedLinear":
        w = conv.weight  # (in, out)
        lin = cls(w.shape[0], w.shape[1], bias=conv.bias is not None, device="meta")
        lin.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
        if conv.bias is not None:
            lin.bias = conv.bias
        return lin

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = destination[prefix + "weight"].t()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "weight"
        if key in state_dict:
            state_dict = {**state_dict, key: state_dict[key].t()}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _replace_conv1d(model: nn.Module) -> None:
    from transformers.pytorch_utils import Conv1D

    for name, m in list(model.named_modules()):
        if isinstance(m, Conv1D):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, TransposedLinear.from_conv1d(m))


def _check_folder(folder: Path, d: dict[str, Any]) -> None:
    """Refuse what the fallback does not load: remote code, no causal-LM class, pickle weights, quantized folders.

    Raises:
        CheckpointError: naming the folder and what to do.
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from slimtune.models.config import ARCHITECTURES

    mt = d.get("model_type")
    if mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        where = "needs remote code, which slimtune does not run" if d.get("auto_map") else \
            f"is not a causal LM of transformers {transformers.__version__}"
        raise CheckpointError(f"{folder}: model_type {mt!r} is not one of slimtune's decoders "
                              f"({', '.join(ARCHITECTURES)}) and {where}")
    if d.get("quantization_config"):
        raise CheckpointError(f"{folder}: a quantized {mt} checkpoint; slimtune loads {mt} (through transformers) "
                              "from 16/32-bit weights only: pass the unquantized folder (quantize=nf4 for QLoRA)")
    for f in checkpoint_files(folder):
        if f.suffix != ".safetensors":
            raise CheckpointError(f"{f}: pickle weights are not loaded; convert the folder to safetensors")
        read_safetensors_header(f)  # a truncated shard fails here, in one line


def load_hf_fallback(folder: Path, d: dict[str, Any], dtype: torch.dtype | None = None,
                     device: str | torch.device = "cpu", force: bool = False, quantize: str | None = None,
                     group_size: int | None = None, double_quant: bool | None = None,
                     quant_skip: tuple[str, ...] = ("lm_head",)):
    """Load a transformers causal LM that slimtune's decoder does not cover (GPT-2, OPT, Falcon, ...).

    transformers builds it on the meta device and assigns the safetensors weights (its own loader: renamed keys,
    tied weights and buffers as the architecture wants), at the stored dtype; each parameter is then cast to `dtype`
    through the precision guard. GPT-2's Conv1D layers become `TransposedLinear`. With `quantize`, the linears are
    quantized afterwards (the 16-bit model exists whole first, on the CPU).
    Args:
        folder: the model folder; d: its config.json; others as `load_model`.
    Returns:
        (model in eval mode on `device`, its transformers config).
    Raises:
        CheckpointError: remote code, no causal LM, pickle or truncated weights, a quantized folder.
        PrecisionError: a weight `dtype` cannot hold (unless force).
    """
    from transformers import AutoModelForCausalLM

    _check_folder(folder, d)
    target = dtype or _declared_dtype(d)
    on_gpu = torch.device(device).type != "cpu" and not quantize
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype="auto", use_safetensors=True, trust_remote_code=False, local_files_only=True,
            device_map={"": str(device)} if on_gpu else None)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: transformers could not load it: {str(e).splitlines()[0]}") from None
    _replace_conv1d(model)
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.dtype != target:
            if not force:
                check_cast(name, p.data, target)
            p.data = p.data.to(target)
    if quantize:
        from slimtune.quant.linear import quantize_model

        quantize_model(model, quantize, group_size, double_quant, skip=quant_skip, device=device)
    model.to(device)
    model.config.dtype = target
    return model.eval(), model.config


def _declared_dtype(d: dict[str, Any]) -> torch.dtype:
    from slimtune.precision.formats import DTYPES

    dt = DTYPES.get(str(d.get("torch_dtype") or d.get("dtype") or "float32"))
    return dt if dt is not None and dt.is_floating_point else torch.float32


# ---- what the loop needs of a transformers model ----------------------------------------------------------------
def transformers_logits(model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
    """Logits (B, T, V) of a transformers causal LM for the decoder's keyword arguments (`data.pack.model_inputs`):
    packed rows' seq_ids become the block-diagonal causal mask, given as a 4-D boolean attention_mask (B, 1, T, T),
    True = may attend, which transformers' mask code takes as is."""
    kw = {k: v for k, v in inputs.items() if k != "seq_ids"}
    seq = inputs.get("seq_ids")
    if seq is not None:
        T = seq.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=seq.device).tril()
        kw["attention_mask"] = ((seq[:, :, None] == seq[:, None, :]) & causal)[:, None]
    return model(**kw, use_cache=False).logits


@torch.no_grad()
def check_packing(model: nn.Module) -> None:
    """Refuse packed rows where transformers' implementation of this architecture ignores or rejects the 4-D mask:
    two random examples packed in one row must give the logits they give alone.

    Raises:
        ConfigError: naming the model type and the fix (packing=false).
    """
    dev = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(3, min(model.config.vocab_size, 1000), (1, n), generator=g).to(dev) for n in (5, 7))
    was = model.training
    model.eval()
    try:
        alone = torch.cat([model(a).logits, model(b).logits], 1)
        inputs = {"input_ids": torch.cat([a, b], 1),
                  "position_ids": torch.cat([torch.arange(5), torch.arange(7)])[None].to(dev),
                  "seq_ids": torch.tensor([[0] * 5 + [1] * 7], device=dev)}
        packed = transformers_logits(model, inputs)
        ok = torch.allclose(packed.float(), alone.float(), atol=1e-2, rtol=1e-2)
    except (RuntimeError, ValueError, TypeError):
        ok = False
    finally:
        model.train(was)
    if not ok:
        raise ConfigError(f"transformers' {type(model).__name__} does not keep packed examples apart (it ignores or "
                          "rejects a block-diagonal attention mask); fix: packing=false")


def set_grad_ckpt(model: nn.Module, mode: bool | str) -> None:
    """Activation checkpointing of a transformers model (its own, non-reentrant).

    Raises:
        ConfigError: grad_ckpt=offload (slimtune's decoder only).
    """
    if mode == "offload":
        raise ConfigError(f"grad_ckpt=offload needs slimtune's decoder; {model.config.model_type} runs through "
                          "transformers: use grad_ckpt=true")
    if mode:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()
