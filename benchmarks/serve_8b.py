"""Serving throughput and latency on one GPU: the Llama-3-8B shape with random bf16 weights (or --model DIR), 8 random
LoRA adapters (r=16 on q, k, v, o, gate, up, down), closed-loop clients keeping 16, 64 and 256 requests in flight,
prompts of 128 random tokens, 128 new tokens each (greedy, end-of-sequence ignored).

Cases (--cases), each through slimtune's engine in this process (continuous batching, paged KV cache, CUDA graphs):
(a) base: the base alone; (b) mixed: mixed-8/<mode>, the 8 adapters spread evenly over every batch, LoRA modes
(--modes) dense and gather; (c) merged: one adapter merged into the base. Beside them, on the same prompts and weights:
transformers' `generate` and PEFT's mixed-batch `generate(adapter_names=...)` (cases transformers, peft), each row one
static batch of `concurrency` prompts, i.e. one `generate` call (--static-concurrency picks their rows: PEFT takes
about a minute per row on the 8B shape, so a call can run only the rows it lacks).

    python benchmarks/serve_8b.py                        # one H200: about 6 minutes, see --budget-s
    python benchmarks/serve_8b.py --cases base,mixed,merged,peft --modes dense --static-concurrency 64,256
    python benchmarks/serve_8b.py --shape tiny --quick   # a smoke run, CPU is fine
    python benchmarks/serve_8b.py --tabulate run1.txt run2.txt   # one table from the JSON lines of earlier runs

Prints one JSON line per row (case, concurrency, tokens/s, latencies, the machine), then a Markdown table (tokens/s,
p50 / p99 latency, (b)/(a)).
"""
import argparse
import gc
import json
import tempfile
import threading
import time
import sys
from pathlib import Path

import torch
from decode_8b import materialise, timed  # the same random-weight model builder

CASES = ("base", "mixed", "merged", "transformers", "peft")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(model, folder: Path, n: int, rank: int) -> list[str]:
    """n PEFT adapter folders with random A and B (init_lora_weights=False), one seed each."""
    from slimtune.peft import apply_method, delete_adapter, save_adapter

    out = []
    for i in range(n):
        torch.manual_seed(1000 + i)
        apply_method(model, {"method": "lora", "r": rank, "lora_alpha": 2 * rank, "target_modules": TARGETS,
                             "init_lora_weights": False}, f"a{i}")
        out.append(str(save_adapter(model, folder / f"a{i}", f"a{i}")))
        delete_adapter(model, f"a{i}")
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q / 100 * len(xs)))], 3)


def drive(engine, prompts: list[list[int]], adapters: list[str], concurrency: int, new: int) -> dict:
    """Closed loop: `concurrency` requests in flight until every prompt has been answered."""
    from slimtune.serve.engine import GenRequest

    R = len(prompts)
    sem, done, lock = threading.Semaphore(concurrency), threading.Event(), threading.Lock()
    lat, ttft, ntok, left, errors = [0.0] * R, [None] * R, [0] * R, [R], []

    def emitter(i: int, t0: float):
        def emit(o):
            now = time.perf_counter()
            ttft[i] = ttft[i] if ttft[i] is not None else now - t0
            if o.finish_reason:
                lat[i], ntok[i] = now - t0, o.completion_tokens
                errors.extend([o.error] if o.error else [])
                sem.release()
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()
        return emit
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        sem.acquire()
        engine.submit([GenRequest(p, new, emitter(i, time.perf_counter()),
                                  adapters[i % len(adapters)] if adapters else None, ignore_eos=True)])
    done.wait()
    dt = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    return {"requests": R, "tokens": sum(ntok), "seconds": round(dt, 2), "tokens_per_s": round(sum(ntok) / dt, 1),
            "p50_s": pct(lat, 50), "p99_s": pct(lat, 99), "ttft_p50_s": pct(ttft, 50)}


def run_engine(case: str, model, tok, bank, a, prompts, adapters, emit) -> None:
    """Start an engine over `model` (with `bank`), capture its graphs, warm up, then drive each concurrency."""
    from slimtune.serve.build import ServeOptions, start

    conc = a.concurrency
    opts = ServeOptions(model=case, max_batch=max(conc), max_len=a.prompt_len + a.new, max_queue=2 * max(conc))
    served = start(model, tok, opts, bank)
    eng = served.engine
    t = time.perf_counter()
    runner = eng.runner
    graphs = eng.call(lambda: runner.capture_all(a.prompt_len + a.new, a.prompt_len + 1)).result()
    drive(eng, prompts[:8], adapters, 8, 4)  # warm-up (prefill shapes, allocator)
    setup = round(time.perf_counter() - t, 1)
    for c in conc:
        emit({"case": case, "concurrency": c, **drive(eng, prompts[:c * a.requests_per_client], adapters, c, a.new),
              "graphs": graphs, "setup_s": setup})
    eng.stop()
    served = eng = runner = None  # drop the KV cache and the graphs before the next case
    gc.collect()
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def hf_twin(model, dev):
    """A transformers model on the same weight tensors (no second copy)."""
    import transformers

    hcfg = transformers.AutoConfig.for_model(**{k: v for k, v in model.config.to_hf().items()
                                                if k != "architectures"})
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hcfg, dtype=model.model.embed_tokens.weight.dtype)
    hf.load_state_dict(model.state_dict(), assign=True, strict=False)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hcfg, device=dev)  # its buffer was on meta
    return hf.eval()


