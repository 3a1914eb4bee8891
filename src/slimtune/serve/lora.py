"""Many LoRA adapters in one batch: every adapted linear holds the factors of all loaded adapters stacked in slots
(slot 0 = no adapter, all zeros; smaller ranks padded with zero rows to the bank's rank; the scale folded into B), and
each batch row names its slot. The update of all rows of all adapters is one gathered computation, no loop over
adapters: dense (x through every slot's A at once, then the other slots' columns masked off) or gathered (each row's
own A and B, two batched matmuls). Projections that share their input (q, k, v; gate, up) keep their A's in one
tensor, so that in dense mode x goes through all of them in one matmul and one mask (`lora_grouped`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor, nn

from slimtune.errors import CheckpointError, ConfigError
from slimtune.models.projections import project
from slimtune.peft.base import FILE_PREFIX
from slimtune.peft.targets import replace_module

LORA_MODES = ("auto", "dense", "gather")
DENSE_MAX_SLOTS = 32  # auto: dense while slots <= this (its flops grow with the slot count; gather's copies do not)
# sibling projections the decoder computes from one input in one `project` call (models/attention.py, layers.py)
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

Factors = dict[str, tuple[Tensor, Tensor, float]]  # module path -> (A (r, in), B (out, r), scale)


def lora_grouped(x: Tensor, other: Tensor, A_cat: Tensor, Bs: Sequence[Tensor], ys: Sequence[Tensor]) -> list[Tensor]:
    """For G projections of one input: y_g + sum over slots s of [row's slot == s] * (x A_{g,s}^T) B_{g,s}, every slot
    computed and the others masked off. Kernels: one matmul and one mask for the group, one addmm per projection.

    The mask stays a kernel of its own (one per group, not per projection): it depends on the row, so it cannot be
    folded into the factors, and PyTorch has no matmul with an elementwise epilogue to fuse it into.

    Args:
        x: (N, T, in); other: (N, R) bool with R = S*r, True on the columns of the slots that are not the row's;
        A_cat: (G*R, in), projection g's A (S, r, in) in rows g*R .. (g+1)*R; Bs: G of (S, r, out_g);
        ys: G base outputs (N, T, out_g), added by the addmm's (no separate kernel).
    Returns:
        G tensors (N, T, out_g).
    """
    N, T, _ = x.shape
    R = other.shape[1]
    xa = x.reshape(N * T, -1) @ A_cat.T  # (N*T, G*R): x through every slot's A of every projection
    xa.view(N, T, -1, R).masked_fill_(other[:, None, None, :], 0)  # each projection keeps the row's own slot
    return [torch.addmm(y.reshape(N * T, -1), xa[:, g * R:(g + 1) * R], B.reshape(R, -1)).view(y.shape)
            for g, (B, y) in enumerate(zip(Bs, ys))]  # (N*T, R) @ (R, out_g), strided columns of xa: no copy


def lora_gather(x: Tensor, ids: Tensor, A: Tensor, B: Tensor, y: Tensor) -> Tensor:
    """y + (x A_{ids}^T) B_{ids} with each row's factors gathered: x (N, T, in), ids (N,), y (N, T, out)."""
    return torch.baddbmm(y, torch.bmm(x, A[ids].transpose(1, 2)), B[ids])  # (N, T, r), then (N, T, out)


class LoraContext:
    """What every served LoRA layer of one model shares: the slot of each batch row for the current forward, the bank
    shape (slots, rank) and the mode; `begin(ids)` before each forward (the dense masks are built once per forward)."""

    def __init__(self, slots: int, rank: int, mode: str = "auto") -> None:
        if mode not in LORA_MODES:
            raise ConfigError(f"unknown LoRA mode {mode!r}; choose one of {', '.join(LORA_MODES)}")
        self.slots, self.rank, self.mode = slots, rank, mode
        self.ids = torch.zeros(1, dtype=torch.long)
        self._other: Tensor | None = None

    @property
    def dense(self) -> bool:
        return self.mode == "dense" or (self.mode == "auto" and self.slots <= DENSE_MAX_SLOTS)

    def begin(self, ids: Tensor) -> None:
        self.ids, self._other = ids, None

    def other(self) -> Tensor:
        """(N, slots*rank) bool: True on the columns of the slots that are not the row's (what dense mode masks)."""
        if self._other is None:
            col = torch.arange(self.slots * self.rank, device=self.ids.device) // self.rank  # column -> its slot
            self._other = self.ids[:, None] != col[None, :]
        return self._other


class MultiLoraLinear(nn.Module):
    """base_layer(x) + the LoRA update of each row's adapter slot. Buffers A (slots, r, in) and B (slots, r, out)
    hold s * B^T so that the update is (x A^T) B with no scale; `base_layer` may be quantized (NF4 ...). After
    `stack_A`, A is a view of rows `index` of `A_group`, the A's of the projections sharing its input."""

    def __init__(self, base_layer: nn.Module, ctx: LoraContext, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.base_layer, self.ctx = base_layer, ctx
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.register_buffer("A", torch.zeros(ctx.slots, ctx.rank, self.in_features, dtype=dtype, device=device))
        self.register_buffer("B", torch.zeros(ctx.slots, ctx.rank, self.out_features, dtype=dtype, device=device))
        self.A_group: Tensor | None = None  # (G*slots*r, in), not a buffer: A is the registered view
        self.index = 0  # which of the G blocks of A_group is A

    @torch.no_grad()
    def resize(self, slots: int, rank: int) -> None:
        """Grow to (slots, rank), keeping every slot's factors (new rows and slots are zero); A leaves its group."""
        for name in ("A", "B"):
            old = getattr(self, name)
            new = old.new_zeros(slots, rank, old.shape[2])
            new[:old.shape[0], :old.shape[1]] = old
            setattr(self, name, new)
        self.A_group = None

    @torch.no_grad()
    def set_slot(self, slot: int, A: Tensor | None, B: Tensor | None, scale: float = 1.0) -> None:
        """Slot `slot` := A (r, in), B (out, r) scaled, zero-padded to the bank rank; None clears it."""
        self.A[slot].zero_()
        self.B[slot].zero_()
        if A is not None:
            r = A.shape[0]
            self.A[slot, :r] = A.to(self.A)
            self.B[slot, :r] = (B.double().T * scale).to(self.B)  # (r, out), the scale folded in

    def update(self, x: Tensor, y: Tensor) -> Tensor:
        """y (the base output of x) + this layer's LoRA update of each row, alone (dense or gathered)."""
        ids, dt = self.ctx.ids, self.A.dtype
        x3 = x.reshape(ids.shape[0], -1, self.in_features).to(dt)  # (N rows, T, in)
        y3 = y.reshape(ids.shape[0], -1, self.out_features).to(dt)
        if self.ctx.dense:
            S, r, _ = self.A.shape
            out = lora_grouped(x3, self.ctx.other(), self.A.reshape(S * r, -1), [self.B], [y3])[0]
        else:
            out = lora_gather(x3, ids, self.A, self.B, y3)
        return out.reshape(y.shape).to(y.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.update(x, self.base_layer(x))

    def group_forward(self, x: Tensor, layers: Sequence[nn.Module]) -> list[Tensor]:
        """The outputs of `layers` (served and plain linears sharing the input x), for `models.projections.project`:
        their base outputs in one `project` call (as without adapters), then, in dense mode and when the served ones
        are exactly one stacked group, their updates through `lora_grouped`; else each served layer's own update."""
        ys = project(x, [getattr(m, "base_layer", m) for m in layers])
        served = [(i, m) for i, m in enumerate(layers) if isinstance(m, MultiLoraLinear)]
        group = served[0][1].A_group
        whole = group is not None and sorted(m.index for _, m in served) == list(range(len(served))) and \
            all(m.A_group is group and m.A._base is group for _, m in served) and \
            len(served) * served[0][1].A.numel() == group.numel()  # each A still a view of the group, all of it here
        if not (self.ctx.dense and whole):
            return [m.update(x, y) if isinstance(m, MultiLoraLinear) else y for m, y in zip(layers, ys)]
        served.sort(key=lambda im: im[1].index)  # the order of A_group's blocks
        N, dt = self.ctx.ids.shape[0], group.dtype
        y3 = [ys[i].reshape(N, -1, m.out_features).to(dt) for i, m in served]
        outs = lora_grouped(x.reshape(N, -1, x.shape[-1]).to(dt), self.ctx.other(), group, [m.B for _, m in served],
                            y3)
        for (i, _), o in zip(served, outs):
            ys[i] = o.reshape(ys[i].shape).to(ys[i].dtype)
        return ys


@torch.no_grad()
def stack_A(layers: Sequence[MultiLoraLinear]) -> None:
    """Copy the A's (S, r, in) of `layers` (projections of one input, one bank shape) into one (G*S*r, in) tensor and
    make each layer's A a view of its rows: stored once, so no concatenation per forward. CUDA graphs captured before
    read the old tensors and must be recaptured (AdapterBank.add says so)."""
    S, r, d = layers[0].A.shape
    if any(m.A.shape != (S, r, d) or m.A.dtype != layers[0].A.dtype for m in layers):
        return  # not one group: each keeps its own A
    group = torch.cat([m.A.reshape(S * r, d) for m in layers])
    for g, m in enumerate(layers):
        m.A, m.A_group, m.index = group[g * S * r:(g + 1) * S * r].view(S, r, d), group, g


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
        if grew:
            self._regroup()
        for path, m in self.layers.items():
            A, B, scale = factors.get(path, (None, None, 1.0))
            m.set_slot(slot, A, B, scale)
        self.names[name] = slot
        return grew

    def _regroup(self) -> None:
        """Stack the A's of each set of sibling layers named together in GROUPS (e.g. one block's q, k, v), after
        layers were added or resized; layers outside GROUPS (o, down) keep their own A."""
        sets: dict[tuple[str, int], list[tuple[int, MultiLoraLinear]]] = {}
        for path, m in self.layers.items():
            parent, _, name = path.rpartition(".")
            for k, names in enumerate(GROUPS):
                if name in names:
                    sets.setdefault((parent, k), []).append((names.index(name), m))
        for members in sets.values():
            stack_A([m for _, m in sorted(members, key=lambda im: im[0])])

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
