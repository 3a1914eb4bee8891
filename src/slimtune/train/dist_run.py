"""A fine-tuning run on several processes (torchrun): `DistRun` is `loop.Run` with the model built straight into FSDP2
shards (`sharded.py`), each rank stepping on its rows of the same global micro-batches (`distributed.py`), sharded
checkpoints (`dist_checkpoint.py`), evaluation and the stop signal agreed over ranks, and the result gathered and
written by rank 0. `train_distributed(cfg)` runs a whole fine-tuning in a process started by torchrun.

Steps are eager (no CUDA graphs), and the loss comes from the full logits: the chunked loss (`train.loss.lm_head_loss`)
calls `hidden_states` and the head's weight directly, around the modules' forward hooks in which FSDP2 gathers them.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.errors import CheckpointError
from slimtune.train.build import predict_memory
from slimtune.train.config import TrainConfig
from slimtune.train.dist_checkpoint import LAYOUT, load_sharded, save_sharded
from slimtune.train.distributed import (RankRows, all_sum, check_distributed, init_distributed, reshard_all,
                                        shard_batch, torchrun_env)
from slimtune.train.evaluate import evaluate
from slimtune.train.loop import Run, train
from slimtune.train.step import predicted_tokens, train_step


class DistRun(Run):
    """A `Run` in one process of a torchrun job; rank 0 logs and writes, every rank computes its shard."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print) -> None:
        """Check what several processes cannot do (one line, nothing loaded or written yet), then build as `Run`."""
        self.env = torchrun_env()
        if self.env is None:
            raise RuntimeError("DistRun runs in a process started by torchrun (RANK / WORLD_SIZE are not set)")
        check_distributed(cfg, self.env.world, self.env.local_world)
        self.main = self.env.main
        if not self.main:
            cfg.progress = False
        super().__init__(cfg, log if self.main else (lambda s: None))

    def _graphed(self) -> None:
        return None  # FSDP2's collectives and hooks are not captured in CUDA graphs: eager steps

    def setup_device(self) -> torch.device:
        device, self.mesh = init_distributed(self.cfg, self.env)
        return device

    def build(self) -> tuple[nn.Module, Any, dict[str, Any]]:
        from slimtune.precision.policy import resolve_precision
        from slimtune.train.sharded import build_sharded

        cfg, env = self.cfg, self.env
        if self.main:
            predict_memory(cfg, self.device, self.log, gpus=env.world)
        prec = resolve_precision(cfg.precision, self.device, cfg.base_dtype, full=cfg.method == "full")
        model, counts = build_sharded(cfg, prec, self.device, self.mesh, env)
        if env.rank:  # dropout masks differ between ranks; rank 0 keeps the stream of a one-process run
            torch.manual_seed(cfg.seed * 1_000_003 + env.rank)
        held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        self.log(f"FSDP2 over {env.world} processes ({self.device.type}): this one holds {held / 2**20:.2f} of "
                 f"{total / 2**20:.2f} MiB of parameters and takes {cfg.batch_size // env.world} rows of each "
                 "micro-batch")
        return model, prec, counts

    def load(self, ckpt: Path, saved: dict[str, Any]) -> dict[str, Any]:
        if saved.get("layout") != LAYOUT:
            raise CheckpointError(f"{ckpt}: written by a one-process run, which several processes cannot resume; "
                                  "fix: resume it on one process (without torchrun), or start in a new out_dir")
        return load_sharded(ckpt, self.model, self.optimizer, self.env.rank, self.device)

    def checkpoint(self) -> Path:
        reshard_all(self.model)  # weights stay gathered after a forward without backward (evaluation)
        return save_sharded(self.out, self.step, self.model, self.optimizer, self.run_state(), self.env.rank,
                            self.env.world, self.device, self.cfg.keep_last)

    def train_micro(self, micro: list[dict]) -> dict[str, Any]:
        local = [shard_batch(b, self.env.rank, self.env.world) for b in micro]
        res = train_step(self.model, local, self.optimizer, self.scaler, self.prec, self.device,
                         self.cfg.max_grad_norm, self.params, self.cfg.offload_activations, chunked=False,
                         n_pred=predicted_tokens(micro), reduce=all_sum)
        res["tokens"] = sum(b["input_ids"].numel() for b in micro)  # the global step's
        return res

    def agree(self, stop: bool) -> bool:
        return bool(all_sum(torch.tensor([float(stop)], device=self.device)).item() > 0)

    def run_eval(self) -> dict[str, float] | None:
        if self.val_ds is None:
            return None
        rows = RankRows(self.val_ds, self.env.rank, self.env.world)
        ev = evaluate(self.model, rows, self.cfg.batch_size, self.prec, self.device, self.cfg.eval_batches,
                      chunked=False, reduce=all_sum)
        reshard_all(self.model)  # no backward follows to free the gathered weights
        self.logger.log({"step": self.step, **ev})
        return ev

    def save_final(self) -> Path:
        """Gather the result and write it from rank 0: out/model (full) or out/adapter (PEFT format)."""
        import torch.distributed as dist

        reshard_all(self.model)
        if self.cfg.method == "full":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            from slimtune.models.save import save_model

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            sd = get_model_state_dict(self.model, options=opts)  # whole tensors on rank 0 only
            if self.model.config.tie_word_embeddings:
                sd.pop("lm_head.weight", None)
            path = self.out / "model"
            if self.main:
                save_model(self.model, path, tokenizer=self.tokenizer, state=sd)
        else:
            from slimtune.peft.base import get_method
            from slimtune.peft.files import save_adapter
            from slimtune.peft.layer import active_adapters, model_adapters

            name = active_adapters(self.model)[0]
            live = get_method(model_adapters(self.model)[name].method).state_dict(self.model, name)
            sd = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in live.items()}  # every rank
            path = self.out / "adapter"
            if self.main:
                save_adapter(self.model, path, name, base_model_name_or_path=self.cfg.model, state=sd)
        dist.barrier()
        return path


def train_distributed(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """`loop.train` in a process of a torchrun job (see `DistRun`); the process group is left at the end.

    Raises:
        ConfigError: what several processes cannot do (see `distributed.check_distributed`); else as `loop.train`.
    """
    import torch.distributed as dist

    try:
        res = train(cfg, log, run_cls=DistRun)
        dist.barrier()  # no process tears its connections down while another still uses them
        return res
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