def run_static(case: str, gen, a, prompts, dev, emit, names=None) -> None:
    """One static batch of `concurrency` prompts through `gen` (a transformers / PEFT model) per --static-concurrency
    row: every request waits for the whole batch, so its latency is the batch time. No row starts past --budget-s."""
    kw = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    for c in a.static_concurrency:
        if time.perf_counter() - a.t0 > a.budget_s:
            emit({"case": case, "concurrency": c, "skipped": f"past --budget-s {a.budget_s:g}"})
            continue
        ids = torch.tensor(prompts[:c], device=dev)
        extra = {"adapter_names": [names[i % len(names)] for i in range(c)]} if names else {}
        gen.generate(input_ids=ids[:, :8], max_new_tokens=2, **kw, **extra)  # warm-up
        _, dt = timed(lambda ids=ids, extra=extra: gen.generate(input_ids=ids, max_new_tokens=a.new,
                                                                min_new_tokens=a.new, **kw, **extra), dev)
        emit({"case": case, "concurrency": c, "requests": c, "tokens": c * a.new, "seconds": round(dt, 2),
              "tokens_per_s": round(c * a.new / dt, 1), "p50_s": round(dt, 3), "p99_s": round(dt, 3)})


def run_peft(hf, dirs: list[str], names: list[str], a, prompts, dev, emit) -> None:
    """PEFT's mixed-batch generate: the adapters loaded by PEFT onto the transformers model."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(hf, dirs[0], adapter_name=names[0])
    for n, d in zip(names[1:], dirs[1:]):
        pm.load_adapter(d, adapter_name=n)
    run_static(f"peft-mixed-{len(names)}", pm, a, prompts, dev, emit, names)


def table(rows: list[dict]) -> str:
    cases = list(dict.fromkeys(r["case"] for r in rows if "tokens_per_s" in r))
    get = {(r["case"], r["concurrency"]): r for r in rows if "tokens_per_s" in r}  # a later line wins
    if not get:
        return "(no rows)"
    out = ["| concurrency | " + " | ".join(f"{c} tok/s (p50 / p99 s)" for c in cases) + " | mixed / base |",
           "| --- " * (len(cases) + 2) + "|"]
    for conc in sorted({r["concurrency"] for r in rows if "tokens_per_s" in r}):
        cells = [f"{get[c, conc]['tokens_per_s']} ({get[c, conc]['p50_s']} / {get[c, conc]['p99_s']})"
                 if (c, conc) in get else "-" for c in cases]
        base = get.get(("base", conc))
        ratios = [f"{get[c, conc]['tokens_per_s'] / base['tokens_per_s']:.2f}" for c in cases
                  if c.startswith("mixed") and base and (c, conc) in get]
        out.append(f"| {conc} | " + " | ".join(cells) + f" | {', '.join(ratios) or '-'} |")
    return "\n".join(out)


def missed(rows: list[dict], target: float) -> list[str]:
    """The (concurrency, mode) pairs whose mixed-adapter tokens/s fall below `target` x the base's (issue 15: 0.8)."""
    get = {(r["case"], r["concurrency"]): r["tokens_per_s"] for r in rows if "tokens_per_s" in r}
    return [f"{c} at {conc}: {t / get['base', conc]:.3f}" for (c, conc), t in get.items()
            if c.startswith("mixed") and c.endswith("/dense") and ("base", conc) in get
            and t < target * get["base", conc]]


