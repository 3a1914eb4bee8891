"""Text generation with a KV cache: greedy or sampled (temperature, top-k, top-p), repetition penalty, stop tokens and
stop strings, batches of prompts with left padding, chat templates, and streaming of tokens as they are produced.
With an active prompt adapter the virtual tokens go first (prompt tuning, P-tuning) or fill the cache's first
positions (prefix tuning), as in training (`peft.prompt.forward_with_prompts`).

The logit processors apply in the order transformers uses (repetition penalty, temperature, top-k, top-p), so greedy
decoding gives the same ids as `transformers.generate`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from slimtune.errors import SlimtuneError
from slimtune.models.cache import KVCache
from slimtune.models.fallback import is_transformers_model
from slimtune.models.rope import host_read
from slimtune.peft.prompt import active_prompt, virtual_tokens


@dataclass
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] | None = None  # default: the model's eos ids
    stop_strings: list[str] = field(default_factory=list)
    seed: int | None = None

    def validate(self) -> None:
        """Raises SlimtuneError naming the first setting out of range (NaN and inf included)."""
        t, p, r = self.temperature, self.top_p, self.repetition_penalty
        checks = [("max_new_tokens", self.max_new_tokens >= 1, "an integer >= 1"),
                  ("temperature", math.isfinite(t) and t >= 0, "a finite number >= 0 (0: greedy)"),
                  ("top_p", 0 < p <= 1, "in (0, 1] (1: off)"), ("top_k", self.top_k >= 0, ">= 0 (0: off)"),
                  ("repetition_penalty", math.isfinite(r) and r > 0, "a finite number > 0 (1: off)")]
        for name, ok, want in checks:
            if not ok:
                raise SlimtuneError(f"--{name.replace('_', '-')} {getattr(self, name)} is out of range; fix: give "
                                    f"{want}")


def check_prompt_lengths(lengths: list[int], max_new_tokens: int, context: int) -> None:
    """Every prompt must hold a token, and prompt + new tokens must fit the model's context.

    Raises:
        SlimtuneError: naming the prompt, its length, the context (max_position_embeddings) and the fix.
    """
    for i, n in enumerate(lengths):
        if n == 0:
            raise SlimtuneError(f"--prompt number {i + 1} is empty (0 tokens); fix: give some text")
        if n > context:
            raise SlimtuneError(f"--prompt number {i + 1} is {n} tokens, longer than the model's context of {context} "
                                "(max_position_embeddings); fix: shorten it")
        if n + max_new_tokens > context:
            raise SlimtuneError(f"--prompt number {i + 1} ({n} tokens) + --max-new-tokens {max_new_tokens} exceeds "
                                f"the model's context of {context}; fix: --max-new-tokens {context - n} or less")


def process_logits(logits: Tensor, seen: Tensor, sc: SamplingConfig) -> Tensor:
    """Apply repetition penalty, temperature, top-k and top-p to fp32 logits (B, V); seen: (B, S) ids so far."""
    if sc.repetition_penalty != 1.0:
        # CTRL (Keskar et al. 2019): divide positive logits of seen tokens by the penalty, multiply negative ones
        s = logits.gather(1, seen)
        s = torch.where(s < 0, s * sc.repetition_penalty, s / sc.repetition_penalty)
        logits = logits.scatter(1, seen, s)
    if sc.temperature == 0:
        return logits
    logits = logits / sc.temperature
    if sc.top_k > 0:
        kth = logits.topk(min(sc.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sc.top_p < 1.0:
        # nucleus: keep the smallest set of most likely tokens whose probability reaches top_p
        srt, idx = logits.sort(dim=-1, descending=True)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum - srt.softmax(-1) >= sc.top_p  # mass before this token already reached top_p
        logits = logits.masked_fill(drop.scatter(1, idx, drop), float("-inf"))
    return logits


class GraphStep:
    """One decode step (one new token per row) captured as a CUDA graph over a static KV cache, then replayed.

    Eager decoding of an 8B model is bound by Python and kernel launches (~1,300 launches a token); a replayed graph
    launches them all at once. Warm-up and capture write into the cache's last slot, which real tokens never reach
    (the last sampled token is not fed back) and which the mask always hides.
    """

    def __init__(self, model, cache: KVCache) -> None:
        B, L, dev = cache.k[0].shape[0], cache.max_len, cache.k[0].device
        self.cache = cache
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.mask = torch.zeros(B, L, dtype=torch.long, device=dev)
        self.mask[:, -1] = 1
        cache.index.fill_(L - 1)
        cache.static = True

        def run() -> Tensor:
            return model(self.tok, attention_mask=self.mask, position_ids=self.pos, cache=cache)

        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                run()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = run()

    def __call__(self, tok: Tensor, pos: Tensor, mask: Tensor, slot: int) -> Tensor:
        self.tok.copy_(tok[:, None])
        self.pos.copy_(pos[:, None])
        self.mask.copy_(mask)
        self.cache.index.fill_(slot)
        self.graph.replay()
        return self.out[:, -1]


def longrope_refill_length(cfg, prompt_len: int) -> int | None:
    """The sequence length at which a LongRoPE model (Phi-3) recomputes its whole KV cache: its original length + 1,
    where the long factors take over for every position (transformers' Phi3 `prepare_inputs_for_generation` drops
    the cache there); None for other models or prompts already past it."""
    rs = cfg.rope_scaling or {}
    if rs.get("rope_type") != "longrope" or prompt_len > rs["original_max_position_embeddings"]:
        return None
    return rs["original_max_position_embeddings"] + 1


def _refill(model, cache: KVCache, ids: Tensor, am: Tensor | None) -> Tensor:
    """Run all of `ids` (B, n) again into `cache` from position 0; the last position's fp32 logits (B, V)."""
    static, cache.static, cache.pos = cache.static, False, 0
    try:
        return model(ids, attention_mask=am, cache=cache)[:, -1].float()
    finally:
        cache.static = static


