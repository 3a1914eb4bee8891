"""The pieces of FSDP2 runs that need no process group: a 4-bit layer quantized shard by shard is byte for byte the
whole layer quantized at once (any number of ranks, partial blocks, odd sizes, NF4 / FP4, with and without double
quantization, bytes stored in 1-, 2- and 4-byte float elements); QuantLinear's float-stored byte parameters read back
as its buffers (same weight, same bitsandbytes state dict, untouched by casts of the model);
FSDP2's row chunks; each rank's rows of a batch; the memory estimator's per-GPU figures against a real model."""
from __future__ import annotations

import pytest
import torch

from slimtune.quant.codecs.fourbit import quantize_4bit
from slimtune.quant.linear import QuantLinear
from slimtune.quant.shard import byte_range, chunk_range, fourbit_shard, to_byte_params


@pytest.mark.parametrize("n", [1, 5, 63, 64, 1000])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_chunk_range_is_torch_chunk(n, world):
    parts = torch.chunk(torch.arange(n), world)
    got = [chunk_range(n, r, world) for r in range(world)]
    want = [(int(p[0]), int(p[-1]) + 1) for p in parts] + [(n, n)] * (world - len(parts))
    assert got == want


@pytest.mark.parametrize("fmt,dq,storage", [("nf4", True, torch.bfloat16), ("nf4", False, torch.float32),
                                            ("fp4", True, torch.float8_e4m3fn), ("nf4", True, torch.float32)])
