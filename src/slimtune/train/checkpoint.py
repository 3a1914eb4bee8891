"""Training checkpoints that resume a run exactly: trainable weights, optimizer, scheduler, loss scaler, every RNG and
the data position. Tensors go into safetensors, everything else into JSON (no pickle).

Layout of `out_dir/checkpoints/step-N/`: `weights.safetensors` (trainable parameters by module path),
`state.safetensors` (optimizer tensors `optim.<param index>.<key>`, RNG states `rng.*`, a run's other tensors
`extra.*`, e.g. ReLoRA's merged base weights), `state.json` (the rest).
Each is written into a temporary folder, fsynced, and renamed into place, so a kill at any moment leaves every
earlier checkpoint whole; only the last `keep_last` are kept.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from slimtune.errors import CheckpointError
from slimtune.io.folders import remove_folder, write_folder_atomically, write_json
from slimtune.io.jsonfile import read_json
from slimtune.io.safetensors import read_safetensors_header, write_safetensors
from slimtune.precision.guard import check_finite

FORMAT = 1
STEP_DIR = re.compile(r"^step-(\d+)$")


# ---- RNG ------------------------------------------------------------------------------------------------------------
def rng_state(cuda: bool = True) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(JSON part, tensor part) of the python, numpy, torch CPU and (`cuda`) every CUDA generator."""
    py = random.getstate()
    npst = np.random.get_state(legacy=True)
    js = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [npst[0], npst[1].tolist(), int(npst[2]), int(npst[3]), float(npst[4])]}
    tensors = {"rng.torch": torch.get_rng_state()}
    if cuda and torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    return js, tensors


def set_rng_state(js: dict[str, Any], tensors: dict[str, Tensor]) -> None:
    """Restore what `rng_state` returned."""
    v, st, gauss = js["python"]
    random.setstate((v, tuple(st), gauss))
    name, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda[:n]])


def numerics_env(device: torch.device) -> dict[str, Any]:
    """What orders floating-point sums besides the data and the seed: torch's version and the device; on the CPU the
    intra-op thread count (ATen splits a large reduction into one partial sum per thread), the vector ISA ATen
    dispatches to, and OMP_DYNAMIC (with which OpenMP hands a parallel region fewer threads when the machine's load
    average is high). A run resumed under other values is not bitwise equal to an uninterrupted one."""
    env: dict[str, Any] = {"torch": torch.__version__, "device": device.type}
    if device.type == "cpu":
        env.update(threads=torch.get_num_threads(), isa=torch.backends.cpu.get_cpu_capability(),
                   omp_dynamic=os.environ.get("OMP_DYNAMIC", "").strip().lower() in ("1", "true", "yes"))
    elif device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device))
    return env


