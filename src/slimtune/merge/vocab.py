"""Re-index the rows of vocabulary tensors (embed_tokens, lm_head) of every input into the output tokenizer's ids.

Row i of an input's re-indexed tensor is its own row for token i when it has that token; otherwise a default row,
chosen as mergekit 0.1.5 does (tokenizer/embed.py): a `tokens:` override, else the one model that has the token,
else the base's row, else the mean of the models that have it, else zeros. Rows past the vocabulary (padding to
`pad_to_multiple_of`) are the mean of the input's re-indexed rows. Rows are gathered from the files by index.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from slimtune.io.safetensors import TensorLoc
from slimtune.errors import ConfigError
from slimtune.merge.plan import Job, Member


def read_rows(loc: TensorLoc, idx: Tensor) -> Tensor:
    """Rows `idx` (any order) of a tensor in a safetensors file, read through a memory map: only their pages."""
    rest = tuple(loc.shape[1:])
    if idx.numel() == 0:
        return torch.empty((0, *rest), dtype=loc.dtype)
    row_bytes = (loc.end - loc.start) // loc.shape[0]
    mm = np.memmap(loc.path, dtype=np.uint8, mode="r", offset=loc.start, shape=(loc.shape[0], row_bytes))
    raw = torch.from_numpy(np.ascontiguousarray(mm[idx.numpy()]))  # (n, row_bytes)
    return raw.view(loc.dtype).reshape(len(idx), *rest)


@dataclass
class _JobRows:
    defaults: dict[int, Tensor]  # token id -> the row every model lacking it (or forced) gets
    forced: Tensor  # (n,) bool: tokens whose override applies to every model
    pad: dict[str, Tensor] = field(default_factory=dict)  # model -> mean row, for padding rows


@dataclass
class Vocab:
    tokenizer: Any  # the output tokenizer (transformers)
    n: int  # tokens in it
    size: int  # rows of the output vocabulary tensors (n padded to pad_to_multiple_of)
    perms: dict[str, Tensor]  # model -> (n,) int64: its row of each output token, -1 when absent
    vocabs: dict[str, dict[str, int]]  # model -> its own tokenizer's vocabulary
    tokens: dict[str, dict[str, Any]]  # the config's overrides: token -> {source, force}
    base: str  # the base model's key
    _jobs: dict[str, _JobRows] = field(default_factory=dict)

    def _own(self, m: Member, idx: Tensor) -> Tensor:
        return read_rows(m.input.index[m.name], idx).float()

    def _default(self, job: Job, members: dict[str, Member], tok: str, tid: int, spec: dict) -> Tensor:
        src = spec.get("source")
        shape = job.shape[1:]
        if isinstance(src, dict) and src.get("kind") == "zero":
            return torch.zeros(shape)
        model = src if isinstance(src, str) else src["model"]
        if model not in members:
            raise ConfigError(f"tokenizer.tokens[{tok!r}]: {model} is not a source of {job.name}")
        if isinstance(src, str):
            row = int(self.perms[model][tid])
            if row < 0:
                raise ConfigError(f"tokenizer.tokens[{tok!r}]: {model} does not have the token {tok!r}")
        else:
            row = src.get("token_id")
            if row is None:
                if src["token"] not in self.vocabs[model]:
                    raise ConfigError(f"tokenizer.tokens[{tok!r}]: token {src['token']!r} not found in {model}")
                row = self.vocabs[model][src["token"]]
            if not 0 <= row < members[model].input.index[members[model].name].shape[0]:
                raise ConfigError(f"tokenizer.tokens[{tok!r}]: token id {row} is out of range for {model}")
        return self._own(members[model], torch.tensor([row]))[0]

    def _prepare(self, job: Job) -> _JobRows:
        members = {m.model: m for m in job.members}  # each model once (mergekit gathers by model)
        keys = list(members)
        have = torch.stack([self.perms[k] >= 0 for k in keys])  # (models, n)
        specs = {t: s for t, s in self.tokens.items() if s.get("source") is not None}
        forced = torch.zeros(self.n, dtype=torch.bool)
        vocab = self.tokenizer.get_vocab()
        names = {i: t for t, i in vocab.items()}
        for t, s in specs.items():
            forced[vocab[t]] = bool(s.get("force"))
        defaults: dict[int, Tensor] = {}
        for tid in torch.nonzero(~have.all(0) | forced).flatten().tolist():
            tok = names[tid]
            present = [k for k, h in zip(keys, have[:, tid].tolist()) if h]
            if tok in specs:
                defaults[tid] = self._default(job, members, tok, tid, specs[tok])
            elif len(present) == 1:
                defaults[tid] = self._default(job, members, tok, tid, {"source": present[0]})
            elif not present:
                defaults[tid] = torch.zeros(job.shape[1:])
            elif self.base in members and self.base in present:
                defaults[tid] = self._default(job, members, tok, tid, {"source": self.base})
            else:  # several models have it, the base does not: their mean
                rows = [self._own(members[k], self.perms[k][tid:tid + 1])[0] for k in present]
                defaults[tid] = sum(rows) / len(rows)
        out = _JobRows(defaults, forced)
        if self.size > self.n:
            for k, m in members.items():
                total = torch.zeros(job.shape[1:], dtype=torch.float64)
                for r0 in range(0, self.n, 4096):
                    total += self._gather(job, out, m, r0, min(self.n, r0 + 4096)).double().sum(0)
                out.pad[k] = (total / self.n).float()
        return out

    def _gather(self, job: Job, jr: _JobRows, m: Member, r0: int, r1: int) -> Tensor:
        """Re-indexed rows [r0, r1) (r1 <= n) of member m: its own where it has the token, else the default."""
        p = self.perms[m.model][r0:r1]
        own = (p >= 0) & ~jr.forced[r0:r1]
        out = torch.zeros((r1 - r0, *job.shape[1:]))
        out[own] = self._own(m, p[own])
        for i in torch.nonzero(~own).flatten().tolist():
            d = jr.defaults.get(r0 + i)
            if d is not None:
                out[i] = d
        return out

    def rows(self, job: Job, m: Member, span: tuple[int, int] | None) -> Tensor:
        """fp32 rows [r0, r1) of member m's tensor of `job`, in the output's token order."""
        if job.name not in self._jobs:
            self._jobs = {job.name: self._prepare(job)}  # one job at a time: drop the previous one's rows
        jr = self._jobs[job.name]
        r0, r1 = span if span is not None else (0, self.size)
        out = self._gather(job, jr, m, r0, min(r1, self.n)) if r0 < self.n else torch.zeros((0, *job.shape[1:]))
        if r1 > self.n:
            pad = jr.pad[m.model].expand(r1 - max(r0, self.n), *job.shape[1:])
            out = torch.cat([out, pad])
        return out
