"""Checkpoints of a run on several processes, through `torch.distributed.checkpoint` (DCP): each rank writes its
shards of the trainable weights and of the optimizer state as safetensors files (`HuggingFaceStorageWriter` with
`save_distributed=True`: each file's header carries its pieces' offsets as JSON, and no pickled `.metadata` file is
written or read), plus its RNG states; rank 0 writes the JSON state (step, data position, scheduler, config, optimizer
hyperparameters). A checkpoint loads on any number of processes - DCP reads the pieces that overlap each rank's shard
- or into a single process.

Layout of `out_dir/checkpoints/step-N/`: `shard-0000r-model-00001-of-00001.safetensors` (rank r-1's tensors:
`model.<name>`, `optim.<name>.<key>`, `rank<r>.rng.*`), `rank-<r>.json` (python / numpy RNG), `state.json` (written
last). All ranks write into `.step-N.tmp-dcp`; rank 0 renames it once every rank is done (barriers around), so a kill
at any moment leaves every earlier checkpoint whole.
"""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from slimtune.errors import CheckpointError
from slimtune.io.folders import fsync_path, remove_folder, write_json
from slimtune.train.checkpoint import FORMAT, list_checkpoints, rng_state, set_rng_state

LAYOUT = "dcp"  # state.json's "layout" for these checkpoints (one-process checkpoints have none)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _state_tensors(model: nn.Module, optimizer) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """(tensors by checkpoint key, the optimizer's state dict with its tensors in place, its non-tensor part)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    tensors = {f"model.{n}": p for n, p in model.named_parameters() if p.requires_grad}
    osd = get_optimizer_state_dict(model, optimizer)  # keyed by parameter name; initialises an empty state
    values: dict[str, dict[str, Any]] = {}
    for name, st in osd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{name}.{k}"] = v
            else:
                values.setdefault(name, {})[k] = v
    return tensors, osd, {"param_groups": osd["param_groups"], "values": values}


def _rank_rng(device: torch.device) -> tuple[dict[str, Any], dict[str, Tensor]]:
    js, t = rng_state(cuda=False)
    if device.type == "cuda":
        t["rng.cuda"] = torch.cuda.get_rng_state(device)
    return js, t


def save_sharded(out_dir: str | Path, step: int, model: nn.Module, optimizer, state: dict[str, Any], rank: int,
                 world: int, device: torch.device, keep_last: int = 2) -> Path:
    """Write out_dir/checkpoints/step-<step> from every rank (a collective) and prune to `keep_last` (0: keep all).

    Args:
        state: JSON-serialisable run state (data position, scheduler, config); rank 0's is written.
    Returns:
        the checkpoint folder.
    """
    import torch.distributed.checkpoint as dcp

    root = Path(out_dir) / "checkpoints"
    tmp, final = root / f".step-{step}.tmp-{LAYOUT}", root / f"step-{step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step-*"):  # temporary folders of writes that were killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    _barrier()
    tensors, _, opt_js = _state_tensors(model, optimizer)
    rng_js, rng_t = _rank_rng(device)
    tensors.update({f"rank{rank}.{k}": v for k, v in rng_t.items()})
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp), save_distributed=True))  # fsyncs
    write_json({"rng": rng_js}, tmp / f"rank-{rank}.json")
    _barrier()
    if rank == 0:
        write_json({"format": FORMAT, "layout": LAYOUT, "world_size": world, "step": step, **state,
                    "optimizer": opt_js}, tmp / "state.json")  # last: its presence marks a complete folder
        fsync_path(tmp)
        old = final.with_name(f".{final.name}.old-{LAYOUT}")
        if final.exists():  # (the same step saved again, e.g. Ctrl-C right after a scheduled save)
            final.rename(old)  # aside until the new one is in place
        tmp.rename(final)
        fsync_path(root)
        shutil.rmtree(old, ignore_errors=True)
        if keep_last > 0:
            for _, d in list_checkpoints(out_dir)[:-keep_last]:
                remove_folder(d)
    _barrier()
    return final


def _check_shapes(path: Path, wanted: dict[str, Tensor], saved: dict[str, Any]) -> None:
    """Every tensor to load is in the checkpoint with the same (global) shape; every saved weight is wanted."""
    for k, t in wanted.items():
        if k not in saved:
            what = "trainable parameter" if k.startswith("model.") else "optimizer state"
            raise CheckpointError(f"{path}: {what} {k.split('.', 1)[1]} is not in the checkpoint; fix: resume with "
                                  "the same model and method settings, or start in a new out_dir")
        if tuple(saved[k].size) != tuple(t.shape):
            raise CheckpointError(f"{path}: {k.split('.', 1)[1]} has shape {tuple(saved[k].size)} in the checkpoint, "
                                  f"{tuple(t.shape)} in the model; fix: resume with the same model and method settings")
    extra = sorted(k for k in saved if k.startswith("model.") and k not in wanted)
    if extra:
        raise CheckpointError(f"{path}: trainable parameter {extra[0][6:]} of the checkpoint is not trainable in this "
                              "model; fix: resume with the same model and method settings")


def load_sharded(path: str | Path, model: nn.Module, optimizer, rank: int = 0,
                 device: torch.device | None = None) -> dict[str, Any]:
    """Restore the trainable weights, the optimizer and this rank's RNGs from a DCP checkpoint, on any number of
    processes (or in one process without a process group); return its JSON state.

    Raises:
        CheckpointError: missing or damaged files, trainable tensors of other names or shapes than the model's.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        saved = dcp.HuggingFaceStorageReader(str(path)).read_metadata().state_dict_metadata
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); resume from an earlier "
                              "one") from None
    tensors, osd, _ = _state_tensors(model, optimizer)
    _check_shapes(path, tensors, saved)
    rng_keys = [k for k in saved if k.startswith(f"rank{rank}.rng.")] if rank < state["world_size"] else []
    rng_t = {k: torch.empty(tuple(saved[k].size), dtype=saved[k].properties.dtype) for k in rng_keys}
    try:
        with warnings.catch_warnings():  # in one process DCP warns that it loads without a process group: intended
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({**tensors, **rng_t}, storage_reader=dcp.HuggingFaceStorageReader(str(path)))
    except Exception as e:  # DCP raises the same CheckpointException on every rank
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot read the checkpoint ({first[:200]}); resume from an earlier one") \
            from None
    values = state["optimizer"]["values"]
    for name, st in osd["state"].items():
        st.update(values.get(name, {}))
    groups = state["optimizer"]["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    set_optimizer_state_dict(model, optimizer, {"state": osd["state"], "param_groups": groups})
    if rng_keys:  # this rank ran in the saved job: its generators continue; a new rank keeps its fresh seed
        js = json.loads((path / f"rank-{rank}.json").read_text())["rng"]
        set_rng_state(js, {"rng.torch": rng_t[f"rank{rank}.rng.torch"]})
        if f"rank{rank}.rng.cuda" in rng_t and device is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng_t[f"rank{rank}.rng.cuda"], device)
    return state
