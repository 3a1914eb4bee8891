"""Building a run from its `TrainConfig`, one separate step each: the device, the method's config, the model (loaded,
adapted, frozen, cast), the data, the optimizer, and the predicted peak memory."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from slimtune.errors import ConfigError
from slimtune.precision.policy import Precision, apply_precision, resolve_precision
from slimtune.train.config import TrainConfig, flat_options

PROMPT_METHODS = ("prompt", "prefix", "ptuning")


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; otherwise cpu, cuda, cuda:N (or mps) when that device exists.

    Raises:
        ConfigError: a name torch does not know, or a device this machine does not have.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={name} is not a device name; fix: device=auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but no CUDA GPU is visible; fix: device=cpu or device=auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name} but only {torch.cuda.device_count()} CUDA GPU(s) are visible; fix: "
                              "device=cuda:0 or device=auto")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={name} but no Apple GPU (MPS) is available; fix: device=cpu or device=auto")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device={name}: slimtune runs on cpu, cuda or mps; fix: device=auto")
    return dev


def method_config(cfg: TrainConfig):
    """The method's own typed config built from the flat keys and `method_args` (None for full fine-tuning).

    Raises:
        ConfigError: unknown method, an option the method does not have, an out-of-range value.
    """
    if cfg.method == "full":
        if cfg.options or cfg.method_args:
            k = next(iter(cfg.options or cfg.method_args))
            raise ConfigError(f"{k} does not apply to method=full (every weight trains); fix: remove it")
        return None
    from slimtune.peft.base import get_method

    spec = get_method("lora" if cfg.method == "qlora" else cfg.method)
    declared = flat_options()
    opts: dict[str, Any] = {}
    for k, v in cfg.options.items():
        target = declared[k].fields.get(spec.name)
        if target is None:
            raise ConfigError(f"{k} does not apply to method={cfg.method}; its options are "
                              f"{', '.join(spec.config_cls.field_names())} (set others through method_args)")
        opts[target] = v
    opts.update(cfg.method_args)
    return spec.config_cls.from_dict(opts)


def build_model(cfg: TrainConfig, device: torch.device, ckpt_blocks: int | None = None
                ) -> tuple[nn.Module, Precision, dict[str, Any]]:
    """Load the model, apply the method, freeze what it does not train, and cast to the precision policy.

    Returns:
        (model in train mode on `device`, the resolved precision, {'trainable', 'total', 'percent'}).
    Raises:
        ConfigError, CheckpointError, PrecisionError: bad method options, model folder or precision.
    """
    from slimtune.models.fallback import check_packing, is_transformers_model, set_grad_ckpt
    from slimtune.models.host_embed import keep_embedding_on_host
    from slimtune.models.load import load_model
    from slimtune.peft.api import apply_method, freeze_base, trainable_report

    full = cfg.method == "full"
    prec = resolve_precision(cfg.precision, device, cfg.base_dtype, full=full)
    mcfg = method_config(cfg)  # validated before the (possibly long) load
    if cfg.method == "qlora":
        # each linear weight is quantized on the device as soon as it is read: the 16-bit model never exists whole
        model, _ = load_model(cfg.model, dtype=prec.compute_dtype or torch.float32, device=device,
                              quantize=cfg.quant)
    else:
        model, _ = load_model(cfg.model, dtype=prec.weight_dtype if full else prec.frozen_dtype, device=device)
    if is_transformers_model(model) and cfg.packing:
        check_packing(model)
    if cfg.from_scratch:
        from slimtune.models.decoder import init_weights

        init_weights(model, cfg.seed)
    if full:
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        apply_method(model, mcfg)
        freeze_base(model)
    apply_precision(model, prec)
    if is_transformers_model(model):  # the fallback: transformers' own checkpointing
        if cfg.ckpt_blocks is not None:
            raise ConfigError(f"ckpt_blocks needs slimtune's decoder; {model.config.model_type} runs through "
                              "transformers, which checkpoints every block; fix: leave ckpt_blocks out")
        set_grad_ckpt(model, cfg.grad_ckpt)
    else:
        model.grad_ckpt, model.mlp_tile = cfg.grad_ckpt, cfg.mlp_tile or None
        model.ckpt_blocks = ckpt_blocks if cfg.ckpt_blocks == "auto" else cfg.ckpt_blocks  # auto: as predicted
    if cfg.host_embedding:
        keep_embedding_on_host(model)  # after the precision policy, which may cast the table
    return model.train(), prec, trainable_report(model, print_line=False)  # counts quantized weights too


def build_data(cfg: TrainConfig, tokenizer) -> tuple[Any, Any, dict[str, Any]]:
    """(train dataset, validation dataset or None, summary) from the data keys (see `slimtune.data`).

    Raises:
        ConfigError: packing with a prompt method, two validation sources. DataError: bad data.
    """
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


def build_optimizer(model: nn.Module, cfg: TrainConfig):
    """The optimizer over the trainable parameters; weight decay on matrices only (not norms, biases); with GaLore
    the block matrices in a projected group (`optim.galore.galore_groups`)."""
    from slimtune.optim.build import decay_groups, make_optimizer
    from slimtune.optim.galore import galore_groups

    groups = galore_groups(model, cfg.weight_decay, cfg.galore_rank, cfg.galore_update_interval, cfg.galore_scale) \
        if "galore" in cfg.optimizer else decay_groups(model, cfg.weight_decay)
    return make_optimizer(groups, cfg.optimizer, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
                          offload=cfg.offload_optimizer, stochastic_rounding=cfg.stochastic_rounding)


AUTO_SHARE = 0.85  # ckpt_blocks=auto plans for this share of the free memory (the allocator's caching needs the rest)


def predict_memory(cfg: TrainConfig, device: torch.device, log: Callable[[str], None], gpus: int = 1) -> dict | None:
    """Before anything is loaded on a GPU: the step's predicted peak (`slimtune.memory.estimate`; per GPU of `gpus`
    under FSDP2) against the free memory, and a warning with the planner's command when it will not fit. None where
    the estimator has no model of the method (full, lora, dora and qlora are modelled)."""
    if device.type != "cuda" or cfg.method not in ("full", "lora", "dora", "qlora") or "galore" in cfg.optimizer:
        return None
    from slimtune.io.hub import resolve
    from slimtune.memory.estimate import EstimateInput, estimate
    from slimtune.models.config import ARCHITECTURES, ModelConfig, read_config_json
    from slimtune.models.tiny import BUILTIN_NAMES, builtin_config

    if cfg.model in BUILTIN_NAMES:
        mcfg = builtin_config()
    else:
        d = read_config_json(resolve(cfg.model) / "config.json")
        if d.get("model_type") not in ARCHITECTURES:  # the fallback: no model of transformers' layers here
            log(f"no memory prediction for model_type {d.get('model_type')} (not one of slimtune's decoders)")
            return None
        mcfg = ModelConfig.from_hf(d)
    prec = cfg.precision if cfg.precision != "auto" else "bf16-mixed"
    offload = "optimizer" if cfg.offload_optimizer else "activations" if cfg.offload_activations else None
    kw = dict(precision=prec, optimizer=cfg.optimizer, lora_rank=cfg.rank or 16, quant_format=cfg.quant, gpus=gpus,
              mlp_tile=cfg.mlp_tile or None, host_embedding=cfg.host_embedding, fsdp_reshard=cfg.fsdp_reshard)
    method, batch = "lora" if cfg.method == "dora" else cfg.method, cfg.batch_size // gpus
    free, _ = torch.cuda.mem_get_info(device)
    n_ck = cfg.ckpt_blocks
    if n_ck == "auto":  # the fewest checkpointed blocks whose predicted peak fits AUTO_SHARE of the free memory
        from slimtune.memory.plan import fewest_ckpt_blocks

        n_ck = fewest_ckpt_blocks(mcfg, int(AUTO_SHARE * free), method, batch, cfg.max_length, kw) \
            if cfg.grad_ckpt is True and offload is None else None
        log(f"ckpt_blocks=auto: {'all' if n_ck is None else n_ck} of {mcfg.num_hidden_layers} blocks checkpointed")
    e = estimate(EstimateInput(mcfg, method, batch=batch, seq=cfg.max_length, grad_ckpt=cfg.grad_ckpt,
                               offload=offload, ckpt_blocks=n_ck, **kw))
    e["ckpt_blocks"] = n_ck
    need = e["total_bytes"]
    log(f"predicted peak GPU memory {need / 2**30:.1f} GiB (largest part: {e['dominant']}); {free / 2**30:.1f} GiB "
        "free")
    if need > free:
        log(f"warning: this run will probably not fit; see what does with: slimtune plan --model {cfg.model} "
            f"--gpu-memory {free / 2**30:.0f}GiB --seq {cfg.max_length}" + (f" --gpus {gpus}" if gpus > 1 else ""))
    return e
