"""`slimtune serve` with adapters loaded and unloaded while a request runs, on an NF4 base, merged (`--merge`, also
into an NF4 base), a full server answering 503, an API key, and the real command line."""
import json
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_helpers import free_port, make_adapters, reference_ids, server_process, serving

from slimtune.cli import main
from slimtune.models.decoder import Decoder, init_weights
from slimtune.models.tiny import builtin_config, builtin_model, builtin_tokenizer
from slimtune.peft import apply_method, save_adapter

TOK = builtin_tokenizer()


def greedy_ids(client, model: str, prompt: str, n: int, **extra) -> list[int]:
    r = client.completions.create(model=model, prompt=prompt, max_tokens=n, temperature=0,
                                  extra_body={"return_token_ids": True, **extra})
    return r.choices[0].model_extra["token_ids"]


def stray_adapters(folder):
    """A DoRA adapter of the tiny model and a LoRA adapter of a narrower model: both refused."""
    dora = builtin_model(0)
    apply_method(dora, {"method": "lora", "r": 4, "use_dora": True, "target_modules": ["q_proj"]}, "d")
    narrow = init_weights(Decoder(builtin_config().replace(hidden_size=128, intermediate_size=256)), 0)
    apply_method(narrow, {"method": "lora", "r": 4, "target_modules": ["q_proj"]}, "n")
    return str(save_adapter(dora, folder / "dora", "d")), str(save_adapter(narrow, folder / "narrow", "n"))


def test_load_and_unload_while_serving(tmp_path):
    ads = make_adapters(tmp_path)  # a0 r=4; a1 r=8 (the bank grows); a2 r=16 on layers nobody adapted yet
    prompt = TOK("running")["input_ids"]
    with serving(adapters={"a0": ads["a0"]}, max_batch=4, max_len=512) as srv:
        url, client = srv.url, srv.client()
        body = {"model": "a0", "prompt": prompt, "max_tokens": 300, "temperature": 0, "stream": True,
                "return_token_ids": True, "ignore_eos": True}
        got = []
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            got += json.loads(next(lines)[6:])["choices"][0]["token_ids"]
            for name in ("a1", "a2"):  # loaded while the a0 request decodes
                assert httpx.post(f"{url}/v1/adapters", json={"name": name, "path": ads[name]}).status_code == 200
            for line in lines:
                if line.startswith("data: {"):
                    got += json.loads(line[6:])["choices"][0]["token_ids"]
        assert got == reference_ids(prompt, 300, ads["a0"], ignore_eos=True)
        assert [m.id for m in client.models.list()] == ["builtin", "a0", "a1", "a2"]
        for name in ("a1", "a2"):
            assert greedy_ids(client, name, "abc", 10) == reference_ids(TOK("abc")["input_ids"], 10, ads[name])

        assert httpx.delete(f"{url}/v1/adapters/a1").json()["deleted"] is True
        with pytest.raises(openai.NotFoundError):
            greedy_ids(client, "a1", "abc", 3)
        assert httpx.post(f"{url}/v1/adapters", json={"name": "again", "path": ads["a1"]}).status_code == 200
        for name, folder in (("again", ads["a1"]), ("a0", ads["a0"]), ("a2", ads["a2"])):
            assert greedy_ids(client, name, "xyz", 8) == reference_ids(TOK("xyz")["input_ids"], 8, folder)

        dora, narrow = stray_adapters(tmp_path)
        for body, status in [({"name": "x"}, 400), ({"name": "x", "path": str(tmp_path / "missing")}, 400),
                             ({"name": "a0", "path": ads["a1"]}, 409), ({"name": "builtin", "path": ads["a1"]}, 400),
                             ({"name": "bad/name", "path": ads["a1"]}, 400), ({"name": "d", "path": dora}, 400),
                             ({"name": "n", "path": narrow}, 400)]:
            r = httpx.post(f"{url}/v1/adapters", json=body)
            assert r.status_code == status and r.json()["error"]["message"], body
        assert httpx.delete(f"{url}/v1/adapters/nope").status_code == 404
        assert greedy_ids(client, "a0", "xyz", 8) == reference_ids(TOK("xyz")["input_ids"], 8, ads["a0"])


