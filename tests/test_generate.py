"""Generation: logit processors against transformers', the static (CUDA-graph) cache path, stop strings, streaming."""
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

import slimtune.generate as G
from slimtune.generate import SamplingConfig, generate, generate_text, process_logits
from slimtune.models.tiny import builtin_model, builtin_tokenizer


def test_processors_match_transformers():
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    seen = torch.randint(0, 50, (3, 7))
    sc = SamplingConfig(temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(seen, logits.clone())
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        ref = w(seen, ref)
    ours = process_logits(logits, seen, sc)
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(ours[fin], ref[fin], atol=1e-6)


class EagerStep:
    """GraphStep's calls run eagerly: the static-cache path that CUDA graphs replay, checkable on the CPU."""

    def __init__(self, model, cache):
        self.model, self.cache = model, cache

    def __call__(self, tok, pos, mask, slot):
        self.cache.static = True
        self.cache.index.fill_(slot)
        out = self.model(tok[:, None], attention_mask=mask, position_ids=pos[:, None], cache=self.cache)[:, -1]
        self.cache.static = False
        return out


def test_static_cache_path_equals_dynamic(monkeypatch):
    m = builtin_model(2).eval()
    ids = torch.randint(8, 264, (2, 9))
    am = torch.ones_like(ids)
    am[1, :4] = 0
    sc = SamplingConfig(max_new_tokens=20, stop_token_ids=[])
    ref = generate(m, ids, am, sc, cuda_graph=False)
    monkeypatch.setattr(G, "GraphStep", EagerStep)
    assert torch.equal(generate(m, ids, am, sc, cuda_graph=True), ref)


def test_stop_strings_and_streaming():
    m, tok = builtin_model(0).eval(), builtin_tokenizer()
    full = generate_text(m, tok, ["abc"], SamplingConfig(max_new_tokens=30, stop_token_ids=[]))["outputs"][0]
    stop = full[5:8]
    pieces = []
    res = generate_text(m, tok, ["abc"], SamplingConfig(max_new_tokens=30, stop_token_ids=[], stop_strings=[stop]),
                        stream=pieces.append)
    assert res["outputs"][0] == full[:full.index(stop)]
    assert "".join(pieces) == res["outputs"][0]


def test_sampling_is_seeded():
    m, tok = builtin_model(0).eval(), builtin_tokenizer()
    sc = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=7, stop_token_ids=[])
    a = generate_text(m, tok, ["x", "yz"], sc)["outputs"]
    assert a == generate_text(m, tok, ["x", "yz"], sc)["outputs"]
