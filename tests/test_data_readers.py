"""Readers and format checks: every file type, detection, and one-line DataErrors naming file, line and fix."""
import json
from pathlib import Path
import random

import pytest

from slimtune.data import (DataConfig, build_datasets, detect_format, read_records, sample_path, to_examples)
from slimtune.errors import DataError, SlimtuneError
from slimtune.models.tiny import builtin_tokenizer


def _one_line_error(excinfo, *parts):
    """The message is one line, names every part (file, place, what) and says the fix."""
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, SlimtuneError)
    assert "\n" not in msg and len(msg.replace(parts[0], "")) < 240, msg
    for p in parts:
        assert p in msg, (p, msg)
    assert "fix:" in msg, msg
    return msg


def _rand_alpaca(rng, n):
    words = ["alpha", "beta", "gamma", "delta", "é", "日本", "x{y}", "\"q\""]
    return [{"instruction": " ".join(rng.choices(words, k=rng.randint(1, 6))),
             "input": " ".join(rng.choices(words, k=rng.randint(0, 3))),
             "output": " ".join(rng.choices(words, k=rng.randint(1, 6)))} for _ in range(n)]


def test_json_array_records_know_their_lines(tmp_path):
    rng = random.Random(1)
    recs = _rand_alpaca(rng, 7)
    path = tmp_path / "d.json"
    path.write_text(json.dumps(recs, indent=2, ensure_ascii=False), encoding="utf-8")
    got = read_records(path)
    assert [r.data for r in got] == recs
    lines = path.read_text(encoding="utf-8").splitlines()
    for r in got:  # each record's line is the line of its opening brace, with the instruction two lines on
        assert lines[r.line - 1].strip() == "{"
        assert json.dumps(r.data["instruction"], ensure_ascii=False) in lines[r.line]
    assert [r.index for r in got] == list(range(7))
    assert got[3].where() == f"{path} line {got[3].line} (record 3)"


def test_jsonl_with_blank_lines_and_parquet(tmp_path):
    rng = random.Random(2)
    recs = _rand_alpaca(rng, 5)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(recs[0]) + "\n\n" + "\n".join(json.dumps(r) for r in recs[1:]) + "\n")
    got = read_records(path)
    assert [r.data for r in got] == recs and [r.line for r in got] == [1, 3, 4, 5, 6]

    import pyarrow as pa
    import pyarrow.parquet as pq
    chats = [{"messages": [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}
             for r in recs]
    pq.write_table(pa.Table.from_pylist(chats), tmp_path / "c.parquet")
    got = read_records(tmp_path / "c.parquet")
    assert [r.data for r in got] == chats and got[2].where() == f"{tmp_path / 'c.parquet'} record 2"
    examples, fmt = to_examples(got)
    assert fmt == "messages" and examples[4].messages == chats[4]["messages"]


def test_detection_and_sharegpt_roles(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                               {"from": "gpt", "value": "A"}]}]
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps(rows[0]))
    ex, fmt = to_examples(read_records(p))
    assert fmt == "sharegpt"
    assert [(m["role"], m["content"]) for m in ex[0].messages] == [("system", "S"), ("user", "Q"), ("assistant", "A")]
    p.write_text(json.dumps({"text": "plain words", "instruction": "x", "output": "y"}))
    recs = read_records(p)
    assert detect_format(recs[0]) == "alpaca"
    assert to_examples(recs, "text")[0][0].text == "plain words"  # overridden
    p.write_text(json.dumps({"prompt": "x", "completion": "y"}))  # TRL's columns (issue 17)
    assert to_examples(read_records(p))[1] == "prompt_completion"
    p.write_text(json.dumps({"question": "x", "answer": "y"}))
    with pytest.raises(DataError) as e:
        to_examples(read_records(p))
    _one_line_error(e, str(p), "line 1", "answer", "data_format")


