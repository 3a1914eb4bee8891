"""LoRA (Hu et al. 2021) and DoRA (Liu et al. 2024): `LoraLinear` wraps a linear `base_layer` and adds named low-rank
updates, y = base(x) + s * B A dropout(x), s = alpha / r (or alpha / sqrt(r), rsLoRA, Kalajdzievski 2023); with DoRA
the adapted weight is m * (W0 + s B A) / ||W0 + s B A||_row, the norm detached (DoRA paper, section 4.3).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.peft.base import MethodConfig, MethodSpec, check_rank, file_key, option, register
from slimtune.peft.layer import AdapterLayer
from slimtune.peft.save_modules import add_modules_to_save, modules_to_save_shapes, modules_to_save_state_dict
from slimtune.peft.targets import ALL_LINEAR, find_targets, replace_module


# PEFT LoRA options that change what the adapter computes; an adapter that sets one is refused rather than misread
UNSUPPORTED_PEFT_OPTIONS = ("target_parameters", "trainable_token_indices", "layer_replication",
                            "use_qalora", "alora_invocation_tokens", "megatron_config", "arrow_config")


@dataclass
class LoraConfig(MethodConfig):
    """LoRA's options, with PEFT's names and meanings (adapter_config.json)."""

    method = "lora"
    peft_type = "LORA"
    # aliases: PEFT's field names, torchtune's (lora_rank) and axolotl's (lora_r, lora_target_modules) run keys
    r: int = option(8, flat="rank", help="LoRA / DoRA rank r", aliases=("r", "lora_r", "lora_rank"))
    lora_alpha: float = option(8, flat="alpha", help="LoRA scaling numerator: the update is scaled by alpha / r",
                               aliases=("lora_alpha",))
    target_modules: list[str] | str | None = option(
        default_factory=lambda: ["q_proj", "v_proj"], flat="targets",
        aliases=("target_modules", "lora_target_modules"),
        help="modules to adapt: comma-separated names / suffixes, a regex, or all-linear")
    lora_dropout: float = option(0.0, flat="dropout", help="dropout on the adapter input", aliases=("lora_dropout",))
    bias: str = "none"  # only "none": trainable biases are BitFit's job
    use_rslora: bool = option(False, flat="use_rslora", help="scale alpha / sqrt(r) (Kalajdzievski 2023)")
    use_dora: bool = option(False, flat="use_dora", help="DoRA: learn a magnitude per output row")
    lora_bias: bool = option(False, flat="lora_bias", help="train a bias on lora_B too (PEFT's lora_bias)")
    fan_in_fan_out: bool = False  # PEFT's flag for GPT-2's Conv1D: those load as nn.Linear (models.fallback), same math
    init_lora_weights: bool | str = True  # True: A Kaiming-uniform, B zero; "gaussian": A ~ N(0, 1/r); False: both random
    rank_pattern: dict[str, int] = field(default_factory=dict)  # module-name regex -> r
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # module-name regex -> lora_alpha
    layers_to_transform: list[int] | int | None = option(None, cli="layers", help="only these block indices")
    layers_pattern: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        # ['all-linear'] (a YAML list, a flat key read as a list) means the keyword: PEFT matches a list literally
        t = self.target_modules
        if isinstance(t, (list, tuple, set)) and len(t) == 1 and ALL_LINEAR in t:
            self.target_modules = ALL_LINEAR

    def validate(self) -> None:
        check_rank(self.r, "LoRA rank r")
        for k, v in self.rank_pattern.items():
            check_rank(v, f"rank_pattern[{k!r}]")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias != "none":
            raise ConfigError(f"LoRA bias={self.bias!r} is not supported; use bias='none' (train biases with bitfit)")
        if self.lora_bias and self.use_dora:
            raise ConfigError("lora_bias with DoRA is not supported; use one of them")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ConfigError(f"init_lora_weights={self.init_lora_weights!r} is not supported; use true, false or "
                              "'gaussian'")
        if not self.target_modules:
            raise ConfigError("LoRA needs target_modules (names such as q_proj, a regular expression, or all-linear)")
        if not isinstance(self.target_modules, str) and ALL_LINEAR in self.target_modules:
            raise ConfigError(f"target_modules {list(self.target_modules)}: all-linear stands alone; list module "
                              "names instead, or use all-linear plus modules_to_save")

    def to_peft_json(self) -> dict[str, Any]:
        d = super().to_peft_json()
        t = self.target_modules  # a plain name as a one-element list: a PEFT string is a full-path regex
        if isinstance(t, str) and t != ALL_LINEAR and re.fullmatch(r"[A-Za-z0-9_.\-,]+", t):
            d["target_modules"] = [x for x in t.split(",") if x]
        return d

    @classmethod
    def from_peft_json(cls, d: dict[str, Any]) -> "LoraConfig":
        """As MethodConfig's, but refusing PEFT options that change the computation and slimtune does not implement."""
        for k in UNSUPPORTED_PEFT_OPTIONS:
            if d.get(k):
                raise ConfigError(f"the adapter uses PEFT option {k}={d[k]!r}, which slimtune does not support")
        cfg = super().from_peft_json(d)
        cfg._from_file = True  # not a field: PEFT tolerates listed names that match nothing; so do files read back
        return cfg

    def rank_alpha(self, path: str) -> tuple[int, float]:
        """(r, alpha) of module `path`: the first rank_pattern / alpha_pattern key that matches its end (as PEFT)."""
        r = next((v for k, v in self.rank_pattern.items() if re.match(rf"(.*\.)?({k})$", path)), self.r)
        a = next((v for k, v in self.alpha_pattern.items() if re.match(rf"(.*\.)?({k})$", path)), self.lora_alpha)
        return r, a

    def targets(self, model: nn.Module) -> list[str]:
        return find_targets(model, self.target_modules, self.layers_to_transform, self.layers_pattern,
                            self.exclude_modules, strict=not getattr(self, "_from_file", False))


