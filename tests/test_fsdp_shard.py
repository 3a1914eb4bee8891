"""The pieces of FSDP2 runs that need no process group: a 4-bit layer quantized shard by shard is byte for byte the
whole layer quantized at once (any number of ranks, partial blocks, odd sizes, NF4 / FP4, with and without double
quantization); QuantLinear's uint8 parameters read back as its buffers (same weight, same bitsandbytes state dict);
FSDP2's row chunks; each rank's rows of a batch; the memory estimator's per-GPU figures against a real model."""
from __future__ import annotations

import pytest
import torch

from slimtune.quant.codecs.fourbit import quantize_4bit
from slimtune.quant.linear import QuantLinear
from slimtune.quant.shard import chunk_range, fourbit_shard, to_byte_params


@pytest.mark.parametrize("n", [1, 5, 63, 64, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_chunk_range_is_torch_chunk(n, world):
    parts = torch.chunk(torch.arange(n), world)
    got = [chunk_range(n, r, world) for r in range(world)]
    want = [(int(p[0]), int(p[-1]) + 1) for p in parts] + [(n, n)] * (world - len(parts))
    assert got == want


@pytest.mark.parametrize("fmt,dq", [("nf4", True), ("nf4", False), ("fp4", True)])
@pytest.mark.parametrize("out_f,in_f", [(48, 80), (7, 9), (300, 96)])
def test_fourbit_shards_are_the_whole_layer_quantized(fmt, dq, out_f, in_f):
    torch.manual_seed(out_f * in_f)
    w = torch.randn(out_f, in_f) * torch.rand(out_f, 1) * 3  # rows of different scales
    whole = QuantLinear.from_weight(w, None, fmt, None, dq)
    full = {k: b.reshape(-1).view(torch.uint8) for k, b in whole.named_buffers()}
    for world in (1, 2, 3, 5, 8):
        layer = QuantLinear(in_f, out_f, fmt, False, None, dq, torch.float32, "meta")
        to_byte_params(torch.nn.Sequential(layer))
        got = {k: [] for k in full}
        for rank in range(world):
            def gather(piece, counts, rank=rank, world=world):  # stands in for the all-gather: checks this rank's piece
                a = sum(counts[:rank]) - rank  # counts include each rank's flag
                own = quantize_4bit(w, fmt, 64).absmax
                assert torch.equal(piece[:-1], own[a:a + counts[rank] - 1]) and piece[-1] == 0
                return torch.cat([torch.cat([own[sum(counts[:r]) - r:sum(counts[:r + 1]) - r - 1], torch.zeros(1)])
                                  for r in range(world)])

            for k, v in fourbit_shard(layer, lambda r0, r1: w[r0:r1], rank, world, gather).items():
                s, e = chunk_range(full[k].numel(), rank, world)
                assert v.dtype == torch.uint8 and v.numel() == e - s, (k, world, rank)
                got[k].append(v)
        for k in full:
            assert torch.equal(torch.cat(got[k]), full[k]), (k, world)


def test_a_failing_rank_stops_every_rank_at_the_same_gather():
    from slimtune.errors import PrecisionError, SlimtuneError

    w = torch.randn(16, 64)
    w[12, 3] = float("nan")  # in rank 1's rows of 2
    layer = QuantLinear(64, 16, "nf4", False, None, True, torch.float32, "meta")
    to_byte_params(torch.nn.Sequential(layer))
    seen = []

    def gather(piece, counts):
        seen.append(piece[-1].item())
        return torch.cat([torch.cat([torch.ones(c - 1), torch.ones(1)]) for c in counts])  # rank 1 flagged

    with pytest.raises(SlimtuneError, match="another process could not read or quantize"):
        fourbit_shard(layer, lambda r0, r1: w[r0:r1], 0, 2, gather)
    with pytest.raises(PrecisionError, match="holds NaN or inf"):
        fourbit_shard(layer, lambda r0, r1: w[r0:r1], 1, 2, gather)
    assert seen == [0.0, 1.0]  # both reached the gather


def test_byte_parameters_read_back_as_the_buffers():
    torch.manual_seed(1)
    w, b = torch.randn(24, 128).to(torch.bfloat16), torch.randn(24).to(torch.bfloat16)
    ref = QuantLinear.from_weight(w, b, "nf4", None, True)
    q = QuantLinear.from_weight(w, b, "nf4", None, True)
    model = torch.nn.Sequential(q)
    assert to_byte_params(model) == ["0"]
    assert not list(q.buffers()) and all(p.dtype == torch.uint8 and p.dim() == 1 and not p.requires_grad
                                         for n, p in q.named_parameters() if n != "bias")
    model.to(torch.float16)  # a cast of the model leaves the bytes alone (the bias follows, as in `ref`)
    ref.to(torch.float16)
    assert q.typed("nested_offset").shape == () and q.typed("nested_offset").dtype == torch.float32
    assert torch.equal(q.dequantize(torch.float32), ref.dequantize(torch.float32))
    sd, want = q.state_dict(), ref.state_dict()
    assert sorted(sd) == sorted(want)  # bitsandbytes' keys, not the raw bytes
    for k in want:
        assert sd[k].dtype == want[k].dtype and torch.equal(sd[k], want[k]), k
    x = torch.randn(3, 128, dtype=torch.float16)
    assert torch.equal(q(x), ref(x))


def test_shard_batch_rows_and_fillers():
    from slimtune.data.tokenize import IGNORE_INDEX
    from slimtune.train.distributed import shard_batch
    from slimtune.train.step import predicted_tokens

    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 50, (5, 7), generator=g),
             "labels": torch.randint(0, 50, (5, 7), generator=g), "position_ids": torch.arange(7).expand(5, 7)}
    parts = [shard_batch(batch, r, 2) for r in range(2)]
    assert [p["input_ids"].shape[0] for p in parts] == [3, 3]
    for k in batch:
        assert torch.equal(torch.cat([parts[0][k], parts[1][k][:2]]), batch[k])
    assert (parts[1]["labels"][2] == IGNORE_INDEX).all()  # the filler row predicts nothing
    assert predicted_tokens([parts[0], parts[1]]) == predicted_tokens([batch])
    assert [shard_batch(batch, r, 8)["input_ids"].shape[0] for r in range(8)] == [1] * 8


