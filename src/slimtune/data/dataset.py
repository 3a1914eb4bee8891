"""Build train/validation datasets from files in one call, and iterate them deterministically and resumably.

`build_datasets` reads and validates every record first (a bad record stops here, before any training), splits off
validation data (by a seeded fraction or a separate file), tokenizes, packs, and returns a summary.
`DataIterator` yields batches in an order fixed by (seed, epoch); its position saves into a checkpoint and restores
exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from torch import Tensor

from slimtune.data.formats import to_examples
from slimtune.data.pack import collate_padded, pack_examples
from slimtune.data.readers import read_many
from slimtune.data.templates import get_renderer
from slimtune.data.tokenize import Tokenized, tokenize_examples
from slimtune.errors import DataError


def sample_path() -> Path:
    """The bundled sample: the first 1000 records of the Stanford Alpaca data (CC BY-NC 4.0, see the license file)."""
    return Path(__file__).with_name("alpaca_sample.json")


@dataclass
class DataConfig:
    """What to read and how to turn it into token rows.

    path: a data source or a list of them: a .json array, .jsonl or .parquet file, a folder of such files (e.g. Parquet
    shards) or saved by datasets' save_to_disk, or a hub dataset id (org/name[:split], online). format: "auto" or
    alpaca / messages / sharegpt / prompt_completion / text. template: "auto" / tokenizer / alpaca / chatml.
    max_length: tokens per example (and per packed row). val_fraction: share of records held out (seeded by `seed`);
    val_path: a separate validation source instead. limit: use only the first N records of `path`. skip_bad: leave
    malformed records out (counted in the summary as `skipped`, the first one quoted as `first_skipped`) instead of
    stopping.
    """

    path: str | list[str] = ""
    format: str = "auto"
    template: str = "auto"
    max_length: int = 1024
    train_on_prompt: bool = False
    add_eos: bool = True
    pack: bool = True
    val_fraction: float = 0.0
    val_path: str | list[str] | None = None
    seed: int = 0
    limit: int | None = None
    skip_bad: bool = False


class TokenDataset:
    """Packed rows (fixed length) or single examples (padded per batch); `collate(indices)` makes a batch."""

    def __init__(self, tok: Tokenized, pad_id: int, pack: bool, seq_len: int) -> None:
        self.pad_id, self.packed, self.seq_len = pad_id, pack, seq_len
        self.tokenized = tok
        self.rows = pack_examples(tok.input_ids, tok.labels, seq_len, pad_id) if pack and len(tok) else None

    def __len__(self) -> int:
        return self.rows["input_ids"].shape[0] if self.rows is not None else len(self.tokenized)

    def collate(self, indices: list[int] | np.ndarray) -> dict[str, Tensor]:
        """A batch of the given rows/examples: keys input_ids, labels and position_ids, then seq_ids (packed) or
        attention_mask (padded); all (B, T) int64."""
        idx = [int(i) for i in indices]
        if self.rows is not None:
            return {k: v[idx] for k, v in self.rows.items()}
        t = self.tokenized
        return collate_padded([t.input_ids[i] for i in idx], [t.labels[i] for i in idx], self.pad_id)

    def batches(self, batch_size: int) -> Iterator[dict[str, Tensor]]:
        """Every row once, in order (for evaluation)."""
        for s in range(0, len(self), batch_size):
            yield self.collate(range(s, min(s + batch_size, len(self))))


def _split(n: int, frac: float, seed: int) -> tuple[list[int], list[int]]:
    """(train indices, validation indices), both in file order; round(frac * n) (at least 1) held out."""
    if not 0.0 <= frac < 1.0:
        raise DataError(f"val_fraction {frac} is out of range; fix: use a number in [0, 1), e.g. 0.05")
    if frac == 0.0:
        return list(range(n)), []
    n_val = max(1, round(frac * n))
    if n_val >= n:
        raise DataError(f"val_fraction {frac} of {n} records leaves nothing to train on; "
                        f"fix: use a smaller val_fraction or more data")
    held = set(np.random.default_rng([seed, 1]).permutation(n)[:n_val].tolist())
    return [i for i in range(n) if i not in held], sorted(held)


def build_datasets(cfg: DataConfig, tokenizer: Any) -> tuple[TokenDataset, TokenDataset | None, dict[str, Any]]:
    """Read, validate, split, tokenize and pack.

    Args:
        cfg: a `DataConfig`.
        tokenizer: a Hugging Face tokenizer (fast preferred).
    Returns:
        (train, validation or None, summary). summary keys: format, template, records, val_records, examples,
        val_examples, tokens, target_tokens, val_tokens, truncated, dropped, rows, val_rows, packed, max_length,
        fill (share of row places holding real tokens), skipped, first_skipped.
    Raises:
        DataError: an unreadable file or a malformed record (the first one found; all records are checked before
            anything is tokenized), a bad split, or no example left to train on.
    """
    if not cfg.path:
        raise DataError("no training data given; fix: set data_path to a .json, .jsonl or .parquet file")
    records = read_many(cfg.path)
    if cfg.limit is not None:
        records = records[:cfg.limit]
    skipped: list[str] = []
    try:
        examples, fmt = to_examples(records, cfg.format, cfg.skip_bad, skipped)
        val_examples = to_examples(read_many(cfg.val_path), fmt, cfg.skip_bad, skipped)[0] if cfg.val_path else []
    except DataError as e:  # a record-level error: say that it can also be skipped
        if cfg.skip_bad or (" record " not in str(e) and " line " not in str(e)):
            raise
        raise DataError(f"{e} (or set skip_bad=true to leave malformed records out)") from None
    if cfg.val_path and cfg.val_fraction:
        raise DataError("both val_path and val_fraction are set; fix: keep one of them")
    if not cfg.val_path:
        tr, va = _split(len(examples), cfg.val_fraction, cfg.seed)
        val_examples = [examples[i] for i in va]
        examples = [examples[i] for i in tr]
    plain = examples[0].text is not None  # text, or TRL's standard prompt / completion: no template
    renderer = get_renderer(tokenizer, cfg.template, "text" if plain else fmt, cfg.add_eos)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    tok = tokenize_examples(examples, tokenizer, renderer, cfg.max_length, cfg.train_on_prompt)
    if not len(tok):
        raise DataError(f"no training example has an answer token within max_length={cfg.max_length} "
                        f"({tok.dropped} dropped); fix: raise max_length or shorten the prompts")
    vtok = tokenize_examples(val_examples, tokenizer, renderer, cfg.max_length, cfg.train_on_prompt) \
        if val_examples else None
    train = TokenDataset(tok, pad_id, cfg.pack, cfg.max_length)
    val = TokenDataset(vtok, pad_id, cfg.pack, cfg.max_length) if vtok is not None and len(vtok) else None
    places = len(train) * cfg.max_length if cfg.pack else tok.tokens
    summary = {
        "format": fmt, "template": renderer.name, "records": len(examples), "val_records": len(val_examples),
        "examples": len(tok), "val_examples": len(vtok) if vtok else 0, "tokens": tok.tokens,
        "target_tokens": tok.target_tokens, "val_tokens": vtok.tokens if vtok else 0,
        "truncated": tok.truncated + (vtok.truncated if vtok else 0),
        "dropped": tok.dropped + (vtok.dropped if vtok else 0),
        "rows": len(train), "val_rows": len(val) if val else 0, "packed": cfg.pack, "max_length": cfg.max_length,
        "fill": round(tok.tokens / places, 4), "skipped": len(skipped),
        "first_skipped": skipped[0] if skipped else None,
    }
    return train, val, summary


class DataIterator:
    """Endless batches over a dataset, epoch after epoch, in an order fixed by (seed, epoch).

    The position is (epoch, index of the next batch in the epoch); the shuffle is a pure function of (seed, epoch)
    (numpy's SeedSequence of both), so `state_dict()` -> `load_state_dict()` continues with exactly the batches an
    uninterrupted run would have seen. The last batch of an epoch is smaller unless drop_last.
    """

    def __init__(self, dataset: TokenDataset, batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        if len(dataset) == 0:
            raise DataError("the dataset is empty; fix: give more data or a larger max_length")
        self.ds, self.batch_size, self.seed, self.shuffle = dataset, batch_size, seed, shuffle
        n = len(dataset)
        self.batches_per_epoch = max(1, n // batch_size) if drop_last else -(-n // batch_size)
        self.epoch, self.index = 0, 0
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """The row order of `epoch` (a permutation when shuffling, else 0..n-1)."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.ds)
            perm = np.random.default_rng([self.seed, 2, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._order = (epoch, perm)
        return self._order[1]

    def __iter__(self) -> "DataIterator":
        return self

    def __next__(self) -> dict[str, Tensor]:
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        s = self.index * self.batch_size
        idx = self.order(self.epoch)[s:s + self.batch_size]
        self.index += 1
        return self.ds.collate(idx)

    def state_dict(self) -> dict[str, int]:
        """Plain ints: epoch, index (next batch), seed, size (rows), batch_size."""
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "size": len(self.ds),
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position.

        Raises:
            DataError: the data, the seed or the batch size differ from the checkpoint's (the order would differ).
        """
        for key, now in (("size", len(self.ds)), ("seed", self.seed), ("batch_size", self.batch_size)):
            if int(state[key]) != now:
                raise DataError(f"checkpoint data position: {key} was {state[key]}, now {now}; fix: resume with "
                                f"the same data, data settings, seed and batch size")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
