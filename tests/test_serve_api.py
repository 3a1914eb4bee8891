"""`slimtune serve` over HTTP, through the `openai` client: models, completions and chat (streaming or not) for the base
and two adapters batched together, equal token for token to `slimtune generate --adapter`; stop strings, seeds, n;
bad requests answered with OpenAI error JSON while the server keeps serving; 200 requests from 16 clients; clients
that leave free their rows."""
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from serve_helpers import make_adapters, reference_ids, serving, wait_until

from slimtune.cli import main
from slimtune.generate import encode_prompts
from slimtune.models.tiny import builtin_tokenizer

PROMPTS = ["hello there", "abc", "The quick brown fox"]
MODELS = ("builtin", "a0", "a1")
TOK = builtin_tokenizer()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    return make_adapters(tmp_path_factory.mktemp("adapters"), ("a0", "a1"))


@pytest.fixture(scope="module")
def srv(adapters):
    with serving(adapters=adapters, max_batch=10, max_len=2048) as s:  # 16 clients queue for 10 rows
        yield s


def ids_of(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def text_of(ids: list[int]) -> str:
    return TOK.decode([t for t in ids if t not in (2, 6)], skip_special_tokens=True)


def test_models_lists_base_and_adapters(srv):
    assert [m.id for m in srv.client().models.list()] == list(MODELS)


def test_mixed_batch_greedy_equals_generate(srv, adapters):
    client, engine = srv.client(), srv.served.engine
    before = engine.status()
    engine.call(lambda: time.sleep(0.3))  # hold the engine so that all nine requests are admitted together
    jobs = [(m, p) for m in MODELS for p in PROMPTS]
    with ThreadPoolExecutor(len(jobs)) as ex:
        res = list(ex.map(lambda j: client.completions.create(model=j[0], prompt=j[1], max_tokens=12, temperature=0,
                                                             extra_body={"return_token_ids": True}), jobs))
    after = engine.status()
    assert after["prefills"] == before["prefills"] + 1 and after["mixed_steps"] > before["mixed_steps"]
    for (m, p), r in zip(jobs, res):
        ref = reference_ids(TOK(p)["input_ids"], 12, adapters.get(m))
        assert ids_of(r.choices[0]) == ref, (m, p)
        assert r.choices[0].text == text_of(ref)
        assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == len(ref)
    assert len({r.choices[0].text for r in res}) > 6  # the adapters really change the outputs


def test_equals_the_generate_cli(srv, adapters, capsys):
    assert main(["generate", "--model", "builtin", "--adapter", adapters["a1"], "--prompt", PROMPTS[2],
                 "--max-new-tokens", "12", "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)["outputs"][0]
    r = srv.client().completions.create(model="a1", prompt=PROMPTS[2], max_tokens=12, temperature=0)
    assert r.choices[0].text == cli


@pytest.mark.parametrize("model", MODELS)
def test_streaming_equals_whole_answer(srv, adapters, model):
    client = srv.client()
    whole = client.completions.create(model=model, prompt="stream me", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=model, prompt="stream me", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason

    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ids = encode_prompts(TOK, ["hi"], chat=True, system="be brief")[0]
    ref = reference_ids(ids, 8, adapters.get(model))
    chat = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0,
                                          extra_body={"return_token_ids": True})
    assert ids_of(chat.choices[0]) == ref and chat.choices[0].message.content == text_of(ref)
    assert chat.usage.prompt_tokens == len(ids)
    parts = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == text_of(ref)
    assert parts[-1].choices == [] and parts[-1].usage.completion_tokens == len(ref)


def test_stop_strings_seed_and_n(srv):
    client = srv.client()
    full = client.completions.create(model="a0", prompt="xyz", max_tokens=20, temperature=0, extra_body={
        "ignore_eos": True}).choices[0].text
    stop = full[4:6]
    r = client.completions.create(model="a0", prompt="xyz", max_tokens=20, temperature=0, stop=[stop, "never"],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="a0", prompt="xyz", max_tokens=20, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text

    def sample(seed, n=1):
        return [c.text for c in client.completions.create(model="a1", prompt="abc", max_tokens=10, temperature=1.0,
                                                          top_p=0.9, seed=seed, n=n).choices]
    assert sample(7) == sample(7) != sample(8)
    three = sample(7, n=3)
    assert three[0] == sample(7)[0] and len(set(three)) == 3


def test_prompt_lists_and_token_ids(srv):
    client = srv.client()
    one = [client.completions.create(model="a0", prompt=p, max_tokens=6, temperature=0).choices[0].text
           for p in ("abc", "xyz")]
    both = client.completions.create(model="a0", prompt=["abc", "xyz"], max_tokens=6, temperature=0)
    assert [c.index for c in both.choices] == [0, 1] and [c.text for c in both.choices] == one
    ids = client.completions.create(model="a0", prompt=TOK("abc")["input_ids"], max_tokens=6, temperature=0)
    assert ids.choices[0].text == one[0] and both.usage.prompt_tokens == 6


def test_stop_token_ids_end_the_text_and_release_what_was_held_back(srv):
    client = srv.client()
    kw = {"model": "a1", "prompt": "hold", "temperature": 0, "max_tokens": 30}
    ids = ids_of(client.completions.create(**kw, extra_body={"return_token_ids": True, "ignore_eos": True}).choices[0])
    k = next(k for k in range(3, 30) if ids[k] not in ids[:k] and not text_of(ids[:k]).endswith("\ufffd"))
    text = text_of(ids[:k])
    # a stop string whose first character ends the text so far is held back, then the stop token ends the text
    r = client.completions.create(**kw, stop=[text[-1] + "\x01\x02"], extra_body={
        "return_token_ids": True, "ignore_eos": True, "stop_token_ids": [ids[k]]})
    assert r.choices[0].text == text and ids_of(r.choices[0]) == ids[:k + 1]
    assert r.choices[0].finish_reason == "stop"


BAD = [  # (route, body (dict or raw bytes), status, code)
    ("completions", b'{"model": "builtin", "prompt": "hi"', 400, "invalid_json"),
    ("completions", b'[1, 2]', 400, "invalid_json"),
    ("completions", {"model": "nope", "prompt": "hi"}, 404, "model_not_found"),
    ("completions", {"prompt": "hi"}, 400, "missing_model"),
    ("completions", {"model": "builtin", "prompt": "x" * 3000}, 400, "context_length_exceeded"),
    ("completions", {"model": "builtin", "prompt": "hi", "max_tokens": 5000}, 400, "context_length_exceeded"),
    ("completions", {"model": "builtin", "prompt": "hi", "max_tokens": 0}, 400, "invalid_value"),
    ("completions", {"model": "builtin", "prompt": "hi", "max_tokens": -3}, 400, "invalid_value"),
    ("completions", {"model": "builtin", "prompt": "hi", "max_tokens": 2.5}, 400, "invalid_value"),
    ("completions", b'{"model": "builtin", "prompt": "hi", "temperature": NaN}', 400, "invalid_value"),
    ("completions", {"model": "builtin", "prompt": "hi", "temperature": "hot"}, 400, "invalid_value"),
    ("completions", {"model": "builtin", "prompt": "hi", "top_p": 0}, 400, "invalid_value"),
    ("completions", {"model": "builtin", "prompt": "hi", "n": 0}, 400, "invalid_value"),
    ("completions", {"model": "builtin", "prompt": "hi", "stop": [""]}, 400, "invalid_value"),
    ("completions", {"model": "builtin", "prompt": "hi", "presence_penalty": 0.5}, 400, "unsupported_parameter"),
    ("completions", {"model": "builtin", "prompt": []}, 400, "invalid_value"),
    ("completions", {"model": "builtin", "prompt": [99999]}, 400, "invalid_value"),
    ("completions", {"model": "builtin", "prompt": "hi", "stop_token_ids": [-1]}, 400, "invalid_value"),
    ("completions", {"model": "builtin"}, 400, "invalid_value"),
    ("chat/completions", {"model": "a0", "messages": []}, 400, "invalid_value"),
    ("chat/completions", {"model": "a0", "messages": [{"role": "wizard", "content": "x"}]}, 400, "invalid_value"),
    ("chat/completions", {"model": "a0", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "invalid_value"),
]


@pytest.mark.parametrize("route,body,status,code", BAD)
def test_bad_requests_get_openai_errors(srv, route, body, status, code):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{srv.url}/v1/{route}", headers={"Content-Type": "application/json"}, timeout=10, **kw)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    ok = srv.client().completions.create(model="builtin", prompt="still there?", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_unknown_routes_and_client_errors(srv):
    assert httpx.get(f"{srv.url}/v1/nothing").json()["error"]["code"] == "not_found"
    r = httpx.get(f"{srv.url}/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        srv.client().chat.completions.create(model="a9", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        srv.client().completions.create(model="a0", prompt="x", temperature=3.0)


def test_200_requests_from_16_clients(srv):
    client = srv.client()

    def one(i):
        kw = {"model": MODELS[i % 3], "prompt": f"request {i}", "max_tokens": 4, "temperature": 0.8, "seed": i}
        if i % 4 == 0:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw)), None
        r = client.completions.create(**kw)
        return r.choices[0].text, r
    t0 = time.time()
    with ThreadPoolExecutor(16) as ex:
        res = list(ex.map(one, range(200)))
    assert len(res) == 200 and time.time() - t0 < 60
    for _, r in res:
        if r is not None:
            assert r.choices[0].finish_reason in ("stop", "length") and 1 <= r.usage.completion_tokens <= 4
    st = srv.served.engine.status()
    assert st["running"] == 0 and st["free_pages"] == st["total_pages"] and st["max_rows"] > 1


def test_client_that_leaves_frees_its_row(srv):
    engine = srv.served.engine
    before = engine.status()["aborted"]
    body = {"model": "a1", "prompt": "long", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=10) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert engine.status()["running"] == 1

    def idle():
        st = engine.status()
        return st["running"] == 0 and st["free_pages"] == st["total_pages"]
    assert wait_until(idle) and engine.status()["aborted"] == before + 1
    with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
        httpx.post(f"{srv.url}/v1/completions", json={**body, "stream": False}, timeout=0.5)
    assert wait_until(idle) and engine.status()["aborted"] == before + 2
