"""The serving pieces against references: per-row sampling filters against `process_logits` and the hashed Gumbel
sampler against softmax frequencies; the gathered multi-adapter LoRA against a per-row float64 loop and against
`LoraLinear`; the adapter bank's slots; incremental detokenization against a whole decode; the engine on a scrambled
paged cache with CUDA-graph-style padding against `generate`; a failing step that does not stop the engine."""
import random
import threading

import pytest
import torch
from serve_helpers import make_adapters, reference_ids

from slimtune.errors import ConfigError
from slimtune.models.load import load_model
from slimtune.generate import SamplingConfig, generate, process_logits
from slimtune.models.tiny import builtin_model, builtin_tokenizer
from slimtune.peft import apply_method, load_adapter, save_adapter
from slimtune.peft.lora import LoraLinear
from slimtune.serve.build import ServeOptions, build
from slimtune.serve.detok import TextStream
from slimtune.serve.engine import GenRequest
from slimtune.serve.lora import AdapterBank, LoraContext, MultiLoraLinear, lora_gather, lora_grouped, read_lora
from slimtune.serve.runner import bucket
from slimtune.serve.sampling import RowSampling, filter_logits, hashed_uniform, sample

TOK = builtin_tokenizer()


def test_filters_match_process_logits():
    logits = torch.randn(6, 50) * 3
    t = torch.tensor([0.7, 1.0, 1.3, 0.5, 2.0, 1.0])
    k = torch.tensor([0, 5, 10, 0, 1, 50])
    p = torch.tensor([0.8, 1.0, 0.5, 1.0, 0.9, 0.3])
    ours = filter_logits(logits, t, k, p)
    for i in range(6):
        sc = SamplingConfig(temperature=float(t[i]), top_k=int(k[i]), top_p=float(p[i]))
        ref = process_logits(logits[i:i + 1], torch.zeros(1, 1, dtype=torch.long), sc)[0]
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref)), i
        assert torch.allclose(ours[i][torch.isfinite(ref)], ref[torch.isfinite(ref)], atol=1e-6)


def test_hashed_gumbel_sampling_follows_softmax():
    V, N = 6, 40000
    logits = torch.randn(1, V) * 1.5
    seed = random.getrandbits(63)
    u = hashed_uniform(torch.full((N,), seed), torch.arange(N), V)  # one row's draws over N steps
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    draws = (logits - torch.log(-torch.log(u))).argmax(-1)
    freq = torch.bincount(draws, minlength=V) / N
    assert (freq - logits.softmax(-1)[0]).abs().max() < 0.012
    # `sample` picks the same token for a row whatever the other rows of the batch are
    rows = [RowSampling(1.0, 1.0, 0, seed), RowSampling(0.0), RowSampling(0.8, 0.9, 3, 5)]
    x = torch.randn(3, 40)
    alone = sample(x[:1], rows[:1], [7])
    assert sample(x, rows, [7, 0, 2])[0] == alone[0] and sample(x, rows, [7, 0, 2])[1] == x[1].argmax()


def test_gathered_lora_matches_a_per_row_loop():
    S, r, d_in, d_out, N, T = 4, 5, 12, 9, 7, 3
    A, B = torch.randn(S, r, d_in), torch.randn(S, r, d_out)
    A[0], B[0] = 0, 0  # slot 0: the base
    A[2, 3:], B[2, 3:] = 0, 0  # a rank-3 adapter padded to 5
    ids = torch.tensor([0, 1, 2, 3, 2, 1, 0])
    x, y = torch.randn(N, T, d_in), torch.randn(N, T, d_out)
    ref = torch.stack([y[n].double() + x[n].double() @ A[ids[n]].double().T @ B[ids[n]].double() for n in range(N)])
    ctx = LoraContext(S, r)
    ctx.begin(ids)
    dense = lora_grouped(x, ctx.other(), A.reshape(S * r, d_in), [B], [y])[0]  # one projection
    assert torch.allclose(dense.double(), ref, atol=1e-5)
    assert torch.allclose(lora_gather(x, ids, A, B, y).double(), ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["dense", "gather"])
