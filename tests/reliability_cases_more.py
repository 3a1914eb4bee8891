"""The bad inputs of the reliability sweep, continued: adapters, merge configs, quantize / convert, generate, resume
(state.json and the checkpoint files), and command-line flags."""
from __future__ import annotations

from pathlib import Path

from reliability_assets import CONTEXT, copy_of, edit_header, edit_json, poison, run_overrides
from reliability_cases import CASES, DEEP, case, damaged, write


# ---- adapters and adapter configs ---------------------------------------------------------------------------------
def madp(adapter: str = "a"):
    return lambda ws, c: ["merge-adapter", "--model", ws / "model", "--adapter", c / adapter, "--out", c / "out"]


def adp(fn):
    return lambda ws, c: fn(copy_of(ws / "adapter", c / "a"))


def adp_cfg(change):
    return adp(lambda a: edit_json(a / "adapter_config.json", change))


case("adapter-missing", "adapter", madp("none"), "none")
case("adapter-config-missing", "adapter", madp(), "adapter_config.json",
     adp(lambda a: (a / "adapter_config.json").unlink()))
case("adapter-config-not-json", "adapter", madp(), "adapter_config.json",
     adp(lambda a: write(a / "adapter_config.json", "{")))
case("adapter-config-list", "adapter", madp(), "adapter_config.json", adp_cfg(lambda d: [d]))
case("adapter-config-deep", "adapter", madp(), "adapter_config.json",
     adp(lambda a: write(a / "adapter_config.json", DEEP)))
for cid, change, expect in [
    ("peft-type", {"peft_type": "LORAX"}, "peft_type"), ("r-text", {"r": "eight"}, "r"), ("r-0", {"r": 0}, "r"),
    ("alpha-nan", {"lora_alpha": float("nan")}, "lora_alpha"), ("alpha-inf", {"lora_alpha": float("inf")}, "lora_alpha"),
    ("targets-int", {"target_modules": 5}, "target_modules"), ("dropout-2", {"lora_dropout": 2.0}, "lora_dropout"),
]:
    case(f"adapter-{cid}", "adapter", madp(), expect, adp_cfg(change))
case("adapter-weights-missing", "adapter", madp(), "adapter_model.safetensors",
     adp(lambda a: (a / "adapter_model.safetensors").unlink()))
case("adapter-wrong-shape", "adapter", madp(), "lora_A",
     adp(lambda a: edit_header(a / "adapter_model.safetensors", lambda h: {
         k: ({**v, "shape": [v["shape"][1], v["shape"][0]]} if "lora_A" in k else v) for k, v in h.items()})))
case("adapter-header-list", "adapter", madp(), "adapter_model.safetensors",
     adp(lambda a: edit_header(a / "adapter_model.safetensors", lambda h: list(h))))
case("adapter-nan-merge", "adapter", madp(), "lora_B", adp(lambda a: poison(a / "adapter_model.safetensors", "lora_B")))
case("adapter-nan-generate", "adapter", lambda ws, c: ["generate", "--model", ws / "model", "--adapter", c / "a",
                                                       "--prompt", "hi", "--max-new-tokens", "1"],
     "lora_A", adp(lambda a: poison(a / "adapter_model.safetensors", "lora_A")))
case("adapter-base-int8", "adapter", lambda ws, c: ["merge-adapter", "--model", c / "m", "--adapter", ws / "adapter",
                                                    "--out", c / "out"],
     "torch_dtype", damaged(lambda m: edit_json(m / "config.json", {"torch_dtype": "int8"})))


# ---- merge configs ----------------------------------------------------------------------------------------------------
def mrg(*extra):
    return lambda ws, c: ["merge", c / "merge.yaml", c / "out", *extra]


def yaml_of(text: str):
    return lambda ws, c: write(c / "merge.yaml", text.replace("WS", str(ws)).replace("CASE", str(c)))


LINEAR = "merge_method: linear\nmodels:\n  - model: WS/model\n    parameters: {weight: W1}\n" \
         "  - model: WS/model\n    parameters: {weight: W2}\n"