@pytest.mark.parametrize("out_f,in_f", [(48, 80), (7, 9), (300, 96)])
def test_fourbit_shards_are_the_whole_layer_quantized(fmt, dq, storage, out_f, in_f):
    torch.manual_seed(out_f * in_f)
    w = torch.randn(out_f, in_f) * torch.rand(out_f, 1) * 3  # rows of different scales
    whole = QuantLinear.from_weight(w, None, fmt, None, dq)
    full = {k: b.reshape(-1).view(torch.uint8) for k, b in whole.named_buffers()}
    unit = storage.itemsize
    for world in (1, 2, 3, 5, 8):
        layer = QuantLinear(in_f, out_f, fmt, False, None, dq, torch.float32, "meta")
        to_byte_params(torch.nn.Sequential(layer), storage)
        # each parameter: the bytes padded to whole storage elements, sharded by FSDP2's chunks of elements
        assert {k: p.numel() for k, p in layer.named_parameters()} == {k: -(-v.numel() // unit) for k, v in
                                                                        full.items()}
        got = {k: [] for k in full}
        for rank in range(world):
            def gather(piece, counts, rank=rank, world=world):  # stands in for the all-gather: checks this rank's piece
                a = sum(counts[:rank]) - rank  # counts include each rank's flag
                own = quantize_4bit(w, fmt, 64).absmax
                assert torch.equal(piece[:-1], own[a:a + counts[rank] - 1]) and piece[-1] == 0
                return torch.cat([torch.cat([own[sum(counts[:r]) - r:sum(counts[:r + 1]) - r - 1], torch.zeros(1)])
                                  for r in range(world)])

            for k, v in fourbit_shard(layer, lambda r0, r1: w[r0:r1], rank, world, gather).items():
                s, e = chunk_range(getattr(layer, k).numel(), rank, world)
                assert v.dtype == torch.uint8 and v.numel() == unit * (e - s), (k, world, rank)
                assert byte_range(full[k].numel(), unit, rank, world)[2] == v.numel()
                got[k].append(v)
        for k in full:
            n, cat = full[k].numel(), torch.cat(got[k])
            assert torch.equal(cat[:n], full[k]) and not cat[n:].any() and cat.numel() < n + unit, (k, world)


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


@pytest.mark.parametrize("out_f,in_f", [(24, 128), (3, 64)])  # (3, 64): 3 absmax codes, an odd byte count
def test_byte_parameters_read_back_as_the_buffers(out_f, in_f):
    from slimtune.quant.shard import StoredQuantLinear

    torch.manual_seed(out_f)
    w, b = torch.randn(out_f, in_f).to(torch.bfloat16), torch.randn(out_f).to(torch.bfloat16)
    ref = QuantLinear.from_weight(w, b, "nf4", None, True)
    q = QuantLinear.from_weight(w, b, "nf4", None, True)
    model = torch.nn.Sequential(q)
    assert to_byte_params(model) == ["0"] and isinstance(q, StoredQuantLinear)
    assert to_byte_params(model) == []  # (converted once)
    assert not list(q.buffers()) and all(p.dtype == torch.float32 and p.dim() == 1 and not p.requires_grad
                                         for n, p in q.named_parameters() if n != "bias")
    codes = q.typed("absmax")
    assert codes.dtype == torch.uint8 and codes.untyped_storage().data_ptr() == q.absmax.untyped_storage().data_ptr()
    model.to(torch.float16)  # a cast of the model leaves the bytes alone (the bias follows, as in `ref`)
    ref.to(torch.float16)
    model.to(torch.bfloat16)
    assert all(p.dtype == torch.float32 for n, p in q.named_parameters() if n != "bias")
    model.half()
    assert q.typed("nested_offset").shape == () and q.typed("nested_offset").dtype == torch.float32
    assert torch.equal(q.typed("nested_offset"), ref.nested_offset)  # fp32, exact
    assert torch.equal(q.dequantize(torch.float32), ref.dequantize(torch.float32))
    sd, want = q.state_dict(), ref.state_dict()
    assert sorted(sd) == sorted(want)  # bitsandbytes' keys, not the raw bytes
    for k in want:
        assert sd[k].dtype == want[k].dtype and torch.equal(sd[k], want[k]), k
    x = torch.randn(3, in_f, dtype=torch.float16)
    assert torch.equal(q(x), ref(x))
    with pytest.raises(Exception, match="not a floating-point dtype"):
        to_byte_params(torch.nn.Sequential(QuantLinear.from_weight(w, None, "nf4")), torch.uint8)


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
        # what FSDP2 gathers for block 0: LoRA everything in bf16 (param_dtype); QLoRA everything uncast (the fp32
        # adapter masters, the bf16 norms, the NF4 bytes without their storage's padding)
        assert all(p.is_floating_point() for p in model.parameters())
        stored = {f"{n}.{k}": v[2] for n, m in model.model.layers[0].named_modules() for k, v in
                  getattr(m, "byte_layout", {}).items()}
        want = sum(stored[n] if n in stored else p.numel() * (2 if method == "lora" else p.element_size())
                   for n, p in model.model.layers[0].named_parameters())
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


def test_estimator_counts_gathers_kept_from_forward_to_backward():
    from slimtune.memory.estimate import EstimateInput, estimate
    from slimtune.models.shapes import get_shape

    cfg = get_shape("llama3-8b")
    L = cfg.num_hidden_layers
    for method in ("lora", "qlora"):
        def est(keep: bool) -> dict:
            e = EstimateInput(cfg, method, "bf16-mixed", "adamw", 2, 512, True, gpus=2, chunked_loss=False)
            e.fsdp_reshard = not keep  # (memory.fsdp reads it where the input has the field)
            return estimate(e)

        base, keep = est(False), est(True)
        d = base["detail"]
        blk, head, embed = d["gathered_block_bytes"], d["gathered_head_bytes"], d["gathered_embed_bytes"]
        assert embed > 0 and d["fsdp_reshard"] and not keep["detail"]["fsdp_reshard"]
        diff = {k: keep["detail"]["phases"][k] - v for k, v in d["phases"].items()}
        assert diff["forward_end"] == diff["loss_backward"] == L * blk + head + embed  # everything gathered
        assert diff["head_backward"] == (L - 2) * blk + embed  # (reshard: the head and 2 blocks, prefetch)
        assert diff[f"block{L - 1}_backward"] == (L - 3) * blk + embed  # blocks 0..L-1 against 3 in flight
        assert diff["block0_backward"] == embed and diff["optimizer_step"] == 0
        assert keep["total_bytes"] > base["total_bytes"]


def test_quantized_models_are_gathered_uncast():
    from slimtune.precision.policy import make_policy
    from slimtune.train.distributed import gather_dtype

    prec = make_policy("bf16-mixed", full=False)
    assert gather_dtype(prec) == torch.bfloat16 and gather_dtype(prec, quantized=True) is None
    assert gather_dtype(make_policy("fp32"), quantized=True) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: its foreach copy is what rounds bf16 NaN byte pairs")
@pytest.mark.parametrize("ours", [True, False])
def test_fsdp2_copy_in_keeps_the_stored_bytes_on_cuda(ours):
    """FSDP2 fills its all-gather buffer with `torch.ops.fsdp.all_gather_copy_in` (a foreach copy). With the bytes
    in fp32 elements (`to_byte_params`' default) they come through bit for bit; in bf16 elements - the first layout -
    the pairs that read as bf16 NaNs come out as the canonical NaN (the case that shows this test can fail; the
    probe `benchmarks/scratch/bf16_copy_probe.py` found 253 of the 254 NaN patterns changed on an H200)."""
    import torch.distributed.fsdp._fully_shard._fsdp_collectives  # noqa: F401  (registers torch.ops.fsdp)

    torch.manual_seed(0)
    w = torch.randn(256, 1024, device="cuda").to(torch.bfloat16)
    q = QuantLinear.from_weight(w, None, "nf4", None, True)
    if ours:
        to_byte_params(torch.nn.Sequential(q))
    else:
        to_byte_params(torch.nn.Sequential(q), torch.bfloat16)
    params = [p.detach() for n, p in q.named_parameters()]
    sizes = [p.numel() for p in params]
    out = torch.empty(2 * sum(sizes), dtype=params[0].dtype, device="cuda")
    inp, _ = torch.ops.fsdp.all_gather_copy_in(params, out, sizes, sum(sizes), 0)
    same = [torch.equal(g.view(torch.uint8), p.view(torch.uint8)) for g, p in zip(inp.split(sizes), params)]
    assert all(same) == ours, same
