"""The one training loop for every method: build (`build.py`), resume, then step with gradient accumulation, warmup +
decay, evaluation, metrics, atomic checkpoints; save the result. Ctrl-C saves a checkpoint and stops; a NaN/inf loss
stops without saving. `train(cfg)` runs a whole fine-tuning; `Run` holds one while it runs.
"""
from __future__ import annotations

import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimtune import kernels
from slimtune.errors import ConfigError, PrecisionError, StorageError
from slimtune.models.fallback import fallback_note
from slimtune.optim.schedules import lr_at, total_steps, warmup_count
from slimtune.train.build import build_data, build_model, build_optimizer, pick_device, predict_memory
from slimtune.train.checkpoint import (find_checkpoint, load_checkpoint, numerics_env, read_state,
                                       save_checkpoint)
from slimtune.train.config import TrainConfig, resume_keys, save_config
from slimtune.train.evaluate import evaluate
from slimtune.train.graphed import GraphedStep
from slimtune.train.graphed import supported as graph_supported
from slimtune.train.metrics import MetricsLogger, NullLogger, plot_losses, truncate_metrics
from slimtune.train.relora import make_restarts
from slimtune.train.step import TrainingError, train_step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def check_resume(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    """Refuse to resume with a setting that changes the numerics (`resume_keys`).

    Raises:
        ConfigError: naming the key, the checkpoint's value and the fix.
    """
    now = cfg.to_dict()
    for k in resume_keys():
        if k in saved and saved[k] != now.get(k):
            raise ConfigError(f"{where}: {k} was {saved[k]!r} in the checkpoint, now {now.get(k)!r}; fix: "
                              f"resume with {k}={saved[k]!r}, or start in a new out_dir")


class Run:
    """One fine-tuning run: its model, data, optimizer, position and outputs in `cfg.out_dir`.

    The methods `setup_device`, `build`, `load`, `checkpoint`, `run_eval`, `train_micro`, `agree` and `save_final`
    are where a run on several processes (`dist_run.DistRun`) differs; `main` is False on the ranks that write nothing.
    """

    main = True

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] = print) -> None:
        """Build everything (data first, so bad data fails before the model loads) and resume if asked."""
        from slimtune.data import DataIterator
        from slimtune.models.tokenizer import load_tokenizer

        self.cfg, self.log, self.out = cfg, log, Path(cfg.out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise ConfigError(f"out_dir={self.out} is a file; fix: choose a folder for the run's outputs")
        seed_everything(cfg.seed)
        self.device = self.setup_device()
        if numerics_env(self.device).get("omp_dynamic"):
            log("note: OMP_DYNAMIC is on: OpenMP gives CPU ops fewer threads when the machine is busy, which reorders "
                "their sums; unset it for runs that reproduce bitwise")
        self.tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        self.train_ds, self.val_ds, self.data_summary = build_data(cfg, self.tokenizer)
        d = self.data_summary
        log(f"data: {d['examples']} training examples in {d['rows']} rows of <= {cfg.max_length} tokens "
            f"({d['format']}, template {d['template']}), {d['val_examples']} validation; {d['truncated']} truncated, "
            f"{d['dropped']} dropped")
        self.model, self.prec, self.counts = self.build()
        if fallback_note(self.model):
            log(fallback_note(self.model))
        log(self.prec.describe())
        c = self.counts
        log(f"method {cfg.method}: trainable params {c['trainable']:,} of {c['total']:,} ({c['percent']:.4f}%) on "
            f"{self.device}")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg)
        self.relora = make_restarts(self.model, self.optimizer)  # ReLoRA's merges and restarts, else None
        self.scaler = self.prec.make_scaler(self.device.type)
        self.graphed = self._graphed()
        self.it = DataIterator(self.train_ds, cfg.batch_size, seed=cfg.seed)
        self.total = total_steps(cfg.max_steps, cfg.epochs, self.it.batches_per_epoch, cfg.grad_accum)
        self.step, self.last_ckpt = 0, None
        self._resume()  # before anything is written, so a refused resume changes nothing on disk
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        if self.main:
            save_config(cfg, self.out / "config.yaml")
            if self.step == 0:
                self.metrics_path.unlink(missing_ok=True)
            else:
                truncate_metrics(self.metrics_path, self.step, final=self.step >= self.total)
        purge = self.step + 1 if self.step else None  # TensorBoard drops what a killed run logged after its checkpoint
        self.logger = MetricsLogger(self.out, cfg.log_tensorboard, purge_step=purge) if self.main else NullLogger()
        self.t_train, self.tok_done, self.last = 0.0, 0, {}

    def _graphed(self) -> GraphedStep | None:
        """The CUDA-graph stepper where the run allows it (`cuda_graph=auto`), else None (eager steps)."""
        cfg = self.cfg
        why = "cuda_graph=off" if cfg.cuda_graph == "off" else \
            graph_supported(self.model, self.optimizer, self.scaler, self.device, cfg.offload_activations)
        if why is None:
            return GraphedStep(self.model, self.optimizer, self.prec, self.device, cfg.max_grad_norm, self.params,
                               cfg.chunked_loss)
        if self.device.type == "cuda":
            self.log(f"steps run eagerly, not as CUDA graphs ({why})")
        return None

    def _resume(self) -> None:
        if not self.cfg.resume:
            return
        ckpt = find_checkpoint(self.out, self.cfg.resume)
        if ckpt is None:
            self.log(f"resume=latest: no checkpoint in {self.out / 'checkpoints'} yet; starting from step 0")
            return
        saved = read_state(ckpt)
        check_resume(saved["config"], self.cfg, ckpt)
        state = self.load(ckpt, saved)
        saved, now = state.get("numerics") or {}, numerics_env(self.device)
        diff = [k for k in now if k in saved and saved[k] != now[k]]
        if diff:
            self.log(f"note: {ckpt} was written with {', '.join(f'{k}={saved[k]}' for k in diff)}, this run has "
                     f"{', '.join(f'{k}={now[k]}' for k in diff)}: sums are ordered differently, so the losses can "
                     "differ from an uninterrupted run in the last digits")
        self.it.load_state_dict(state["data"])
        self.step, self.last_ckpt = int(state["step"]), ckpt
        if self.relora is not None:
            self.relora.load_state_tensors(state["extra"], self.step)
        self.log(f"resumed from {ckpt} at step {self.step}")

    # ---- pieces of the run --------------------------------------------------------------------------------------
    def setup_device(self) -> torch.device:
        return pick_device(self.cfg.device)

    def build(self) -> tuple[nn.Module, Any, dict[str, Any]]:
        """(model, precision, counts): the memory prediction, then `build_model`."""
        e = predict_memory(self.cfg, self.device, self.log)  # (also resolves ckpt_blocks=auto)
        return build_model(self.cfg, self.device, (e or {}).get("ckpt_blocks"))

    def load(self, ckpt: Path, saved: dict[str, Any]) -> dict[str, Any]:
        """Restore from checkpoint folder `ckpt` (whose state.json is `saved`): one written by one process, or a
        sharded one (`dist_checkpoint`, from any number of processes)."""
        if "layout" in saved:  # sharded (train.dist_checkpoint)
            from slimtune.train.dist_checkpoint import load_sharded

            return load_sharded(ckpt, self.model, self.optimizer, device=self.device)
        return load_checkpoint(ckpt, self.model, self.optimizer, self.scaler)

    def train_micro(self, micro: list[dict]) -> dict[str, Any]:
        """One eager optimizer step over the micro-batches (`train_step`)."""
        cfg = self.cfg
        return train_step(self.model, micro, self.optimizer, self.scaler, self.prec, self.device, cfg.max_grad_norm,
                          self.params, cfg.offload_activations, cfg.chunked_loss)

    def agree(self, stop: bool) -> bool:
        """Whether to stop now (on several processes: all of them together)."""
        return stop

    def save_final(self) -> Path:
        return save_result(self.model, self.cfg, self.tokenizer, self.out)

    def run_state(self) -> dict[str, Any]:
        """The JSON part of a checkpoint: data position, config, scheduler position."""
        return {"data": self.it.state_dict(), "config": self.cfg.to_dict(), "numerics": numerics_env(self.device),
                "scheduler": {"step": self.step, "total": self.total}}

    def stopped(self) -> str:
        """Where the run can go on from, for the message of an error that stops it."""
        return f"the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else "no checkpoint was saved yet"

    def checkpoint(self) -> Path:
        """Save a checkpoint of the current step; one whose weights or optimizer state are not finite is refused.

        Raises:
            TrainingError: NaN / inf in a trainable weight or the optimizer state (nothing written).
            StorageError: the disk refused the write (the earlier checkpoints stay whole).
        """
        extra = self.relora.state_tensors() if self.relora is not None else None
        try:
            return save_checkpoint(self.out, self.step, self.model, self.optimizer, self.run_state(), self.scaler,
                                   self.cfg.keep_last, extra)
        except PrecisionError as e:
            raise TrainingError(f"step {self.step}: {e}; the run stopped, {self.stopped()}; fix: lower lr (now "
                                f"{self.cfg.lr:g}), raise warmup_steps or set max_grad_norm") from None
        except StorageError as e:
            raise StorageError(f"checkpoint of step {self.step} not written: {e}; {self.stopped()}, continue "
                               "from it with resume=latest") from None

    def run_eval(self) -> dict[str, float] | None:
        if self.val_ds is None:
            return None
        ev = evaluate(self.model, self.val_ds, self.cfg.batch_size, self.prec, self.device, self.cfg.eval_batches,
                      chunked=self.cfg.chunked_loss)
        self.logger.log({"step": self.step, **ev})
        return ev

    def one_step(self) -> dict[str, Any]:
        """Set the learning rate, run one optimizer step, log it; returns the metrics row."""
        cfg = self.cfg
        warmup = warmup_count(cfg.warmup_steps, cfg.warmup_ratio, self.total)
        lr = lr_at(self.step, cfg.lr, self.total, warmup, cfg.schedule, cfg.min_lr)
        if self.relora is not None:
            lr *= self.relora.lr_factor(self.step)
        if self.graphed is None:  # (the graphed step sets its own device-side learning rate)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        t0 = time.perf_counter()
        micro = [next(self.it) for _ in range(cfg.grad_accum)]
        try:
            res = self.graphed(micro, lr) if self.graphed is not None else self.train_micro(micro)
        except TrainingError as e:
            raise TrainingError(f"step {self.step + 1}: {e}; the run stopped, {self.stopped()}; fix: lower lr (now "
                                f"{cfg.lr:g}), raise warmup_steps, set max_grad_norm, or use precision=fp32 / "
                                "bf16-mixed") from None
        if self.graphed is not None and self.graphed.failed:
            self.log(f"steps run eagerly from step {self.step + 1} on: {self.graphed.failed}")
            self.graphed = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t0
        self.step += 1
        self.t_train, self.tok_done = self.t_train + dt, self.tok_done + res["tokens"]
        row = {"step": self.step, "loss": res["loss"], "lr": lr, "grad_norm": res["grad_norm"],
               "tokens_per_s": res["tokens"] / dt, "peak_mem_gib": round(peak_memory_gib(self.device), 3),
               "epoch": self.it.epoch}
        if self.scaler is not None:
            row.update(skipped=res["skipped"], loss_scale=self.scaler.get_scale())
        if self.relora is not None and self.relora.after_step(self.step):
            row["relora_restart"] = self.relora.restarts
        if self.step % cfg.log_every == 0 or self.step == self.total:
            self.logger.log(row)
        self.last = row
        return row

    def fit(self) -> bool:
        """Step until the end (evaluating and checkpointing on schedule); returns True when Ctrl-C stopped it."""
        from tqdm import tqdm

        cfg, stop = self.cfg, {"flag": False}

        def on_sigint(signum, frame) -> None:
            if stop["flag"]:
                raise KeyboardInterrupt
            stop["flag"] = True

        main_thread = threading.current_thread() is threading.main_thread()
        old_handler = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        bar = tqdm(total=self.total, initial=self.step, disable=not cfg.progress, dynamic_ncols=True, desc="train")
        try:
            while self.step < self.total and not self.agree(stop["flag"]):
                row = self.one_step()
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                tok_s=f"{self.tok_done / self.t_train:,.0f}", mem=f"{row['peak_mem_gib']:.2f}G")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total:
                    ev = self.run_eval()
                    if ev and self.main:
                        bar.write(f"step {self.step}: validation loss {ev['val_loss']:.4f}")
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total:
                    self.last_ckpt = self.checkpoint()
        except BaseException:  # a second Ctrl-C or an error: stop now, the last checkpoint stays as it was
            bar.close()
            self.logger.close()
            raise
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, old_handler)
        bar.close()
        return self.agree(stop["flag"]) and self.step < self.total

    def summary(self, val_before, val_after, interrupted: bool, final: Path | None, plot: Path | None) -> dict:
        return {"steps": self.step, "total_steps": self.total, "loss": self.last.get("loss"),
                "val_before": val_before, "val_after": val_after,
                "tokens_per_s": self.tok_done / self.t_train if self.t_train else None,
                "peak_mem_gib": peak_memory_gib(self.device), "seconds": self.t_train, "interrupted": interrupted,
                "checkpoint": str(self.last_ckpt), "final": str(final) if final else None,
                "plot": str(plot) if plot else None, "metrics": str(self.metrics_path), "precision": self.prec.name,
                "device": str(self.device), "data": self.data_summary, "trainable": self.counts["trainable"],
                "model": self.model, "tokenizer": self.tokenizer}