def test_multi_lora_linear_equals_lora_linear_per_row(mode):
    base = torch.nn.Linear(16, 24)
    lora = LoraLinear(base)
    for name, rank in (("x", 3), ("y", 6)):
        lora.add(name, rank, alpha=2 * rank, init=False)
    ctx = LoraContext(3, 6, mode)
    multi = MultiLoraLinear(base, ctx, torch.float32, torch.device("cpu"))
    for slot, name in ((1, "x"), (2, "y")):
        multi.set_slot(slot, lora.lora_A[name].weight, lora.lora_B[name].weight, lora.scaling[name])
    ids = torch.tensor([0, 1, 2, 1, 2])
    x = torch.randn(5, 4, 16)
    ctx.begin(ids)
    y = multi(x)
    for i, slot in enumerate(ids.tolist()):
        lora.active = [[], ["x"], ["y"]][slot]
        assert torch.allclose(y[i], lora(x[i:i + 1])[0], atol=1e-5)


def test_bank_grows_reuses_and_retires_slots(tmp_path):
    ads = make_adapters(tmp_path)
    model = builtin_model(0).eval()
    skeleton = builtin_model(0)
    bank = AdapterBank(model, slots=1, rank=2)
    read = {n: read_lora(skeleton, f) for n, f in ads.items()}
    assert bank.add("a0", *read["a0"])  # rank 4 > 2 and new layers: shapes change
    assert bank.add("a1", *read["a1"]) and bank.ctx.slots == 4 and bank.ctx.rank == 8  # no free slot: doubled
    q = model.model.layers[1].self_attn.q_proj
    A0, B0, s0 = read["a0"][0]["model.layers.1.self_attn.q_proj"]
    assert torch.equal(q.A[1, :4], A0) and not q.A[1, 4:].any()  # survived the growth, padded with zeros
    assert torch.allclose(q.B[1, :4], (B0.double().T * s0).float())
    slot = bank.acquire("a0")
    bank.remove("a0")
    assert "a0" not in bank.names and q.A[slot].any()  # a running request keeps its factors
    assert not bank.add("again", *read["a0"]) and bank.names["again"] != slot  # a free slot, same shapes
    bank.release(slot)
    assert not q.A[slot].any()
    with pytest.raises(Exception, match="unloaded"):
        bank.acquire("a0")


