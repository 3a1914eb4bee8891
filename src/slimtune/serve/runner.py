"""The forward passes of the server over the paged cache: a batched prefill of newly admitted prompts (left-padded,
causal), and one decode step for every running row. With CUDA graphs, decode steps are padded to a batch bucket and
a length bucket and each (batch, length) shape is captured once and replayed (an 8B model launches ~2,000 kernels a
step, which eager PyTorch issues slower than the GPU runs them).
"""
from __future__ import annotations

import torch
from torch import Tensor

from slimtune.serve.cache import PagedKVCache, pages_for
from slimtune.serve.lora import LoraContext


def bucket(n: int, cap: int) -> int:
    """The smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5 times them) >= n, at most cap."""
    p = 1
    while p < n:
        if p >= 2 and p * 3 // 2 >= n:
            return min(p * 3 // 2, cap)
        p *= 2
    return min(p, cap)


class DecodeGraph:
    """One decode step of a fixed (rows, length) shape captured as a CUDA graph, with its static input buffers."""

    def __init__(self, runner: Runner, B: int, S: int, pool) -> None:
        dev = runner.cache.device
        self.bufs = {"tok": torch.zeros(B, 1, dtype=torch.long, device=dev),
                     "pos": torch.zeros(B, 1, dtype=torch.long, device=dev),
                     "write": torch.zeros(B, dtype=torch.long, device=dev),
                     "read": torch.zeros(B, S, dtype=torch.long, device=dev),
                     "mask": torch.zeros(B, S, dtype=torch.long, device=dev),
                     "ids": torch.zeros(B, dtype=torch.long, device=dev)}
        self.bufs["mask"][:, 0] = 1  # warm-up and capture write and read the trash page only
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                runner.forward_decode(**self.bufs)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode="thread_local"):  # HTTP threads run on
            self.out = runner.forward_decode(**self.bufs)

    def __call__(self, **inputs: Tensor) -> Tensor:
        for k, t in inputs.items():
            self.bufs[k].copy_(t)
        self.graph.replay()
        return self.out


class Runner:
    """Runs `model` (a Decoder, possibly with MultiLoraLinear layers sharing `lora`) over `cache`.

    Args:
        cuda_graphs: replay decode steps as CUDA graphs (CUDA only).
        buckets: pad decode steps to bucketed shapes even without graphs (what graphs replay, checkable on the CPU).
    """

    def __init__(self, model, cache: PagedKVCache, lora: LoraContext | None, cuda_graphs: bool = False,
                 buckets: bool = False) -> None:
        self.model, self.cache, self.lora = model, cache, lora
        self.cuda_graphs, self.buckets = cuda_graphs, buckets or cuda_graphs
        self.graphs: dict[tuple[int, int], DecodeGraph] = {}
        self.pool = torch.cuda.graph_pool_handle() if cuda_graphs else None

    def reset(self) -> None:
        """Forget captured graphs (after the model's buffers changed shape, e.g. a larger adapter bank)."""
        self.graphs.clear()

    def capture_all(self, max_tokens: int, min_tokens: int = 1) -> int:
        """Capture the decode graphs of every batch bucket and every length bucket from min_tokens to max_tokens
        ahead of traffic (otherwise each is captured when first needed); returns how many graphs exist."""
        c = self.cache
        if self.cuda_graphs:
            lengths = {bucket(n, c.max_pages) * c.page_size
                       for n in range(pages_for(min_tokens, c.page_size), pages_for(max_tokens, c.page_size) + 1)}
            for B in sorted({bucket(n, c.max_rows) for n in range(1, c.max_rows + 1)}):
                for S in sorted(lengths):
                    if (B, S) not in self.graphs:
                        self.graphs[B, S] = DecodeGraph(self, B, S, self.pool)
        return len(self.graphs)

    def _begin(self, ids: Tensor) -> None:
        if self.lora is not None:
            self.lora.begin(ids)

    def prefill(self, rows: list[int], prompts: list[list[int]], slots: list[int]) -> Tensor:
        """Write the prompts' keys and values into their rows' pages; returns the last position's logits (B, V) fp32."""
        c, dev = self.cache, self.cache.device
        T = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=dev)
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        am = (torch.arange(T, device=dev)[None] >= (T - lengths)[:, None]).long()  # left padding
        c.static, c.pos = False, 0
        c.write = c.prefill_slots(torch.tensor(rows, device=dev), lengths, T)
        self._begin(torch.tensor(slots, device=dev))
        padded = any(len(p) < T for p in prompts)
        h = self.model.hidden_states(ids, attention_mask=am if padded else None, cache=c)
        return self.model.logits(h[:, -1]).float()  # the head, soft-capped where the model says

    def forward_decode(self, tok: Tensor, pos: Tensor, write: Tensor, read: Tensor, mask: Tensor,
                       ids: Tensor) -> Tensor:
        """One token per row: tok, pos (B, 1); write (B,); read, mask (B, S); ids (B,) adapter slots -> (B, V)."""
        c = self.cache
        c.static, c.write, c.read = True, write, read
        self._begin(ids)
        try:
            return self.model(tok, attention_mask=mask, position_ids=pos, cache=c)[:, -1]
        finally:
            c.static = False

    def decode(self, rows: list[int], pos: list[int], toks: list[int], slots: list[int]) -> Tensor:
        """Feed each row's last token at its position; returns the next logits (B, V) fp32."""
        c, dev, n = self.cache, self.cache.device, len(rows)
        need = pages_for(max(pos) + 1, c.page_size)
        if self.buckets:
            B, pages = bucket(n, c.max_rows), bucket(need, c.max_pages)
        else:
            B, pages = n, need
        pad = B - n
        meta = torch.tensor([rows + [c.pad_row] * pad, pos + [0] * pad, toks + [0] * pad, slots + [0] * pad],
                            device=dev)  # one host-to-device copy
        write, read, mask = c.decode_slots(meta[0], meta[1], pages * c.page_size)
        inputs = {"tok": meta[2][:, None], "pos": meta[1][:, None], "write": write, "read": read, "mask": mask,
                  "ids": meta[3]}
        if not self.cuda_graphs:
            return self.forward_decode(**inputs)[:n].float()
        key = (B, pages * c.page_size)
        if key not in self.graphs:
            self.graphs[key] = DecodeGraph(self, B, key[1], self.pool)
        return self.graphs[key](**inputs)[:n].float()