# ---- optimizer state as tensors + JSON ------------------------------------------------------------------------------
def flatten_optimizer(sd: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """Split `optimizer.state_dict()` into a JSON index and tensors named `optim.<param index>.<key>`.

    Raises:
        CheckpointError: a state value that is neither a tensor nor JSON-serialisable.
    """
    tensors: dict[str, Tensor] = {}
    state_js: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        entry: dict[str, Any] = {}
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{idx}.{k}"] = v.detach().to("cpu").contiguous()
                entry[k] = {"tensor": f"optim.{idx}.{k}"}
            elif isinstance(v, (int, float, bool, str)) or v is None:
                entry[k] = {"value": v}
            else:
                raise CheckpointError(f"optimizer state {idx}.{k} is a {type(v).__name__}; only tensors and numbers "
                                      "can be checkpointed")
        state_js[str(idx)] = entry
    groups = [{k: v.item() if isinstance(v, Tensor) else v for k, v in g.items()}  # a graphed step's lr is a tensor
              for g in sd["param_groups"]]
    return {"state": state_js, "param_groups": groups}, tensors


def unflatten_optimizer(js: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Any]:
    """The inverse of `flatten_optimizer`: a dict for `optimizer.load_state_dict`."""
    state = {}
    for idx, entry in js["state"].items():
        state[int(idx)] = {k: tensors[v["tensor"]] if "tensor" in v else v["value"] for k, v in entry.items()}
    groups = []
    for g in js["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters by module path (tied ones once), detached, on the CPU, contiguous."""
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


# ---- writing --------------------------------------------------------------------------------------------------------
def write_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """One safetensors file of a checkpoint (the folder writer fsyncs it)."""
    write_safetensors(tensors, path)


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under out_dir/checkpoints, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and (d / "state.json").is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def save_checkpoint(out_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], scaler: "torch.amp.GradScaler | None" = None,
                    keep_last: int = 2, extra: dict[str, Tensor] | None = None) -> Path:
    """Write out_dir/checkpoints/step-<step> atomically and prune older ones down to `keep_last`.

    Args:
        state: JSON-serialisable run state (data position, scheduler step, counters, the config); RNG states,
            the scaler state and the step are added here.
        keep_last: checkpoints kept (0 keeps all).
        extra: other tensors of the run (`load_checkpoint` returns them as state['extra']).
    Returns:
        The checkpoint folder.
    Raises:
        PrecisionError: a trainable weight or an optimizer tensor holds NaN or inf (nothing is written).
    """
    opt_js, opt_t = flatten_optimizer(optimizer.state_dict())
    weights = trainable_state(model)
    for name, t in [*weights.items(), *opt_t.items()]:  # "the last good checkpoint" must be good
        check_finite(name, t, fix="no checkpoint was written")
    rng_js, rng_t = rng_state()
    root = Path(out_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*"):  # temporary folders of writes that were killed
        shutil.rmtree(stale, ignore_errors=True)

    def fill(tmp: Path) -> None:
        write_tensors(weights, tmp / "weights.safetensors")
        ext = {f"extra.{k}": v.detach().to("cpu").contiguous() for k, v in (extra or {}).items()}
        write_tensors({**opt_t, **rng_t, **ext}, tmp / "state.safetensors")
        full = {"format": FORMAT, "step": step, **state, "optimizer": opt_js, "rng": rng_js,
                "scaler": scaler.state_dict() if scaler is not None else None}
        write_json(full, tmp / "state.json")  # last: its presence marks a complete folder

    final = write_folder_atomically(root / f"step-{step}", fill)
    if keep_last > 0:
        for _, d in list_checkpoints(out_dir)[:-keep_last]:
            remove_folder(d)  # out of sight first, so a kill during the delete leaves no half checkpoint
    return final


# ---- reading --------------------------------------------------------------------------------------------------------
def find_checkpoint(out_dir: str | Path, resume: str) -> Path | None:
    """The folder named by `resume`: 'latest' (None when out_dir has no checkpoint yet) or a path.

    Raises:
        CheckpointError: a path that is not a complete checkpoint folder.
    """
    if resume == "latest":
        found = list_checkpoints(out_dir)
        return found[-1][1] if found else None
    p = Path(resume)
    if not (p / "state.json").is_file():
        raise CheckpointError(f"{p}: not a training checkpoint (no state.json); fix: pass resume=latest or a "
                              "folder such as OUT/checkpoints/step-100")
    return p


def read_state(path: str | Path) -> dict[str, Any]:
    """The checked state.json of checkpoint folder `path`: an object with the step, the data position, the
    optimizer index, the RNG states and the run's config, each of the right type (a sharded checkpoint's, which has a
    `layout` and keeps its optimizer index and RNG states elsewhere: the step, the data position and the config).

    Raises:
        CheckpointError: a missing, truncated, non-UTF-8 or malformed state.json (naming the key at fault).
    """
    f = Path(path) / "state.json"
    fix = "resume from an earlier checkpoint (resume=OUT/checkpoints/step-N) or start in a new out_dir"
    state = read_json(f, fix=fix)
    sharded = "layout" in state  # (train.dist_checkpoint)
    want = {"step": int, "data": dict, "config": dict} if sharded else \
        {"step": int, "data": dict, "optimizer": dict, "rng": dict, "config": dict}
    parts = [("", k, state.get(k), t) for k, t in want.items()]
    parts += [("data.", k, (state.get("data") or {}).get(k), int) for k in ("epoch", "index", "seed", "size",
                                                                         "batch_size")]
    if not sharded:
        parts += [("optimizer.", k, (state.get("optimizer") or {}).get(k), t) for k, t in (("state", dict),
                                                                                          ("param_groups", list))]
        parts += [("rng.", k, (state.get("rng") or {}).get(k), list) for k in ("python", "numpy")]
    for prefix, k, v, t in parts:
        if not isinstance(v, t) or isinstance(v, bool) or (t is int and v < 0):
            raise CheckpointError(f"{f}: {prefix}{k} is missing or not a{'n' if t is int else ''} "
                                  f"{'non-negative integer' if t is int else t.__name__}; the file is damaged; "
                                  f"fix: {fix}")
    return state


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: "torch.amp.GradScaler | None" = None) -> dict[str, Any]:
    """Restore weights, optimizer, scaler and RNGs from a checkpoint folder; return its JSON state (step, data, ...)
    with the run's extra tensors under 'extra'.

    Raises:
        CheckpointError: missing or damaged files, or trainable parameters that differ from the checkpoint's
            (another method or model).
        PrecisionError: a weight or optimizer tensor holding NaN or inf.
    """
    from safetensors.torch import load_file

    path = Path(path)
    state = read_state(path)
    for f in ("weights.safetensors", "state.safetensors"):
        read_safetensors_header(path / f)  # a clear error for a missing, truncated or malformed file
    weights = load_file(str(path / "weights.safetensors"))
    tensors = load_file(str(path / "state.safetensors"))
    earlier = "resume from an earlier checkpoint (resume=OUT/checkpoints/step-N)"
    for f, part in (("weights.safetensors", weights), ("state.safetensors", tensors)):
        for name, t in part.items():
            check_finite(name, t, str(path / f), fix=earlier)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        extra = sorted(set(weights) ^ set(params))[0]
        raise CheckpointError(f"{path}: trainable parameter {extra} is in only one of the checkpoint and the model; "
                              "fix: resume with the same model and method settings")
    for n, p in params.items():
        if weights[n].shape != p.shape:
            raise CheckpointError(f"{path}: {n} has shape {tuple(weights[n].shape)}, the model "
                                  f"{tuple(p.shape)}; fix: resume with the same method settings")
    try:
        optimizer.load_state_dict(unflatten_optimizer(state["optimizer"], tensors))
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], tensors)
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise CheckpointError(f"{path}: the optimizer / RNG state in state.json and state.safetensors does not fit "
                              f"this run ({type(e).__name__}: {' '.join(str(e).split())[:120]}); resume from an "
                              "earlier checkpoint") from None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    state["extra"] = {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")}
    return state
