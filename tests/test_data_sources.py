"""Data users have (issue 17): folders of Parquet shards, `datasets` save_to_disk folders, hub ids (offline: one
line), the tool role and tool_calls, list-of-parts content, TRL's prompt / completion columns. Each gives the same
token ids and label masks as the equivalent plain records, and trains."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from slimtune.data import (IGNORE_INDEX, DataConfig, build_datasets, read_records)
from slimtune.data.templates import tool_call_text
from slimtune.errors import DataError
from slimtune.models.tiny import builtin_tokenizer

WORDS = ["alpha", "beta", "gamma", "délta", "日本", "x{y}", "ok", "42"]
# a chat template that writes tool calls (as Qwen2.5's does, shortened): the call JSON after the content
TOOL_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + (m['content'] or '') }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}{{ '<tool_call>' + c.function.name + ' ' + "
    "(c.function.arguments | tojson) + '</tool_call>' }}{% endfor %}{% endif %}{{ '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")


def words(rng, lo=1, hi=6):
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi)))


def chats(n, seed=0):
    rng = random.Random(seed)
    return [{"messages": [{"role": "system", "content": words(rng)}, {"role": "user", "content": words(rng)},
                          {"role": "assistant", "content": words(rng)}]} for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


@pytest.fixture(scope="module")
def chatml_tok():
    t = builtin_tokenizer()
    t.chat_template = None
    return t


def tokens(records, tokenizer, tmp_path, fmt="auto", template="auto", name="d.jsonl"):
    """(input_ids, labels) of every record, through the whole pipeline (no packing)."""
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records))
    return tokens_of(p, tokenizer, fmt, template)


def tokens_of(path, tokenizer, fmt="auto", template="auto"):
    train, _, summary = build_datasets(DataConfig(path=str(path), format=fmt, template=template, pack=False,
                                                  max_length=512), tokenizer)
    t = train.tokenized
    return [x.tolist() for x in t.input_ids], [x.tolist() for x in t.labels], summary


# ---- sources --------------------------------------------------------------------------------------------------------
def test_folder_of_parquet_shards(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = chats(23, seed=1)
    shards = tmp_path / "ds" / "data"
    shards.mkdir(parents=True)
    for i, (a, b) in enumerate([(0, 8), (8, 15), (15, 23)]):  # the hub's layout: data/train-0000i-of-00003.parquet
        pq.write_table(pa.Table.from_pylist(recs[a:b]), shards / f"train-{i:05d}-of-00003.parquet")
    (shards / ".cache.parquet").write_bytes(b"not parquet")  # hidden files are skipped
    got = read_records(tmp_path / "ds")
    assert [r.data for r in got] == recs
    assert got[9].where() == f"{shards / 'train-00001-of-00003.parquet'} record 1"
    assert tokens_of(tmp_path / "ds", tok)[:2] == tokens(recs, tok, tmp_path)[:2]


def test_datasets_save_to_disk_folder(tmp_path, tok):
    import datasets

    recs = chats(17, seed=2)
    ds = datasets.Dataset.from_list(recs)
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    ds.shuffle(seed=3).select(range(5)).save_to_disk(str(tmp_path / "subset"))  # indices are flattened on save
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dict"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "no_train"))
    assert [r.data for r in read_records(tmp_path / "saved")] == recs
    assert [r.data for r in read_records(tmp_path / "subset")] == ds.shuffle(seed=3).select(range(5)).to_list()
    assert [r.data for r in read_records(tmp_path / "dict")] == recs
    assert tokens_of(tmp_path / "saved", tok)[:2] == tokens(recs, tok, tmp_path)[:2]
    with pytest.raises(DataError) as e:
        read_records(tmp_path / "no_train")
    assert "without a 'train' split (splits: test)" in str(e.value) and "\n" not in str(e.value)


def test_hub_id_offline_is_one_line(tmp_path):
    code = ("from slimtune.data import read_records\nfrom slimtune.errors import DataError\n"
            "try:\n    read_records('slimtune-tests/no-such-dataset:train')\nexcept DataError as e:\n    print(e)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "slimtune-tests/no-such-dataset:train: not a local data file or folder" in lines[0]
    assert "hub" in lines[0] and "fix:" in lines[0]


# ---- content parts, tools -------------------------------------------------------------------------------------------
def test_list_of_parts_content_equals_strings(tmp_path, tok):
    recs = chats(6, seed=4)
    parts = json.loads(json.dumps(recs))
    for r in parts:
        for m in r["messages"]:
            a, _, b = m["content"].partition(" ")
            m["content"] = [{"type": "text", "text": a}] + ([{"type": "text", "text": b}] if b else [])
    plain = json.loads(json.dumps(recs))
    for r in plain:
        for m in r["messages"]:
            m["content"] = m["content"].replace(" ", "\n", 1)  # parts are joined with a newline
    assert tokens(parts, tok, tmp_path)[:2] == tokens(plain, tok, tmp_path)[:2]
    bad = [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]},
                         {"role": "assistant", "content": "y"}]}]
    with pytest.raises(DataError) as e:
        tokens(bad, tok, tmp_path)
    assert "messages[0].content is a list of image_url" in str(e.value)


def tool_chat(rng):
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": words(rng, 1, 2)}}}
    return {"messages": [{"role": "user", "content": words(rng)},
                         {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "name": "get_weather", "content": words(rng)},
                         {"role": "assistant", "content": words(rng)}]}


def test_tool_calls_with_chatml_equal_plain_answers(tmp_path, chatml_tok):
    rng = random.Random(5)
    recs = [tool_chat(rng) for _ in range(5)]
    plain = json.loads(json.dumps(recs))
    for r in plain:  # the same turns written as text: the call as ChatML models write it; the result turn as is
        m = r["messages"][1]
        m["content"] = tool_call_text(m.pop("tool_calls"))
    ids, labels, _ = tokens(recs, chatml_tok, tmp_path)
    assert (ids, labels) == tokens(plain, chatml_tok, tmp_path)[:2]
    for r, i, lab in zip(recs, ids, labels):
        text = chatml_tok.decode([t for t, x in zip(i, lab) if x != IGNORE_INDEX])
        assert '"name": "get_weather"' in text and r["messages"][2]["content"] not in text  # call trained, result not
        assert "<|im_start|>tool\n" + r["messages"][2]["content"] in chatml_tok.decode(i)


def test_tool_role_and_calls_with_the_tokenizer_template(tmp_path, tok):
    rng = random.Random(6)
    recs = [tool_chat(rng) for _ in range(5)]
    with pytest.raises(DataError) as e:  # the built-in template ignores tool_calls: refused, not silently dropped
        tokens(recs, tok, tmp_path)
    assert "does not write tool_calls" in str(e.value) and "\n" not in str(e.value)
    t = builtin_tokenizer()
    t.chat_template = TOOL_TEMPLATE
    plain = json.loads(json.dumps(recs))
    for r in plain:
        m = r["messages"][1]
        c = m.pop("tool_calls")[0]["function"]
        m["content"] = f"<tool_call>{c['name']} {json.dumps(c['arguments'], ensure_ascii=False)}</tool_call>"
        del r["messages"][2]["name"]
    ids, labels, _ = tokens(recs, t, tmp_path)
    assert (ids, labels) == tokens(plain, t, tmp_path)[:2]
    trained = t.decode([x for x, lab in zip(ids[0], labels[0]) if lab != IGNORE_INDEX])
    assert trained.startswith("<tool_call>get_weather") and recs[0]["messages"][2]["content"] not in trained


# ---- TRL prompt / completion ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tokenizer", "chatml"])
def test_conversational_prompt_completion_equals_messages(tmp_path, tok, chatml_tok, which):
    tokenizer = tok if which == "tokenizer" else chatml_tok
    rng = random.Random(7)
    msgs = [[{"role": "user", "content": words(rng)}, {"role": "assistant", "content": "earlier " + words(rng)},
             {"role": "user", "content": words(rng)}, {"role": "assistant", "content": "final " + words(rng)}]
            for _ in range(6)]
    single = [{"prompt": m[:1], "completion": m[1:2]} for m in msgs]
    assert tokens(single, tokenizer, tmp_path)[:2] == tokens([{"messages": m[:2]} for m in msgs], tokenizer,
                                                             tmp_path)[:2]
    ids, labels, summary = tokens([{"prompt": m[:3], "completion": m[3:]} for m in msgs], tokenizer, tmp_path)
    assert summary["format"] == "prompt_completion"
    ref_ids, ref_labels, _ = tokens([{"messages": m} for m in msgs], tokenizer, tmp_path)
    assert ids == ref_ids
    for m, lab, ref in zip(msgs, labels, ref_labels):  # the prompt's answer is context; the completion's trained
        kept = tokenizer.decode([x for x in lab if x != IGNORE_INDEX])
        assert m[3]["content"] in kept and m[1]["content"] not in kept
        assert sum(x != IGNORE_INDEX for x in lab) < sum(x != IGNORE_INDEX for x in ref)
        assert lab[-len(tokenizer(m[3]["content"], add_special_tokens=False)["input_ids"]) - 2:] == \
            ref[-len(tokenizer(m[3]["content"], add_special_tokens=False)["input_ids"]) - 2:]


def test_standard_prompt_completion_masks_the_prompt(tmp_path, tok):
    rng = random.Random(8)
    pairs = [(words(rng) + " ", words(rng)) for _ in range(7)]
    ids, labels, summary = tokens([{"prompt": p, "completion": c} for p, c in pairs], tok, tmp_path)
    assert summary["format"] == "prompt_completion" and summary["template"] == "text"
    ref_ids, ref_labels, _ = tokens([{"text": p + c} for p, c in pairs], tok, tmp_path)
    assert ids == ref_ids  # no chat template: the prompt and the completion as one text, BOS first
    for (p, c), i, lab, ref in zip(pairs, ids, labels, ref_labels):
        n_prompt = len(tok(p)["input_ids"])  # BOS + the prompt's tokens (byte-level: no merge across the seam)
        assert all(x == IGNORE_INDEX for x in lab[:n_prompt])
        assert lab[n_prompt:] == ref[n_prompt:] == i[n_prompt:]
    mixed = [{"prompt": "a", "completion": "b"}, {"prompt": [{"role": "user", "content": "a"}],
                                                  "completion": [{"role": "assistant", "content": "b"}]}]
    with pytest.raises(DataError) as e:
        tokens(mixed, tok, tmp_path)
    assert "mixes plain-text and conversation records" in str(e.value)


def test_new_sources_train(tmp_path):
    """A LoRA run of a few steps on a Parquet folder of tool conversations: the loss goes down."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from slimtune.train import load_config, train
    from slimtune.train.metrics import read_metrics
    from test_train_recipe import tiny_dir

    rng = random.Random(9)
    recs = [tool_chat(rng) for _ in range(24)]
    for r in recs:
        r["messages"][1]["tool_calls"][0]["function"]["arguments"] = json.dumps(
            r["messages"][1]["tool_calls"][0]["function"]["arguments"])  # a JSON string, as datasets store it
    (tmp_path / "pq").mkdir()
    for i in range(2):
        pq.write_table(pa.Table.from_pylist(recs[i::2]), tmp_path / "pq" / f"part-{i}.parquet")
    cfg = load_config(None, [f"model={tiny_dir(tmp_path)}", f"data={tmp_path / 'pq'}", "template=chatml",
                             "max_length=128", "method=lora", "rank=4", "batch_size=4", "max_steps=6", "lr=5e-3",
                             "precision=fp32", f"out_dir={tmp_path / 'out'}", "progress=false", "plot=false",
                             "save_final=false", "seed=0"])
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest
    try:
        train(cfg, log=lambda m: None)
    finally:
        torch.set_num_threads(n)
    got = [r["loss"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert len(got) == 6 and all(torch.isfinite(torch.tensor(got))) and got[-1] < got[0]