def _prefill(model, input_ids: Tensor, am: Tensor, cache: KVCache, enc) -> tuple[Tensor, Tensor, bool]:
    """Run the prompts (B, T) into the cache, after the virtual tokens or prefix of the prompt module `enc` (if any).
    Returns (last logits (B, V) fp32, the attention mask over the cache's filled positions, padded)."""
    B = input_ids.shape[0]
    n, embeds = 0, None
    if enc is not None and getattr(enc, "is_prefix", False):  # the prefix k, v take the cache's first P positions
        n = enc.num_virtual_tokens
        for i in range(len(cache.k)):
            k, v = enc.layer_kv(i)  # (nkv, P, hd)
            cache.k[i][:, :, :n], cache.v[i][:, :, :n] = k.to(cache.k[i].dtype), v.to(cache.v[i].dtype)
        cache.pos = n
    elif enc is not None:  # prompt / P-tuning: n virtual tokens before the (left-padded) prompts
        virt = virtual_tokens(enc)
        n = virt.shape[0]
        x = model.model.embed_tokens(input_ids)
        embeds = torch.cat([virt.to(x.dtype)[None].expand(B, -1, -1), x], 1)  # (B, n + T, d)
    am = torch.cat([am.new_ones(B, n), am], 1) if n else am
    padded = bool((am == 0).any())
    if embeds is not None:
        out = model(inputs_embeds=embeds, attention_mask=am if padded else None, cache=cache)
    else:
        out = model(input_ids, attention_mask=am if padded else None, cache=cache)
    return out[:, -1].float(), am, padded


@torch.no_grad()
def generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, sc: SamplingConfig | None = None,
             on_tokens: Callable[[Tensor], bool | None] | None = None, cuda_graph: bool | None = None) -> Tensor:
    """Generate up to sc.max_new_tokens after each (left-padded) prompt.

    Args:
        model: a `Decoder` (with its active prompt, prefix or P-tuning adapter, if any: `_prefill`), or a transformers
            model (the fallback: `transformers_generate`).
        input_ids: (B, T) prompt ids, left-padded; attention_mask: (B, T), 0 on padding.
        on_tokens: called with each step's new ids (B,); returning True stops generation (stop strings).
        cuda_graph: replay each decode step as a CUDA graph (default: on CUDA).
    Returns:
        (B, n) new ids, n <= max_new_tokens; rows that stopped early are filled with their stop token.
    """
    enc = active_prompt(model)
    hooked = [m for m in model.modules() if getattr(m, "prefix", None) is not None]
    saved = [m.prefix for m in hooked]
    for m in hooked:  # a prefix enters through the cache here, not through the attention hooks
        m.prefix = None
    try:
        return _generate(model, input_ids, attention_mask, sc or SamplingConfig(), on_tokens, cuda_graph, enc)
    finally:
        for m, pre in zip(hooked, saved):
            m.prefix = pre


