"""The server's paged KV cache: per layer one pool of fixed-size pages shared by every request, a page table per batch
row, and the `update(layer, k, v)` protocol that `Decoder` calls. A request holds only the pages its prompt plus its
max_tokens need (no block of the maximum length per request), and gives them back when it ends.
"""
from __future__ import annotations

import torch
from torch import Tensor

from slimtune.models.config import ModelConfig

TRASH_PAGE = 0  # never handed out: padding tokens and padding rows write here, and masked reads point here


class PagePool:
    """Free-list allocator of page ids 1..num_pages-1 (page 0 is the trash page)."""

    def __init__(self, num_pages: int) -> None:
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        """n page ids, or None (nothing taken) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


class PagedKVCache:
    """Keys and values in pages of `page_size` positions: per layer a pool (num_pages * page_size, nkv, hd), and a
    page table (max_rows + 1, max_pages) of page ids per batch row (the last row is the padding row: all trash).

    The decoder calls `update(layer, k, v)` with k, v (B, nkv, T, hd). Before a forward the caller sets `write`, the
    flat pool position of each new token ((B, T), or (B,) in decode), and for decode `static = True` and `read`, the
    (B, S) flat positions to attend over, with the (B, S) mask of those that hold this row's tokens. In prefill
    (static False, pos 0) the prompt attends over itself only; in decode every row attends over its gathered pages.
    """

    def __init__(self, cfg: ModelConfig, num_pages: int, page_size: int, max_rows: int, max_len: int,
                 device: torch.device | str, dtype: torch.dtype) -> None:
        self.page_size, self.max_rows, self.max_len = page_size, max_rows, max_len
        self.max_pages = pages_for(max_len, page_size)
        shape = (num_pages * page_size, cfg.num_key_value_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.table = torch.full((max_rows + 1, self.max_pages), TRASH_PAGE, dtype=torch.long, device=device)
        self.pool = PagePool(num_pages)
        self.device = torch.device(device)
        self.static = False
        self.pos = 0  # the decoder's count of cached positions; 0 in prefill: prompts attend over themselves
        self.write = torch.zeros(1, dtype=torch.long, device=device)
        self.read = torch.zeros(1, 1, dtype=torch.long, device=device)

    @property
    def pad_row(self) -> int:
        return self.max_rows

    def bytes_per_token(self) -> int:
        return 2 * len(self.k) * self.k[0][0].numel() * self.k[0].element_size()

    def assign(self, row: int, pages: list[int]) -> None:
        """Give batch row `row` these pages (in position order); the rest of its table row points at the trash."""
        t = torch.full((self.max_pages,), TRASH_PAGE, dtype=torch.long)
        t[:len(pages)] = torch.tensor(pages, dtype=torch.long)
        self.table[row].copy_(t.to(self.device))

    def flat(self, rows: Tensor, pos: Tensor) -> Tensor:
        """Flat pool positions of positions `pos` (any shape (B, ...)) of batch rows `rows` (B,)."""
        P = self.page_size
        page = self.table[rows].gather(1, (pos // P).reshape(len(rows), -1)).view(pos.shape)
        return page * P + pos % P

    def prefill_slots(self, rows: Tensor, lengths: Tensor, T: int) -> Tensor:
        """(B, T) write positions of left-padded prompts of `lengths` (B,); padding goes to the trash page."""
        p = torch.arange(T, device=self.device)[None] - (T - lengths)[:, None]  # (B, T) position of each column
        return torch.where(p >= 0, self.flat(rows, p.clamp_min(0)), TRASH_PAGE * self.page_size)

    def decode_slots(self, rows: Tensor, pos: Tensor, S: int) -> tuple[Tensor, Tensor, Tensor]:
        """For one new token per row at position pos (B,): write (B,), read (B, S) and mask (B, S) (1 = attend)."""
        P = self.page_size
        pages = self.table[rows, :S // P]  # (B, S/P)
        read = (pages[:, :, None] * P + torch.arange(P, device=self.device)).reshape(len(rows), S)
        s = torch.arange(S, device=self.device)[None]
        mask = s <= pos[:, None]  # sliding layers narrow it further (`window_mask`)
        return self.flat(rows, pos), read, mask.long()

    def window_mask(self, position_ids: Tensor, window: int) -> Tensor:
        """Decode: (B, 1, 1, S), True for the read positions within `window` of each row's new token at
        position_ids (B, 1) (read position s holds the row's token at position s), as a sliding layer sees."""
        s = torch.arange(self.read.shape[1], device=self.device)[None]
        return (s > position_ids - window)[:, None, None, :]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        B, H, T, D = k.shape
        self.k[layer].index_copy_(0, self.write.reshape(-1), k.transpose(1, 2).reshape(B * T, H, D))
        self.v[layer].index_copy_(0, self.write.reshape(-1), v.transpose(1, 2).reshape(B * T, H, D))
        if not self.static:
            return k, v
        # (B, S, nkv, hd) gathered from the pages, as (B, nkv, S, hd) for attention
        K = self.k[layer].index_select(0, self.read.reshape(-1)).view(B, -1, H, D).transpose(1, 2)
        V = self.v[layer].index_select(0, self.read.reshape(-1)).view(B, -1, H, D).transpose(1, 2)
        return K, V
