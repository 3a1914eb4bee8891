"""Continuous batching: one background thread owns the model. Between any two decode steps it runs queued commands
(adapter loads), drops requests whose client left, admits waiting requests while batch rows and KV pages last
(prefilling them together), then decodes one token for every running row; a row leaves as soon as it finishes.
"""
from __future__ import annotations

import logging
import random
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from slimtune.errors import ConfigError
from slimtune.serve.cache import PagedKVCache, pages_for
from slimtune.serve.detok import TextStream
from slimtune.serve.lora import AdapterBank, Factors
from slimtune.serve.runner import Runner
from slimtune.serve.sampling import RowSampling, sample

log = logging.getLogger("slimtune.serve")


class Overloaded(Exception):
    """The waiting queue is full."""


@dataclass
class Output:
    """What a request gets after each step: new text and token ids; finish_reason once it ends ('stop', 'length',
    'abort' when its client left, 'error' with `error`)."""
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    status: int = 500  # the HTTP status of an error (404: the adapter was unloaded meanwhile)


@dataclass
class GenRequest:
    """One sequence to generate. `emit` is called from the engine thread with each `Output`."""
    prompt: list[int]
    max_tokens: int
    emit: Callable[[Output], None]
    adapter: str | None = None  # None: the base model (or the merged one)
    sampling: RowSampling = field(default_factory=RowSampling)  # its seed: None draws a random one
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)  # besides the model's end-of-sequence ids
    ignore_eos: bool = False  # the model's end-of-sequence ids do not stop it (stop_token_ids still do)
    cancelled: bool = False


@dataclass
class _Row:
    req: GenRequest
    row: int
    pages: list[int]
    slot: int
    text: TextStream
    sampling: RowSampling
    pos: int = 0  # tokens in the cache
    last: int = 0  # the newest token (fed at `pos` by the next decode step)
    n: int = 0  # tokens generated
    done: bool = False


