"""The bad inputs of the reliability sweep, by category: each is a command line of the real CLI plus the damage done
to a fresh case folder first, and the words its one-line refusal must contain (the file, the key or the flag).

`ws` is the workspace of good inputs (`reliability_assets.build_workspace`), `c` the case's own folder; outputs go
under `c`, so that "nothing written" covers them.
"""
from __future__ import annotations

import json
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reliability_assets import (copy_of, edit_header, edit_json, first_weight, poison, read_st,
                                run_overrides, write_st)


@dataclass
class Case:
    id: str
    category: str
    argv: Callable[[Path, Path], list]
    expect: list[str]
    make: Callable[[Path, Path], object] = lambda ws, c: None
    tags: list[str] = field(default_factory=list)


CASES: list[Case] = []


def case(id: str, category: str, argv, expect, make=lambda ws, c: None) -> None:
    CASES.append(Case(id, category, argv, [expect] if isinstance(expect, str) else expect, make))


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ---- data files -----------------------------------------------------------------------------------------------------
def ft_data(name: str):
    return lambda ws, c: ["finetune", *run_overrides(ws, c / "out", data=c / name)]


DEEP = "[" * 200_000 + "]" * 200_000
for cid, name, content, expect in [
    ("data-missing", "nope.jsonl", None, "nope.jsonl"),
    ("data-empty", "empty.jsonl", "", "empty.jsonl"),
    ("data-not-utf8", "latin.jsonl", b'{"instruction": "caf\xe9", "output": "x"}\n', "latin.jsonl"),
    ("data-bad-json-line", "bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", \n', "bad.jsonl line 2"),
    ("data-record-is-list", "list.jsonl", "[1, 2]\n", "list.jsonl line 1"),
    ("data-array-unclosed", "open.json", '[{"instruction": "a", "output": "b"}', "open.json"),
    ("data-deep-nesting-jsonl", "deep.jsonl", DEEP + "\n", "deep.jsonl"),
    ("data-deep-nesting-array", "deep.json", "[" + DEEP + "]", "deep.json"),
    ("data-deep-nesting-field", "deepf.jsonl", '{"instruction": "a", "output": ' + DEEP + "}\n", "deepf.jsonl"),
    ("data-unknown-fields", "fields.jsonl", '{"foo": "bar"}\n', "fields.jsonl"),
    ("data-unknown-suffix", "data.csv", "instruction,output\na,b\n", "data.csv"),
    ("data-broken-parquet", "broken.parquet", b"PAR1 this is not parquet", "broken.parquet"),
    ("data-one-object", "one.json", '{\n "instruction": "a",\n "output": "b"\n}\n', "one.json"),
    ("data-wrong-type", "types.jsonl", '{"instruction": 5, "output": "x"}\n', "types.jsonl"),
    ("data-nan-field", "nan.jsonl", '{"instruction": NaN, "output": "x"}\n', "nan.jsonl"),
    ("data-bad-role", "roles.jsonl", '{"messages": [{"role": "robot", "content": "hi"}]}\n', "roles.jsonl"),
]:
    case(cid, "data", ft_data(name), expect,
         (lambda n, t: (lambda ws, c: write(c / n, t) if t is not None else None))(name, content))
case("data-is-directory", "data", ft_data("dir"), "dir", lambda ws, c: (c / "dir").mkdir())
case("val-data-missing", "data", lambda ws, c: ["finetune", *run_overrides(ws, c / "out", val_data=c / "v.jsonl")],
     "v.jsonl")


# ---- configs and key=value overrides ---------------------------------------------------------------------------------
def ft(**kw):
    return lambda ws, c: ["finetune", *run_overrides(ws, c / "out", **kw)]


for cid, kw, expect in [
    ("lr-inf", {"lr": ".inf"}, "lr"), ("lr-nan", {"lr": ".nan"}, "lr"), ("lr-1e400", {"lr": "1e400"}, "lr"),
    ("weight-decay-nan", {"weight_decay": ".nan"}, "weight_decay"), ("betas-1.5", {"betas": "[1.5,0.999]"}, "betas"),
    ("betas-one", {"betas": "[0.9]"}, "betas"), ("betas-nan", {"betas": "[0.9,.nan]"}, "betas"),
    ("device-tpu", {"device": "tpu"}, "device"), ("device-cuda-absent", {"device": "cuda"}, "device"),
    ("max-length-0", {"max_length": 0}, "max_length"), ("unknown-key", {"lrr": 1}, "lrr"),
    ("batch-size-text", {"batch_size": "abc"}, "batch_size"), ("schedule-unknown", {"schedule": "foo"}, "schedule"),
    ("max-grad-norm-nan", {"max_grad_norm": ".nan"}, "max_grad_norm"),
    ("warmup-negative", {"warmup_steps": -1}, "warmup_steps"), ("epochs-nan", {"max_steps": "null", "epochs": ".nan"},
                                                                "epochs"),
    ("epochs-inf", {"max_steps": "null", "epochs": ".inf"}, "epochs"), ("val-fraction-1.5", {"val_fraction": 1.5},
                                                                        "val_fraction"),
    ("min-lr-inf", {"min_lr": ".inf"}, "min_lr"), ("rank-0", {"rank": 0}, "r"), ("dropout-1.5", {"dropout": 1.5},
                                                                                 "dropout"),
    ("alpha-nan", {"alpha": ".nan"}, "alpha"), ("keep-last-negative", {"keep_last": -1}, "keep_last"),
    ("precision-fp8", {"precision": "fp8"}, "precision"), ("max-steps-0", {"max_steps": 0}, "max_steps"),
    ("method-unknown", {"method": "lorax"}, "lorax"), ("data-limit-0", {"data_limit": 0}, "data_limit"),
    ("eval-batches-0", {"eval_batches": 0}, "eval_batches"), ("grad-accum-0", {"grad_accum": 0}, "grad_accum"),
    ("quant-unknown", {"method": "qlora", "quant": "nf5"}, "nf5"), ("template-unknown", {"template": "foo"}, "foo"),
    ("seed-negative", {"seed": -1}, "seed"),
]:
    case(f"cfg-{cid}", "config", ft(**kw), expect)
case("cfg-out-dir-is-file", "config", lambda ws, c: ["finetune", *run_overrides(ws, c / "f")], "f",
     lambda ws, c: write(c / "f", "x"))
case("cfg-not-key-value", "config", lambda ws, c: ["finetune", "lr", *run_overrides(ws, c / "out")], "lr")
for cid, text, expect in [
    ("yaml-missing", None, "run.yaml"), ("yaml-syntax", "lr: [1e-4\nrank: 4\n", "run.yaml"),
    ("yaml-list", "- lr\n- rank\n", "run.yaml"), ("yaml-deep", "lr: " + "[" * 20_000 + "]" * 20_000 + "\n", "run.yaml"),
    ("yaml-wrong-type", "lr: [1, 2]\n", "lr"), ("yaml-nan", "weight_decay: .nan\n", "weight_decay"),
]:
    case(f"cfg-{cid}", "config", lambda ws, c: ["finetune", c / "run.yaml", *run_overrides(ws, c / "out")], expect,
         (lambda t: (lambda ws, c: write(c / "run.yaml", t) if t is not None else None))(text))


# ---- model folders: config.json, safetensors headers, index.json, tokenizer files, .bin ----------------------------
def gen(model: str = "m", *extra):
    return lambda ws, c: ["generate", "--model", c / model, "--prompt", "hi", "--max-new-tokens", "1", *extra]


def conv(model: str = "m"):
    return lambda ws, c: ["convert", c / model, c / "out"]


def damaged(fn):
    """make(): copy the good model to c/m, then fn(c/m)."""
    return lambda ws, c: fn(copy_of(ws / "model", c / "m"))


def cfg_edit(change):
    return damaged(lambda m: edit_json(m / "config.json", change))


case("model-missing", "model", gen("nomodel"), "nomodel")
case("model-is-file", "model", gen("file"), "file", lambda ws, c: write(c / "file", "x"))
case("config-missing", "model", gen(), "config.json", damaged(lambda m: (m / "config.json").unlink()))
case("config-not-json", "model", conv(), "config.json", damaged(lambda m: write(m / "config.json", "{oops")))
case("config-list", "model", gen(), "config.json", cfg_edit(lambda d: [d]))
case("config-not-utf8", "model", gen(), "config.json", damaged(lambda m: write(m / "config.json", b'{"a": "\xff"}')))
case("config-deep", "model", conv(), "config.json", damaged(lambda m: write(m / "config.json", '{"a": ' + DEEP + "}")))
for cid, change, expect in [
    ("kv-heads-0", {"num_key_value_heads": 0}, "num_key_value_heads"),
    ("kv-heads-3", {"num_key_value_heads": 3}, "num_key_value_heads"),
    ("hidden-size-string", {"hidden_size": "256"}, "hidden_size"),
    ("model-type", {"model_type": "gpt9"}, "model_type"),
    ("layers-negative", {"num_hidden_layers": -1}, "num_hidden_layers"),
    ("vocab-0", {"vocab_size": 0}, "vocab_size"),
    ("hidden-not-divisible", {"hidden_size": 34, "head_dim": None}, "hidden_size"),
    ("eps-nan", {"rms_norm_eps": float("nan")}, "rms_norm_eps"),
    ("rope-theta-text", {"rope_theta": "abc"}, "rope_theta"),
    ("rope-scaling-list", {"rope_scaling": [1, 2]}, "rope_scaling"),
    ("torch-dtype-int8", {"torch_dtype": "int8"}, "torch_dtype"),
    ("max-positions-0", {"max_position_embeddings": 0}, "max_position_embeddings"),
    ("eos-text", {"eos_token_id": "two"}, "eos_token_id"),
]:
    case(f"config-{cid}", "model", gen(), expect, cfg_edit(change))
case("config-vocab-missing", "model", conv(), "vocab_size",
     cfg_edit(lambda d: {k: v for k, v in d.items() if k != "vocab_size"}))


def st_edit(change):
    return damaged(lambda m: edit_header(m / "model.safetensors", change))


def one(h: dict, **kw) -> dict:
    """The header with the first weight's entry updated by kw."""
    k = first_weight(h)
    h[k] = {**h[k], **kw}
    return h


def overlap(h: dict) -> dict:
    names = [k for k in h if k != "__metadata__"]
    h[names[1]]["data_offsets"] = [h[names[0]]["data_offsets"][0] + 4, h[names[0]]["data_offsets"][0] + 4 +
                                   h[names[1]]["data_offsets"][1] - h[names[1]]["data_offsets"][0]]
    return h


case("st-header-list", "model", gen(), "model.safetensors", st_edit(lambda h: list(h)))
case("st-no-offsets", "model", gen(), "data_offsets", st_edit(lambda h: {k: ({x: y for x, y in v.items()
                                                                            if x != "data_offsets"} if k != "__metadata__"
                                                                           else v) for k, v in h.items()}))
case("st-negative-shape", "model", conv(), "shape", st_edit(lambda h: one(h, shape=[-2, 16])))
case("st-float-shape", "model", gen(), "shape", st_edit(lambda h: one(h, shape=[1.5, 2])))
case("st-offsets-reversed", "model", gen(), "data_offsets",
     st_edit(lambda h: one(h, data_offsets=h[first_weight(h)]["data_offsets"][::-1])))
case("st-offsets-overlap", "model", gen(), "model.safetensors", st_edit(overlap))
case("st-offsets-past-end", "model", conv(), "model.safetensors",
     st_edit(lambda h: one(h, data_offsets=[10**9, 10**9 + 4 * 32 * 32])))
case("st-dtype-unknown", "model", gen(), "F9", st_edit(lambda h: one(h, dtype="F9")))
case("st-size-mismatch", "model", gen(), "model.safetensors", st_edit(lambda h: one(h, shape=[3, 3])))
case("st-entry-string", "model", gen(), "model.safetensors", st_edit(lambda h: one_str(h)))
case("st-metadata-list", "model", conv(), "__metadata__", st_edit(lambda h: {**h, "__metadata__": [1]}))
case("st-header-too-long", "model", gen(), "model.safetensors",
     damaged(lambda m: write(m / "model.safetensors", struct.pack("<Q", 10**12) + b"{}")))
case("st-short-file", "model", gen(), "model.safetensors", damaged(lambda m: write(m / "model.safetensors", b"\x01")))
case("st-header-not-json", "model", conv(), "model.safetensors",
     damaged(lambda m: write_st(m / "model.safetensors", None, b"", header_bytes=b"{not json")))
case("st-header-deep", "model", gen(), "model.safetensors",
     damaged(lambda m: write_st(m / "model.safetensors", None, b"", header_bytes=DEEP.encode())))
case("st-truncated-data", "model", gen(), "model.safetensors",
     damaged(lambda m: write(m / "model.safetensors", (m / "model.safetensors").read_bytes()[:-100])))
case("st-int32-weights", "model", gen(), "model.embed_tokens.weight",
     st_edit(lambda h: {**h, "model.embed_tokens.weight": {**h["model.embed_tokens.weight"], "dtype": "I32"}}))
case("st-missing-tensor", "model", gen(), "lm_head.weight", damaged(lambda m: drop_tensor(m, "lm_head.weight")))
case("st-wrong-shape", "model", conv(), "model.norm.weight",
     st_edit(lambda h: {**h, "model.norm.weight": {**h["model.norm.weight"], "shape": [16, 2]}}))
case("st-extra-tensor", "model", gen(), "extra.weight", damaged(lambda m: add_tensor(m, "extra.weight")))
case("st-nan-generate", "model", gen(), "lm_head.weight", damaged(lambda m: poison(m / "model.safetensors", "lm_head")))
case("st-nan-convert", "model", conv(), "q_proj", damaged(lambda m: poison(m / "model.safetensors", "q_proj")))


def one_str(h: dict) -> dict:
    h[first_weight(h)] = "F32"
    return h


def drop_tensor(m: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file
    sd = load_file(str(m / "model.safetensors"))
    del sd[name]
    save_file(sd, str(m / "model.safetensors"))


def add_tensor(m: Path, name: str) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    sd = load_file(str(m / "model.safetensors"))
    sd[name] = torch.ones(2, 2)
    save_file(sd, str(m / "model.safetensors"))


def sharded(index) -> Callable:
    """make(): the model with its weights in one shard named by an index.json holding `index(weight_map)`."""
    def fn(m: Path) -> None:
        (m / "model.safetensors").rename(m / "model-00001-of-00001.safetensors")
        header, _ = read_st(m / "model-00001-of-00001.safetensors")
        wm = {k: "model-00001-of-00001.safetensors" for k in header if k != "__metadata__"}
        write(m / "model.safetensors.index.json", json.dumps(index(wm)))
    return damaged(fn)


case("index-list", "model", gen(), "model.safetensors.index.json", sharded(lambda wm: []))
case("index-weight-map-list", "model", conv(), "weight_map", sharded(lambda wm: {"weight_map": list(wm)}))
case("index-missing-shard", "model", gen(), "model-00002-of-00002.safetensors",
     sharded(lambda wm: {"weight_map": {**wm, "lm_head.weight": "model-00002-of-00002.safetensors"}}))
case("index-shard-int", "model", gen(), "model.safetensors.index.json",
     sharded(lambda wm: {"weight_map": {k: 1 for k in wm}}))
case("index-shard-escapes", "model", conv(), "model.safetensors.index.json",
     sharded(lambda wm: {"weight_map": {k: "../model-00001-of-00001.safetensors" for k in wm}}))
case("tokenizer-json-broken", "model", gen(), "tokenizer.json", damaged(lambda m: write(m / "tokenizer.json", "{oops")))
case("tokenizer-config-list", "model", gen(), "tokenizer_config.json",
     damaged(lambda m: write(m / "tokenizer_config.json", "[1, 2]")))
case("tokenizer-json-garbage", "model", gen(), "tokenizer", damaged(lambda m: write(m / "tokenizer.json", '{"a": 1}')))
case("tokenizer-missing", "model", gen(), "tokenizer", damaged(
    lambda m: [p.unlink() for p in m.iterdir() if p.name.startswith(("tokenizer", "chat_template"))]))


class Payload:
    """A pickle that would create a file if it were ever unpickled without weights_only."""

    def __reduce__(self):
        return (open, ("/tmp/slimtune-reliability-pwned", "w"))


def to_bin(m: Path, payload: bool = False, legacy: bool = False) -> None:
    import torch
    from safetensors.torch import load_file
    sd = load_file(str(m / "model.safetensors"))
    (m / "model.safetensors").unlink()
    obj = {**sd, "evil": Payload()} if payload else sd
    if payload:
        (m / "pytorch_model.bin").write_bytes(pickle.dumps(obj))
    else:
        torch.save(obj, m / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)


case("bin-generate", "model", gen(), "slimtune convert", damaged(to_bin))
case("bin-convert-untrusted", "model", conv(), "--trust-pickle", damaged(to_bin))
case("bin-convert-payload-trusted", "model", lambda ws, c: ["convert", c / "m", c / "out", "--trust-pickle"],
     "pytorch_model.bin", damaged(lambda m: to_bin(m, payload=True)))
