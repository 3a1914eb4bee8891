"""The one training loop for every method: build the model, the data and the optimizer (separate steps, no global
state), then step with gradient accumulation, clipping, warmup + decay, loss scaling, evaluation, metrics, atomic
checkpoints and exact resume. Ctrl-C saves a checkpoint and stops; a NaN/inf loss stops without saving.
"""
from __future__ import annotations

import json
import math
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

from slimtune.errors import ConfigError, SlimtuneError
from slimtune.train.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from slimtune.train.config import TrainConfig, save_config
from slimtune.train.precision import AdamWFp32State, Precision, apply_precision, resolve_precision

# flat TrainConfig keys -> the field they set in a method's config (the first one the method has)
METHOD_KEYS = {"rank": ("r",), "alpha": ("lora_alpha", "alpha"), "dropout": ("lora_dropout", "dropout"),
               "targets": ("target_modules",), "use_dora": ("use_dora",), "use_rslora": ("use_rslora",),
               "num_virtual_tokens": ("num_virtual_tokens",)}
PROMPT_METHODS = ("prompt", "prefix", "ptuning")
# keys that must match between a checkpoint and the run resuming from it (else the numerics differ)
RESUME_KEYS = ("model", "method", "rank", "alpha", "dropout", "targets", "use_dora", "use_rslora",
               "num_virtual_tokens", "method_args", "quant", "data", "data_format", "template", "train_on_prompt",
               "max_length", "packing", "precision", "base_dtype", "batch_size", "grad_accum", "lr", "min_lr",
               "warmup_steps", "schedule", "weight_decay", "betas", "optimizer", "seed")


class TrainingError(SlimtuneError):
    """The run diverged: a loss or gradient turned NaN/inf outside what loss scaling handles."""


# ---- building blocks ------------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA GPU is visible; fix: device=cpu or device=auto")
    return torch.device(name)


def method_config(cfg: TrainConfig):
    """The method's own typed config built from the flat keys (None for full fine-tuning).

    Raises:
        ConfigError: unknown method, an option the method does not have, an out-of-range value.
    """
    set_keys = {k: getattr(cfg, k) for k in METHOD_KEYS if getattr(cfg, k) is not None}
    if cfg.method == "full":
        if set_keys or cfg.method_args:
            k = next(iter(set_keys or cfg.method_args))
            raise ConfigError(f"{k} does not apply to method=full (every weight trains); fix: remove it")
        return None
    from slimtune.peft import get_method

    spec = get_method("lora" if cfg.method == "qlora" else cfg.method)
    fields = spec.config_cls.field_names()
    opts: dict[str, Any] = {}
    for k, v in set_keys.items():
        target = next((f for f in METHOD_KEYS[k] if f in fields), None)
        if target is None:
            raise ConfigError(f"{k} does not apply to method={cfg.method}; its options are {', '.join(fields)} "
                              "(set others through method_args)")
        opts[target] = v
    opts.update(cfg.method_args)
    return spec.config_cls.from_dict(opts)


def build_model(cfg: TrainConfig, device: torch.device) -> tuple[nn.Module, Precision, dict[str, Any]]:
    """Load the model, apply the method, freeze what it does not train, and cast to the precision policy.

    Returns:
        (model in train mode on `device`, the resolved precision, {'trainable', 'total', 'percent'}).
    Raises:
        ConfigError, CheckpointError, PrecisionError: bad method options, model folder or precision.
    """
    from slimtune.checkpoint import load_model

    full = cfg.method == "full"
    prec = resolve_precision(cfg.precision, device, cfg.base_dtype, full=full)
    mcfg = method_config(cfg)  # validated before the (possibly long) load
    if cfg.method == "qlora":
        # each linear weight is quantized on the device as soon as it is read: the 16-bit model never exists whole
        model, _ = load_model(cfg.model, dtype=prec.compute_dtype or torch.float32, device=device,
                              quantize=cfg.quant)
    else:
        model, _ = load_model(cfg.model, dtype=prec.weight_dtype if full else prec.frozen_dtype, device=device)
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        from slimtune.peft import apply_method, freeze_base

        apply_method(model, mcfg)
        freeze_base(model)
    apply_precision(model, prec)
    model.grad_ckpt = cfg.grad_ckpt
    from slimtune.peft import trainable_report

    return model.train(), prec, trainable_report(model, print_line=False)  # counts quantized weights too


