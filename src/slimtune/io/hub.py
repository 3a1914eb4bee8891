"""A model folder from a local path or a Hugging Face hub id (through huggingface_hub's cache, when online)."""
from __future__ import annotations

from pathlib import Path

from slimtune.errors import CheckpointError

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]


def resolve(path: str | Path) -> Path:
    """A local model folder; a hub id (org/name) goes through huggingface_hub's cache when a network exists.

    Raises:
        CheckpointError: a file instead of a folder, a missing folder, or a hub id that cannot be fetched.
    """
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p}: is a file; pass the model folder that holds config.json")
    s = str(path)
    if s.count("/") == 1 and not s.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(s, allow_patterns=HUB_PATTERNS))
        except Exception as e:  # network or auth: the user's environment, not a bug
            raise CheckpointError(f"{s}: not a local folder, and the Hugging Face hub could not be reached "
                                  f"({type(e).__name__}); download it first or pass a local folder") from None
    raise CheckpointError(f"{p}: model folder not found; pass a Hugging Face model folder, a hub id, or 'builtin'")
