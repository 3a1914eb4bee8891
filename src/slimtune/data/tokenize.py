"""Tokenize rendered examples into input_ids and labels, with the prompt tokens masked out of the loss.

All texts go through one batched call of the fast tokenizer; a token is trained when its character span overlaps
an answer span from the renderer (labels = -100 elsewhere, unless training on everything). Examples longer than
`max_length` are cut at the end and counted; examples left with nothing to learn are dropped and counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from slimtune.data.formats import Example
from slimtune.data.templates import Renderer

IGNORE_INDEX = -100  # the label of a token that is not predicted (torch cross_entropy's default ignore_index)


@dataclass
class Tokenized:
    """Token ids and labels per example (int64 tensors of equal length), with the counts for the summary."""

    input_ids: list[Tensor] = field(default_factory=list)
    labels: list[Tensor] = field(default_factory=list)
    where: list[str] = field(default_factory=list)
    truncated: int = 0  # examples cut to max_length
    dropped: int = 0  # examples with no trained token left (after truncation), left out
    tokens: int = 0  # input tokens kept
    target_tokens: int = 0  # tokens with a label (the loss is averaged over these, less one per example)

    def __len__(self) -> int:
        return len(self.input_ids)


def _labels_from_offsets(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> np.ndarray:
    """labels[t] = ids[t] where token t's characters [a, b) overlap a trained span [s, e), else -100.

    Overlap is a < e and b > s; special tokens added by the tokenizer (BOS) have the empty span (0, 0) and stay
    masked. A token straddling the prompt/answer boundary counts as answer.
    """
    ids_a = np.asarray(ids, dtype=np.int64)
    if not spans or not len(ids_a):
        return np.full_like(ids_a, IGNORE_INDEX)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # (n, 2)
    sp = np.asarray(spans, dtype=np.int64)  # (k, 2)
    hit = (off[:, None, 0] < sp[None, :, 1]) & (off[:, None, 1] > sp[None, :, 0])  # (n, k)
    return np.where(hit.any(1), ids_a, IGNORE_INDEX)


def _labels_fast(ids: list[int], encoding: Any, spans: list[tuple[int, int]]) -> tuple[list[int], np.ndarray]:
    """Labels from the tokens holding each span's first and last character (`Encoding.char_to_token`, which gives
    the first token of a character; a multi-byte character may go on over further byte tokens): the same as the
    overlap rule of `_labels_from_offsets`, in O(spans) instead of O(tokens); that rule is the fallback when a
    span edge falls on a character no token covers (some normalizers drop spaces)."""
    labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    ids_a = np.asarray(ids, dtype=np.int64)
    for s, e in spans:
        a, b = encoding.char_to_token(s), encoding.char_to_token(e - 1)
        if a is None or b is None:
            return ids, _labels_from_offsets(ids, encoding.offsets, spans)
        while b + 1 < len(ids):  # the other byte tokens of a multi-byte last character, if any
            nxt = encoding.token_to_chars(b + 1)
            if nxt is None or nxt[0] >= e:
                break
            b += 1
        labels[a:b + 1] = ids_a[a:b + 1]
    return ids, labels


def _encode_segments(tokenizer: Any, renderer: Renderer, ex: Example) -> tuple[list[int], np.ndarray]:
    """Fallback for slow tokenizers (no offsets): tokenize each segment alone and concatenate."""
    ids: list[int] = []
    labels: list[int] = []
    if renderer.add_special_tokens and getattr(tokenizer, "bos_token_id", None) is not None \
            and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]:
        ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, trained in renderer.segments(ex):
        if not text:
            continue
        seg = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += seg
        labels += seg if trained else [IGNORE_INDEX] * len(seg)
    return ids, np.asarray(labels, dtype=np.int64)


def tokenize_examples(examples: list[Example], tokenizer: Any, renderer: Renderer, max_length: int,
                      train_on_prompt: bool = False) -> Tokenized:
    """Token ids and labels of every example.

    Args:
        examples: validated examples (`formats.to_examples`).
        tokenizer: a Hugging Face tokenizer (fast: one batched call with offsets; slow: segment by segment).
        renderer: from `templates.get_renderer`.
        max_length: longest kept sequence; longer ones lose their end (counted in `truncated`).
        train_on_prompt: label every token (prompts too) instead of only the answers.
    Returns:
        A `Tokenized`; labels equal input_ids on trained tokens and -100 elsewhere. Examples whose labels are all
        -100 after position 0 (nothing to predict; e.g. a prompt longer than max_length) are dropped and counted.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    out = Tokenized()
    if getattr(tokenizer, "is_fast", False):
        rendered = [renderer.render(ex) for ex in examples]
        enc = tokenizer([t for t, _ in rendered], add_special_tokens=renderer.add_special_tokens,
                        return_attention_mask=False, verbose=False)
        pairs = (_labels_fast(ids, e, spans)
                 for ids, e, (_, spans) in zip(enc["input_ids"], enc.encodings, rendered))
    else:
        pairs = (_encode_segments(tokenizer, renderer, ex) for ex in examples)
    for ex, (ids, labels) in zip(examples, pairs):
        ids_t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
        labels_t = ids_t.clone() if train_on_prompt else torch.as_tensor(labels)
        if len(ids_t) > max_length:
            ids_t, labels_t = ids_t[:max_length].clone(), labels_t[:max_length].clone()
            out.truncated += 1
        n_target = int((labels_t[1:] != IGNORE_INDEX).sum())  # position 0 is never predicted
        if n_target == 0:
            out.dropped += 1
            continue
        out.input_ids.append(ids_t)
        out.labels.append(labels_t)
        out.where.append(ex.where)
        out.tokens += len(ids_t)
        out.target_tokens += n_target
    return out
