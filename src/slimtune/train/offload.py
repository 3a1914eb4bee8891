"""Activation offloading: tensors saved for backward are copied to pinned host memory on a side CUDA stream during
forward and copied back when backward needs them, so GPU memory holds roughly the block being computed.

Built on `torch.autograd.graph.saved_tensors_hooks`. Parameters (and views of them), autocast's copies of trainable
weights and tensors under `min_bytes` stay where they are. On the CPU the same path runs with plain copies, so that
exactness can be tested (gradients are identical with and without it). Tensors saved inside checkpointed blocks are
packed by the checkpoint's own (inner) hooks and are not offloaded; combine it with checkpointing only for the rest.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from slimtune.models.recompute import copy_on_stream


def _is_weight_copy(t: Tensor) -> bool:
    """An autocast cast of a trainable leaf (ToCopy whose input is AccumulateGrad), possibly viewed (w.t())."""
    b = t._base if t._base is not None else t
    gf = b.grad_fn
    return gf is not None and type(gf).__name__ == "ToCopyBackward0" and bool(gf.next_functions) and \
        type(gf.next_functions[0][0]).__name__ == "AccumulateGrad"


class _Slot:
    """One offloaded tensor: its host copy (and the event of that copy), the device copy once fetched back."""

    __slots__ = ("index", "host", "saved", "device", "gpu", "ready", "nbytes")

    def __init__(self, index: int, host: Tensor, saved, device: torch.device, nbytes: int) -> None:
        self.index, self.host, self.saved, self.device, self.nbytes = index, host, saved, device, nbytes
        self.gpu: Tensor | None = None
        self.ready = None


class offload_activations(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: `with offload_activations(model): loss = loss_fn(model(x))`, then `loss.backward()`
    anywhere (the unpack hooks travel with the graph).

    Backward needs the saved tensors in about the reverse order they were saved, so when it asks for one, the
    copies back of the ones saved just before it (up to `prefetch_bytes`) are started on the side stream: the
    transfers overlap the backward compute instead of stalling it.

    Args:
        model: its parameters are never offloaded (None: only nn.Parameter objects themselves are recognised).
        min_bytes: tensors smaller than this stay on the device (default 1 MiB).
        prefetch_bytes: how much to copy back ahead of backward (default 512 MiB).
    Attributes:
        offloaded_bytes / kept_bytes: totals packed to host / left in place during this context's forward.
    """

    def __init__(self, model: nn.Module | None = None, min_bytes: int = 1 << 20,
                 prefetch_bytes: int = 512 << 20) -> None:
        self.min_bytes, self.prefetch_bytes = min_bytes, prefetch_bytes
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()} if model is not None else set()
        self.stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self.offloaded_bytes = self.kept_bytes = 0
        self.slots: list[_Slot] = []
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: Tensor):
        nbytes = t.numel() * t.element_size()
        if (isinstance(t, nn.Parameter) or nbytes < self.min_bytes or t.device.type not in ("cuda", "cpu")
                or t.untyped_storage().data_ptr() in self.param_ptrs or _is_weight_copy(t)):
            self.kept_bytes += nbytes
            return t
        self.offloaded_bytes += nbytes
        if t.device.type == "cpu":  # the testable path: a real copy, the original may be freed
            host = torch.empty_like(t)
            host.copy_(t)
            slot = _Slot(len(self.slots), host, None, t.device, nbytes)
        else:
            host = torch.empty_like(t, device="cpu", pin_memory=True)  # keeps t's strides (dense tensors)
            slot = _Slot(len(self.slots), host, copy_on_stream(host, t, self.stream), t.device, nbytes)
        self.slots.append(slot)
        return slot

    def _fetch(self, slot: _Slot) -> None:
        """Start copying `slot` back to the device (once)."""
        if slot.gpu is not None or slot.host is None:
            return
        if slot.saved is None:  # CPU
            slot.gpu = slot.host
            return
        main = torch.cuda.current_stream(slot.device)
        gpu = torch.empty_like(slot.host, device=slot.device)  # allocated by the main stream, written by the side
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(slot.saved)
            gpu.copy_(slot.host, non_blocking=True)
            slot.ready = torch.cuda.Event()
            slot.ready.record(self.stream)
        slot.gpu = gpu

    def _unpack(self, packed):
        if isinstance(packed, Tensor):
            return packed
        slot: _Slot = packed
        self._fetch(slot)
        ahead, i = 0, slot.index - 1
        while i >= 0 and ahead < self.prefetch_bytes:  # the ones backward will ask for next
            self._fetch(self.slots[i])
            ahead += self.slots[i].nbytes
            i -= 1
        if slot.ready is not None:
            torch.cuda.current_stream(slot.device).wait_event(slot.ready)
        t, slot.gpu, slot.host = slot.gpu, None, None  # the host copy goes back to the pinned-memory cache
        return t
