"""`slimtune serve`: an OpenAI-compatible HTTP server (completions, chat, streaming) over one base model and any
number of LoRA adapters batched together, or one adapter merged in (see docs/serving.md)."""
from __future__ import annotations

import argparse

HELP = "serve a model and LoRA adapters over an OpenAI-compatible HTTP API, with continuous batching"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model folder (or 'builtin')")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="serve a PEFT LoRA adapter folder under NAME (the request's `model`); repeatable")
    p.add_argument("--merge", metavar="NAME", help="merge adapter NAME into the base and serve only that, as NAME")
    p.add_argument("--quantize", help="quantize the base while loading (nf4 for a QLoRA base; any slimtune format)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together at most")
    p.add_argument("--max-len", type=int, help="prompt + completion tokens at most (default: the model's, <= 8192)")
    p.add_argument("--kv-tokens", type=int,
                   help="KV cache size in tokens (default: max-batch x max-len, on CUDA at most 60%% of free memory)")
    p.add_argument("--page-size", type=int, default=16, help="tokens per KV cache page")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests beyond this get 503")
    p.add_argument("--served-model-name", help="the base model's name in the API (default: --model as given)")
    p.add_argument("--dtype", default="auto", help="auto (the checkpoint's), bf16, fp16 or fp32")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--cuda-graphs", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--lora-mode", default="auto", choices=["auto", "dense", "gather"],
                   help="how a mixed-adapter batch computes its LoRA updates (see slimtune.serve.lora)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--log-level", default="info")


def parse_adapters(items: list[str]) -> dict[str, str]:
    """{'name': 'dir'} from NAME=DIR strings.

    Raises:
        ConfigError: an item without '=' or a repeated name.
    """
    from slimtune.errors import ConfigError
    from slimtune.serve.app import ADAPTER_NAME

    out: dict[str, str] = {}
    for it in items:
        name, eq, folder = it.partition("=")
        if not eq or not folder or not ADAPTER_NAME.fullmatch(name):
            raise ConfigError(f"--adapter {it!r}: write NAME=DIR, NAME of letters, digits or ._:@+-")
        if name in out:
            raise ConfigError(f"--adapter: the name {name!r} is given twice")
        out[name] = folder
    return out


def options(args: argparse.Namespace):
    """`ServeOptions` from the parsed command line."""
    from slimtune.serve.build import ServeOptions

    return ServeOptions(model=args.model, adapters=parse_adapters(args.adapter), merge=args.merge,
                        quantize=args.quantize, dtype=args.dtype, device=args.device, max_batch=args.max_batch,
                        max_len=args.max_len, kv_tokens=args.kv_tokens, page_size=args.page_size,
                        max_queue=args.max_queue, cuda_graphs=args.cuda_graphs, lora_mode=args.lora_mode,
                        served_name=args.served_model_name)


def run(args: argparse.Namespace) -> int:
    import logging

    import uvicorn

    from slimtune.serve.app import create_app
    from slimtune.serve.build import build

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s: %(message)s")
    served = build(options(args))
    logging.getLogger("slimtune.serve").info("serving %s on http://%s:%d/v1", ", ".join(served.model_names()),
                                             args.host, args.port)
    try:
        uvicorn.run(create_app(served, args.api_key), host=args.host, port=args.port, log_level=args.log_level)
    finally:
        served.engine.stop()
    return 0
