"""Shared by the serving tests: real PEFT adapter folders for the tiny model, a real uvicorn server in a thread on a
free port (or `slimtune serve` as its own process), and reference generations through `slimtune generate`'s own
code path."""
from __future__ import annotations

import copy
import functools
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from slimtune.models.load import load_model
from slimtune.generate import SamplingConfig, generate
from slimtune.models.tiny import builtin_model
from slimtune.peft import apply_method, delete_adapter, load_adapter, merge_and_unload, save_adapter

# name -> (rank, targets): different ranks and target sets, so the bank pads ranks and leaves layers empty per slot
ADAPTERS = {"a0": (4, ["q_proj", "v_proj"]), "a1": (8, "all-linear"), "a2": (16, ["o_proj", "down_proj", "k_proj"])}


def make_adapters(folder: Path, names=("a0", "a1", "a2")) -> dict[str, str]:
    """PEFT adapter folders with random A and B (init_lora_weights=False), one seed each: they all differ."""
    model = builtin_model(0).eval()
    out = {}
    for i, name in enumerate(names):
        r, targets = ADAPTERS[name]
        torch.manual_seed(100 + i)
        apply_method(model, {"method": "lora", "r": r, "lora_alpha": 2 * r, "target_modules": targets,
                             "init_lora_weights": False}, name)
        out[name] = str(save_adapter(model, folder / name, name))
        delete_adapter(model, name)
    return out


@functools.cache
def _base(quantize: str | None, device: str):
    return load_model("builtin", quantize=quantize, device=device)[0]


def reference_ids(prompt_ids: list[int], max_new: int, adapter: str | None = None, quantize: str | None = None,
                  merge: bool = False, ignore_eos: bool = False, device: str = "cpu") -> list[int]:
    """Greedy ids from `slimtune.generate.generate` on the tiny model with the adapter loaded as `slimtune generate
    --adapter` loads it (merged first with merge=True), cut after the first stop token unless ignore_eos."""
    model = copy.deepcopy(_base(quantize, device))
    cfg = model.config
    if adapter:
        load_adapter(model, adapter)
        if merge and quantize:
            from slimtune.quant.qlora import merge_into_dequantized

            merge_into_dequantized(model, torch.float32)
        elif merge:
            merge_and_unload(model)
    sc = SamplingConfig(max_new_tokens=max_new, stop_token_ids=[] if ignore_eos else None)
    out = generate(model, torch.tensor([prompt_ids], device=device), sc=sc)[0].tolist()
    stop = None if ignore_eos else next((i for i, t in enumerate(out) if t in cfg.eos_ids), None)
    return out if stop is None else out[:stop + 1]


class ServerThread:
    """uvicorn serving `create_app(served)` in a thread, on a socket bound to a free port of 127.0.0.1."""

    def __init__(self, served, api_key: str | None = None) -> None:
        import uvicorn

        from slimtune.serve.app import create_app

        self.served = served
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(served, api_key), log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            assert time.time() - t0 < 20, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.served.engine.stop()

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


@contextmanager
def serving(api_key: str | None = None, **opts):
    """Build a server of the tiny model with ServeOptions(**opts) and run it for the block."""
    from slimtune.serve.build import ServeOptions, build

    with ServerThread(build(ServeOptions(model="builtin", **opts)), api_key) as srv:
        yield srv


def wait_until(cond, timeout: float = 10.0) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        time.sleep(0.02)
    return False


def free_port() -> int:
    """A TCP port of 127.0.0.1 free a moment ago (for a server started in another process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def server_process(cmd: str | list[str], port: int, shell: bool = False):
    """`slimtune serve ...` started as its own process, yielded once /health answers on `port` (its output in the
    failure message if it never does), stopped with SIGTERM afterwards."""
    import subprocess

    import httpx

    proc = subprocess.Popen(cmd, shell=shell, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        def up():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200
            except httpx.TransportError:
                return proc.poll() is not None
        assert wait_until(up, 60) and proc.poll() is None, proc.stdout.read().decode()
        yield proc
    finally:
        proc.terminate()
        proc.wait(20)
