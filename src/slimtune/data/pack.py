"""Batch layout: packing several examples into fixed-length rows, and padding unpacked batches.

A packed row carries position_ids restarting at 0 for every example and seq_ids (the example's index in the row)
so that `Decoder` lets no token attend across examples; the first label of each example is masked, so the loss of
a packed batch equals the loss of the same examples run one by one (tests/test_data_pack.py).
"""
from __future__ import annotations

import bisect

import torch
from torch import Tensor

from slimtune.data.tokenize import IGNORE_INDEX


def pack_examples(input_ids: list[Tensor], labels: list[Tensor], seq_len: int, pad_id: int) -> dict[str, Tensor]:
    """Pack examples into rows of `seq_len` tokens by best-fit decreasing (deterministic).

    Examples are taken longest first (ties by index); each goes into the open row with the least room that still
    holds it, else a new row. Packing is done once; the sampler shuffles rows.

    Args:
        input_ids, labels: per example, 1-D int64 of the same length, each at most seq_len.
        seq_len: row length.
        pad_id: the token id written into unused places.
    Returns:
        dict of (R, seq_len) int64 tensors:
            input_ids; labels (-100 on padding and on the first token of every example, which in the unpacked run
            is never predicted: here the previous example's last token would predict it);
            position_ids (0, 1, ... restarting at each example and at the padding);
            seq_ids (k for the k-th example of the row; the padding gets its own id, one past the last example).
    Raises:
        ValueError: an example longer than seq_len, or mismatched lengths.
    """
    lens = [len(x) for x in input_ids]
    for i, (n, lab) in enumerate(zip(lens, labels)):
        if n > seq_len or n != len(lab) or n == 0:
            raise ValueError(f"example {i}: length {n} (labels {len(lab)}) does not fit rows of {seq_len}")
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row index) of rows that can take more
    for i in sorted(range(len(lens)), key=lambda j: (-lens[j], j)):
        k = bisect.bisect_left(free, (lens[i], -1))  # the tightest row with room >= length
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            room -= lens[i]
        else:
            r, room = len(rows), seq_len - lens[i]
            rows.append([i])
        if room > 0:
            bisect.insort(free, (room, r))
    R = len(rows)
    out = {"input_ids": torch.full((R, seq_len), pad_id, dtype=torch.long),
           "labels": torch.full((R, seq_len), IGNORE_INDEX, dtype=torch.long),
           "position_ids": torch.zeros(R, seq_len, dtype=torch.long),
           "seq_ids": torch.zeros(R, seq_len, dtype=torch.long)}
    ar = torch.arange(seq_len)
    for r, members in enumerate(rows):
        pos = 0
        for k, i in enumerate(members):
            n = lens[i]
            out["input_ids"][r, pos:pos + n] = input_ids[i]
            out["labels"][r, pos:pos + n] = labels[i]
            out["labels"][r, pos] = IGNORE_INDEX
            out["position_ids"][r, pos:pos + n] = ar[:n]
            out["seq_ids"][r, pos:pos + n] = k
            pos += n
        out["position_ids"][r, pos:] = ar[:seq_len - pos]
        out["seq_ids"][r, pos:] = len(members)
    return out


def collate_padded(input_ids: list[Tensor], labels: list[Tensor], pad_id: int,
                   pad_to_multiple_of: int | None = None) -> dict[str, Tensor]:
    """Right-pad unpacked examples into one batch.

    Returns:
        dict of (B, T) int64: input_ids (pad_id after the end), labels (-100 after the end), attention_mask
        (1 on real tokens), position_ids (0..n-1, then continuing over the padding, which nobody attends to).
    """
    T = max(len(x) for x in input_ids)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(input_ids)
    out = {"input_ids": torch.full((B, T), pad_id, dtype=torch.long),
           "labels": torch.full((B, T), IGNORE_INDEX, dtype=torch.long),
           "attention_mask": torch.zeros(B, T, dtype=torch.long),
           "position_ids": torch.arange(T).expand(B, T).clone()}
    for b, (ids, lab) in enumerate(zip(input_ids, labels)):
        n = len(ids)
        out["input_ids"][b, :n] = ids
        out["labels"][b, :n] = lab
        out["attention_mask"][b, :n] = 1
    return out


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The keyword arguments of `Decoder.forward` in a batch (everything but labels): `model(**model_inputs(b))`."""
    keys = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "seq_ids")  # rows looked up on the host
    return {k: v for k, v in batch.items() if k in keys}  # (models.host_embed) come as inputs_embeds
