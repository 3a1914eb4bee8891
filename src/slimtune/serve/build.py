"""Assemble a server from options: load the base (NF4-quantized if asked), read and check each adapter into the bank,
or merge one adapter into the base, size the paged KV cache and start the engine."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from slimtune.errors import ConfigError
from slimtune.generate import longrope_refill_length
from slimtune.models.rope import host_read
from slimtune.serve.cache import PagedKVCache, pages_for
from slimtune.serve.engine import Engine
from slimtune.serve.lora import AdapterBank, read_lora

log = logging.getLogger("slimtune.serve")
MAX_LEN_DEFAULT = 8192  # default context cap when the config allows more
KV_MEMORY_FRACTION = 0.6  # default KV cache size on CUDA: this share of the memory free after loading


@dataclass
class ServeOptions:
    """What `slimtune serve` takes (see its --help)."""
    model: str
    adapters: dict[str, str] = field(default_factory=dict)  # name -> PEFT adapter folder
    merge: str | None = None  # serve this adapter merged into the base, under its name
    quantize: str | None = None  # e.g. nf4
    dtype: str = "auto"
    device: str = "auto"
    max_batch: int = 32
    max_len: int | None = None  # prompt + completion tokens; default: the config's, at most MAX_LEN_DEFAULT
    kv_tokens: int | None = None  # KV cache size in tokens; default: max_batch * max_len (CUDA: memory-capped)
    page_size: int = 16
    max_queue: int = 256
    cuda_graphs: str = "auto"  # auto (on CUDA), on, off
    lora_mode: str = "auto"  # auto, dense, gather (see slimtune.serve.lora)
    served_name: str | None = None  # the base model's name in the API; default: --model as given
    max_prefill_tokens: int = 8192


@dataclass
class Served:
    """A running engine and what the HTTP layer needs to validate requests."""
    engine: Engine
    tokenizer: object
    base_name: str
    skeleton: torch.nn.Module  # the architecture on the meta device: adapter files are checked against it
    vocab_size: int
    created: int = field(default_factory=lambda: int(time.time()))
    paths: dict[str, str] = field(default_factory=dict)  # adapter name -> folder

    def model_names(self) -> list[str]:
        bank = self.engine.bank
        return [self.base_name] + (list(bank.names) if bank is not None else [])


def _merge(model, folder: str, quantized: bool) -> None:
    from slimtune.peft import load_adapter, merge_and_unload

    load_adapter(model, folder)
    if quantized:  # W_q + s B A from the dequantized base: what a QLoRA adapter was trained against
        from slimtune.quant.qlora import merge_into_dequantized

        merge_into_dequantized(model, model.model.embed_tokens.weight.dtype)
    else:
        merge_and_unload(model)


def _kv_tokens(opts: ServeOptions, max_len: int, cache_bytes_per_token: int, device: str) -> int:
    want = opts.kv_tokens or opts.max_batch * max_len
    if opts.kv_tokens is None and device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        want = min(want, int(free * KV_MEMORY_FRACTION) // cache_bytes_per_token)
    if want < max_len:
        raise ConfigError(f"the KV cache holds {want} tokens, less than one request of --max-len {max_len}; lower "
                          "--max-len or raise --kv-tokens")
    return want


def build(opts: ServeOptions) -> Served:
    """Load everything and start the engine thread.

    Raises:
        SlimtuneError: a missing or damaged model or adapter folder, an adapter that does not fit, bad options.
    """
    from slimtune.models import load_model, load_tokenizer
    from slimtune.train.build import pick_device
    from slimtune.models.decoder import Decoder
    from slimtune.models.fallback import require_decoder

    if opts.max_batch < 1 or opts.page_size < 1 or opts.max_queue < 1:
        raise ConfigError("--max-batch, --page-size and --max-queue must be >= 1")
    for name in opts.adapters:
        if not name or name == (opts.served_name or opts.model):
            raise ConfigError(f"adapter name {name!r} is empty or the base model's name; pick another")
    if opts.merge is not None and (opts.merge not in opts.adapters or len(opts.adapters) > 1):
        raise ConfigError(f"--merge {opts.merge} needs exactly one --adapter, named {opts.merge}: a merged model "
                          "serves only itself (other adapters were trained on the unmerged base)")
    from slimtune.quant.qlora import detect_quant

    for name, folder in opts.adapters.items():
        q = detect_quant(folder)
        if q and q != opts.quantize:
            log.warning("adapter %s was trained on a %s base; serve it with --quantize %s to compute against the "
                        "weights it learned on", name, q, q)
    device = str(pick_device(opts.device))
    model, cfg = load_model(opts.model, dtype=opts.dtype, device=device, quantize=opts.quantize)
    require_decoder(model, "serve (its paged KV cache)")
    tokenizer = load_tokenizer(opts.model)
    with torch.device("meta"):
        skeleton = Decoder(cfg)
    bank = None
    if opts.merge is not None:
        _merge(model, opts.adapters[opts.merge], opts.quantize is not None)
    else:
        read = {name: read_lora(skeleton, folder) for name, folder in opts.adapters.items()}
        bank = AdapterBank(model, slots=max(4, len(read)), rank=max([r for _, r in read.values()] or [8]),
                           mode=opts.lora_mode)
        for name, (factors, rank) in read.items():
            bank.add(name, factors, rank)
    return start(model, tokenizer, opts, bank, skeleton, device)


def start(model, tokenizer, opts: ServeOptions, bank: AdapterBank | None, skeleton=None,
          device: str | None = None) -> Served:
    """Size the paged KV cache for `model` and start an engine over it (the model, its bank and tokenizer ready).

    Raises:
        ConfigError: a KV cache too small for one request of max_len; a LongRoPE model past its original length.
    """
    cfg = model.config
    device = device or str(model.model.embed_tokens.weight.device)
    if skeleton is None:
        from slimtune.models.decoder import Decoder

        with torch.device("meta"):
            skeleton = Decoder(cfg)
    max_len = min(opts.max_len or MAX_LEN_DEFAULT, cfg.max_position_embeddings)
    switch = longrope_refill_length(cfg, 0)
    if switch is not None and max_len >= switch:  # past it every cached key would need the long factors
        raise ConfigError(f"serving a LongRoPE model beyond its original length ({switch - 1}) is not supported (its "
                          f"KV cache would need recomputing there); fix: --max-len {switch - 1}, or slimtune generate")
    dtype = model.model.embed_tokens.weight.dtype
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * dtype.itemsize
    kv = _kv_tokens(opts, max_len, per_token, device)
    cache = PagedKVCache(cfg, pages_for(kv, opts.page_size) + 1, opts.page_size, opts.max_batch, max_len, device,
                         dtype)
    if opts.cuda_graphs == "on" and host_read(cfg):
        raise ConfigError("--cuda-graphs on: this model's dynamic NTK RoPE reads the longest position on the host, "
                          "which a CUDA graph cannot capture; fix: --cuda-graphs auto (decodes without graphs)")
    graphs = (opts.cuda_graphs == "on" or (opts.cuda_graphs == "auto" and device.startswith("cuda"))) and \
        not host_read(cfg)
    engine = Engine(model, tokenizer, cache, bank, opts.max_queue, graphs, max_prefill_tokens=opts.max_prefill_tokens)
    log.info("KV cache: %d pages of %d tokens (%.2f GiB); max batch %d, max length %d, CUDA graphs %s",
             cache.pool.num_pages - 1, opts.page_size, kv * per_token / 2**30, opts.max_batch, max_len, graphs)
    return Served(engine.start(), tokenizer, opts.merge or opts.served_name or opts.model, skeleton, cfg.vocab_size,
                  paths=dict(opts.adapters))