def train(cfg: TrainConfig, log: Callable[[str], None] = print, run_cls: type[Run] | None = None) -> dict[str, Any]:
    """Run a whole fine-tuning: build, (resume,) train, evaluate, checkpoint, save the result.

    Outputs in cfg.out_dir: config.yaml, metrics.jsonl, loss.png, checkpoints/step-N/, and adapter/ (PEFT format)
    or model/ (full fine-tuning, a Hugging Face folder).
    Returns:
        summary: steps, loss, val_before / val_after, tokens_per_s, peak_mem_gib, seconds, interrupted, paths;
        plus 'model' and 'tokenizer' (the trained objects, for generation; pop them before serialising).
    Raises:
        SlimtuneError subclasses for bad config, data, checkpoints; TrainingError when the loss diverges.
    """
    with kernels.use(cfg.kernels):
        return _train(cfg, log, run_cls or Run)


def _train(cfg: TrainConfig, log: Callable[[str], None], run_cls: type[Run]) -> dict[str, Any]:
    """`train` inside its kernel setting; `run_cls`: `Run`, or `dist_run.DistRun` in a torchrun process."""
    run = run_cls(cfg, log)
    val_before = run.run_eval() if run.step == 0 else None
    if val_before:
        run.log(f"validation loss before training: {val_before['val_loss']:.4f} (perplexity "
                f"{val_before['val_ppl']:.2f})")
    interrupted = run.fit()
    try:
        run.last_ckpt = run.checkpoint()
    except BaseException:
        run.logger.close()
        raise
    val_after = None
    if interrupted:
        run.log(f"interrupted at step {run.step}: checkpoint saved to {run.last_ckpt}; continue with resume=latest")
    else:
        val_after = run.run_eval()
        if val_after:
            run.log(f"validation loss after training: {val_after['val_loss']:.4f} (perplexity "
                    f"{val_after['val_ppl']:.2f})")
    run.logger.close()
    plot = plot_losses(run.metrics_path, run.out / "loss.png") if cfg.plot and run.main else None
    final = None
    if cfg.save_final and not interrupted:
        final = run.save_final()
        run.log(f"saved {'model' if cfg.method in ('full', 'relora') else 'adapter'} to {final}")
    return run.summary(val_before, val_after, interrupted, final, plot)


def save_result(model: nn.Module, cfg: TrainConfig, tokenizer, out: Path) -> Path:
    """out/adapter (PEFT format: adapter_config.json + adapter_model.safetensors) or, for full fine-tuning and ReLoRA
    (merged first), out/model (a Hugging Face folder with the tokenizer)."""
    if cfg.method in ("full", "relora"):
        from slimtune.models.save import save_model
        from slimtune.peft.api import merge_and_unload

        return save_model(merge_and_unload(model) if cfg.method == "relora" else model, out / "model",
                          tokenizer=tokenizer)
    from slimtune.peft.files import save_adapter

    return save_adapter(model, out / "adapter", base_model_name_or_path=cfg.model)
