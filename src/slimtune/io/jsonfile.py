"""Reading the small JSON files a model, an adapter or a run folder holds (config.json, index.json,
adapter_config.json, state.json, tokenizer files): a missing file, bytes that are not UTF-8, text that is not JSON,
nesting deeper than Python's parser goes, or a value of the wrong kind each become one line naming the file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimtune.errors import CheckpointError, SlimtuneError


def parse_json(text: str | bytes, where: str, error: type[SlimtuneError] = CheckpointError) -> Any:
    """JSON text -> a Python value (NaN / Infinity are read as floats, as Python and transformers read them).

    Raises:
        `error`: not UTF-8, not JSON (with the line and column), or nested too deep.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise error(f"{where}: not UTF-8 text (byte {e.start}); fix: re-save it as UTF-8 JSON") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); fix: repair the file or "
                    "copy it again from its source") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply to read; the file is damaged or not what it should be") from None


def read_json(path: str | Path, kind: type = dict, error: type[SlimtuneError] = CheckpointError,
              fix: str = "copy it again from its source") -> Any:
    """The JSON value in file `path`, which must be of Python type `kind` (dict: a JSON object, list: an array).

    Raises:
        `error`: a missing or unreadable file, bad JSON (see `parse_json`), or a value of another kind.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: file not found; fix: {fix}") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a JSON file; fix: {fix}") from None
    value = parse_json(raw, str(path), error)
    if not isinstance(value, kind):
        want = {dict: "a JSON object {...}", list: "a JSON array [...]"}.get(kind, kind.__name__)
        raise error(f"{path}: holds {_json_kind(value)}, expected {want}; fix: {fix}")
    return value


def _json_kind(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")