def build_data(cfg: TrainConfig, tokenizer) -> tuple[Any, Any, dict[str, Any]]:
    """(train dataset, validation dataset or None, summary) from the data keys (see `slimtune.data`)."""
    from slimtune.data import DataConfig, build_datasets

    if cfg.method in PROMPT_METHODS and cfg.packing:
        raise ConfigError(f"method={cfg.method} runs unpacked batches (its virtual tokens come before each example); "
                          "fix: set packing=false")
    if cfg.val_data and cfg.val_fraction:
        raise ConfigError("both val_data and val_fraction are set; fix: keep one of them")
    dc = DataConfig(path=cfg.data, format=cfg.data_format, template=cfg.template, max_length=cfg.max_length,
                    train_on_prompt=cfg.train_on_prompt, pack=cfg.packing, val_fraction=cfg.val_fraction,
                    val_path=cfg.val_data, seed=cfg.seed, limit=cfg.data_limit, skip_bad=cfg.skip_bad)
    return build_datasets(dc, tokenizer)


def build_optimizer(model: nn.Module, cfg: TrainConfig, prec: Precision, device: torch.device):
    """The optimizer over the trainable parameters; weight decay on matrices only (not norms, biases).

    adamw: torch AdamW (fused on CUDA), or `AdamWFp32State` when weights are stored in bf16 (bf16-true).
    sgd, adamw8bit and offload_optimizer: `slimtune.memory.optim.make_optimizer`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"method={cfg.method} left no trainable parameter; check targets / method options")
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer != "adamw" or cfg.offload_optimizer:
        from slimtune.memory.optim import make_optimizer

        return make_optimizer(groups, cfg.optimizer, lr=cfg.lr, betas=tuple(cfg.betas),
                              weight_decay=cfg.weight_decay, offload=cfg.offload_optimizer)
    if any(p.dtype != torch.float32 for p in params):
        return AdamWFp32State(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=device.type == "cuda")


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """max_steps, or epochs x optimizer steps per epoch (ceil of batches / grad_accum)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * math.ceil(batches_per_epoch / cfg.grad_accum)))


def lr_at(step: int, cfg: TrainConfig, total: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to lr over warmup_steps (lr (s+1)/warmup),
    then cosine (min + (lr - min)(1 + cos(pi p))/2) or linear (lr - (lr - min) p) decay, p in [0, 1] over the rest."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    p = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps - 1))
    if cfg.schedule == "cosine":
        return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
    return cfg.lr - (cfg.lr - cfg.min_lr) * p


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


# ---- one step, one evaluation ---------------------------------------------------------------------------------------
def forward_loss(model: nn.Module, batch: dict, prec: Precision, device: torch.device,
                 offload: bool = False) -> tuple[torch.Tensor, int]:
    """(summed token loss (fp32), number of predicted tokens) of one batch; `offload`: activations saved for
    backward wait in host memory (`slimtune.memory.offload`)."""
    import contextlib

    from slimtune.data import causal_lm_loss, model_inputs

    b = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if offload:
        from slimtune.memory.offload import offload_activations
    with prec.context(device.type), offload_activations(model) if offload else contextlib.nullcontext():
        if len(getattr(model, "prompt_encoder", ())):  # prompt / p-tuning / prefix: virtual tokens go in first
            from slimtune.peft.prompt import forward_with_prompts

            logits = forward_with_prompts(model, b["input_ids"], b.get("attention_mask")).logits  # (B, T, V)
        else:
            logits = model(**model_inputs(b))  # (B, T, V)
    loss_sum, count = causal_lm_loss(logits, b["labels"])
    return loss_sum, int(count)


def train_step(model: nn.Module, micro: list[dict], optimizer, scaler, prec: Precision, device: torch.device,
               max_grad_norm: float, params: list[nn.Parameter], offload: bool = False) -> dict[str, Any]:
    """One optimizer step over the micro-batches `micro` (gradient accumulation).

    Every micro-batch's summed loss is divided by the token count of the whole step, so the accumulated gradient is
    that of the mean over all tokens (as one big batch). With a scaler the loss is multiplied by the scale before
    backward and the gradients are unscaled before clipping; the scaler skips a step whose gradients hold inf/NaN.
    Returns:
        {'loss', 'grad_norm', 'tokens', 'skipped'}.
    Raises:
        TrainingError: the loss is NaN/inf, or (without a scaler) a gradient is.
    """
    from slimtune.data import IGNORE_INDEX

    n_pred = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro)
    total = torch.zeros((), device=device)
    for b in micro:
        loss_sum, _ = forward_loss(model, b, prec, device, offload)
        loss = loss_sum / max(n_pred, 1)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    loss_val = total.item()
    if not math.isfinite(loss_val):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"loss is {loss_val} under precision={prec.name}")
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    norm = float(norm)
    skipped = False
    if scaler is not None:
        before = scaler.get_scale()
        scaler.step(optimizer)  # skipped inside when unscale_ found inf/NaN
        scaler.update()
        skipped = scaler.get_scale() < before
    elif not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        raise TrainingError(f"gradient norm is {norm} under precision={prec.name}")
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(b["input_ids"].numel() for b in micro)
    return {"loss": loss_val, "grad_norm": norm, "tokens": tokens, "skipped": skipped}


