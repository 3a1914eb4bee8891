"""Packing and batching: packed loss == unpacked loss on the tiny model, row layout invariants, the loss against a
float64 reference, the seeded split and the exact resume of the data iterator."""
import json
import random

import pytest
import torch

from slimtune.train.loss import causal_lm_loss
from slimtune.data import (IGNORE_INDEX, DataConfig, DataIterator, build_datasets, collate_padded,
                           get_renderer, model_inputs, pack_examples, read_records, sample_path, to_examples,
                           tokenize_examples)
from slimtune.errors import DataError
from slimtune.models.tiny import builtin_model, builtin_tokenizer


@pytest.fixture(scope="module")
def tok():
    return builtin_tokenizer()


def _tokenized(tok, n, max_length, train_on_prompt, seed=0):
    recs = random.Random(seed).sample(read_records(sample_path()), n)
    exs, fmt = to_examples(recs)
    return tokenize_examples(exs, tok, get_renderer(tok, "auto", fmt), max_length, train_on_prompt)


def test_causal_lm_loss_against_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 17, generator=g)
    labels = torch.randint(0, 17, (3, 9), generator=g)
    labels[torch.rand(3, 9, generator=g) < 0.3] = IGNORE_INDEX
    s, c = causal_lm_loss(logits, labels)
    ref, n = 0.0, 0
    lp = torch.log_softmax(logits.double(), -1)
    for b in range(3):
        for t in range(8):  # position t predicts label t + 1
            if labels[b, t + 1] != IGNORE_INDEX:
                ref -= lp[b, t, labels[b, t + 1]].item()
                n += 1
    assert int(c) == n and abs(s.item() - ref) < 1e-4
    s16, c16 = causal_lm_loss(logits.bfloat16(), labels)
    assert s16.dtype == torch.float32 and int(c16) == n


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_loss_equals_unpacked_loss(tok, train_on_prompt):
    """Done-when: the loss of a packed batch equals that of the same examples run one by one (fp32, 1e-5)."""
    torch.manual_seed(0)
    model = builtin_model(0).eval()
    data = _tokenized(tok, 10, 96, train_on_prompt, seed=1)
    rows = pack_examples(data.input_ids, data.labels, seq_len=192, pad_id=tok.pad_token_id)
    assert rows["input_ids"].shape[0] < len(data)  # several examples share rows
    with torch.no_grad():
        s_p, c_p = causal_lm_loss(model(**model_inputs(rows)).float(), rows["labels"])
        s_u, c_u = torch.zeros(()), torch.zeros((), dtype=torch.long)
        for ids, lab in zip(data.input_ids, data.labels):  # unpadded, one by one
            s, c = causal_lm_loss(model(ids[None]), lab[None])
            s_u, c_u = s_u + s, c_u + c
        padded = collate_padded(data.input_ids, data.labels, tok.pad_token_id)
        s_b, c_b = causal_lm_loss(model(**model_inputs(padded)), padded["labels"])
        # control: without seq_ids the examples of a row see each other, and the loss must differ
        leak = dict(model_inputs(rows))
        del leak["seq_ids"]
        s_l, _ = causal_lm_loss(model(**leak), rows["labels"])
    assert int(c_p) == int(c_u) == int(c_b) == data.target_tokens
    mean_u = (s_u / c_u).item()
    assert abs((s_p / c_p).item() - mean_u) <= 1e-5
    assert abs((s_b / c_b).item() - mean_u) <= 1e-5
    assert abs((s_l / c_p).item() - mean_u) > 1e-3


