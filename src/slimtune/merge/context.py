"""The rows and parameters of one output tensor while it is merged: row chunks (`spans`), the fp32 rows of each
input for a chunk (read once even when an input is used twice), and parameter values read through the job's scopes.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from slimtune.errors import ConfigError
from slimtune.merge.config import REQUIRED
from slimtune.merge.plan import Job, Member, Plan
from slimtune.merge.settings import lookup

CHUNK_ELEMS = 2**23  # rows are read and merged in chunks of about this many elements (32 MiB in fp32)
Span = tuple[int, int] | None


def spans(shape: tuple[int, ...], chunk: int) -> list[Span]:
    """Row ranges [r0, r1) of about `chunk` elements; None (the whole tensor) for 0-d and 1-d tensors."""
    if len(shape) < 2:
        return [None]
    rows = shape[0]
    per = max(1, chunk // max(1, torch.Size(shape[1:]).numel()))
    return [(r, min(r + per, rows)) for r in range(0, rows, per)] or [(0, 0)]


class Ctx:
    """One job's parameters and rows: `shared(k)`, `per(member, k)`, and `rows(span)` (cached for the last span)."""

    def __init__(self, plan: Plan, job: Job, members: list[Member]):
        self.plan, self.job, self.members, self.cfg = plan, job, members, plan.cfg
        self.base = job.base
        self._span: Any = ()
        self._rows: tuple = ()

    def _value(self, chain: list, k: str, tensor: str, where: str) -> Any:
        v = lookup(chain, k, tensor, self.job.t)
        if v is None:
            m = self.cfg.method
            v = m.per_model.get(k, m.shared.get(k))
            if v is REQUIRED:
                raise ConfigError(f"{self.cfg.source}: no {k} for {tensor}{where}: no filter matches it; add a "
                                  f"fallback condition {{value: ...}}")
        return v

    def shared(self, k: str) -> Any:
        return self._value(self.job.shared, k, self.job.name, "")

    def per(self, m: Member, k: str) -> Any:
        return self._value(m.chain, k, m.name, f" of {m.input.label}")

    def _read(self, m: Member, span: Span) -> Tensor:
        if self.job.vocab and self.plan.vocab is not None:
            return self.plan.vocab.rows(self.job, m, span)
        return m.input.rows(m.name, span)

    def rows(self, span: Span) -> tuple[Tensor | None, list[Tensor]]:
        """(base rows or None, rows of each of `members`), fp32; an input used twice is read once."""
        if span != self._span:
            self._rows, self._span = (), span
            got: dict = {}

            def read(m: Member) -> Tensor:
                key = (id(m.input), m.name)
                if key not in got:
                    got[key] = self._read(m, span)
                return got[key]

            self._rows = (read(self.base) if self.base else None, [read(m) for m in self.members])
        return self._rows