TASK = "merge_method: task_arithmetic\nbase_model: WS/model\nmodels:\n  - model: MODEL\n    parameters: {weight: 1.0}\n"
for cid, text, expect in [
    ("weight-nan", LINEAR.replace("W1", ".nan").replace("W2", "1.0"), "weight"),
    ("weight-inf", LINEAR.replace("W1", ".inf").replace("W2", "1.0"), "weight"),
    ("weights-cancel", LINEAR.replace("W1", "1.0").replace("W2", "-1.0"), "weight"),
    ("weight-text", LINEAR.replace("W1", "abc").replace("W2", "1.0"), "weight"),
    ("method-unknown", LINEAR.replace("linear", "lineer").replace("W1", "1").replace("W2", "1"), "merge_method"),
    ("density-0", TASK.replace("task_arithmetic", "ties").replace("MODEL", "WS/model").replace("1.0}", "1.0, density: 0}"),
     "density"),
    ("slerp-t", "merge_method: slerp\nbase_model: WS/model\nparameters: {t: 1.5}\nmodels:\n  - model: WS/model\n"
                "  - model: CASE/m\n", "t"),
    ("lambda-nan", TASK.replace("MODEL", "CASE/m") + "parameters: {lambda: .nan}\n", "lambda"),
    ("other-shape", TASK.replace("MODEL", "CASE/m"), "hidden_size"),
    ("model-missing", TASK.replace("MODEL", "CASE/nowhere"), "nowhere"),
    ("list", "- merge_method\n", "merge.yaml"),
    ("yaml-syntax", "merge_method: [linear\n", "merge.yaml"),
    ("yaml-deep", "merge_method: " + "[" * 20_000 + "]" * 20_000 + "\n", "merge.yaml"),
    ("nan-adapter", TASK.replace("MODEL", "CASE/a"), "lora_B"),
    ("nan-model", TASK.replace("MODEL", "CASE/n"), "q_proj"),
]:
    def make(ws, c, text=text, cid=cid):
        yaml_of(text)(ws, c)
        if cid == "other-shape":
            edit_json(copy_of(ws / "model", c / "m") / "config.json", {"hidden_size": 64})
        elif cid == "slerp-t":
            copy_of(ws / "model", c / "m")
        elif cid == "lambda-nan":
            copy_of(ws / "model", c / "m")
        elif cid == "nan-adapter":
            poison(copy_of(ws / "adapter", c / "a") / "adapter_model.safetensors", "lora_B")
        elif cid == "nan-model":
            poison(copy_of(ws / "model", c / "n") / "model.safetensors", "q_proj")
    case(f"merge-{cid}", "merge", mrg(), expect, make)
case("merge-missing-config", "merge", mrg(), "merge.yaml")
case("merge-out-is-input", "merge", lambda ws, c: ["merge", c / "merge.yaml", ws / "model"], "model",
     yaml_of(LINEAR.replace("W1", "1").replace("W2", "1")))
case("merge-shard-size-negative", "merge", mrg("--shard-size=-5GB"), "-5GB",
     yaml_of(LINEAR.replace("W1", "1").replace("W2", "1")))
case("merge-adapter-rank-0", "merge", mrg("--adapter-rank", "0"), "adapter-rank", yaml_of(TASK.replace("MODEL", "WS/adapter")))


# ---- quantize / convert ---------------------------------------------------------------------------------------------
def cv(*extra):
    return lambda ws, c: ["convert", ws / "model", c / "out", *extra]


def qz(*extra, model=None):
    return lambda ws, c: ["quantize", model(ws, c) if model else ws / "model", "--out", c / "out", *extra]


for cid, extra, expect in [
    ("shard-negative", ["--max-shard-size=-5GB"], "-5GB"), ("shard-text", ["--max-shard-size", "abc"], "abc"),
    ("shard-inf", ["--max-shard-size", "infGB"], "infGB"), ("shard-zero", ["--max-shard-size", "0"], "0"),
    ("dtype-int8", ["--dtype", "int8"], "int8"), ("dtype-unknown", ["--dtype", "fp9"], "fp9"),
]:
    case(f"convert-{cid}", "quantize/convert", cv(*extra), expect)
case("convert-fp16-overflow", "quantize/convert", lambda ws, c: ["convert", c / "m", c / "out", "--dtype", "fp16"],
     "q_proj", damaged(lambda m: big_weight(m / "model.safetensors", "q_proj")))
for cid, extra, expect in [
    ("max-length-0", ["--format", "int8", "--max-length", "0"], "max-length"),
    ("format-unknown", ["--format", "int9"], "int9"), ("device-cuda", ["--format", "int8", "--device", "cuda"], "cuda"),
    ("group-0", ["--format", "int4", "--group", "0"], "group"), ("bits-1", ["--bits", "1"], "bits"),
    ("bits-nan", ["--bits", "nan"], "bits"), ("eval-limit-0", ["--format", "int8", "--eval-limit", "0"], "eval-limit"),
    ("calib-rows-0", ["--bits", "4", "--calib-rows", "0"], "calib-rows"),
    ("eval-missing", ["--format", "int8", "--eval", "/nonexistent/e.jsonl"], "e.jsonl"),
]:
    case(f"quantize-{cid}", "quantize/convert", qz(*extra), expect)
case("quantize-nan-weights", "quantize/convert", qz("--format", "int8", "--no-eval", model=lambda ws, c: c / "m"),
     "q_proj", damaged(lambda m: poison(m / "model.safetensors", "q_proj")))


def big_weight(path: Path, part: str) -> None:
    import struct

    from reliability_assets import read_st, write_st
    header, data = read_st(path)
    name = next(k for k in header if part in k)
    b, _ = header[name]["data_offsets"]
    write_st(path, header, data[:b] + struct.pack("<f", 1e6) + data[b + 4:])


