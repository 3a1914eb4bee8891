"""Load a Hugging Face checkpoint folder (or 'builtin') into a `Decoder`: built on the `meta` device, each tensor
assigned as it is read straight from the file into its final buffer, so the weights are never held twice. A cast into
a narrower format goes through the precision guard; `quantize=` quantizes each linear weight as it is read (QLoRA);
a folder written by `slimtune quantize` loads into empty `QuantLinear`s.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from slimtune.errors import CheckpointError, ConfigError
from slimtune.io.hub import resolve
from slimtune.io.safetensors import iter_tensors
from slimtune.models.config import ARCHITECTURES, ModelConfig, read_config_json
from slimtune.models.decoder import Decoder
from slimtune.models.tiny import BUILTIN_NAMES, builtin_model
from slimtune.precision.formats import dtype_name, parse_dtype
from slimtune.precision.guard import check_cast, check_finite, require_float
from slimtune.quant.bnb_config import BNB_METHOD, bnb_layers
from slimtune.quant.codecs import get_codec
from slimtune.quant.codecs.fourbit import FORMATS_4BIT
from slimtune.quant.linear import QuantLinear, linear_names, quantize_model

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; recomputed here


def load_model(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
               force: bool = False, quantize: str | None = None, group_size: int | None = None,
               double_quant: bool | None = None, quant_skip: tuple[str, ...] = ("lm_head",),
               trust_pickle: bool = False):
    """Load a Hugging Face checkpoint folder (or 'builtin') into a `Decoder`; an architecture the decoder does not
    cover loads through transformers' own implementation (`models.fallback.load_hf_fallback`).

    Args:
        path: a folder with config.json and safetensors, a hub id, or 'builtin' (the tiny built-in model).
        dtype: None or 'auto' keeps the checkpoint's declared torch_dtype; otherwise cast (precision-guarded).
        device: where the weights go; each tensor is moved as it is read.
        force: cast even when the precision guard refuses.
        quantize: a `slimtune.quant` format (nf4 for QLoRA, int8, int4, ...): each linear weight but `quant_skip`
            is quantized on `device` as soon as it is read, so the 16-bit model is never in memory at once (peak:
            the quantized model plus one 16-bit tensor). double_quant defaults to True for nf4/fp4.
        trust_pickle: read a folder of pytorch_model*.bin through torch's weights-only unpickler (only for files
            from a trusted source: `slimtune convert --trust-pickle`); otherwise .bin files are refused.
    Returns:
        (model, config), the model in eval mode (for the fallback: the transformers model and its config).
    Raises:
        CheckpointError: missing folder or shard, truncated file, unsupported architecture, name/shape mismatch, a
            weight stored as an integer type.
        PrecisionError: a tensor that the requested dtype cannot hold (unless force), or that holds NaN / inf.
    """
    dtype = parse_dtype(dtype)
    if dtype is not None:
        require_float(dtype, "--dtype")
    if str(path) in BUILTIN_NAMES:
        return _builtin(dtype, device, quantize, group_size, double_quant, quant_skip)
    folder = resolve(path)
    d = read_config_json(folder / "config.json")
    if d.get("model_type") not in ARCHITECTURES:  # any other causal LM: transformers' own implementation
        from slimtune.models.fallback import load_hf_fallback

        return load_hf_fallback(folder, d, dtype, device, force, quantize, group_size, double_quant, quant_skip)
    cfg = ModelConfig.from_hf(d, source=str(folder / "config.json"))
    qc = cfg.hf.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") in ("slimtune", BNB_METHOD):  # `slimtune quantize`, bnb
        return load_quantized(folder, cfg, dtype, device, force)
    target = dtype or cfg.torch_dtype
    cfg.dtype = dtype_name(target)
    with torch.device("meta"):
        model = Decoder(cfg)
    expected = {k: v for k, v in model.state_dict(keep_vars=True).items()}
    quantized: set[str] = set()  # names of linear modules to quantize while loading
    if quantize:
        quantized = set(linear_names(model, tuple(quant_skip)))
        if double_quant is None:
            double_quant = quantize in ("nf4", "fp4")  # QLoRA's default
    sd: dict[str, Tensor] = {}
    for name, t in iter_tensors(folder, trust_pickle):
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name not in expected:
            raise CheckpointError(f"{folder}: tensor {name} is not part of a {cfg.model_type} model of this config "
                                  "(is config.json from another model?)")
        if tuple(t.shape) != tuple(expected[name].shape):
            raise CheckpointError(f"{folder}: tensor {name} has shape {tuple(t.shape)}, config.json implies "
                                  f"{tuple(expected[name].shape)}")
        check_weight(folder, name, t)
        if t.dtype != target:
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
    _assign(model, sd, expected, folder, strict=not (cfg.tie_word_embeddings or quantized))
    return model.eval(), cfg


def _assign(model: nn.Module, sd: dict[str, Tensor], expected: dict[str, Tensor], folder: Path, strict: bool) -> None:
    """Put the tensors read into the meta-device model (a tied head shares the embedding).

    Raises:
        CheckpointError: a tensor the model expects is missing.
    """
    tied = model.config.tie_word_embeddings
    if tied:
        sd.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in sd and not (tied and k == "lm_head.weight")]
    if missing:
        raise CheckpointError(f"{folder}: tensor {missing[0]} is missing ({len(missing)} missing in all); the "
                              "checkpoint is incomplete or of another architecture")
    model.load_state_dict(sd, assign=True, strict=strict)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight


def _quantized_layers(folder: Path, qc: dict) -> dict[str, tuple[str, int | None, bool]]:
    """name -> (format, group size, double quant) of a quantized folder: from slimtune's `layers` map, or read from
    the tensors of a bitsandbytes folder."""
    if qc.get("quant_method") == BNB_METHOD:
        return bnb_layers(folder, qc)
    layers = qc.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise CheckpointError(f"{folder / 'config.json'}: quantization_config has no 'layers' map; re-quantize with "
                              "slimtune quantize")
    return {n: (fmt, qc.get("group_size") if get_codec(fmt).default_group else None,
                bool(qc.get("double_quant")) and fmt in FORMATS_4BIT) for n, fmt in layers.items()}


def _builtin(dtype: torch.dtype | None, device, quantize: str | None, group_size: int | None,
             double_quant: bool | None, quant_skip: tuple[str, ...]):
    model = builtin_model(0)
    if dtype is not None:
        model.config.dtype = dtype_name(dtype)
    model = model.to(device=device, dtype=dtype).eval()
    if quantize:
        quantize_model(model, quantize, group_size, double_quant, skip=quant_skip)
    return model, model.config


def check_weight(folder: Path, name: str, t: Tensor) -> None:
    """A weight of a 16/32-bit checkpoint must be a float tensor without NaN or inf.

    Raises:
        CheckpointError: an integer dtype. PrecisionError: NaN or inf.
    """
    if not t.is_floating_point():
        raise CheckpointError(f"{folder}: tensor {name} is stored as {str(t.dtype)[6:]}, not as a float type; the "
                              "file is damaged or not a plain checkpoint (re-download or re-save it)")
    check_finite(name, t, str(folder))


def load_quantized(folder: Path, cfg, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                   force: bool = False):
    """Load a quantized folder (written by `slimtune quantize`, or by transformers + bitsandbytes: nf4 / fp4 /
    int8): empty QuantLinears on the meta device, then each tensor assigned as read.

    Returns:
        (model in eval mode, config).
    Raises:
        CheckpointError: a malformed quantization_config, a layer it names that the model lacks, a missing tensor
            (a quantized layer without its scales included), an unexpected tensor.
        PrecisionError: a non-quantized tensor the requested dtype cannot hold (unless force).
    """
    where = folder / "config.json"
    layers = _quantized_layers(folder, cfg.hf["quantization_config"])
    target = dtype or cfg.torch_dtype
    cfg.dtype = dtype_name(target)
    with torch.device("meta"):
        model = Decoder(cfg)
    for n, (fmt, g, dq) in layers.items():
        try:
            lin = model.get_submodule(n)
        except AttributeError:
            raise CheckpointError(f"{where}: quantization_config names layer {n}, which this model lacks") from None
        try:
            q = QuantLinear(lin.in_features, lin.out_features, fmt, lin.bias is not None, g, dq, target, "meta", n)
        except ConfigError as e:
            raise CheckpointError(f"{where}: {e}") from None
        model.set_submodule(n, q)
    quantized = tuple(f"{n}." for n in layers)
    sd = {}
    for name, t in iter_tensors(folder):
        check_finite(name, t, str(folder))
        if t.is_floating_point() and not name.startswith(quantized) and t.dtype != target:
            if not force:
                check_cast(name, t, target)
            t = t.to(target)
        sd[name] = t.to(device)
    res = model.load_state_dict(sd, assign=True, strict=False)
    missing = [k for k in res.missing_keys if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing:
        raise CheckpointError(f"{folder}: tensor {missing[0]} is missing ({len(missing)} in all); the checkpoint is "
                              "incomplete; re-quantize the model or re-download it")
    extra = [k for k in res.unexpected_keys if not k.endswith(("nested_quant_map", ".weight_format"))]
    if extra:
        raise CheckpointError(f"{folder}: tensor {extra[0]} has no place in this model (is config.json from "
                              "another checkpoint?)")
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    for n in layers:
        q = model.get_submodule(n)
        if q.fmt not in FORMATS_4BIT:
            q.compute_dtype = target
    return model.eval(), cfg