def test_pack_layout():
    g = torch.Generator().manual_seed(2)
    lens = torch.randint(1, 40, (60,), generator=g).tolist()
    ids = [torch.randint(8, 300, (n,), generator=g) for n in lens]
    labels = [torch.where(torch.rand(n, generator=g) < 0.5, x, IGNORE_INDEX) for n, x in zip(lens, ids)]
    T = 48
    rows = pack_examples(ids, labels, T, pad_id=0)
    R = rows["input_ids"].shape[0]
    assert -(-sum(lens) // T) <= R <= -(-sum(lens) // T) + 3  # best fit leaves little room
    found = []
    for r in range(R):
        pos, seq = rows["position_ids"][r], rows["seq_ids"][r]
        starts = (pos == 0).nonzero().flatten().tolist() + [T]
        for k, (a, b) in enumerate(zip(starts[:-1], starts[1:])):
            assert (seq[a:b] == k).all() and torch.equal(pos[a:b], torch.arange(b - a))
            x = rows["input_ids"][r, a:b]
            if (x == 0).all():  # padding (examples use ids >= 8): the last block, own seq id, no labels
                assert b == T and k == len(starts) - 2 and (rows["labels"][r, a:b] == IGNORE_INDEX).all()
                continue
            i = next(j for j in range(len(ids)) if len(ids[j]) == b - a and torch.equal(ids[j], x) and j not in found)
            found.append(i)
            lab = rows["labels"][r, a:b]
            assert lab[0] == IGNORE_INDEX and torch.equal(lab[1:], labels[i][1:])  # first label never predicted
    assert sorted(found) == list(range(len(ids)))  # every example exactly once
    again = pack_examples(ids, labels, T, pad_id=0)
    assert all(torch.equal(again[k], rows[k]) for k in rows)  # deterministic
    with pytest.raises(ValueError):
        pack_examples([torch.arange(T + 1)], [torch.arange(T + 1)], T, 0)


def test_collate_padded():
    ids = [torch.tensor([5, 6, 7]), torch.tensor([9])]
    b = collate_padded(ids, [torch.tensor([-100, 6, 7]), torch.tensor([9])], pad_id=0, pad_to_multiple_of=4)
    assert b["input_ids"].tolist() == [[5, 6, 7, 0], [9, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7, -100], [9, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def _write(tmp_path, n, seed):
    recs = [r.data for r in random.Random(seed).sample(read_records(sample_path()), n)]
    p = tmp_path / f"d{seed}.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in recs))
    return p


def test_split_by_fraction_and_by_file(tmp_path, tok):
    p = _write(tmp_path, 60, 3)
    cfg = DataConfig(path=str(p), max_length=128, val_fraction=0.2, seed=5, pack=False)
    tr, va, s = build_datasets(cfg, tok)
    tr2, va2, _ = build_datasets(cfg, tok)
    assert s["records"] == 48 and s["val_records"] == 12 and s["format"] == "alpaca" and s["template"] == "tokenizer"
    assert all(torch.equal(a, b) for a, b in zip(va.tokenized.input_ids, va2.tokenized.input_ids))  # seeded
    tv = {tuple(x.tolist()) for x in tr.tokenized.input_ids}
    assert not tv & {tuple(x.tolist()) for x in va.tokenized.input_ids}  # disjoint
    _, va3, _ = build_datasets(DataConfig(path=str(p), max_length=128, val_fraction=0.2, seed=6, pack=False), tok)
    assert [len(x) for x in va3.tokenized.input_ids] != [len(x) for x in va.tokenized.input_ids]
    pv = _write(tmp_path, 7, 4)
    tr, va, s = build_datasets(DataConfig(path=str(p), val_path=str(pv), max_length=128), tok)
    assert s["records"] == 60 and s["val_records"] == 7 and s["packed"] and s["rows"] == len(tr)
    assert s["truncated"] > 0 and 0.5 < s["fill"] <= 1.0
    with pytest.raises(DataError, match="val_fraction 1.0 is out of range"):
        build_datasets(DataConfig(path=str(p), val_fraction=1.0), tok)


@pytest.mark.parametrize("pack", [True, False])
def test_iterator_resumes_exactly(tmp_path, tok, pack):
    p = _write(tmp_path, 40, 7)
    ds, _, _ = build_datasets(DataConfig(path=str(p), max_length=160, pack=pack), tok)
    it = DataIterator(ds, batch_size=3, seed=11)
    n = 2 * it.batches_per_epoch + 2  # crosses two epoch boundaries
    ref = [next(it) for _ in range(n)]
    for cut in (1, it.batches_per_epoch, it.batches_per_epoch + 1, n - 1):
        a = DataIterator(ds, batch_size=3, seed=11)
        for _ in range(cut):
            next(a)
        state = json.loads(json.dumps(a.state_dict()))  # survives a JSON / checkpoint round trip
        b = DataIterator(ds, batch_size=3, seed=11)
        b.load_state_dict(state)
        for k in range(cut, n):
            got = next(b)
            assert all(torch.equal(got[key], ref[k][key]) for key in ref[k]), (cut, k)
    assert sorted(sum((DataIterator(ds, 3, seed=11).order(e).tolist() for e in [0]), [])) == list(range(len(ds)))
    assert DataIterator(ds, 3, seed=11).order(1).tolist() != DataIterator(ds, 3, seed=11).order(0).tolist()
    with pytest.raises(DataError, match="batch_size was 3, now 4"):
        DataIterator(ds, 4, seed=11).load_state_dict(state)