@torch.no_grad()
def evaluate(model: nn.Module, dataset, batch_size: int, prec: Precision, device: torch.device,
             max_batches: int | None = None) -> dict[str, float]:
    """Mean token loss and perplexity exp(loss) over the dataset (first `max_batches` batches if given)."""
    was_training = model.training
    model.eval()
    s, n = 0.0, 0
    for i, b in enumerate(dataset.batches(batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        loss_sum, count = forward_loss(model, b, prec, device)
        s, n = s + loss_sum.item(), n + count
    model.train(was_training)
    loss = s / max(n, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


# ---- metrics --------------------------------------------------------------------------------------------------------
def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every line of a metrics.jsonl (an unfinished last line, from a kill, is skipped)."""
    out = []
    p = Path(path)
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines after `step` (written by a run that died after its last checkpoint), so a resumed run's file reads
    as that of an uninterrupted one."""
    if path.exists():
        keep = [json.dumps(r) for r in read_metrics(path) if r.get("step", 0) <= step]
        path.write_text("".join(line + "\n" for line in keep))


def plot_losses(metrics_path: Path, png: Path) -> Path | None:
    """Training loss per step and validation loss as a PNG (matplotlib's Agg canvas; no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not tr and not va:
        return None
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    return png


class _Logger:
    """metrics.jsonl (appended and flushed line by line), optional TensorBoard."""

    def __init__(self, out: Path, tensorboard: bool) -> None:
        self.path = out / "metrics.jsonl"
        self.f = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("log_tensorboard=true needs the tensorboard package; fix: pip install tensorboard"
                                  ) from None
            self.tb = SummaryWriter(str(out / "tensorboard"))

    def log(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


# ---- the run --------------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _check_resume(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    for k in RESUME_KEYS:
        if k in saved and saved[k] != getattr(cfg, k):
            raise ConfigError(f"{where}: {k} was {saved[k]!r} in the checkpoint, now {getattr(cfg, k)!r}; fix: "
                              f"resume with {k}={saved[k]!r}, or start in a new out_dir")


def predict_memory(cfg: TrainConfig, device: torch.device, log: Callable[[str], None]) -> dict | None:
    """Before anything is loaded on a GPU: the step's predicted peak (`slimtune.memory.estimate`) against the free
    memory, and a warning with the planner's command when it will not fit. None where the estimator has no model of
    the method (full, lora, dora and qlora are modelled)."""
    if device.type != "cuda" or cfg.method not in ("full", "lora", "dora", "qlora"):
        return None
    from slimtune.checkpoint import resolve
    from slimtune.memory.estimate import PRECISIONS, estimate
    from slimtune.models.config import ModelConfig
    from slimtune.models.tiny import BUILTIN_NAMES, builtin_config

    mcfg = builtin_config() if cfg.model in BUILTIN_NAMES else ModelConfig.from_file(resolve(cfg.model) / "config.json")
    prec = cfg.precision if cfg.precision in PRECISIONS else "bf16-mixed"
    offload = "optimizer" if cfg.offload_optimizer else "activations" if cfg.offload_activations else None
    e = estimate(mcfg, "lora" if cfg.method == "dora" else cfg.method, prec, cfg.optimizer, cfg.batch_size,
                 cfg.max_length, cfg.grad_ckpt, offload=offload, lora_rank=cfg.rank or 16, quant_format=cfg.quant)
    free, _ = torch.cuda.mem_get_info(device)
    need = e["total_bytes"]
    log(f"predicted peak GPU memory {need / 2**30:.1f} GiB (largest part: {e['dominant']}); {free / 2**30:.1f} GiB "
        "free")
    if need > free:
        log(f"warning: this run will probably not fit; see what does with: slimtune plan --model {cfg.model} "
            f"--gpu-memory {free / 2**30:.0f}GiB --seq {cfg.max_length}")
    return e


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a whole fine-tuning: build, (resume,) train, evaluate, checkpoint, save the result.

    Outputs in cfg.out_dir: config.yaml, metrics.jsonl, loss.png, checkpoints/step-N/, and adapter/ (PEFT format)
    or model/ (full fine-tuning, a Hugging Face folder).
    Returns:
        summary: steps, loss, val_before / val_after, tokens_per_s, peak_mem_gib, seconds, interrupted, paths;
        plus 'model' and 'tokenizer' (the trained objects, for generation; pop them before serialising).
    Raises:
        SlimtuneError subclasses for bad config, data, checkpoints; TrainingError when the loss diverges.
    """
    from tqdm import tqdm

    from slimtune.checkpoint import load_tokenizer
    from slimtune.data import DataIterator

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
    train_ds, val_ds, data_summary = build_data(cfg, tokenizer)
    log(f"data: {data_summary['examples']} training examples in {data_summary['rows']} rows of <= {cfg.max_length} "
        f"tokens ({data_summary['format']}, template {data_summary['template']}), {data_summary['val_examples']} "
        f"validation; {data_summary['truncated']} truncated, {data_summary['dropped']} dropped")
    predict_memory(cfg, device, log)
    model, prec, counts = build_model(cfg, device)
    log(prec.describe())
    log(f"method {cfg.method}: trainable params {counts['trainable']:,} of {counts['total']:,} "
        f"({counts['percent']:.4f}%) on {device}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, cfg, prec, device)
    scaler = prec.make_scaler(device.type)
    it = DataIterator(train_ds, cfg.batch_size, seed=cfg.seed)
    total = total_steps(cfg, it.batches_per_epoch)
    save_config(cfg, out / "config.yaml")

    step, last_ckpt = 0, None
    if cfg.resume:
        ckpt = find_checkpoint(out, cfg.resume)
        if ckpt is None:
            log(f"resume=latest: no checkpoint in {out / 'checkpoints'} yet; starting from step 0")
        else:
            _check_resume(json.loads((ckpt / "state.json").read_text()).get("config", {}), cfg, ckpt)
            state = load_checkpoint(ckpt, model, optimizer, scaler)
            it.load_state_dict(state["data"])
            step, last_ckpt = int(state["step"]), ckpt
            log(f"resumed from {ckpt} at step {step}")
    metrics_path = out / "metrics.jsonl"
    if step == 0:
        metrics_path.unlink(missing_ok=True)
    else:
        truncate_metrics(metrics_path, step)
    logger = _Logger(out, cfg.log_tensorboard)

    def checkpoint(at: int) -> Path:
        return save_checkpoint(out, at, model, optimizer, {"data": it.state_dict(), "config": cfg.to_dict(),
                                                          "scheduler": {"step": at, "total": total}},
                               scaler, cfg.keep_last)

    def run_eval(at: int) -> dict[str, float] | None:
        if val_ds is None:
            return None
        ev = evaluate(model, val_ds, cfg.batch_size, prec, device, cfg.eval_batches)
        logger.log({"step": at, **ev})
        return ev

    val_before = run_eval(0) if step == 0 else None
    if val_before:
        log(f"validation loss before training: {val_before['val_loss']:.4f} (perplexity {val_before['val_ppl']:.2f})")

    stop = {"flag": False}

    def on_sigint(signum, frame) -> None:
        if stop["flag"]:
            raise KeyboardInterrupt
        stop["flag"] = True

    main_thread = threading.current_thread() is threading.main_thread()
    old_handler = signal.signal(signal.SIGINT, on_sigint) if main_thread else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=total, initial=step, disable=not cfg.progress, dynamic_ncols=True, desc="train")
    t_train, tok_done, steps_done, last = 0.0, 0, 0, {}
    interrupted = False
    try:
        while step < total:
            if stop["flag"]:
                interrupted = True
                break
            lr = lr_at(step, cfg, total)
            for g in optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            micro = [next(it) for _ in range(cfg.grad_accum)]
            try:
                res = train_step(model, micro, optimizer, scaler, prec, device, cfg.max_grad_norm, params,
                                 cfg.offload_activations)
            except TrainingError as e:
                where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was saved yet"
                raise TrainingError(f"step {step + 1}: {e}; the run stopped, {where}; fix: lower lr (now "
                                    f"{cfg.lr:g}), raise warmup_steps, set max_grad_norm, or use precision=fp32 / "
                                    "bf16-mixed") from None
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step += 1
            t_train, tok_done, steps_done = t_train + dt, tok_done + res["tokens"], steps_done + 1
            mem = peak_memory_gib(device)
            last = {"step": step, "loss": res["loss"], "lr": lr, "grad_norm": res["grad_norm"],
                    "tokens_per_s": res["tokens"] / dt, "peak_mem_gib": round(mem, 3), "epoch": it.epoch}
            if scaler is not None:
                last.update(skipped=res["skipped"], loss_scale=scaler.get_scale())
            if step % cfg.log_every == 0 or step == total:
                logger.log(last)
            bar.update(1)
            bar.set_postfix(loss=f"{res['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_done / t_train:,.0f}",
                            mem=f"{mem:.2f}G")
            if cfg.eval_every and step % cfg.eval_every == 0 and step < total:
                ev = run_eval(step)
                if ev:
                    bar.write(f"step {step}: validation loss {ev['val_loss']:.4f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                last_ckpt = checkpoint(step)
    except KeyboardInterrupt:  # a second Ctrl-C: stop now, the last checkpoint stays as it was
        bar.close()
        logger.close()
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, old_handler)
    bar.close()
    last_ckpt = checkpoint(step)
    val_after = None
    if interrupted:
        log(f"interrupted at step {step}: checkpoint saved to {last_ckpt}; continue with resume=latest")
    else:
        val_after = run_eval(step)
        if val_after:
            log(f"validation loss after training: {val_after['val_loss']:.4f} (perplexity "
                f"{val_after['val_ppl']:.2f})")
    logger.close()
    plot = plot_losses(metrics_path, out / "loss.png") if cfg.plot else None
    final = None
    if cfg.save_final and not interrupted:
        final = save_result(model, cfg, tokenizer, out)
        log(f"saved {'model' if cfg.method == 'full' else 'adapter'} to {final}")
    return {"steps": step, "total_steps": total, "loss": last.get("loss"), "val_before": val_before,
            "val_after": val_after, "tokens_per_s": tok_done / t_train if t_train else None,
            "peak_mem_gib": peak_memory_gib(device), "seconds": t_train, "interrupted": interrupted,
            "checkpoint": str(last_ckpt), "final": str(final) if final else None, "plot": str(plot) if plot else None,
            "metrics": str(metrics_path), "precision": prec.name, "device": str(device), "data": data_summary,
            "trainable": counts["trainable"], "model": model, "tokenizer": tokenizer}


def save_result(model: nn.Module, cfg: TrainConfig, tokenizer, out: Path) -> Path:
    """out/adapter (PEFT format: adapter_config.json + adapter_model.safetensors) or, for full fine-tuning, out/model
    (a Hugging Face folder with the tokenizer)."""
    if cfg.method == "full":
        from slimtune.checkpoint import save_model

        return save_model(model, out / "model", tokenizer=tokenizer)
    from slimtune.peft import save_adapter

    return save_adapter(model, out / "adapter", base_model_name_or_path=cfg.model)
