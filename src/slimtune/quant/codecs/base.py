"""`Codec`: what one weight format is to a `QuantLinear` - its buffers, how a weight becomes them and comes back, its
exact byte size, and (optionally) its own matmul. One subclass per format family, one instance per format name."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from slimtune.errors import ConfigError


class Codec:
    """A weight format for a linear layer of shape (out, in).

    name: the format's name. code_bits: bits of one weight's code. default_group: the block / group size (None:
    per channel or per tensor). scale_keys: the buffers beside `weight` that a checkpoint must hold. table_bytes:
    lookup tables a checkpoint carries per layer (4-bit formats' code maps).
    """

    name: str = ""
    code_bits: int = 8
    default_group: int | None = None
    scale_keys: ClassVar[tuple[str, ...]] = ()

    def check(self, in_f: int, group: int | None, name: str) -> int | None:
        """Validate the group size for a layer of width `in_f`; returns the group size to use.

        Raises:
            ConfigError: a group given to a per-channel format, or one that does not fit the width.
        """
        if group is not None:
            raise ConfigError(f"format {self.name} is per-channel (no groups); drop the group size {group}")
        return None

    def buffers(self, out_f: int, in_f: int, group: int | None, dq: bool, device) -> dict[str, Tensor]:
        """Empty buffers of the right shapes and dtypes (on any device, `meta` included)."""
        raise NotImplementedError

    def quantize(self, w: Tensor, group: int | None, dq: bool, name: str) -> dict[str, Tensor]:
        """The buffers that encode the (out, in) weight `w`, on its device."""
        raise NotImplementedError

    def dequantize(self, m: nn.Module, dtype: torch.dtype) -> Tensor:
        """The (out, in) weight a `QuantLinear` `m` of this format computes with, in `dtype`."""
        raise NotImplementedError

    def nbytes(self, out_f: int, in_f: int, group: int | None = None, dq: bool = False) -> int:
        """Bytes of the buffers of one (out_f, in_f) layer (the bias excluded): its memory."""
        raise NotImplementedError

    def table_bytes(self, dq: bool) -> int:
        """Bytes of the code tables a checkpoint of this format carries per layer (0 for most formats)."""
        return 0

    def forward(self, m: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
        """y = x @ W^T + b for layer `m` (default: dequantize to x's dtype, then one matmul)."""
        return F.linear(x, self.dequantize(m, x.dtype), bias)

    def save_state(self, m: nn.Module, prefix: str) -> dict[str, Tensor] | None:
        """The layer's checkpoint tensors when they differ from its buffers (None: the buffers as they are)."""
        return None

    def load_state(self, m: nn.Module, sd: dict[str, Tensor], prefix: str, assign: bool) -> list[str] | None:
        """Load this layer from checkpoint tensors when they differ from its buffers; returns unexpected keys (None:
        the default buffer loading)."""
        return None


class GroupedCodec(Codec):
    """A format with a block / group size along the flattened weight or each row's input columns."""

    default_group = 64

    def check(self, in_f: int, group: int | None, name: str) -> int | None:
        return self.default_group if group is None else group