@dataclass
class DoraConfig(LoraConfig):
    """DoRA: LoRA with `use_dora=True` (PEFT writes it as peft_type LORA)."""

    method = "dora"
    use_dora: bool = True


def lora_scale(alpha: float, r: int, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023: keeps the update's scale stable in r)."""
    return alpha / math.sqrt(r) if rslora else alpha / r


def dora_weight(W: Tensor, delta: Tensor, m: Tensor) -> Tensor:
    """The DoRA-adapted weight (m / ||W + delta||_row) (W + delta), (out, in), in the dtype of its inputs
    (Liu et al. 2024, eq. 5; the row norm is over the input dimension)."""
    V = W + delta
    return (m / torch.linalg.vector_norm(V, dim=1))[:, None] * V


def base_weight(layer: nn.Module, dtype: torch.dtype) -> Tensor:
    """The (out, in) weight a linear layer computes with, as a dense `dtype` tensor (dequantized if it must be)."""
    if hasattr(layer, "dequantize"):
        return layer.dequantize(dtype)
    return layer.weight.to(dtype)


def _adapter_dtype(layer: nn.Module) -> torch.dtype:
    """fp32 for the adapter, unless the base computes in float64 (reference tests)."""
    t = next(iter(layer.parameters()), None)
    if t is None or not t.is_floating_point():
        t = next((b for b in layer.buffers() if b.is_floating_point()), None)
    return torch.float64 if t is not None and t.dtype == torch.float64 else torch.float32


def _device(layer: nn.Module) -> torch.device:
    t = next(iter(layer.parameters()), None)
    if t is None:
        t = next(iter(layer.buffers()), None)
    return t.device if t is not None else torch.device("cpu")


def new_factors(in_f: int, out_f: int, r: int, bias: bool, init: bool | str, device: torch.device,
                dtype: torch.dtype) -> tuple[nn.Linear, nn.Linear]:
    """LoRA's factors A (in -> r) and B (r -> out) at their starting values, drawn from the global RNG of `device`
    in a fixed order (a sharded run replays these draws to start where a one-process run starts).

    init True: A Kaiming-uniform with a = sqrt(5) (nn.Linear's default, as PEFT), B = 0, so the update starts at 0;
    "gaussian": A ~ N(0, 1/r), B = 0; False: both as nn.Linear initialises them. B's bias (lora_bias) starts at 0.
    """
    A = nn.Linear(in_f, r, bias=False, device=device, dtype=dtype)
    B = nn.Linear(r, out_f, bias=bias, device=device, dtype=dtype)
    if bias and device.type != "meta":
        nn.init.zeros_(B.bias)
    if init is True:
        nn.init.kaiming_uniform_(A.weight, a=math.sqrt(5))
        nn.init.zeros_(B.weight)
    elif init == "gaussian":
        nn.init.normal_(A.weight, std=1 / r)
        nn.init.zeros_(B.weight)
    return A, B


class LoraLinear(AdapterLayer):
    """A linear layer plus named LoRA adapters: lora_A[name] (r, in), lora_B[name] (out, r), and for DoRA
    lora_magnitude_vector[name] (out,). `base_layer` needs `in_features`, `out_features` and either a float
    `weight` or `dequantize(dtype)` (only merging and DoRA read it)."""

    adapter_attrs = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self._dora_norm: dict[str, Tensor] = {}  # the row norms used by a DoRA merge, to undo it exactly

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def add(self, name: str, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
            dora: bool = False, init: bool | str = True, bias: bool = False) -> None:
        """Add adapter `name` of rank r (replacing one of the same name); `bias`: lora_B gets a trainable bias
        (zero at start), added as s * b (PEFT's lora_bias)."""
        check_rank(r, "LoRA rank r")
        dev, dt = _device(self.base_layer), _adapter_dtype(self.base_layer)
        A, B = new_factors(self.in_features, self.out_features, r, bias, init, dev, dt)
        self.lora_A[name], self.lora_B[name] = A, B
        self.lora_dropout[name] = (nn.Dropout(dropout) if dropout > 0 else nn.Identity()).train(self.training)
        self.scaling[name] = lora_scale(alpha, r, rslora)
        if dora:
            # m starts at ||W0 + s B A||_row, so that the adapted layer starts equal to the (adapted) base
            if dev.type == "meta":
                m = torch.empty(self.out_features, device=dev, dtype=dt)
            else:
                with torch.no_grad():
                    m = self._row_norm(name, dt)
            self.lora_magnitude_vector[name] = nn.Parameter(m)
        elif name in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[name]

    def set_factors(self, name: str, A: Tensor, B: Tensor, scale: float) -> None:
        """Adapter `name` from given factors A (r, in), B (out, r) and scale (used by combinations)."""
        self.add(name, A.shape[0], 1.0, init=False)
        with torch.no_grad():
            self.lora_A[name].weight.copy_(A)
            self.lora_B[name].weight.copy_(B)
        self.scaling[name] = scale

    # ---- math -------------------------------------------------------------------------------------------------------
    def delta_weight(self, name: str) -> Tensor:
        """s * B @ A, (out, in), in the adapter dtype."""
        return self.scaling[name] * (self.lora_B[name].weight @ self.lora_A[name].weight)

    def _row_norm(self, name: str, dtype: torch.dtype) -> Tensor:
        """||W0 + s B A|| over the input dimension, (out,), detached (DoRA treats it as a constant in backward)."""
        W = base_weight(self.base_layer, dtype).detach() + self.delta_weight(name).detach()
        return torch.linalg.vector_norm(W, dim=1)

    def forward(self, x: Tensor, *args: Any, **kw: Any) -> Tensor:
        if self.disabled:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kw)
        y = self.base_layer(x, *args, **kw)  # (..., out)
        todo = [n for n in self.active if n not in self.merged and n in self.lora_A]
        if not todo:
            return y
        out_dtype = y.dtype
        for n in todo:
            A, B = self.lora_A[n], self.lora_B[n]
            xa = self.lora_dropout[n](x.to(A.weight.dtype))
            lora = B(A(xa)) * self.scaling[n]  # (..., out), adapter dtype
            if n in self.lora_magnitude_vector:
                # DoRA: W' x = (m / ||W0 + sBA||) * (W0 x + s B A x); with W0 x taken from the base output (minus its
                # bias) in eval or without dropout, and recomputed on the dropped-out input otherwise (as PEFT).
                ratio = self.lora_magnitude_vector[n] / self._row_norm(n, A.weight.dtype)  # (out,)
                if isinstance(self.lora_dropout[n], nn.Identity) or not self.training:
                    base = y - self.base_layer.bias if getattr(self.base_layer, "bias", None) is not None else y
                    base = base.to(A.weight.dtype)
                else:
                    base = F.linear(xa, base_weight(self.base_layer, A.weight.dtype))
                lora = (ratio - 1) * base + ratio * lora
            y = y + lora.to(out_dtype)
        return y

    # ---- merging ----------------------------------------------------------------------------------------------------
    def _dense_base(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The base as an nn.Linear with a float weight of `dtype` (default: the base's own, or a quantized base's
        compute dtype); a quantized base is dequantized once, for merging."""
        b = self.base_layer
        plain = isinstance(getattr(b, "weight", None), torch.Tensor) and b.weight.is_floating_point() \
            and not hasattr(b, "dequantize")
        if plain and (dtype is None or b.weight.dtype == dtype):
            return b
        dt = dtype or getattr(b, "compute_dtype", torch.float32)
        dense = nn.Linear(self.in_features, self.out_features, bias=getattr(b, "bias", None) is not None,
                          device=_device(b), dtype=dt)
        with torch.no_grad():
            dense.weight.copy_(base_weight(b, dt))
            if dense.bias is not None:
                dense.bias.copy_(b.bias)
        dense.requires_grad_(False)
        self.base_layer = dense
        return dense

    @torch.no_grad()
    def merge(self, names: list[str] | None = None) -> None:
        """Fold adapters into the base weight: W0 + s B A, or for DoRA (m / ||W0 + s B A||) (W0 + s B A)."""
        for n in names if names is not None else self.active:
            if n in self.merged or n not in self.lora_A:
                continue
            if self.lora_B[n].bias is not None and getattr(self.base_layer, "bias", None) is None:
                raise ConfigError("a LoRA adapter with lora_bias cannot merge into a layer without a bias; keep it "
                                  "unmerged")
            W = self._dense_base().weight
            delta = self.delta_weight(n)
            if n in self.lora_magnitude_vector:
                self._dora_norm[n] = self._row_norm(n, delta.dtype)  # to undo the merge exactly
                new = dora_weight(W.to(delta.dtype), delta, self.lora_magnitude_vector[n])
            else:
                new = W.to(delta.dtype) + delta
            W.copy_(new.to(W.dtype))
            self._merge_bias(n, +1)
            self.merged.append(n)

    def _merge_bias(self, name: str, sign: int) -> None:
        """Add (sign +1) or take back (-1) adapter `name`'s bias s * b into the base bias (checked to exist)."""
        b = self.lora_B[name].bias
        if b is None:
            return
        base_bias = self.base_layer.bias
        base_bias.copy_((base_bias.to(b.dtype) + sign * self.scaling[name] * b).to(base_bias.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo merge, last merged first."""
        while self.merged:
            n = self.merged.pop()
            W = self.base_layer.weight
            delta = self.delta_weight(n)
            if n in self._dora_norm:
                ratio = self.lora_magnitude_vector[n] / self._dora_norm.pop(n)
                old = W.to(delta.dtype) / ratio[:, None] - delta
            else:
                old = W.to(delta.dtype) - delta
            W.copy_(old.to(W.dtype))
            self._merge_bias(n, -1)

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.lora_A[n].out_features}{' dora' if n in self.lora_magnitude_vector else ''}"
                         for n in self.lora_A)


# ---- the method -----------------------------------------------------------------------------------------------------
def apply(model: nn.Module, cfg: LoraConfig, name: str) -> None:
    """Wrap each target linear of `model` in a LoraLinear (once) and add adapter `name` to it.

    Raises:
        ConfigError: bad config, targets matching nothing, a target already wrapped by another method.
    """
    cfg.validate()
    paths = cfg.targets(model)
    for p in paths:  # check everything before changing anything
        m = model.get_submodule(p)
        if isinstance(m, AdapterLayer) and not isinstance(m, LoraLinear):
            raise ConfigError(f"module {p} is already adapted by {type(m).__name__}; LoRA cannot wrap it as well")
    for p in paths:
        m = model.get_submodule(p)
        if not isinstance(m, LoraLinear):
            m = LoraLinear(m)
            replace_module(model, p, m)
        r, alpha = cfg.rank_alpha(p)
        m.add(name, r, alpha, cfg.lora_dropout, cfg.use_rslora, cfg.use_dora, cfg.init_lora_weights, cfg.lora_bias)
    add_modules_to_save(model, cfg.modules_to_save, name)


def state_dict(model: nn.Module, name: str) -> dict[str, Tensor]:
    """Adapter `name` in PEFT's file naming: '<prefix><path>.lora_A.weight' (r, in), '.lora_B.weight' (out, r),
    '.lora_magnitude_vector' (out,); live tensors (they share storage with the parameters)."""
    out: dict[str, Tensor] = {}
    for path, m in model.named_modules():
        if isinstance(m, LoraLinear) and name in m.lora_A:
            out[file_key(path, "lora_A.weight")] = m.lora_A[name].weight.detach()
            out[file_key(path, "lora_B.weight")] = m.lora_B[name].weight.detach()
            if m.lora_B[name].bias is not None:
                out[file_key(path, "lora_B.bias")] = m.lora_B[name].bias.detach()
            if name in m.lora_magnitude_vector:
                out[file_key(path, "lora_magnitude_vector")] = m.lora_magnitude_vector[name].detach()
    out.update(modules_to_save_state_dict(model, name))
    return out


def shapes(model: nn.Module, cfg: LoraConfig) -> dict[str, tuple[int, ...]]:
    """The file keys and shapes `apply(model, cfg, ...)` would create (the model is not touched).

    Raises:
        ConfigError: as `apply`.
    """
    cfg.validate()
    out: dict[str, tuple[int, ...]] = {}
    for p in cfg.targets(model):
        m = model.get_submodule(p)
        r, _ = cfg.rank_alpha(p)
        out[file_key(p, "lora_A.weight")] = (r, m.in_features)
        out[file_key(p, "lora_B.weight")] = (m.out_features, r)
        if cfg.lora_bias:
            out[file_key(p, "lora_B.bias")] = (m.out_features,)
        if cfg.use_dora:
            out[file_key(p, "lora_magnitude_vector")] = (m.out_features,)
    out.update(modules_to_save_shapes(model, cfg.modules_to_save))
    return out


register(MethodSpec("lora", LoraConfig, apply, state_dict, shapes=shapes))
register(MethodSpec("dora", DoraConfig, apply, state_dict, shapes=shapes))