def report(rows: list[dict], target: float) -> int:
    """Print the table and the target's verdict; the exit status: 1 when a dense mixed row misses the target."""
    print(table(rows))
    bad = missed(rows, target)
    print(f"target mixed/base >= {target}: " + ("missed: " + "; ".join(bad) if bad else "met"))
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b")
    ap.add_argument("--model", help="a model folder instead of random weights of --shape")
    ap.add_argument("--concurrency", default="16,64,256", help="requests in flight, for slimtune's engine")
    ap.add_argument("--static-concurrency", help="static batch sizes of transformers / PEFT (default --concurrency)")
    ap.add_argument("--cases", default=",".join(CASES), help="a subset of " + ",".join(CASES))
    ap.add_argument("--tabulate", nargs="+", metavar="FILE", help="print one table of earlier runs' JSON lines "
                                                                  "(a later line of a case and concurrency wins)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--modes", default="dense,gather", help="LoRA modes of case (b)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers and PEFT")
    ap.add_argument("--budget-s", type=float, default=330, help="start no transformers / PEFT row after this long")
    ap.add_argument("--quick", action="store_true", help="a smoke run: concurrency 4,16, 32 + 16 tokens")
    ap.add_argument("--target", type=float, default=0.8, help="exit 1 when mixed-N/dense runs below this x base")
    a = ap.parse_args()
    if a.tabulate:
        rows = [json.loads(line) for f in a.tabulate for line in Path(f).read_text().splitlines()
                if line.startswith("{") and '"case"' in line]
        return report(rows, a.target)
    if a.quick:
        a.concurrency, a.prompt_len, a.new, a.requests_per_client = "4,16", 32, 16, 1
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    a.static_concurrency = [int(c) for c in a.static_concurrency.split(",")] if a.static_concurrency else a.concurrency
    a.cases = a.cases.split(",")
    if set(a.cases) - set(CASES):
        ap.error(f"--cases: unknown {sorted(set(a.cases) - set(CASES))}; choose from {','.join(CASES)}")
    T0 = a.t0 = time.perf_counter()
    from slimtune.models import load_model, load_tokenizer
    from slimtune.models.shapes import build_meta, get_shape
    from slimtune.models.tiny import builtin_tokenizer

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if a.model:
        model, _ = load_model(a.model, dtype=dtype, device=dev)
        tok = load_tokenizer(a.model)
    else:
        cfg = get_shape(a.shape).replace(dtype=str(dtype)[6:])
        model = materialise(build_meta(cfg), dev).to(dtype).eval()
        tok = builtin_tokenizer()  # random weights have no tokenizer; this one decodes any id (unknown ones to "")
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    n_prompts = max(max(a.concurrency) * a.requests_per_client, max(a.static_concurrency))
    prompts = torch.randint(0, V, (n_prompts, a.prompt_len), generator=g).tolist()
    rows: list[dict] = []
    info = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "shape": a.model or a.shape, "prompt_len": a.prompt_len, "new": a.new, "adapters": a.adapters,
            "rank": a.rank}

    def emit(r: dict) -> None:
        rows.append(r)
        print(json.dumps({**r, **info}), flush=True)

    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        run_cases(model, tok, a, prompts, make_adapters(model, Path(tmp), a.adapters, a.rank), dev, emit)
    print(json.dumps({"total_s": round(time.perf_counter() - T0), **info}) + "\n")
    return report(rows, a.target) if dev.type == "cuda" else (print(table(rows)) or 0)  # CPU smoke: no target


def run_cases(model, tok, a, prompts, dirs, dev, emit) -> None:
    """Those of --cases: (a) base, (b) mixed adapters in each LoRA mode, (c) merged; then transformers and PEFT, each
    row while time is left (--budget-s)."""
    from slimtune.models.shapes import build_meta
    from slimtune.peft import load_adapter, merge_and_unload
    from slimtune.peft.targets import replace_module
    from slimtune.serve.lora import AdapterBank, read_lora

    def attempt(case: str, fn) -> None:  # a failing case is reported and the others still run
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            emit({"case": case, "concurrency": 0, "error": f"{type(e).__name__}: {e}"})

    names, cases = [f"a{i}" for i in range(a.adapters)], set(a.cases)
    if "base" in cases:  # (a)
        attempt("base", lambda: run_engine("base", model, tok, None, a, prompts, [], emit))
    skeleton = build_meta(model.config)
    factors = [read_lora(skeleton, d) for d in dirs]
    for mode in a.modes.split(",") if "mixed" in cases else []:  # (b)
        bank = AdapterBank(model, slots=a.adapters, rank=a.rank, mode=mode)
        for n, (f, r) in zip(names, factors):
            bank.add(n, f, r)
        case = f"mixed-{a.adapters}/{mode}"
        attempt(case, lambda case=case, bank=bank: run_engine(case, model, tok, bank, a, prompts, names, emit))
        for path, m in bank.layers.items():  # back to the plain base
            replace_module(model, path, m.base_layer)
    if "merged" in cases:  # (c): one adapter folded into the base weights, then served plainly
        load_adapter(model, dirs[0], "merged")
        merge_and_unload(model)
        attempt("merged", lambda: run_engine("merged", model, tok, None, a, prompts, [], emit))
    if a.no_hf or not cases & {"transformers", "peft"}:
        return
    hf = hf_twin(model, dev)  # merged or not: the same shapes, so the same speed
    if "transformers" in cases:
        attempt("transformers", lambda: run_static("transformers", hf, a, prompts, dev, emit))
    if "peft" in cases:
        attempt(f"peft-mixed-{a.adapters}", lambda: run_peft(hf, dirs, names, a, prompts, dev, emit))

if __name__ == "__main__":
    sys.exit(main())
