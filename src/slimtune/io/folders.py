"""The one way slimtune writes a folder: fill a temporary sibling, fsync every file and the folder, then rename it
into place (swapping out an existing folder of the same name only once the new one is complete). A kill or an error at
any moment leaves either the old folder or the new one, never a half-written one; leftovers of killed writes are
removed by the next write beside them."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimtune.errors import StorageError


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's data and metadata to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(obj: Any, path: Path) -> None:
    """JSON (indent 1) to `path`, flushed and fsynced."""
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def remove_stale(parent: Path, name: str) -> None:
    """Delete the temporary / swapped-out siblings a killed write of `parent/name` left behind."""
    for stale in list(parent.glob(f".{name}.tmp-*")) + list(parent.glob(f".{name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)


def write_folder_atomically(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Call fill(tmpdir), fsync what it wrote, then move tmpdir to `path`.

    An existing folder at `path` is replaced only once `fill` succeeded (renamed aside, the new one renamed in, the
    old one deleted). If `fill` raises, the temporary folder is removed and `path` is untouched.

    Returns:
        `path` as a Path.
    Raises:
        whatever `fill` raises; StorageError (one line naming the path) for an error of the file system: a full
        disk, a folder that may not be written, a read-only file system.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path.parent, path.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    except OSError as e:
        if Path(str(e.filename or "")).name.startswith(f".{path.name}.tmp-"):  # name the folder, not mkdtemp's try
            e.filename = None
        raise StorageError.from_os(e, path.parent) from None
    try:
        fill(tmp)
        for f in tmp.rglob("*"):
            fsync_path(f)
        fsync_path(tmp)
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
        fsync_path(path.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            if str(e.filename or "").startswith(str(tmp)):  # a file of the half-written folder: name the target
                e.filename = None
            raise StorageError.from_os(e, path) from None
        raise
    return path


def remove_folder(path: Path) -> None:
    """Delete a folder so that a kill midway leaves no half folder under its name: rename it aside first."""
    trash = path.with_name(f".{path.name}.old-{os.getpid()}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)
