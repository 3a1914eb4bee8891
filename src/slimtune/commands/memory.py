"""`slimtune memory`: the predicted peak GPU memory of a fine-tuning step (or of generation), component by component."""
from __future__ import annotations

import argparse
import json

HELP = "predict peak GPU memory of training (or generation) for a model shape, method and precision"
COMPONENTS = ("weights", "trainable", "gradients", "optimizer", "gathered", "activations", "autocast_copies",
              "logits_loss", "temporary", "kv_cache", "workspace")


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--shape", help="a named shape (slimtune shapes)")
    g.add_argument("--model", help="a Hugging Face model folder (its config.json is read; no weights loaded)")


def resolve_config(args: argparse.Namespace):
    """The ModelConfig of --shape or --model (raises SlimtuneError with one line on a bad name or folder)."""
    from pathlib import Path

    from slimtune.models.config import ModelConfig
    from slimtune.models.shapes import get_shape

    if args.shape:
        return get_shape(args.shape)
    path = Path(args.model)
    return ModelConfig.from_file(path / "config.json" if path.is_dir() else path)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--method", default="lora", help="full | lora | qlora (default lora)")
    p.add_argument("--precision", default="bf16-mixed", help="fp32 | bf16-mixed | fp16-mixed | bf16-true")
    p.add_argument("--optimizer", default="adamw", help="adamw | adamw8bit | sgd")
    p.add_argument("--batch", type=int, default=1, help="rows per micro-batch on each GPU")
    p.add_argument("--gpus", type=int, default=1, help="FSDP2 over N GPUs (torchrun): the peak of one of them")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--grad-ckpt", nargs="?", const=True, default=False, choices=["offload"],
                   help="activation checkpointing per block; --grad-ckpt offload: block inputs in host memory")
    p.add_argument("--mlp-tile", type=int, default=None,
                   help="with checkpointing, the MLP of longer sequences runs in pieces of this many tokens "
                        "(default: the decoder's, 8192; 0: off)")
    p.add_argument("--ckpt-blocks", type=int, default=None,
                   help="with checkpointing, checkpoint only the first N blocks (default: all)")
    p.add_argument("--host-embedding", action="store_true",
                   help="the token embedding table in pinned host memory (train key host_embedding)")
    p.add_argument("--offload", default=None, help="activations | optimizer")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--weight-dtype", default=None, help="base weights: fp32, bf16, fp16, or nf4, int8, int4, fp8")
    p.add_argument("--grad-dtype", default=None)
    p.add_argument("--optim-state-dtype", default=None)
    p.add_argument("--attention", default="flash", help="flash | efficient | math (SDPA backend)")
    p.add_argument("--generate", action="store_true", help="generation instead of training: weights + KV cache")
    p.add_argument("--context", type=int, default=None, help="KV-cache length for --generate")
    p.add_argument("--json", action="store_true")


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def run(args: argparse.Namespace) -> int:
    from slimtune.errors import ConfigError
    from slimtune.memory.estimate import estimate

    from slimtune.models.recompute import MLP_TILE

    if args.rank <= 0:
        raise ConfigError(f"--rank must be a positive integer, got {args.rank}")
    if args.mlp_tile is not None and args.mlp_tile < 0:
        raise ConfigError(f"--mlp-tile must be a number of tokens (0: off), got {args.mlp_tile}")
    tile = MLP_TILE if args.mlp_tile is None else (args.mlp_tile or None)
    cfg = resolve_config(args)
    e = estimate(cfg, args.method, args.precision, args.optimizer, args.batch, args.seq, args.grad_ckpt,
                 offload=args.offload, lora_rank=args.rank, lora_targets=tuple(args.targets.split(",")),
                 weight_dtype=args.weight_dtype, grad_dtype=args.grad_dtype, optim_state_dtype=args.optim_state_dtype,
                 attention=args.attention, generate=args.generate, context=args.context, gpus=args.gpus,
                 mlp_tile=tile, ckpt_blocks=args.ckpt_blocks, host_embedding=args.host_embedding)
    if args.json:
        print(json.dumps(e))
        return 0
    what = "generation" if args.generate else f"{args.method}, {args.precision}, {args.optimizer}"
    where = f" per GPU of {args.gpus} (FSDP2)" if args.gpus > 1 else ""
    ckpt = ", checkpointing" if args.grad_ckpt is True else ", offloaded checkpointing" if args.grad_ckpt else ""
    off = f", offload {args.offload}" if args.offload else ""
    print(f"peak GPU memory{where}: {gib(e['total_bytes'])} ({what}, batch {args.batch} x seq {args.seq}{ckpt}{off}); "
          f"peak during {e['peak_phase']}")
    for k in COMPONENTS:
        v = e.get(f"{k}_bytes", 0)
        if v:
            mark = "  <== dominant" if k == e["dominant"] else ""
            print(f"  {k:<16}{gib(v):>14}{100 * v / e['total_bytes']:>7.1f}%{mark}")
    print(f"  weights + gradients + optimizer states: {gib(e['static_bytes'])}; CUDA context (~0.5 GiB) not counted")
    if e.get("host_bytes"):
        print(f"  pinned host memory for offloading: {gib(e['host_bytes'])}")
    return 0
