"""The tokenizer of a model folder (transformers' AutoTokenizer from local files, no remote code) or the built-in one."""
from __future__ import annotations

from pathlib import Path

from slimtune.errors import CheckpointError
from slimtune.io.hub import resolve
from slimtune.io.jsonfile import read_json
from slimtune.models.tiny import BUILTIN_NAMES, builtin_tokenizer

JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
FIX = "copy the tokenizer files (tokenizer.json, tokenizer_config.json) again from the original model folder"


def load_tokenizer(path: str | Path):
    """The tokenizer of a model folder (transformers AutoTokenizer, local files, no remote code), or the built-in one.

    Raises:
        CheckpointError: the folder has no tokenizer files, or ones that cannot be read (each JSON file is checked
            first; then whatever transformers refuses is named in one line).
    """
    if str(path) in BUILTIN_NAMES:
        return builtin_tokenizer()
    folder = resolve(path)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        raise CheckpointError(f"{folder}: no tokenizer files (tokenizer.json or tokenizer.model); copy them from "
                              "the original model folder")
    for name in JSON_FILES:
        if (folder / name).exists():
            read_json(folder / name, fix=FIX)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # transformers / tokenizers raise many types for damaged files: name the folder
        why = " ".join(str(e).split())[:160] or type(e).__name__
        raise CheckpointError(f"{folder}: the tokenizer files cannot be read ({type(e).__name__}: {why}); "
                              f"fix: {FIX}") from None
