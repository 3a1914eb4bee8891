"""Read training records from JSON array files, JSON Lines, Parquet, folders of them (e.g. Parquet shards), folders
written by `datasets`' `save_to_disk`, and (online) Hugging Face hub datasets; remembering where each one came from.

Every record keeps its file and its line (JSON, JSONL) or row index (Parquet, Arrow), so that a bad record can be
reported as `data.jsonl line 7: ...` before any training starts. Unreadable input raises `DataError` with one line.
`save_to_disk` folders are read with pyarrow from their Arrow files (no pickle, no `datasets` needed).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtune.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)
PARQUET_SUFFIXES = (".parquet", ".pq")
DATA_SUFFIXES = JSONL_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?(:[\w.-]+)?$")  # org/name, optionally :split
TOO_DEEP = "the record is nested too deeply to read (thousands of levels); fix: repair or remove it"


@dataclass
class Record:
    """One raw record: its fields, its file, its 1-based line (None for Parquet) and its 0-based index in the file."""

    data: dict[str, Any]
    source: str
    index: int
    line: int | None = None
    in_array: bool = False  # from a JSON array, where several records may share a line

    def where(self) -> str:
        """`file line L` (JSONL), `file line L (record I)` (JSON array), `file record I` (Parquet); I is 0-based."""
        if self.line is None:
            return f"{self.source} record {self.index}"
        return f"{self.source} line {self.line}" + (f" (record {self.index})" if self.in_array else "")


def one_line(msg: str, n: int = 80) -> str:
    """One line, at most n characters: error messages must stay on one line."""
    msg = " ".join(str(msg).split())
    return msg if len(msg) <= n else msg[: n - 3] + "..."


def _check_object(obj: Any, source: str, index: int, line: int | None, in_array: bool = False) -> Record:
    rec = Record(obj, source, index, line, in_array)
    if not isinstance(obj, dict):
        raise DataError(f"{rec.where()}: the record is a {type(obj).__name__}, not a JSON object; "
                        f"fix: make every record an object such as {{\"instruction\": ..., \"output\": ...}}")
    return rec


def _read_jsonl(text: str, source: str) -> list[Record]:
    out = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{source} line {lineno}: not valid JSON ({e.msg} at column {e.colno}); "
                            f"fix: write exactly one JSON object per line") from None
        except RecursionError:
            raise DataError(f"{source} line {lineno}: {TOO_DEEP}") from None
        out.append(_check_object(obj, source, len(out), lineno))
    return out


def _read_json_array(text: str, source: str) -> list[Record]:
    """Decode `[obj, obj, ...]` element by element so that each record knows the line it starts on."""
    dec = json.JSONDecoder()
    ws = " \t\r\n"
    n = len(text)

    def skip(p: int) -> int:
        while p < n and text[p] in ws:
            p += 1
        return p

    def bad(p: int, what: str) -> DataError:
        line = text.count("\n", 0, p) + 1
        return DataError(f"{source} line {line}: not valid JSON ({what}); "
                         f"fix: the file must be one JSON array of objects, or use .jsonl with one object per line")

    pos = skip(text.index("[") + 1)
    out: list[Record] = []
    line, counted = 1, 0  # line number of `counted`, advanced incrementally (one pass over the text)
    if pos < n and text[pos] == "]":
        return out
    while True:
        try:
            obj, end = dec.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise bad(e.pos, f"{e.msg} at column {e.colno}") from None
        except RecursionError:
            raise DataError(f"{source} line {text.count(chr(10), 0, pos) + 1}: {TOO_DEEP}") from None
        line += text.count("\n", counted, pos)
        counted = pos
        out.append(_check_object(obj, source, len(out), line, in_array=True))
        pos = skip(end)
        if pos >= n:
            raise bad(pos, "the array is not closed with ']'")
        if text[pos] == "]":
            if skip(pos + 1) < n:
                raise bad(skip(pos + 1), "extra text after the closing ']'")
            return out
        if text[pos] != ",":
            raise bad(pos, f"expected ',' or ']' but found {text[pos]!r}")
        pos = skip(pos + 1)


def _one_object(text: str) -> bool:
    """Whether the whole text is a single JSON value (a pretty-printed object rather than JSON Lines)."""
    try:
        json.loads(text)
        return "\n" in text.strip()
    except (json.JSONDecodeError, RecursionError):
        return False


def _read_parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise DataError(f"{path}: reading Parquet needs pyarrow; fix: pip install pyarrow") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for broken files
        raise DataError(f"{path}: not a readable Parquet file ({one_line(e)}); "
                        f"fix: write it again with pyarrow or pandas.to_parquet") from None
    return _rows(rows, str(path))


def _rows(rows: list[dict], source: str) -> list[Record]:
    return [_check_object(r, source, i, None) for i, r in enumerate(rows)]


def _read_arrow_stream(path: Path) -> list[Record]:
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as f:
            table = pa.ipc.open_stream(f).read_all()
    except Exception as e:  # ArrowInvalid, OSError
        raise DataError(f"{path}: not a readable Arrow file ({one_line(e)}); fix: save the dataset again with "
                        f"save_to_disk") from None
    return _rows(table.to_pylist(), str(path))


def _read_saved_dataset(folder: Path) -> list[Record]:
    """A `Dataset.save_to_disk` folder: state.json lists the Arrow (IPC stream) files, read in order."""
    if (folder / "dataset_dict.json").exists():  # a DatasetDict: one folder per split; train it is
        splits = sorted(p.name for p in folder.iterdir() if (p / "state.json").exists())
        if "train" not in splits:
            raise DataError(f"{folder}: a saved DatasetDict without a 'train' split (splits: {', '.join(splits)}); "
                            f"fix: pass the split's folder, e.g. {folder / (splits[0] if splits else 'SPLIT')}")
        folder = folder / "train"
    try:
        files = [f["filename"] for f in json.loads((folder / "state.json").read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise DataError(f"{folder}/state.json is not a datasets state file; fix: save the dataset again with "
                        f"save_to_disk") from None
    out: list[Record] = []
    for name in files:
        out += _read_arrow_stream(folder / name)
    return out


def _read_folder(folder: Path) -> list[Record]:
    """A saved `datasets` folder, or every data file under the folder (e.g. Parquet shards), in name order."""
    if (folder / "state.json").exists() or (folder / "dataset_dict.json").exists():
        return _read_saved_dataset(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder}: the folder holds no data files; fix: put .jsonl, .json or .parquet files in it, "
                        f"or pass a folder written by datasets' save_to_disk")
    out: list[Record] = []
    for f in files:
        out += read_records(f)
    return out


def _read_hub(spec: str) -> list[Record]:
    """A Hugging Face hub dataset `org/name[:split]` (split: train by default) through `datasets.load_dataset`."""
    name, _, split = spec.partition(":")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: not a local data file or folder; loading it as a hub dataset needs the datasets "
                        f"package; fix: pip install datasets, or pass a local file") from None
    try:
        ds = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline (ConnectionError), unknown dataset, unknown split: all one line
        raise DataError(f"{spec}: not a local data file or folder, and loading it as a Hugging Face hub dataset "
                        f"failed ({one_line(e, 120)}); fix: check the path, or go online (HF_HUB_OFFLINE unset), or "
                        f"download the dataset and pass its folder") from None
    return _rows(ds.to_list(), f"{name}[{split or 'train'}]")


def read_records(path: str | Path) -> list[Record]:
    """Read every record of one data source.

    Args:
        path: a `.json` file holding one array of objects (a `.json` file holding JSON Lines is accepted too),
            a `.jsonl` / `.ndjson` file with one object per line, a `.parquet` file (one record per row), a folder
            (every such file under it, in name order, e.g. Parquet shards; or a `datasets` save_to_disk folder, its
            train split for a DatasetDict), or a hub dataset id `org/name` or `org/name:split` (needs `datasets` and
            a connection).
    Returns:
        The records in file order, each with its source, index and line.
    Raises:
        DataError: missing or empty file, unknown suffix, text that is not JSON (naming the line), a record that is
            not an object, a hub dataset that cannot be loaded (offline).
    """
    path = Path(path)
    if path.is_dir():
        recs = _read_folder(path)
        if not recs:
            raise DataError(f"{path}: the folder holds no records; fix: add at least one record")
        return recs
    if not path.exists() and path.suffix.lower() not in DATA_SUFFIXES and HUB_ID.match(str(path)):
        return _read_hub(str(path))
    if not path.is_file():
        raise DataError(f"{path}: no such data file; fix: check the path (JSON, JSONL or Parquet)")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        recs = _read_parquet(path)
    elif suffix in JSON_SUFFIXES + JSONL_SUFFIXES:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start}); fix: save the file as UTF-8") from None
        text = text.lstrip("\ufeff")
        if not text.strip():
            raise DataError(f"{path}: the file is empty; fix: add records, one JSON object per line or one array")
        if suffix in JSON_SUFFIXES and text.lstrip().startswith("["):
            recs = _read_json_array(text, str(path))
        elif suffix in JSON_SUFFIXES and text.lstrip().startswith("{") and _one_object(text):
            raise DataError(f"{path}: the file holds one JSON object, not an array of records; "
                            f"fix: put the records in a top-level [...] array, or write them as .jsonl")
        else:
            recs = _read_jsonl(text, str(path))
    else:
        raise DataError(f"{path}: unknown data file type '{suffix}'; fix: use .json, .jsonl or .parquet")
    if not recs:
        raise DataError(f"{path}: the file holds no records; fix: add at least one record")
    return recs


def read_many(paths: str | Path | list[str | Path]) -> list[Record]:
    """Records of several sources (or one), concatenated in the given order. Errors as `read_records`."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[Record] = []
    for p in paths:
        out.extend(read_records(p))
    return out
