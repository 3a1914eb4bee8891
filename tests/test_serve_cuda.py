"""On a GPU only: the server with CUDA graphs (decode steps padded to buckets, captured while HTTP threads run) gives
the same greedy tokens as `generate` on the same device, for the base and two adapters in one batch, on a 16-bit and
on an NF4 base."""
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("uvicorn", reason="the server needs the serve extra (starlette, uvicorn)")
from serve_helpers import make_adapters, reference_ids, serving  # noqa: E402

from slimtune.models.tiny import builtin_tokenizer  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOK = builtin_tokenizer()


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_cuda_graph_decoding_equals_generate(tmp_path, quantize):
    ads = make_adapters(tmp_path, ("a0", "a1"))
    with serving(adapters=ads, quantize=quantize, device="cuda", max_batch=8, max_len=128) as srv:
        engine, client = srv.served.engine, srv.client()
        assert engine.runner.cuda_graphs
        engine.call(lambda: time.sleep(0.3))  # all six requests start together
        jobs = [(m, p) for m in ("builtin", "a0", "a1") for p in ("abc", "hello there")]
        with ThreadPoolExecutor(len(jobs)) as ex:
            res = list(ex.map(lambda j: client.completions.create(
                model=j[0], prompt=j[1], max_tokens=16, temperature=0, extra_body={"return_token_ids": True}), jobs))
        assert engine.runner.graphs and engine.status()["mixed_steps"] > 0
        for (m, p), r in zip(jobs, res):
            ref = reference_ids(TOK(p)["input_ids"], 16, ads.get(m), quantize=quantize, device="cuda")
            assert r.choices[0].model_extra["token_ids"] == ref, (m, p)
