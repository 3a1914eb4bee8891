"""Training steps replayed as CUDA graphs (train/graphed.py): on CUDA they give the losses of eager steps, a
non-finite loss leaves the weights as they were and stops the run, a batch of another shape runs eagerly; the reasons
a run cannot use graphs are named (CPU, loss scaling, dropout, offloading); offloaded checkpointing is captured; a
capture that runs out of memory leaves the run to eager steps."""
from __future__ import annotations

import pytest
import torch

from slimtune.models.tiny import builtin_model
from slimtune.optim.build import make_optimizer
from slimtune.peft import apply_method, freeze_base
from slimtune.precision.policy import apply_precision, resolve_precision
from slimtune.train.graphed import GraphedStep, supported
from slimtune.train.step import TrainingError, train_step

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (runs on the GPU machine)")


def setup(device: str, dropout: float = 0.0):
    dev = torch.device(device)
    model = builtin_model(0).to(dev)
    apply_method(model, {"method": "lora", "r": 8, "lora_alpha": 16, "target_modules": "all-linear",
                         "lora_dropout": dropout})
    freeze_base(model)
    prec = resolve_precision("bf16-mixed" if dev.type == "cuda" else "fp32", dev)
    apply_precision(model, prec)
    model.grad_ckpt = True
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, prec, make_optimizer(params, "adamw", lr=1e-3), params, dev


def batches(n: int, dev_rows: int = 4, T: int = 48, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(8, 264, (dev_rows, T), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def test_reasons_it_cannot_be_used():
    model, prec, opt, params, dev = setup("cpu")
    assert supported(model, opt, None, dev, False) == "not on CUDA"
    if torch.cuda.is_available():
        m2, p2, o2, _, d2 = setup("cuda", dropout=0.1)
        assert supported(m2, o2, None, d2, False) == "dropout"
        m3, p3, o3, _, d3 = setup("cuda")
        assert supported(m3, o3, torch.amp.GradScaler("cuda"), d3, False) == "fp16 loss scaling"
        assert supported(m3, o3, None, d3, True) == "offloading moves tensors to the host"
        assert supported(m3, o3, None, d3, False) is None


@cuda
def test_graphed_steps_equal_eager_steps():
    data = batches(6)
    model, prec, opt, params, dev = setup("cuda")
    eager = [train_step(model, [b], opt, None, prec, dev, 1.0, params)["loss"] for b in data]
    model, prec, opt, params, dev = setup("cuda")
    stepper = GraphedStep(model, opt, prec, dev, 1.0, params)
    graphed = [stepper([b], 1e-3)["loss"] for b in data]
    assert stepper.replays == 5  # step 1 eager, then one capture and replays
    # the same kernels replayed; cuBLAS may choose other algorithms while a graph is captured, so bf16 rounding
    # (measured on an H200: 2.5e-4 relative at most)
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=2e-3, atol=0)
    assert graphed[0] == eager[0]  # the first step runs eagerly
    # a batch of another shape runs eagerly, then the graph goes on
    other = batches(1, T=40, seed=3)[0]
    stepper([other], 1e-3)
    assert stepper.replays == 5
    stepper([data[0]], 1e-3)
    assert stepper.replays == 6


@cuda
def test_graphed_offloaded_checkpointing_equals_eager():
    """grad_ckpt=offload under capture: the block inputs' copies to pinned host buffers and back (a forked stream,
    events) replay with the graph; the losses are the eager ones."""
    data = batches(6)
    model, prec, opt, params, dev = setup("cuda")
    model.grad_ckpt = "offload"
    eager = [train_step(model, [b], opt, None, prec, dev, 1.0, params)["loss"] for b in data]
    model, prec, opt, params, dev = setup("cuda")
    model.grad_ckpt = "offload"
    assert supported(model, opt, None, dev, False) is None
    stepper = GraphedStep(model, opt, prec, dev, 1.0, params)
    graphed = [stepper([b], 1e-3)["loss"] for b in data]
    assert stepper.replays == 5
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=2e-3, atol=0)


@cuda
def test_capture_out_of_memory_falls_back_to_eager_steps(monkeypatch):
    """An out-of-memory error while the step is captured (the graph's pool at the edge of the card): that step and
    the later ones run eagerly, with the losses of an eager run."""
    import slimtune.train.graphed as graphed

    data = batches(4)
    model, prec, opt, params, dev = setup("cuda")
    eager = [train_step(model, [b], opt, None, prec, dev, 1.0, params)["loss"] for b in data]
    model, prec, opt, params, dev = setup("cuda")
    real = graphed.batch_loss

    def tight(*args, **kw):
        if torch.cuda.is_current_stream_capturing():
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # 1 PiB: the allocator refuses
        return real(*args, **kw)

    monkeypatch.setattr(graphed, "batch_loss", tight)
    stepper = GraphedStep(model, opt, prec, dev, 1.0, params)
    got = [stepper([b], 1e-3)["loss"] for b in data]
    assert stepper.replays == 0 and stepper.graph is None and "out of memory while capturing" in stepper.failed
    torch.testing.assert_close(torch.tensor(got), torch.tensor(eager), rtol=1e-6, atol=0)


@cuda
def test_non_finite_step_keeps_the_weights():
    data = batches(3)
    model, prec, opt, params, dev = setup("cuda")
    stepper = GraphedStep(model, opt, prec, dev, 1.0, params)
    stepper([data[0]], 1e-3)
    stepper([data[1]], 1e-3)  # captured and replayed
    with torch.no_grad():
        params[0].fill_(float("inf"))  # poison one adapter: loss and gradients turn non-finite
    kept = [p.detach().clone() for p in params]
    with pytest.raises(TrainingError, match="loss is"):
        stepper([data[2]], 1e-3)
    assert all(torch.equal(a, b) for a, b in zip(kept[1:], [p.detach() for p in params[1:]]))
