"""Templates and tokenization: prompt tokens masked exactly (checked on token ids), only answers trained, EOS,
truncation counted, and the speed of tokenizing the bundled sample."""
import random
import time

import pytest
import torch

from slimtune.data import (IGNORE_INDEX, Example, get_renderer, read_records, sample_path, to_examples,
                           tokenize_examples)
from slimtune.data.templates import ALPACA_PREAMBLE, ALPACA_PREAMBLE_INPUT
from slimtune.errors import DataError
from slimtune.models.tiny import builtin_tokenizer


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


@pytest.fixture(scope="module")
def plain_tok():
    """The same byte-level tokenizer without a chat template, to exercise the built-in templates."""
    t = builtin_tokenizer()
    t.chat_template = None
    return t


def _alpaca(n, seed=0):
    rng = random.Random(seed)
    recs = [r.data for r in read_records(sample_path())]
    return [Example(messages=[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}],
                    input=r["input"], where=f"sample {i}") for i, r in enumerate(rng.sample(recs, n))]


def _runs(ids, labels, tokenizer):
    """Decoded maximal runs of trained tokens."""
    runs, cur = [], []
    for i, lab in zip(ids.tolist(), labels.tolist()):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]


def test_prompt_masked_with_tokenizer_chat_template(tok):
    """Reference: transformers' own apply_chat_template(tokenize=True) of the prompt with the generation prompt."""
    exs = _alpaca(12, seed=1)
    r = get_renderer(tok, "auto", "alpaca")
    assert r.name == "tokenizer"
    out = tokenize_examples(exs, tok, r, max_length=4096)
    for ex, ids, labels in zip(exs, out.input_ids, out.labels):
        user = ex.messages[0]["content"] + ("\n\n" + ex.input if ex.input else "")
        p_ids = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                        tokenize=True)["input_ids"]
        full = tok.apply_chat_template([{"role": "user", "content": user},
                                        {"role": "assistant", "content": ex.messages[1]["content"]}],
                                       tokenize=True)["input_ids"]
        P = len(p_ids)
        assert ids.tolist() == list(full) + [tok.eos_token_id]
        assert ids[:P].tolist() == list(p_ids)
        assert (labels[:P] == IGNORE_INDEX).all()  # exactly the prompt tokens are masked ...
        assert torch.equal(labels[P:], ids[P:])  # ... and every answer token (answer, <|end|>, EOS) is trained
        assert labels[-1] == tok.eos_token_id


def test_prompt_masked_with_builtin_alpaca_template(plain_tok):
    """The Stanford Alpaca prompt: masked exactly on its tokens; answer + EOS trained."""
    exs = _alpaca(12, seed=2)
    r = get_renderer(plain_tok, "auto", "alpaca")
    assert r.name == "alpaca"
    out = tokenize_examples(exs, plain_tok, r, max_length=4096)
    for ex, ids, labels in zip(exs, out.input_ids, out.labels):
        ins, ans = ex.messages[0]["content"], ex.messages[1]["content"]
        prompt = (ALPACA_PREAMBLE_INPUT + f"### Instruction:\n{ins}\n\n### Input:\n{ex.input}\n\n### Response:"
                  if ex.input else ALPACA_PREAMBLE + f"### Instruction:\n{ins}\n\n### Response:")
        assert r.prompt(ex) == prompt
        p_ids = plain_tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = plain_tok(ans, add_special_tokens=False)["input_ids"] + [plain_tok.eos_token_id]
        P = len(p_ids)
        assert ids.tolist() == p_ids + a_ids
        assert (labels[:P] == IGNORE_INDEX).all() and labels[P:].tolist() == a_ids


def _conversation(rng):
    words = ["one", "two", "three", "é", "{x}", "\n"]
    say = lambda: " ".join(rng.choices(words, k=rng.randint(2, 6))).strip() + "!"  # noqa: E731
    return Example(messages=[{"role": "system", "content": say()}, {"role": "user", "content": say()},
                             {"role": "assistant", "content": say()}, {"role": "user", "content": say()},
                             {"role": "assistant", "content": say()}], where="conv")


def test_multi_turn_trains_only_assistant_turns(tok, plain_tok):
    rng = random.Random(3)
    convs = [_conversation(rng) for _ in range(5)]
    for tokenizer, name, end, last_end in ((tok, "tokenizer", "<|end|>", "<|end|></s>"),
                                          (plain_tok, "chatml", "<|im_end|></s>", "<|im_end|></s>"),
                                          (plain_tok, "alpaca", "</s>", "</s>")):
        r = get_renderer(tokenizer, name, "messages")
        out = tokenize_examples(convs, tokenizer, r, max_length=4096)
        for c, ids, labels in zip(convs, out.input_ids, out.labels):
            a1, a2 = c.messages[2]["content"], c.messages[4]["content"]
            assert _runs(ids, labels, tokenizer) == [a1 + end, a2 + last_end], name
            text = tokenizer.decode(ids.tolist())
            for m in c.messages[:2] + c.messages[3:4]:  # system and user turns are present but never trained
                assert m["content"] in text
            assert r.prompt(c) in text and text.startswith(r.prompt(Example(messages=c.messages[:2])))


