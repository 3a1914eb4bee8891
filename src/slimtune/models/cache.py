"""The key/value cache of generation: preallocated per layer, filled as tokens are decoded."""
from __future__ import annotations

import torch
from torch import Tensor

from slimtune.models.config import ModelConfig


class KVCache:
    """Preallocated keys and values for generation: per layer (B, nkv, max_len, hd); `pos` tokens filled so far.

    In `static` mode (for CUDA graphs) every shape is fixed: new keys go to the slots in the tensor `index`, attention
    runs over all max_len slots, and the caller passes a (B, max_len) attention mask of the filled slots and the
    position ids; `pos` is then the caller's business.
    """

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str,
                 dtype: torch.dtype) -> None:
        shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.pos = 0
        self.max_len = max_len
        self.static = False
        self.index = torch.zeros(1, dtype=torch.long, device=device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.static:
            self.k[layer].index_copy_(2, self.index, k)
            self.v[layer].index_copy_(2, self.index, v)
            return self.k[layer], self.v[layer]
        T = k.shape[2]
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions is full")
        self.k[layer][:, :, self.pos:self.pos + T] = k
        self.v[layer][:, :, self.pos:self.pos + T] = v
        return self.k[layer][:, :, :self.pos + T], self.v[layer][:, :, :self.pos + T]

    def window_mask(self, position_ids: Tensor, window: int) -> Tensor:
        """Static mode: (1, 1, 1, max_len), True for the slots within `window` cache positions of the slot being
        written (`index`), as a sliding layer sees (the caller's mask removes slots not filled yet)."""
        return (torch.arange(self.max_len, device=self.index.device) > self.index - window)[None, None, None, :]