def _generate(model, input_ids: Tensor, attention_mask: Tensor | None, sc: SamplingConfig,
              on_tokens: Callable[[Tensor], bool | None] | None, cuda_graph: bool | None, enc) -> Tensor:
    sc.validate()
    if is_transformers_model(model):
        return transformers_generate(model, input_ids, attention_mask, sc, on_tokens)
    cfg = model.config
    stop = torch.tensor(sc.stop_token_ids if sc.stop_token_ids is not None else cfg.eos_ids,
                        dtype=torch.long, device=input_ids.device)
    B, T = input_ids.shape
    n = enc.num_virtual_tokens if enc is not None else 0
    dtype = model.model.embed_tokens.weight.dtype
    cache = KVCache(cfg, B, n + T + sc.max_new_tokens, input_ids.device, dtype)
    gen = torch.Generator(device=input_ids.device).manual_seed(sc.seed) if sc.seed is not None else None
    am = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    logits, am, padded = _prefill(model, input_ids, am, cache, enc)
    if not bool(torch.isfinite(logits).all()):
        raise SlimtuneError("the model's logits are NaN or inf on this prompt: its weights (or the adapter's) are "
                            "damaged or overflow in this dtype; fix: --dtype fp32, or a good checkpoint")
    T = am.shape[1]  # positions filled: virtual tokens or prefix, then the prompts
    if cuda_graph is None:  # dynamic NTK RoPE reads the longest position on the host: no graph
        cuda_graph = input_ids.is_cuda and not host_read(cfg)
    graph = GraphStep(model, cache) if cuda_graph else None
    slots = torch.zeros(B, T + sc.max_new_tokens, dtype=torch.long, device=input_ids.device)
    slots[:, :T] = am
    next_pos = am.long().sum(1)  # position of the next token in each row (padding not counted)
    seen, out = input_ids, []
    # (not with a prompt adapter: its virtual tokens are not in `seen`, so they would not be run again)
    refill = longrope_refill_length(cfg, T) if enc is None else None
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(sc.max_new_tokens):
        scores = process_logits(logits, seen, sc)
        if sc.temperature == 0:
            nxt = scores.argmax(-1)
        else:
            nxt = torch.multinomial(scores.softmax(-1), 1, generator=gen).squeeze(1)
        if out:  # rows already finished keep repeating their stop token
            nxt = torch.where(done, out[-1], nxt)
        out.append(nxt)
        seen = torch.cat([seen, nxt[:, None]], 1)
        done = done | torch.isin(nxt, stop)
        if on_tokens is not None and on_tokens(nxt):
            break
        if bool(done.all()) or len(out) == sc.max_new_tokens:
            break
        if seen.shape[1] == refill:  # LongRoPE: from here on every position takes the long factors
            slots[:, T + len(out) - 1] = 1
            am = slots[:, :seen.shape[1]].clone()
            logits = _refill(model, cache, seen, am if padded else None)
            next_pos += 1
            continue
        if graph is not None:
            slot = T + len(out) - 1
            slots[:, slot] = 1
            logits = graph(nxt, next_pos, slots, slot).float()
            next_pos += 1
            continue
        am = torch.cat([am, am.new_ones(B, 1)], 1)
        logits = model(nxt[:, None], attention_mask=am if padded else None, cache=cache)[:, -1].float()
    return torch.stack(out, 1)


def eos_ids(model) -> list[int]:
    """The model's end-of-sequence ids (slimtune's config, or a transformers model's config)."""
    e = getattr(model.config, "eos_ids", None)
    if e is None:
        e = model.config.eos_token_id
        e = [] if e is None else [e] if isinstance(e, int) else list(e)
    return e