def test_train_on_everything_and_text_format(tok):
    exs = _alpaca(4, seed=4)
    r = get_renderer(tok, "auto", "alpaca")
    out = tokenize_examples(exs, tok, r, max_length=4096, train_on_prompt=True)
    for ids, labels in zip(out.input_ids, out.labels):
        assert torch.equal(ids, labels)
    rt = get_renderer(tok, "chatml", "text")  # plain text ignores templates: all of it trained, EOS appended
    t = tokenize_examples([Example(text="hello wörld", where="t")], tok, rt, max_length=64)
    assert t.input_ids[0].tolist() == tok("hello wörld", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert torch.equal(t.labels[0], t.input_ids[0])


def test_truncation_counted_and_empty_targets_dropped(tok):
    exs = _alpaca(40, seed=5)
    r = get_renderer(tok, "auto", "alpaca")
    full = tokenize_examples(exs, tok, r, max_length=100_000)
    L = 96
    out = tokenize_examples(exs, tok, r, max_length=L)
    lens = [len(x) for x in full.input_ids]
    n_long = sum(n > L for n in lens)
    prompt_lens = [int((lab != IGNORE_INDEX).nonzero()[0]) for lab in full.labels]  # first trained position
    n_dropped = sum(p >= L for p in prompt_lens)  # answers start beyond the cut: nothing left to learn
    assert n_long > 0 and n_dropped > 0
    assert out.truncated == n_long and out.dropped == n_dropped and len(out) == 40 - n_dropped
    assert all(len(x) <= L for x in out.input_ids)
    kept = [i for i in range(40) if prompt_lens[i] < L]
    for j, i in enumerate(kept):  # truncation keeps the start
        n = min(L, lens[i])
        assert torch.equal(out.input_ids[j], full.input_ids[i][:n]) and torch.equal(out.labels[j], full.labels[i][:n])
    assert out.tokens == sum(len(x) for x in out.input_ids)


def test_span_lookup_matches_offset_overlap(tok):
    """The fast label rule (tokens holding a span's first and last character) equals the overlap rule on offsets,
    for random spans over text with multi-byte characters."""
    from slimtune.data.tokenize import _labels_fast, _labels_from_offsets

    rng = random.Random(7)
    for _ in range(300):
        text = "".join(rng.choice(["a", "b", " ", "é", "日", "<|end|>", "\n"]) for _ in range(rng.randint(5, 60)))
        cuts = sorted(rng.sample(range(len(text) + 1), 4))
        spans = [(cuts[0], cuts[1]), (cuts[2], cuts[3])]
        spans = [(a, b) for a, b in spans if b > a]
        enc = tok([text], add_special_tokens=False, return_offsets_mapping=True)
        ids, offs = enc["input_ids"][0], enc["offset_mapping"][0]
        assert _labels_fast(ids, enc.encodings[0], spans)[1].tolist() == _labels_from_offsets(ids, offs, spans).tolist()


def test_slow_tokenizer_path_matches_fast(plain_tok):
    """Without offsets (slow tokenizers) segments are tokenized one by one; for a byte-level vocabulary the result
    is the same as the fast path."""

    class Slow:
        is_fast = False

        def __init__(self, t):
            self.t = t

        def __getattr__(self, k):
            return getattr(self.t, k)

        def __call__(self, *a, **k):
            return self.t(*a, **k)

    exs = _alpaca(6, seed=6)
    r = get_renderer(plain_tok, "alpaca", "alpaca")
    a = tokenize_examples(exs, plain_tok, r, max_length=4096)
    b = tokenize_examples(exs, Slow(plain_tok), r, max_length=4096)
    for x, y, lx, ly in zip(a.input_ids, b.input_ids, a.labels, b.labels):
        assert torch.equal(x, y) and torch.equal(lx, ly)


def test_template_errors(plain_tok):
    with pytest.raises(DataError, match="no chat template.*fix: set template=alpaca"):
        get_renderer(plain_tok, "tokenizer", "alpaca")
    with pytest.raises(DataError, match="template 'vicuna' is unknown"):
        get_renderer(plain_tok, "vicuna", "alpaca")


def test_tokenizing_the_sample_is_fast(tok):
    exs, _ = to_examples(read_records(sample_path()))
    r = get_renderer(tok, "auto", "alpaca")
    t0 = time.perf_counter()
    out = tokenize_examples(exs, tok, r, max_length=1024)
    dt = time.perf_counter() - t0
    assert len(out) == 1000 and out.tokens > 200_000
    assert dt < 5.0, f"tokenizing 1000 records took {dt:.2f} s"  # about 0.6 s on 2 CPU cores