class Engine:
    """The scheduler and its thread.

    Args:
        model: a Decoder in eval mode, with `bank`'s layers if adapters are served.
        cache: the paged KV cache (its rows are the batch rows, at most `max_batch`).
        bank: the adapter bank, or None (a merged model: only the base name is served).
        max_queue: waiting requests beyond this are refused (`Overloaded`).
        max_prefill_tokens: padded prompt tokens per prefill forward (bounds its activation memory).
    """

    def __init__(self, model, tokenizer, cache: PagedKVCache, bank: AdapterBank | None, max_queue: int = 256,
                 cuda_graphs: bool = False, buckets: bool = False, max_prefill_tokens: int = 8192) -> None:
        self.model, self.tokenizer, self.cache, self.bank = model, tokenizer, cache, bank
        self.runner = Runner(model, cache, bank.ctx if bank is not None else None, cuda_graphs, buckets)
        self.max_batch, self.max_queue, self.max_prefill_tokens = cache.max_rows, max_queue, max_prefill_tokens
        self.max_len = min(cache.max_len, (cache.pool.num_pages - 1) * cache.page_size)  # prompt + completion
        eos = model.config.eos_ids or [tokenizer.eos_token_id]
        self.stop_ids = {i for i in eos if i is not None}
        self.waiting: deque[GenRequest] = deque()
        self.rows: dict[int, _Row] = {}  # running, by batch row
        self.free_rows = list(range(self.max_batch - 1, -1, -1))
        self.commands: list[tuple[Callable[[], object], Future]] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.stats = {"steps": 0, "prefills": 0, "mixed_steps": 0, "tokens": 0, "max_rows": 0, "errors": 0,
                      "aborted": 0}
        self.thread = threading.Thread(target=self._loop, name="slimtune-engine", daemon=True)

    # ---- the outside: called from other threads ------------------------------------------------------------------
    def start(self) -> Engine:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify()
        self.thread.join()

    def submit(self, reqs: list[GenRequest]) -> None:
        """Queue requests (all or none).

        Raises:
            Overloaded: the queue would exceed max_queue.
        """
        with self.cv:
            if len(self.waiting) + len(reqs) > self.max_queue:
                raise Overloaded(f"{len(self.waiting)} requests are waiting (at most {self.max_queue})")
            self.waiting.extend(reqs)
            self.cv.notify()

    def cancel(self, req: GenRequest) -> None:
        """The client left: free its row at the next step (or drop it from the queue)."""
        req.cancelled = True
        with self.cv:
            self.cv.notify()

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() in the engine thread between two steps; its result or exception lands in the Future."""
        fut: Future = Future()
        with self.cv:
            self.commands.append((fn, fut))
            self.cv.notify()
        return fut

    def load_adapter(self, name: str, factors: Factors, rank: int) -> Future:
        def load() -> None:
            if self.bank.add(name, factors, rank):
                self.runner.reset()  # the bank's buffers changed shape: graphs are recaptured
        return self.call(load)

    def unload_adapter(self, name: str) -> Future:
        return self.call(lambda: self.bank.remove(name))

    def status(self) -> dict:
        with self.cv:
            return {**self.stats, "running": len(self.rows), "waiting": len(self.waiting),
                    "free_pages": self.cache.pool.free, "total_pages": self.cache.pool.num_pages - 1}

    # ---- the engine thread -----------------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.no_grad():
            while True:
                with self.cv:
                    while not (self.stopping or self.waiting or self.rows or self.commands):
                        self.cv.wait()
                    if self.stopping:
                        return
                    commands, self.commands = self.commands, []
                for fn, fut in commands:
                    try:
                        fut.set_result(fn())
                    except Exception as e:  # noqa: BLE001 - handed to the caller
                        fut.set_exception(e)
                try:
                    self._step()
                except Exception:  # the last line of defence: the thread must keep serving
                    log.exception("engine step failed")
                    self.stats["errors"] += 1

    def _step(self) -> None:
        for r in [r for r in self.rows.values() if r.req.cancelled]:
            self._finish(r, "abort")
        new = self._admit()
        try:
            if new:
                self._prefill(new)
            if self.rows:
                self._decode()
        except Exception as e:
            log.exception("generation step failed")
            self.stats["errors"] += 1
            for r in list(self.rows.values()) + new:
                self._finish(r, "error", error=f"generation failed: {type(e).__name__}: {e}")

    def _admit(self) -> list[_Row]:
        new: list[_Row] = []
        P = self.cache.page_size
        with self.cv:
            if any(r.cancelled for r in self.waiting):  # clients that left while waiting
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
            while self.waiting and self.free_rows:
                req = self.waiting[0]
                pages = self.cache.pool.alloc(pages_for(len(req.prompt) + req.max_tokens - 1, P))
                if pages is None:
                    break  # first come, first served: wait for pages to free up
                self.waiting.popleft()
                try:
                    slot = self.bank.acquire(req.adapter) if self.bank is not None else 0
                except ConfigError as e:
                    self.cache.pool.release(pages)
                    self._send(req, Output("", [], "error", error=str(e), status=404))
                    continue
                row = self.free_rows.pop()
                self.cache.assign(row, pages)
                sp = req.sampling
                sp = RowSampling(sp.temperature, sp.top_p, sp.top_k, random.getrandbits(63) if sp.seed is None
                                 else sp.seed)
                new.append(_Row(req, row, pages, slot, TextStream(self.tokenizer, req.stop), sp))
        return new

    def _prefill(self, new: list[_Row]) -> None:
        new = sorted(new, key=lambda r: len(r.req.prompt))  # similar lengths together: less padding
        i = 0
        while i < len(new):
            j = i + 1  # grow the group while its padded size stays within the budget
            while j < len(new) and (j + 1 - i) * len(new[j].req.prompt) <= self.max_prefill_tokens:
                j += 1
            group = new[i:j]
            logits = self.runner.prefill([r.row for r in group], [r.req.prompt for r in group],
                                         [r.slot for r in group])
            toks = sample(logits, [r.sampling for r in group], [0] * len(group)).tolist()
            self.stats["prefills"] += 1
            for r, t in zip(group, toks):
                r.pos = len(r.req.prompt)
                self.rows[r.row] = r
                self._token(r, t)
            i = j

    def _decode(self) -> None:
        rows = list(self.rows.values())
        logits = self.runner.decode([r.row for r in rows], [r.pos for r in rows], [r.last for r in rows],
                                    [r.slot for r in rows])
        toks = sample(logits, [r.sampling for r in rows], [r.n for r in rows]).tolist()
        self.stats["steps"] += 1
        self.stats["mixed_steps"] += len({r.slot for r in rows}) > 1
        self.stats["max_rows"] = max(self.stats["max_rows"], len(rows))
        for r, t in zip(rows, toks):
            r.pos += 1
            self._token(r, t)

    def _token(self, r: _Row, t: int) -> None:
        """Account for a new token of row r: stream its text, or finish the row."""
        r.n, r.last = r.n + 1, t
        self.stats["tokens"] += 1
        if (t in self.stop_ids and not r.req.ignore_eos) or t in r.req.stop_token_ids:
            # the text held back for a stop string that never came goes out with the end
            return self._finish(r, "stop", r.text.flush(), [t])
        piece, hit = r.text.add(t)
        if hit:
            return self._finish(r, "stop", piece, [t])
        if r.n >= r.req.max_tokens:
            return self._finish(r, "length", piece + r.text.flush(), [t])
        self._send(r.req, Output(piece, [t]))

    def _finish(self, r: _Row, reason: str, text: str = "", tokens: list[int] | None = None,
                error: str | None = None) -> None:
        if r.done:
            return
        r.done = True
        self.stats["aborted"] += reason == "abort"
        self._send(r.req, Output(text, tokens or [], reason, len(r.req.prompt), r.n, error))
        self.rows.pop(r.row, None)
        self.cache.pool.release(r.pages)
        self.free_rows.append(r.row)
        if self.bank is not None:
            self.bank.release(r.slot)

    def _send(self, req: GenRequest, out: Output) -> None:
        try:
            req.emit(out)
        except RuntimeError:  # the server's event loop is gone (shutting down): nobody is listening
            req.cancelled = True
