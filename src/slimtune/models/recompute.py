"""Activation checkpointing of the decoder blocks, two ways.

`grad_ckpt=True`: PyTorch's non-reentrant checkpoint; each block keeps only its input (B, T, d) on the device and
recomputes the rest in backward. `grad_ckpt="offload"`: the block input goes to pinned host memory on a side stream as
soon as the block's forward has produced the next one, and comes back ahead of the block's backward: while block k
recomputes, the input of block k-1 is already being copied back (prefetch). The device then holds about two block
inputs instead of L of them (at 128k tokens of an 8B model, 2 x 1 GiB instead of 32 GiB).

The offloaded form is a reentrant checkpoint (an autograd Function whose backward reruns the block under
`enable_grad` and calls `torch.autograd.backward` on it): the block's trainable parameters are passed in as inputs so
that the first block, whose input needs no gradient, still gets its backward; their gradients accumulate in the
inner backward. RNG states (dropout) and the autocast setting of the forward are replayed in the recompute, so the
gradients equal those of the plain checkpoint (bitwise on the CPU: tests/test_models_recompute.py).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

CKPT_MODES = (False, True, "offload")
# under checkpointing, the MLP of a sequence longer than this runs in pieces of this many tokens (`layers.MLP.tile`):
# above the usual 2k-8k lengths, so those (and their CUDA-graphed steps) run as before
MLP_TILE = 8192


def capturing(x: Tensor) -> bool:
    """Whether a CUDA graph is being captured on x's stream: RNG states cannot be read then (graphed steps run no
    dropout, so there is nothing to replay)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def copy_on_stream(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream) -> torch.cuda.Event:
    """Copy CUDA tensor `src` into `dst` (pinned host memory, or back) on `stream`, overlapping the compute stream;
    returns the event that marks the copy done. `src` stays alive for the allocator until the copy ends."""
    stream.wait_stream(torch.cuda.current_stream(src.device))  # src is fully written
    with torch.cuda.stream(stream):
        dst.copy_(src, non_blocking=True)
        ev = torch.cuda.Event()
        ev.record(stream)
    src.record_stream(stream)  # the allocator may reuse src's memory only once the copy is done
    return ev

class HostPool:
    """Pinned host buffers for block inputs, one per block index, reused from step to step (allocating pinned memory
    costs far more than copying into it). On the CPU the "host" copy is an ordinary clone."""

    def __init__(self) -> None:
        self.buffers: dict[int, Tensor] = {}

    def buffer(self, i: int, like: Tensor) -> Tensor:
        b = self.buffers.get(i)
        if b is None or b.shape != like.shape or b.dtype != like.dtype:
            b = torch.empty(like.shape, dtype=like.dtype, pin_memory=like.is_cuda)
            self.buffers[i] = b
        return b


class OffloadedInputs:
    """One forward pass's offloaded block inputs: D2H copies on a side stream, prefetching H2D copies in backward."""

    def __init__(self, pool: HostPool, device: torch.device) -> None:
        self.pool, self.device = pool, device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.host: list[Tensor] = []
        self.saved: list[torch.cuda.Event | None] = []
        self.fetched: dict[int, tuple[Tensor, torch.cuda.Event | None]] = {}

    def offload(self, x: Tensor) -> int:
        """Start copying block input x to host; returns its slot."""
        i = len(self.host)
        h = self.pool.buffer(i, x)
        if not self.cuda:
            h.copy_(x)
            self.host.append(h)
            self.saved.append(None)
            return i
        self.host.append(h)
        self.saved.append(copy_on_stream(h, x, self.stream))
        return i

    def _start_fetch(self, i: int) -> None:
        if i < 0 or i in self.fetched:
            return
        h = self.host[i]
        if not self.cuda:
            self.fetched[i] = (h.clone(), None)
            return
        main = torch.cuda.current_stream(self.device)
        x = torch.empty(h.shape, dtype=h.dtype, device=self.device)  # owned by the main stream
        self.stream.wait_stream(main)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.saved[i])  # the D2H copy of this slot is complete
            x.copy_(h, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        self.fetched[i] = (x, ev)

    def fetch(self, i: int) -> Tensor:
        """Block input `i` back on the device (waiting for its copy), and the prefetch of block i-1 started."""
        self._start_fetch(i)
        x, ev = self.fetched.pop(i)
        if ev is not None:
            torch.cuda.current_stream(self.device).wait_event(ev)
        self._start_fetch(i - 1)
        return x


class _OffloadedBlock(torch.autograd.Function):
    """y = block(x, *extra) with x kept on the host; backward recomputes the block and backpropagates through it.

    dL/dx and the parameter gradients come from the inner `torch.autograd.backward(y, dL/dy)` on the recomputed
    block, exactly as a reentrant checkpoint; the parameters' own slots here get None (already accumulated)."""

    @staticmethod
    def forward(ctx, inputs: OffloadedInputs, block: nn.Module, x: Tensor, cos, sin, mask, *params: Tensor):
        ctx.inputs, ctx.block, ctx.extra = inputs, block, (cos, sin, mask)
        ctx.slot = inputs.offload(x)
        ctx.x_grad = x.requires_grad
        dev = x.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.rng = None if capturing(x) else (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda
                                             else None)  # replayed for dropout
        with torch.no_grad():
            return block(x, cos, sin, mask)

    @staticmethod
    def backward(ctx, gy: Tensor):
        x = ctx.inputs.fetch(ctx.slot).detach().requires_grad_(ctx.x_grad)
        dev, on, dtype = ctx.autocast
        devices = [x.device] if x.is_cuda else []
        with torch.random.fork_rng(devices=devices, enabled=ctx.rng is not None), torch.enable_grad(), \
                torch.autocast(dev, dtype=dtype, enabled=on):
            if ctx.rng is not None:
                torch.set_rng_state(ctx.rng[0])
                if ctx.rng[1] is not None:
                    torch.cuda.set_rng_state(ctx.rng[1], x.device)
            y = ctx.block(x, *ctx.extra)
        torch.autograd.backward(y, gy)
        n_params = len(ctx.needs_input_grad) - 6
        return (None, None, x.grad if ctx.x_grad else None, None, None, None) + (None,) * n_params


def checkpointed(i: int, mode, n_ckpt: int | None) -> bool | str:
    """The checkpoint mode of block i: `mode` for the first `n_ckpt` blocks (None: all), False after them."""
    return mode if n_ckpt is None or i < n_ckpt else False


def run_blocks(layers: nn.ModuleList, x: Tensor, cos, sin, mask, cache, mode, pool: HostPool | None,
               n_ckpt: int | None = None) -> Tensor:
    """Run the decoder blocks on x (B, T, d) with checkpointing `mode` (False, True or "offload"; see the module
    docstring) for the first `n_ckpt` of them (None: all; the later blocks keep their activations, which costs memory
    and saves their recomputation) and return the last block's output."""
    from torch.utils.checkpoint import checkpoint

    offloaded = OffloadedInputs(pool, x.device) if mode == "offload" else None
    for i, layer in enumerate(layers):
        mode_i = checkpointed(i, mode, n_ckpt)
        if mode_i == "offload":
            params = [p for p in layer.parameters() if p.requires_grad]
            x = _OffloadedBlock.apply(offloaded, layer, x, cos, sin, mask, *params)
        elif mode_i:
            x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False, preserve_rng_state=not capturing(x))
        else:
            x = layer(x, cos, sin, mask, cache)
    return x