def transformers_generate(model, input_ids: Tensor, attention_mask: Tensor | None, sc: SamplingConfig,
                          on_tokens: Callable[[Tensor], bool | None] | None = None) -> Tensor:
    """`generate` for a transformers model (the fallback): its own `generate` (its cache, the same logit processors),
    `on_tokens` called at every step as a stopping criterion; rows that stopped are filled with their stop token.

    Returns:
        (B, n) new ids, n <= max_new_tokens.
    """
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Callback(StoppingCriteria):
        def __call__(self, ids: Tensor, scores, **kw) -> Tensor:
            stop = bool(on_tokens(ids[:, -1])) if on_tokens is not None else False
            return torch.full((ids.shape[0],), stop, dtype=torch.bool, device=ids.device)

    stop_ids = sc.stop_token_ids if sc.stop_token_ids is not None else eos_ids(model)
    kw = dict(max_new_tokens=sc.max_new_tokens, do_sample=sc.temperature > 0,
              repetition_penalty=sc.repetition_penalty, eos_token_id=list(stop_ids) or None,
              pad_token_id=getattr(model.config, "pad_token_id", None) or 0)
    if sc.temperature > 0:
        kw.update(temperature=sc.temperature, top_k=sc.top_k or None, top_p=sc.top_p)
        if sc.seed is not None:
            torch.manual_seed(sc.seed)
    T = input_ids.shape[1]
    out = model.generate(input_ids, attention_mask=attention_mask, stopping_criteria=StoppingCriteriaList([Callback()]),
                         **kw)[:, T:]
    if stop_ids and out.numel():  # after a row's first stop token, repeat it (transformers pads there)
        hit = torch.isin(out, torch.tensor(stop_ids, device=out.device))
        first = hit.int().argmax(1, keepdim=True)
        later = (torch.arange(out.shape[1], device=out.device)[None] > first) & hit.any(1, keepdim=True)
        out = torch.where(later, out.gather(1, first), out)
    return out


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` ([{'role', 'content'}, ...]) through the tokenizer's chat template, ending with the
    assistant's generation prompt."""
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc)


def encode_prompts(tokenizer, prompts: list[str], chat: bool, system: str | None = None) -> list[list[int]]:
    """Token ids of each prompt: through the tokenizer's chat template with chat=True, plain text otherwise."""
    ids = []
    for p in prompts:
        if chat:
            if not getattr(tokenizer, "chat_template", None):
                raise SlimtuneError("--chat needs a tokenizer with a chat template; this one has none (drop --chat)")
            msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": p}]
            ids.append(chat_ids(tokenizer, msgs))
        else:
            ids.append(tokenizer(p)["input_ids"])
    return ids


def _partial_suffix(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


def generate_text(model, tokenizer, prompts: list[str], sc: SamplingConfig | None = None, chat: bool = False,
                  system: str | None = None, stream: Callable[[str], None] | None = None) -> dict:
    """Generate for a batch of text prompts; stream the first row's text pieces as they are produced.

    Returns:
        {"outputs": [text, ...], "new_tokens": int, "seconds": float, "tokens_per_s": float}
    """
    sc = sc or SamplingConfig()
    ids = encode_prompts(tokenizer, prompts, chat, system)
    check_prompt_lengths([len(x) for x in ids], sc.max_new_tokens, model.config.max_position_embeddings)
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    T = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (T - len(x)) + x for x in ids], device=dev)
    am = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids], device=dev)
    stop_ids = sc.stop_token_ids if sc.stop_token_ids is not None else eos_ids(model)
    stop_ids = [i for i in stop_ids if i is not None]
    texts = [""] * len(prompts)
    hit = [False] * len(prompts)
    streamed = [0]  # characters of row 0 already streamed
    steps: list[Tensor] = []

    def on_tokens(nxt: Tensor) -> bool:
        steps.append(nxt)
        cols = torch.stack(steps, 1).tolist()
        for b, row in enumerate(cols):
            if hit[b]:
                continue
            keep = [t for t in row if t not in stop_ids] if not any(t in stop_ids for t in row) else \
                row[:next(i for i, t in enumerate(row) if t in stop_ids)]
            text = tokenizer.decode(keep, skip_special_tokens=True)
            if b == 0 and stream is not None:
                safe = text.rstrip("\ufffd")  # hold back a character whose bytes are not all there yet
                for s in sc.stop_strings:  # never stream a stop string, nor the start of one
                    if s in safe:
                        safe = safe[:safe.index(s)]
                    else:
                        safe = safe[:len(safe) - _partial_suffix(safe, s)]
                if len(safe) > streamed[0]:
                    stream(safe[streamed[0]:])
                    streamed[0] = len(safe)
            texts[b] = text
            if any(s in text for s in sc.stop_strings):
                hit[b] = True
        return all(hit)

    t0 = time.perf_counter()
    out = generate(model, input_ids, am, sc, on_tokens)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    for b, t in enumerate(texts):
        for s in sc.stop_strings:
            if s in t:
                texts[b] = t[:t.index(s)]
    if stream is not None and len(texts[0]) > streamed[0]:
        stream(texts[0][streamed[0]:])  # what was held back as incomplete bytes stays incomplete: flush it
    n = out.shape[1]
    return {"outputs": texts, "new_tokens": n, "seconds": dt, "tokens_per_s": n * len(prompts) / dt}