def test_text_stream_equals_a_whole_decode():
    text = "héllo wörld ✓ 日本語 and more"
    ids = TOK(text)["input_ids"]
    ts = TextStream(TOK, [])
    pieces = [ts.add(t)[0] for t in ids] + [ts.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    ts = TextStream(TOK, ["✓ 日", "zzz"])
    out, hit = "", False
    for t in ids:
        piece, hit = ts.add(t)
        out += piece
        assert text.startswith(out) and "✓" not in out  # never hands out the start of a stop string
        if hit:
            break
    assert hit and out == text[:text.index("✓ 日")]


def test_engine_on_scrambled_pages_with_padding_equals_generate(tmp_path):
    ads = make_adapters(tmp_path, ("a0", "a1"))
    served = build(ServeOptions("builtin", adapters=ads, max_batch=5, max_len=128, page_size=4))
    engine = served.engine
    free = engine.cache.pool._free
    while free == sorted(free, reverse=True):
        random.shuffle(free)  # pages handed out in no particular order
    engine.runner.buckets = True  # pad rows and lengths to buckets as CUDA graphs do
    jobs = [(m, p) for m in (None, "a0", "a1") for p in ("a", "hello there", "The quick brown fox jumps")]
    outs = {i: [] for i in range(len(jobs))}
    done = threading.Semaphore(0)

    def emit(i):
        def f(o):
            outs[i].append(o)
            if o.finish_reason:
                done.release()
        return f
    engine.submit([GenRequest(TOK(p)["input_ids"], 20, emit(i), m) for i, (m, p) in enumerate(jobs)])
    for _ in jobs:
        assert done.acquire(timeout=30)
    for i, (m, p) in enumerate(jobs):
        got = [t for o in outs[i] for t in o.token_ids]
        assert got == reference_ids(TOK(p)["input_ids"], 20, ads.get(m)), (m, p)
    st = engine.status()
    assert st["running"] == 0 and st["free_pages"] == st["total_pages"] and st["max_rows"] == 5
    engine.stop()


def test_each_architecture_with_an_adapter_equals_generate(hf_folder):
    """Llama 2 / 3, Mistral (sliding window 8, shorter than the sequences), Qwen2 (biases), Qwen3 (q/k norms),
    Gemma 2 / 3 (sliding and global layers, soft-capping), Phi-3 (fused projections)."""
    arch, folder, _ = hf_folder
    TOK.save_pretrained(folder)
    model, _ = load_model(folder)
    apply_method(model, {"method": "lora", "r": 4, "target_modules": "all-linear", "init_lora_weights": False}, "x")
    adapter = str(save_adapter(model, folder / "x", "x"))
    if arch == "phi3_longrope":  # its original length is 12: refused beyond, in one line
        with pytest.raises(ConfigError, match="--max-len 12"):
            build(ServeOptions(str(folder), adapters={"x": adapter}, max_batch=4, max_len=64, page_size=4))
        return
    served = build(ServeOptions(str(folder), adapters={"x": adapter}, max_batch=4, max_len=64, page_size=4))
    prompts = torch.randint(3, 264, (2, 12)).tolist()
    outs, done = [[] for _ in range(4)], threading.Semaphore(0)
    reqs = [GenRequest(p, 16, lambda o, i=2 * j + a: (outs[i].extend(o.token_ids), o.finish_reason and done.release()),
                       ad, ignore_eos=True) for j, p in enumerate(prompts) for a, ad in enumerate([None, "x"])]
    served.engine.submit(reqs)
    for _ in reqs:
        assert done.acquire(timeout=30)
    served.engine.stop()
    for j, p in enumerate(prompts):
        for a, with_adapter in enumerate([False, True]):
            ref, _ = load_model(folder)
            if with_adapter:
                load_adapter(ref, adapter)
            sc = SamplingConfig(max_new_tokens=16, stop_token_ids=[])
            assert outs[2 * j + a] == generate(ref, torch.tensor([p]), sc=sc)[0].tolist(), (arch, j, a)


def test_a_failing_step_fails_its_requests_not_the_engine(monkeypatch):
    served = build(ServeOptions("builtin", max_batch=2, max_len=64))
    engine = served.engine
    real = engine.runner.decode
    calls = []

    def flaky(*a):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated out of memory")
        return real(*a)
    monkeypatch.setattr(engine.runner, "decode", flaky)
    results = []
    for _ in range(2):
        got = threading.Event()
        engine.submit([GenRequest(TOK("x")["input_ids"], 5, lambda o, got=got: (
            results.append(o), o.finish_reason and got.set()), ignore_eos=True)])
        assert got.wait(30)
    assert results[-1].finish_reason == "length" and any(o.finish_reason == "error" for o in results)
    st = engine.status()
    assert st["errors"] == 1 and st["free_pages"] == st["total_pages"]
    engine.stop()


def test_a_request_whose_adapter_was_unloaded_while_it_waited_gets_404(tmp_path):
    ads = make_adapters(tmp_path, ("a0",))
    engine = build(ServeOptions("builtin", adapters=ads, max_len=64)).engine
    got = threading.Event()
    outs = []
    queued = threading.Event()
    unload = engine.call(lambda: (queued.wait(10), engine.bank.remove("a0")))  # after the request is queued
    engine.submit([GenRequest(TOK("x")["input_ids"], 4, lambda o: (outs.append(o), got.set()), "a0")])
    queued.set()
    unload.result(10)
    assert got.wait(10) and outs[0].finish_reason == "error" and outs[0].status == 404
    engine.stop()


def test_buckets():
    assert [bucket(n, 100) for n in (1, 2, 3, 4, 5, 7, 9, 13, 17, 33)] == [1, 2, 3, 4, 6, 8, 12, 16, 24, 48]
    assert bucket(300, 256) == 256


def test_dynamic_ntk_models_serve_without_cuda_graphs():
    """Dynamic NTK RoPE picks its frequencies from the longest position, a value read on the host, which a CUDA graph
    cannot capture: `--cuda-graphs on` is refused in one line, `auto` serves without graphs."""
    from slimtune.models.rope import host_read
    from slimtune.serve.build import ServeOptions, start

    model, tok = builtin_model(0), builtin_tokenizer()
    assert not host_read(model.config)
    model.config.rope_scaling = {"rope_type": "dynamic", "factor": 2.0}
    model.reset_rope()
    assert host_read(model.config)
    with pytest.raises(ConfigError, match="--cuda-graphs on: this model's dynamic NTK RoPE"):
        start(model, tok, ServeOptions("builtin", max_batch=2, max_len=64, cuda_graphs="on"), None)
    served = start(model, tok, ServeOptions("builtin", max_batch=2, max_len=64, cuda_graphs="auto"), None)
    try:
        assert served.engine.runner.cuda_graphs is False
    finally:
        served.engine.stop()