def test_estimator_per_gpu_figures_against_a_real_sharded_layout():
    from slimtune.memory.estimate import EstimateInput, estimate
    from slimtune.models.tiny import builtin_config
    from slimtune.precision.policy import make_policy
    from slimtune.train.config import load_config
    from slimtune.train.sharded import _meta_model

    mc = builtin_config()
    for method in ("lora", "qlora"):
        cfg = load_config(None, ["data=x.json", f"method={method}", "rank=16", "targets=all-linear",
                                 "precision=bf16-mixed"])
        model, _, _ = _meta_model(cfg, make_policy("bf16-mixed", full=False), mc.replace())
        to_byte_params(model)
        # what FSDP2 gathers for block 0: floats in bf16 (param_dtype), the NF4 bytes as they are
        want = sum(p.numel() * (2 if p.is_floating_point() else 1) for p in model.model.layers[0].parameters())
        one = estimate(EstimateInput(mc, method, "bf16-mixed", "adamw", 1, 64, True))
        two = estimate(EstimateInput(mc, method, "bf16-mixed", "adamw", 1, 64, True, gpus=2))
        assert two["detail"]["gathered_block_bytes"] == want, method
        assert two["weights_bytes"] == -(-one["weights_bytes"] // 2)
        assert two["optimizer_bytes"] == -(-one["optimizer_bytes"] // 2)
        assert two["total_bytes"] < one["total_bytes"]
        assert estimate(EstimateInput(mc, method, "bf16-mixed", "adamw", 1, 64, True, gpus=1)) == one
    with pytest.raises(Exception, match="gpus must be a positive integer"):
        estimate(EstimateInput(mc, "lora", gpus=0))
    with pytest.raises(Exception, match="without offloading"):
        estimate(EstimateInput(mc, "lora", offload="optimizer", gpus=2))
