"""Incremental detokenization of one request with stop strings: each new token gives the text that is final, holding
back an incomplete UTF-8 character and any end of the text that could begin a stop string, as `generate_text` does.
"""
from __future__ import annotations

from slimtune.generate import _partial_suffix


class TextStream:
    """Decodes a growing list of token ids in short windows (vLLM's prefix / read offsets): the new text is
    decode(ids[prefix:]) minus decode(ids[prefix:read]), so tokenizers that drop a leading space at the start of a
    decode (SentencePiece) still join up, and each step decodes a few tokens rather than the whole output."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tok, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` already handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token: int) -> tuple[str, bool]:
        """Append a token; returns (new final text, whether a stop string was reached: the text ends before it)."""
        self.ids.append(token)
        prev, cur = self._decode(self.ids[self.prefix:self.read]), self._decode(self.ids[self.prefix:])
        if len(cur) > len(prev) and not cur.endswith("\ufffd"):  # a character still missing bytes waits
            self.text += cur[len(prev):]
            self.prefix, self.read = self.read, len(self.ids)
        # a stop string cannot start before `sent`: the text handed out never ends with the beginning of one
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            piece, self.sent = self.text[self.sent:end], end
            return piece, True
        safe = len(self.text) - max((_partial_suffix(self.text, s) for s in self.stop), default=0)
        piece = self.text[self.sent:max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        return piece, False

    def flush(self) -> str:
        """At the end (no stop string): the held-back rest, an incomplete character included."""
        rest = self._decode(self.ids[self.prefix:])[len(self._decode(self.ids[self.prefix:self.read])):]
        self.text += rest
        self.prefix = self.read = len(self.ids)
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece
