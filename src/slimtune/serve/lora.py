"""Many LoRA adapters in one batch: every adapted linear holds the factors of all loaded adapters stacked in slots
(slot 0 = no adapter, all zeros; smaller ranks padded with zero rows to the bank's rank; the scale folded into B), and
each batch row names its slot. The update of all rows of all adapters is one gathered computation, no loop over
adapters: `lora_dense` (x through every slot's A at once, then the other slots' columns masked off) or `lora_gather`
(each row's own A and B gathered, two batched matmuls).
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from slimtune.errors import CheckpointError, ConfigError
from slimtune.peft.base import FILE_PREFIX
from slimtune.peft.targets import replace_module

LORA_MODES = ("auto", "dense", "gather")
DENSE_MAX_SLOTS = 32  # auto: dense while slots <= this (its flops grow with the slot count; gather's copies do not)

Factors = dict[str, tuple[Tensor, Tensor, float]]  # module path -> (A (r, in), B (out, r), scale)


def lora_dense(x: Tensor, own: Tensor, A: Tensor, B: Tensor, y: Tensor) -> Tensor:
    """y + sum over slots s of [row's slot == s] * (x A_s^T) B_s, every slot computed and the others masked off.

    Args:
        x: (N, T, in); own: (N, S*r) bool, True on the r columns of the row's slot; A: (S, r, in); B: (S, r, out);
        y: (N, T, out), the base output (added by the second matmul, no separate kernel).
    Returns:
        (N, T, out).
    """
    S, r, _ = A.shape
    xa = (x @ A.reshape(S * r, -1).T).masked_fill_(~own[:, None, :], 0)  # (N, T, S*r): x through every A
    return torch.addmm(y.reshape(-1, B.shape[2]), xa.reshape(-1, S * r), B.reshape(S * r, -1)).view(y.shape)


def lora_gather(x: Tensor, ids: Tensor, A: Tensor, B: Tensor, y: Tensor) -> Tensor:
    """y + (x A_{ids}^T) B_{ids} with each row's factors gathered: x (N, T, in), ids (N,), y (N, T, out)."""
    return torch.baddbmm(y, torch.bmm(x, A[ids].transpose(1, 2)), B[ids])  # (N, T, r), then (N, T, out)


class LoraContext:
    """What every served LoRA layer of one model shares: the slot of each batch row for the current forward, the bank
    shape (slots, rank) and the mode; `begin(ids)` before each forward (the dense mask is built once per forward)."""

    def __init__(self, slots: int, rank: int, mode: str = "auto") -> None:
        if mode not in LORA_MODES:
            raise ConfigError(f"unknown LoRA mode {mode!r}; choose one of {', '.join(LORA_MODES)}")
        self.slots, self.rank, self.mode = slots, rank, mode
        self.ids = torch.zeros(1, dtype=torch.long)
        self._own: Tensor | None = None

    @property
    def dense(self) -> bool:
        return self.mode == "dense" or (self.mode == "auto" and self.slots <= DENSE_MAX_SLOTS)

    def begin(self, ids: Tensor) -> None:
        self.ids, self._own = ids, None

    def own(self) -> Tensor:
        """(N, slots*rank) bool: True on the columns of each row's slot."""
        if self._own is None:
            col = torch.arange(self.slots * self.rank, device=self.ids.device) // self.rank  # column -> its slot
            self._own = self.ids[:, None] == col[None, :]
        return self._own


class MultiLoraLinear(nn.Module):
    """base_layer(x) + the LoRA update of each row's adapter slot. Buffers A (slots, r, in) and B (slots, r, out)
    hold s * B^T so that the update is (x A^T) B with no scale; `base_layer` may be quantized (NF4 ...)."""

    def __init__(self, base_layer: nn.Module, ctx: LoraContext, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.base_layer, self.ctx = base_layer, ctx
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.register_buffer("A", torch.zeros(ctx.slots, ctx.rank, self.in_features, dtype=dtype, device=device))
        self.register_buffer("B", torch.zeros(ctx.slots, ctx.rank, self.out_features, dtype=dtype, device=device))

    @torch.no_grad()
    def resize(self, slots: int, rank: int) -> None:
        """Grow to (slots, rank), keeping every slot's factors (new rows and slots are zero)."""
        for name in ("A", "B"):
            old = getattr(self, name)
            new = old.new_zeros(slots, rank, old.shape[2])
            new[:old.shape[0], :old.shape[1]] = old
            setattr(self, name, new)

    @torch.no_grad()
    def set_slot(self, slot: int, A: Tensor | None, B: Tensor | None, scale: float = 1.0) -> None:
        """Slot `slot` := A (r, in), B (out, r) scaled, zero-padded to the bank rank; None clears it."""
        self.A[slot].zero_()
        self.B[slot].zero_()
        if A is not None:
            r = A.shape[0]
            self.A[slot, :r] = A.to(self.A)
            self.B[slot, :r] = (B.double().T * scale).to(self.B)  # (r, out), the scale folded in

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        ids, dt = self.ctx.ids, self.A.dtype
        x3 = x.reshape(ids.shape[0], -1, self.in_features).to(dt)  # (N rows, T, in)
        y3 = y.reshape(ids.shape[0], -1, self.out_features).to(dt)
        if self.ctx.dense:
            out = lora_dense(x3, self.ctx.own(), self.A, self.B, y3)
        else:
            out = lora_gather(x3, ids, self.A, self.B, y3)
        return out.reshape(y.shape).to(y.dtype)


def read_lora(skeleton: nn.Module, folder: str | Path) -> tuple[Factors, int]:
    """The factors of a PEFT LoRA adapter folder, checked against `skeleton` (the served architecture, e.g. on meta).

    Returns:
        ({module path: (A (r, in), B (out, r), scale)}, the largest rank), tensors on the CPU as stored.
    Raises:
        CheckpointError: missing / malformed files, a shape or name that does not fit the model, a method other than
            plain LoRA (DoRA's magnitude vector and modules_to_save do not stack: merge those with --merge).
    """
    from safetensors.torch import load_file

    from slimtune.peft.files import check_adapter
    from slimtune.peft.lora import LoraConfig, lora_scale

    method, cfg, wfile = check_adapter(skeleton, folder)
    if method != "lora" or not isinstance(cfg, LoraConfig) or cfg.use_dora:
        raise CheckpointError(f"{folder}: a {'DoRA' if getattr(cfg, 'use_dora', False) else method} adapter; the "
                              "server batches plain LoRA adapters only (serve this one merged: --merge)")
    if cfg.lora_bias:
        raise CheckpointError(f"{folder}: the adapter has a lora_bias, which the batched server does not apply; serve "
                              "it merged (--merge)")
    if cfg.modules_to_save:
        raise CheckpointError(f"{folder}: the adapter trains whole modules ({cfg.modules_to_save}), which cannot be "
                              "batched with other adapters; serve it merged (--merge)")
    sd = load_file(str(wfile))
    out: Factors = {}
    for key, A in sd.items():
        if key.endswith(".lora_A.weight"):
            path = key[len(FILE_PREFIX):-len(".lora_A.weight")]
            B = sd[key.replace(".lora_A.weight", ".lora_B.weight")]
            if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
                raise CheckpointError(f"{wfile}: {path} holds inf or NaN values")
            r, alpha = cfg.rank_alpha(path)
            out[path] = (A, B, lora_scale(alpha, r, cfg.use_rslora))
    return out, max(A.shape[0] for A, _, _ in out.values())


class AdapterBank:
    """The adapters a model serves, by name: their slots, how many running requests use each (an unloaded adapter's
    slot is cleared only when its last request ends), and the MultiLoraLinear layers (added on first use)."""

    def __init__(self, model: nn.Module, slots: int = 4, rank: int = 8, mode: str = "auto") -> None:
        p = model.model.embed_tokens.weight
        self.model, self.dtype, self.device = model, p.dtype, p.device
        self.ctx = LoraContext(slots + 1, rank, mode)  # + slot 0, the base
        self.layers: dict[str, MultiLoraLinear] = {}
        self.names: dict[str, int] = {}
        self.refs = [0] * (slots + 1)
        self.retired: set[int] = set()  # slots of unloaded adapters still in use

    def _free_slot(self) -> int | None:
        used = set(self.names.values()) | self.retired
        return next((s for s in range(1, self.ctx.slots) if s not in used), None)

    def add(self, name: str, factors: Factors, rank: int) -> bool:
        """Load adapter `name` into a free slot (growing the bank if needed); True when buffer shapes changed (CUDA
        graphs must be recaptured).

        Raises:
            ConfigError: the name is in use.
        """
        if name in self.names:
            raise ConfigError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
        slot, old = self._free_slot(), self.ctx.slots
        shape = (old if slot is not None else 2 * old, max(rank, self.ctx.rank))
        grew = shape != (old, self.ctx.rank) or any(p not in self.layers for p in factors)
        if shape != (old, self.ctx.rank):
            self._resize(*shape)
        slot = old if slot is None else slot
        for path in factors:
            if path not in self.layers:
                m = MultiLoraLinear(self.model.get_submodule(path), self.ctx, self.dtype, self.device)
                replace_module(self.model, path, m)
                self.layers[path] = m
        for path, m in self.layers.items():
            A, B, scale = factors.get(path, (None, None, 1.0))
            m.set_slot(slot, A, B, scale)
        self.names[name] = slot
        return grew

    def _resize(self, slots: int, rank: int) -> None:
        for m in self.layers.values():
            m.resize(slots, rank)
        self.refs += [0] * (slots - self.ctx.slots)
        self.ctx.slots, self.ctx.rank = slots, rank

    def remove(self, name: str) -> None:
        """Unload adapter `name`: new requests cannot use it; its slot is cleared once no request runs on it.

        Raises:
            ConfigError: no such adapter.
        """
        if name not in self.names:
            raise ConfigError(f"no adapter named {name!r} is loaded")
        slot = self.names.pop(name)
        self.retired.add(slot)
        if self.refs[slot] == 0:
            self._clear(slot)

    def _clear(self, slot: int) -> None:
        for m in self.layers.values():
            m.set_slot(slot, None, None)
        self.retired.discard(slot)

    def acquire(self, name: str | None) -> int:
        """The slot of adapter `name` (0 for None, the base), counted as used by one more request.

        Raises:
            ConfigError: no such adapter (e.g. unloaded since the request arrived).
        """
        if name is None:
            return 0
        if name not in self.names:
            raise ConfigError(f"adapter {name!r} was unloaded")
        slot = self.names[name]
        self.refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        if slot == 0:
            return
        self.refs[slot] -= 1
        if self.refs[slot] == 0 and slot in self.retired:
            self._clear(slot)
