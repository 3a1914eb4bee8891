"""The output tokenizer of a merge (mergekit's `tokenizer:` block) and the chat template written with it.

`build_vocab` makes the output vocabulary (the base's, the union of every input's, or one model's, plus `tokens:`)
with transformers' own tokenizers, and for each input the map new token id -> its row (-1: absent), as mergekit
0.1.5 does (tokenizer/build.py). `vocab.py` then re-indexes the embedding and lm_head rows through these maps.
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from slimtune.models.save import copy_tokenizer_files
from slimtune.errors import ConfigError
from slimtune.merge.plan import VOCAB_TENSORS, Input, Plan, find_path

# ChatML (OpenAI's chat markup, <|im_start|>role\ncontent<|im_end|>), in the usual one-line Jinja form
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _load(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def _rows(x: Input) -> int:
    return int(x.hf.get("vocab_size") or 0)


def stripped(x: Input) -> Any:
    """The model's tokenizer without tokens whose id is past its embedding rows (config vocab_size), as mergekit
    strips the base tokenizer: only a fast BPE tokenizer can be edited (vocab, merges and added tokens)."""
    tok = _load(x.folder)
    n = _rows(x) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= n}
    if not unused:
        return tok
    from tokenizers import Tokenizer

    d = json.loads(tok._tokenizer.to_str())
    if not getattr(tok, "is_fast", False) or d["model"]["type"] != "BPE":
        raise ConfigError(f"{x.label}: its tokenizer has {len(unused)} tokens past vocab_size {n} and is not a fast "
                          "BPE tokenizer, so they cannot be removed; use tokenizer source: union or a model")
    d["added_tokens"] = [e for e in d["added_tokens"] if e["id"] < n]
    for t in unused:
        d["model"]["vocab"].pop(t, None)
    pair = (lambda m: m.split(" ") if isinstance(m, str) else m)
    d["model"]["merges"] = [m for m in d["model"]["merges"] if not set(pair(m)) & unused]
    tok._tokenizer = Tokenizer.from_str(json.dumps(d))
    return tok


def _union(base_tok: Any, toks: dict[str, Any], inputs: dict[str, Input]) -> Any:
    """The base tokenizer plus every other input's tokens (ordinary ones first, then added / special ones).

    Tokens are visited by id within each model (mergekit visits them in the tokenizer's hash order, so when several
    ordinary tokens are new their ids may differ from mergekit's; added tokens come in id order in both).
    """
    with tempfile.TemporaryDirectory() as p:  # a copy, so that the base tokenizer itself is left unchanged
        base_tok.save_pretrained(p)
        res = _load(Path(p))
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for key, tok in toks.items():
        n = _rows(inputs[key]) or tok.vocab_size
        for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < n:
                plain.setdefault(t)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i < n:
                added.setdefault(info.content, info)
    have = base_tok.get_vocab()
    for t in plain:
        if t not in added and t not in have:
            res.add_tokens(t)
    for info in added.values():
        res.add_tokens(info)
    return res


def build_vocab(plan: Plan) -> Any:
    """Build the output tokenizer and every input's row map; set the plan's vocab_size and vocabulary tensor shapes.

    Raises:
        ConfigError: an unknown tokenizer source, a LoRA input that changes a vocabulary tensor, a token override
            naming a model that is not an input.
    """
    from slimtune.merge.vocab import Vocab

    cfg, tdef = plan.cfg, plan.cfg.tokenizer
    base_key = cfg.base_model or next(iter(plan.inputs))
    for key, x in plan.inputs.items():
        if x.lora is not None and any(v in n for n in x.lora.targets for v in VOCAB_TENSORS):
            raise ConfigError(f"{cfg.source}: {x.label} changes a vocabulary tensor; a tokenizer: block cannot be "
                              "combined with an adapter on embed_tokens or lm_head")
    base_in = plan.inputs.get(base_key, plan.base)
    toks = {base_key: stripped(base_in)}
    for key, x in plan.inputs.items():
        toks.setdefault(key, _load(x.folder))
    if tdef.source == "base":
        out = toks[base_key]
    elif tdef.source == "union":
        out = _union(toks[base_key], toks, plan.inputs)
    else:
        try:
            out = _load(find_path(tdef.source, cfg.source))
        except Exception as e:  # transformers raises OSError / ValueError for a folder without a tokenizer
            raise ConfigError(f"{cfg.source}: tokenizer source {tdef.source!r} is not base, union or a model folder "
                              f"with a tokenizer ({type(e).__name__})") from None
    for t in tdef.tokens:
        if t not in out.get_vocab():
            out.add_tokens(t)
    vocab = out.get_vocab()
    n = len(vocab)
    size = n if not tdef.pad_to_multiple_of else -(-n // tdef.pad_to_multiple_of) * tdef.pad_to_multiple_of
    perms = {}
    for key, x in plan.inputs.items():
        own, rows = toks[key].get_vocab(), _rows(x) or len(toks[key].get_vocab())
        p = torch.full((n,), -1, dtype=torch.long)
        for t, i in vocab.items():
            j = own.get(t)
            if j is not None and j < rows:
                p[i] = j
        perms[key] = p
    for t, spec in tdef.tokens.items():
        src = spec.get("source")
        model = src if isinstance(src, str) else (src or {}).get("model")
        if model is not None and model not in plan.inputs:
            raise ConfigError(f"{cfg.source}: tokenizer.tokens[{t!r}] takes its embedding from {model}, which is not "
                              "one of the merged models")
    plan.hf["vocab_size"] = size
    for job in plan.jobs.values():
        if job.vocab:
            job.shape = (size, *job.shape[1:])
    return Vocab(out, n, size, perms, {k: t.get_vocab() for k, t in toks.items()}, dict(tdef.tokens), base_key)


def _template(plan: Plan) -> str | None:
    t = plan.cfg.chat_template
    if t != "auto":
        return CHATML if t == "chatml" else t
    seen = []
    for x in [plan.base, *plan.inputs.values()]:
        try:
            tmpl = _load(x.folder).chat_template
        except Exception:  # noqa: BLE001 - a model without a loadable tokenizer has no vote (mergekit does the same)
            continue
        tmpl = tmpl.get("default") if isinstance(tmpl, dict) else tmpl
        if tmpl:
            seen.append(tmpl.strip())
    return Counter(seen).most_common(1)[0][0] if seen else None


def write_tokenizer(plan: Plan, folder: Path) -> None:
    """Write the output's tokenizer: the built one, else the base's files (re-saved when a chat template is set)."""
    tok = plan.vocab.tokenizer if plan.vocab is not None else None
    if tok is None and not plan.cfg.chat_template:
        copy_tokenizer_files(plan.base.folder, folder)
        return
    if tok is None:
        tok = _load(plan.base.folder)
    if plan.cfg.chat_template:
        tmpl = _template(plan)
        if tmpl:
            tok.chat_template = tmpl
    tok.save_pretrained(str(folder))
