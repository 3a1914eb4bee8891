"""Errors of the operating system during a save or a checkpoint - a full disk, a folder that may not be written, a
read-only file system - end as one line naming the path (exit 2), and leave the previous state whole. The disk is
filled by making safetensors' writer fail exactly as it does on a full disk (its own error type, errno 28, no path);
permissions are refused by the kernel itself (the child drops root); where this machine lets us mount a tiny tmpfs,
a real full and a real read-only file system are used too."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from safetensors.torch import load_file

from reliability_assets import run_overrides
from reliability_harness import one_clean_line, tree_hash




DISK_FULL_AT = """
import safetensors.torch as st
from safetensors import SafetensorError
orig = st.save_file
def save_file(tensors, filename, metadata=None):
    if {marker!r} in str(filename):  # what safetensors raises when write(2) fails with ENOSPC
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return orig(tensors, filename, metadata=metadata)
st.save_file = save_file
"""


def test_disk_full_during_a_checkpoint(ws, zygote, tmp_path):
    out = tmp_path / "run"
    r = zygote.run(["finetune", *run_overrides(ws, out, max_steps=4)], tmp_path,
                   setup=DISK_FULL_AT.format(marker=".step-2.tmp"))
    line = one_clean_line(r)
    for word in ("checkpoint of step 2 not written", f"{out}/checkpoints/step-2", "No space left on device",
                 "free disk space", f"the last good checkpoint is {out}/checkpoints/step-1", "resume=latest"):
        assert word in line, (word, line)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1"]  # no half folder, no temp left
    load_file(str(out / "checkpoints" / "step-1" / "weights.safetensors"))
    # space is back: the run goes on from step 1 and ends as an uninterrupted run does
    assert zygote.run(["finetune", *run_overrides(ws, out, max_steps=4, resume="latest")], tmp_path).code == 0
    ref = tmp_path / "ref"
    assert zygote.run(["finetune", *run_overrides(ws, ref, max_steps=4)], tmp_path).code == 0
    assert (out / "metrics.jsonl").read_text().count("\n") == (ref / "metrics.jsonl").read_text().count("\n")
    strip = lambda p: [line.split('"tokens_per_s"')[0] for line in p.read_text().splitlines()]  # noqa: E731
    assert strip(out / "metrics.jsonl") == strip(ref / "metrics.jsonl")


@pytest.mark.parametrize("cmd", ["convert", "merge-adapter", "adapter-at-the-end"])
def test_disk_full_during_a_save(ws, zygote, tmp_path, cmd):
    out = tmp_path / "out"
    argv, marker = {
        "convert": (["convert", ws / "model", out], "model.safetensors"),
        "merge-adapter": (["merge-adapter", "--model", ws / "model", "--adapter", ws / "adapter", "--out", out],
                          "model.safetensors"),
        "adapter-at-the-end": (["finetune", *run_overrides(ws, tmp_path / "run", save_final="true")],
                               "adapter_model"),
    }[cmd]
    before = tree_hash(ws)
    line = one_clean_line(zygote.run(argv, tmp_path, setup=DISK_FULL_AT.format(marker=marker)))
    assert "No space left on device" in line and "errno 28" in line, line
    where = tmp_path / "run" / "adapter" if cmd == "adapter-at-the-end" else out
    assert str(where) in line, line
    assert tree_hash(ws) == before
    if cmd == "adapter-at-the-end":
        assert sorted(p.name for p in where.iterdir()) == []  # the temporary files are gone
    else:
        assert not out.exists() and not list(tmp_path.glob(".out.*"))


@pytest.fixture
def shared_dir():
    """A folder outside pytest's private (0700) temp root, so that an unprivileged child can reach it."""
    d = Path(tempfile.mkdtemp(prefix="slimtune-perm-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_permission_denied(zygote, shared_dir):
    locked = shared_dir / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root ignores permissions: the child becomes 'nobody' first
        setup = "import os\nos.setgid(65534)\nos.setuid(65534)\n"
        locked.chmod(0o755)
    else:
        setup = None
        locked.chmod(0o555)
    line = one_clean_line(zygote.run(["convert", "builtin", locked / "out"], shared_dir, setup=setup))
    assert f"{locked}: Permission denied (errno 13)" in line and "choose a folder you may write to" in line, line
    assert list(locked.iterdir()) == []


def _mount(where: Path, opts: str) -> bool:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True)
    return r.returncode == 0


@pytest.mark.parametrize("opts, words", [("size=64k", ["No space left on device", "errno 28"]),
                                         ("ro,size=64k", ["Read-only file system", "errno 30"])])
def test_a_real_full_or_read_only_file_system(zygote, shared_dir, opts, words):
    mnt = shared_dir / "mnt"
    if not _mount(mnt, opts):
        pytest.skip("this machine does not let the tests mount a tmpfs")
    try:
        line = one_clean_line(zygote.run(["convert", "builtin", mnt / "out"], shared_dir))
        assert all(w in line for w in words) and str(mnt) in line, line
        assert list(mnt.iterdir()) == []  # the half-written temporary folder is gone
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