def test_line_that_is_not_json(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n{"instruction": "e",\n')
    with pytest.raises(DataError) as e:
        read_records(p)
    _one_line_error(e, str(p), "line 3", "not valid JSON")
    p = tmp_path / "bad.json"
    p.write_text('[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]')
    with pytest.raises(DataError) as e:
        read_records(p)
    _one_line_error(e, str(p), "line 3", "not valid JSON")


def test_empty_file_and_empty_array(tmp_path):
    for name, text in (("e.jsonl", ""), ("e.json", "  \n"), ("a.json", "[ ]")):
        p = tmp_path / name
        p.write_text(text)
        with pytest.raises(DataError) as e:
            read_records(p)
        _one_line_error(e, str(p))
    with pytest.raises(DataError) as e:
        read_records(tmp_path / "missing.jsonl")
    _one_line_error(e, "missing.jsonl", "no such")


def test_record_missing_its_output(tmp_path):
    recs = _rand_alpaca(random.Random(3), 4)
    del recs[2]["output"]
    p = tmp_path / "m.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs))
    with pytest.raises(DataError) as e:
        to_examples(read_records(p))
    _one_line_error(e, str(p), "line 3", "'output'")


@pytest.mark.parametrize("turn,what", [
    ({"role": "bot", "content": "hi"}, "unknown role 'bot'"),
    ({"role": "assistant", "content": "  "}, "messages[1].content is empty"),
    ({"role": "assistant", "content": ["x"]}, "messages[1].content is a list"),
    ({"role": "assistant"}, "messages[1] has no 'content'"),
    ("just text", "messages[1] is a str"),
])
def test_bad_conversation_turns(tmp_path, turn, what):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    bad = {"messages": [{"role": "user", "content": "q"}, turn]}
    p = tmp_path / "c.json"
    p.write_text(json.dumps([good, good, bad], indent=1))
    with pytest.raises(DataError) as e:
        to_examples(read_records(p))
    line = read_records(p)[2].line
    _one_line_error(e, str(p), f"line {line}", what)


def test_sharegpt_unknown_role_and_no_answer(tmp_path):
    p = tmp_path / "s.jsonl"
    p.write_text(json.dumps({"conversations": [{"from": "human", "value": "q"}, {"from": "narrator", "value": "a"}]}))
    with pytest.raises(DataError) as e:
        to_examples(read_records(p))
    _one_line_error(e, str(p), "line 1", "unknown from 'narrator'", "human")
    p.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}]}))
    with pytest.raises(DataError) as e:
        to_examples(read_records(p))
    _one_line_error(e, str(p), "line 1", "no assistant turn")


def test_wrong_types(tmp_path):
    p = tmp_path / "w.jsonl"
    for rec, what in (({"instruction": "i", "output": 3}, "'output' is a int"),
                      ({"instruction": "i", "input": ["a"], "output": "o"}, "'input' is a list"),
                      ({"messages": "hello"}, "'messages' is a str")):
        p.write_text(json.dumps(rec))
        with pytest.raises(DataError) as e:
            to_examples(read_records(p))
        _one_line_error(e, str(p), "line 1", what)
    p.write_text('{"instruction": "i", "output": "o"}\n[1, 2]\n')
    with pytest.raises(DataError) as e:
        read_records(p)
    _one_line_error(e, str(p), "line 2", "not a JSON object")


def test_bad_record_stops_the_build_before_tokenizing(tmp_path, monkeypatch):
    """Malformed records are found at build time: the last record is bad, nothing is tokenized."""
    import slimtune.data.dataset as ds

    recs = _rand_alpaca(random.Random(4), 200)
    recs[-1] = {"instruction": "x", "input": "", "output": ""}
    p = tmp_path / "big.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs))

    def boom(*a, **k):
        raise AssertionError("tokenized before validating")

    monkeypatch.setattr(ds, "tokenize_examples", boom)
    with pytest.raises(DataError) as e:
        build_datasets(DataConfig(path=str(p), val_fraction=0.1), builtin_tokenizer())
    _one_line_error(e, str(p), "line 200", "'output' is empty", "skip_bad=true")
    monkeypatch.undo()
    tr, va, s = build_datasets(DataConfig(path=str(p), val_fraction=0.1, skip_bad=True), builtin_tokenizer())
    assert s["records"] + s["val_records"] == 199 and s["skipped"] == 1 and "line 200" in s["first_skipped"]


def test_pretty_printed_single_object(tmp_path):
    p = tmp_path / "o.json"
    p.write_text(json.dumps({"data": [{"instruction": "a", "output": "b"}]}, indent=2))
    with pytest.raises(DataError) as e:
        read_records(p)
    _one_line_error(e, str(p), "one JSON object", "[...]")


def test_bundled_sample():
    recs = read_records(sample_path())
    assert len(recs) == 1000
    src = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_5000.json"  # ../shared beside the repo
    if src.exists():
        assert [r.data for r in recs] == json.loads(src.read_text())[:1000]
    lic = sample_path().with_name("ALPACA_DATA_LICENSE.txt").read_text()
    assert "CC BY-NC 4.0" in lic and "Attribution-NonCommercial 4.0 International" in lic
    assert to_examples(recs)[1] == "alpaca"
