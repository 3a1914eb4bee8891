"""The tokenizer of a model folder (transformers' AutoTokenizer from local files, no remote code) or the built-in one."""
from __future__ import annotations

from pathlib import Path

from slimtune.errors import CheckpointError
from slimtune.io.hub import resolve
from slimtune.models.tiny import BUILTIN_NAMES, builtin_tokenizer


def load_tokenizer(path: str | Path):
    """The tokenizer of a model folder (transformers AutoTokenizer, local files, no remote code), or the built-in one.

    Raises:
        CheckpointError: the folder has no tokenizer files.
    """
    if str(path) in BUILTIN_NAMES:
        return builtin_tokenizer()
    folder = resolve(path)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise CheckpointError(f"{folder}: no tokenizer files (tokenizer.json or tokenizer.model); copy them from "
                              "the original model folder")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