def test_nf4_base_with_adapters(tmp_path):
    from slimtune.quant.linear import QuantLinear
    from slimtune.serve.lora import MultiLoraLinear

    ads = make_adapters(tmp_path, ("a0", "a1"))
    with serving(adapters=ads, quantize="nf4", max_batch=4, max_len=256) as srv:
        q = srv.served.engine.model.model.layers[0].self_attn.q_proj
        assert isinstance(q, MultiLoraLinear) and isinstance(q.base_layer, QuantLinear)
        client = srv.client()
        with ThreadPoolExecutor(3) as ex:
            got = list(ex.map(lambda m: greedy_ids(client, m, "quantized", 10), ["builtin", "a0", "a1"]))
        for m, ids in zip(["builtin", "a0", "a1"], got):
            assert ids == reference_ids(TOK("quantized")["input_ids"], 10, ads.get(m), quantize="nf4"), m


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merged_adapter(tmp_path, quantize):
    ads = make_adapters(tmp_path, ("a1",))
    with serving(adapters=ads, merge="a1", quantize=quantize, max_len=256) as srv:
        client = srv.client()
        assert [m.id for m in client.models.list()] == ["a1"]
        assert greedy_ids(client, "a1", "merged", 10) == reference_ids(TOK("merged")["input_ids"], 10, ads["a1"],
                                                                       quantize=quantize, merge=True)
        r = httpx.post(f"{srv.url}/v1/adapters", json={"name": "x", "path": ads["a1"]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "adapters_disabled"


def test_full_server_answers_503_then_recovers():
    with serving(max_batch=1, max_queue=1, max_len=512) as srv:
        body = {"model": "builtin", "prompt": "x", "max_tokens": 200, "ignore_eos": True}
        with ThreadPoolExecutor(6) as ex:
            res = list(ex.map(lambda _: httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60), range(6)))
        codes = [r.status_code for r in res]
        assert 200 in codes and 503 in codes, codes
        full = next(r for r in res if r.status_code == 503)
        assert full.json()["error"]["code"] == "server_overloaded" and full.headers["retry-after"]
        assert greedy_ids(srv.client(), "builtin", "ok", 2)


def test_api_key():
    with serving(api_key="sekret", max_len=128) as srv:
        with pytest.raises(openai.AuthenticationError):
            srv.client().models.list()
        assert [m.id for m in srv.client(api_key="sekret").models.list()] == ["builtin"]
        assert httpx.get(f"{srv.url}/health").json() == {"status": "ok"}


def test_command_line_errors(tmp_path, capsys):
    ads = make_adapters(tmp_path, ("a0",))
    for argv in (["--adapter", "noequals"], ["--adapter", f"a={tmp_path}/missing"], ["--merge", "a0"],
                 ["--adapter", f"a0={ads['a0']}", "--adapter", f"a0={ads['a0']}"],
                 ["--adapter", f"a0={ads['a0']}", "--max-batch", "0"]):
        assert main(["serve", "--model", "builtin", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("slimtune serve: error:") and "\n" not in err


def test_the_real_command(tmp_path):
    ads = make_adapters(tmp_path, ("a0",))
    port = free_port()
    with server_process([sys.executable, "-m", "slimtune", "serve", "--model", "builtin", "--adapter",
                         f"a0={ads['a0']}", "--port", str(port), "--max-len", "256", "--log-level", "warning"],
                        port) as proc:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        chat = client.chat.completions.create(model="a0", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                              temperature=0)
        assert chat.choices[0].finish_reason in ("stop", "length") and chat.usage.completion_tokens >= 1
    assert proc.returncode in (0, -signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal it caught