# ---- generate ---------------------------------------------------------------------------------------------------------
def gn(*extra, prompt="hi"):
    return lambda ws, c: ["generate", "--model", ws / "model", "--prompt", prompt, "--max-new-tokens", "2", *extra]


for cid, extra, expect in [
    ("temperature-nan", ["--temperature", "nan"], "temperature"), ("temperature-inf", ["--temperature", "inf"],
                                                                   "temperature"),
    ("temperature-negative", ["--temperature", "-1"], "temperature"), ("top-p-0", ["--top-p", "0"], "top-p"),
    ("top-p-nan", ["--top-p", "nan"], "top-p"), ("top-k-negative", ["--top-k", "-1"], "top-k"),
    ("repetition-inf", ["--repetition-penalty", "inf"], "repetition-penalty"),
    ("device-cuda", ["--device", "cuda"], "cuda"), ("device-tpu", ["--device", "tpu"], "tpu"),
    ("dtype-int8", ["--dtype", "int8"], "int8"), ("max-new-tokens-0", ["--max-new-tokens", "0"], "max-new-tokens"),
    ("new-tokens-past-context", ["--max-new-tokens", str(CONTEXT + 5)], "max-new-tokens"),
]:
    case(f"generate-{cid}", "generate", gn(*extra), expect)
case("generate-empty-prompt", "generate", gn(prompt=""), "prompt")
case("generate-prompt-longer-than-context", "generate", gn(prompt="x" * (CONTEXT + 10)), "context")


# ---- resume: state.json and checkpoint files ----------------------------------------------------------------------
def rs(**kw):
    return lambda ws, c: ["finetune", *run_overrides(ws, c / "run", resume="latest", max_steps=3, **kw)]


def run_copy(fn):
    """make(): a copy of the finished run, then fn(its latest checkpoint folder)."""
    return lambda ws, c: fn(copy_of(ws / "run", c / "run") / "checkpoints" / "step-2")


for cid, fn, expect in [
    ("state-truncated", lambda k: write(k / "state.json", (k / "state.json").read_text()[:50]), "state.json"),
    ("state-list", lambda k: write(k / "state.json", "[]"), "state.json"),
    ("state-not-utf8", lambda k: write(k / "state.json", b'{"step": "\xff"}'), "state.json"),
    ("state-deep", lambda k: write(k / "state.json", DEEP), "state.json"),
    ("state-no-data", lambda k: edit_json(k / "state.json", lambda d: {x: y for x, y in d.items() if x != "data"}),
     "data"),
    ("state-step-text", lambda k: edit_json(k / "state.json", {"step": "two"}), "step"),
    ("state-rng-missing", lambda k: edit_json(k / "state.json", lambda d: {x: y for x, y in d.items() if x != "rng"}),
     "rng"),
    ("weights-truncated", lambda k: write(k / "weights.safetensors", (k / "weights.safetensors").read_bytes()[:-64]),
     "weights.safetensors"),
    ("weights-nan", lambda k: poison(k / "weights.safetensors"), "weights.safetensors"),
    ("state-tensors-missing", lambda k: (k / "state.safetensors").unlink(), "state.safetensors"),
]:
    case(f"resume-{cid}", "resume", rs(), expect, run_copy(fn))
case("resume-changed-lr", "resume", rs(lr=5e-3), "lr", lambda ws, c: copy_of(ws / "run", c / "run"))
case("resume-changed-rank", "resume", rs(rank=4), "rank", lambda ws, c: copy_of(ws / "run", c / "run"))
case("resume-not-a-checkpoint", "resume", lambda ws, c: ["finetune", *run_overrides(ws, c / "out", resume=c / "x")], "x",
     lambda ws, c: (c / "x").mkdir())


# ---- command-line flags -------------------------------------------------------------------------------------------
for cid, argv, expect in [
    ("unknown-command", ["frobnicate"], "frobnicate"), ("unknown-top-flag", ["--bogus"], "--bogus"),
    ("required-missing", ["merge-adapter", "--adapter", "x", "--out", "y"], "--model"),
    ("int-flag-text", ["generate", "--max-new-tokens", "abc"], "max-new-tokens"),
    ("unknown-flag", ["generate", "--frob"], "--frob"), ("merge-seed-text", ["merge", "a.yaml", "o", "--seed", "x"],
                                                         "seed"),
    ("positional-missing", ["convert", "builtin"], "out"), ("float-flag-text", ["quantize", "builtin", "--out", "o",
                                                                                "--bits", "abc"], "bits"),
    ("finetune-flag", ["finetune", "--lr", "1"], "--lr"),
]:
    case(f"cli-{cid}", "cli", (lambda a: (lambda ws, c: a))(argv), expect)

__all__ = ["CASES"]
