"""Run the real `slimtune` CLI many times, fast: one "zygote" process imports slimtune, torch and transformers once,
then forks a child per command (as `python -m slimtune ARGS` would run it, with its own stdout / stderr files and
working directory). Also: a content hash of a folder tree, to assert that a refused command changed nothing.

Protocol (one JSON line each way over the zygote's stdin / stdout):
  {"op": "spawn", "argv": [...], "cwd": DIR, "out": FILE, "err": FILE, "setup": CODE | null} -> {"pid": PID}
  {"op": "poll", "pid": PID} -> {"code": EXIT CODE, or -SIGNAL, or null while it runs}
`setup` is Python run in the child before the command (to simulate a full disk, say).
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ZYGOTE = r'''
import json, os, sys, traceback
import torch, transformers, safetensors.torch, yaml
import slimtune.cli, slimtune.train.loop, slimtune.merge, slimtune.quant.ptq, slimtune.generate
import tempfile
from slimtune.models.tiny import builtin_tokenizer
from slimtune.models.tokenizer import load_tokenizer
with tempfile.TemporaryDirectory() as d:  # warm transformers' lazy imports once, not in every child
    builtin_tokenizer().save_pretrained(d)
    load_tokenizer(d)
proto = os.fdopen(os.dup(1), "w")
def child(req):
    os.chdir(req["cwd"])
    for fd, path in ((1, req["out"]), (2, req["err"])):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", closefd=False, buffering=1)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    code = 1
    try:
        if req.get("setup"):
            exec(req["setup"], {"__name__": "setup"})
        code = slimtune.cli.main(req["argv"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code or 0))
for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "spawn":
        pid = os.fork()
        if pid == 0:
            proto.close()
            child(req)
        proto.write(json.dumps({"pid": pid}) + "\n")
    else:
        done, status = os.waitpid(req["pid"], os.WNOHANG)
        proto.write(json.dumps({"code": os.waitstatus_to_exitcode(status) if done else None}) + "\n")
    proto.flush()
'''


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


class Zygote:
    """A process that has imported slimtune and forks one child per CLI command."""

    def __init__(self, scratch: Path, threads: int | None = 1) -> None:
        self.scratch = scratch
        scratch.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        if threads is not None:  # one thread per child by default: children run side by side
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=scratch)
        self.n = 0
        self.lock = threading.Lock()

    def _ask(self, req: dict) -> dict:
        with self.lock:  # one request at a time; callers may be threads
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the zygote died")
        return json.loads(line)

    def spawn(self, argv: list[str], cwd: Path, setup: str | None = None) -> tuple[int, Path, Path]:
        """Start `slimtune ARGV` in a forked child; returns (pid, stdout file, stderr file)."""
        with self.lock:
            self.n += 1
            n = self.n
        out, err = self.scratch / f"{n}.out", self.scratch / f"{n}.err"
        pid = self._ask({"op": "spawn", "argv": [str(a) for a in argv], "cwd": str(cwd), "out": str(out),
                         "err": str(err), "setup": setup})["pid"]
        return pid, out, err

    def poll(self, pid: int) -> int | None:
        """The child's exit code (-N: killed by signal N), or None while it runs."""
        return self._ask({"op": "poll", "pid": pid})["code"]

    def wait(self, pid: int, timeout: float = 120.0) -> int:
        """Wait for the child; after `timeout` seconds kill it and return 124."""
        t0 = time.time()
        while (code := self.poll(pid)) is None:
            if time.time() - t0 > timeout:
                os.kill(pid, signal.SIGKILL)
                while self.poll(pid) is None:
                    time.sleep(0.01)
                return 124
            time.sleep(0.003)
        return code

    def run(self, argv: list[str], cwd: Path, setup: str | None = None, timeout: float = 120.0) -> Result:
        pid, out, err = self.spawn(argv, cwd, setup)
        code = self.wait(pid, timeout)
        return Result(code, out.read_text(errors="replace"), err.read_text(errors="replace"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.proc.stdout.close()


def tree_hash(*roots: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file (and '<dir>' for every folder, hidden ones included) under the roots."""
    out: dict[str, str] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            d = Path(dirpath)
            out[str(d)] = "<dir>"
            for name in filenames:
                p = d / name
                out[str(p)] = "<link>" if p.is_symlink() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_clean_line(r: Result) -> str:
    """Assert the refusal contract (exit 2, exactly one stderr line, no traceback) and return that line."""
    assert "Traceback" not in r.err, r.err[-3000:]
    assert r.code == 2, (r.code, r.err[-2000:])
    assert len(r.err_lines) == 1, r.err
    return r.err_lines[0]
