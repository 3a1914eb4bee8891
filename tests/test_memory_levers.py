"""Two memory/speed levers: checkpointing only the first N blocks (`ckpt_blocks`) and the token embedding table in
pinned host memory (`host_embedding`). Each against the plain path (bitwise on the CPU), against what autograd saves
(saved_tensors_hooks) and against the estimator; plus the real `slimtune finetune` with both keys."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slimtune.cli import main
from slimtune.data import sample_path
from slimtune.errors import ConfigError
from slimtune.memory.estimate import estimate
from slimtune.memory.plan import fewest_ckpt_blocks
from slimtune.models.decoder import Decoder, init_weights
from slimtune.models.host_embed import HostEmbedding, keep_embedding_on_host, with_host_rows
from slimtune.models.shapes import get_shape
from slimtune.peft import apply_method, freeze_base
from slimtune.precision.policy import resolve_precision
from slimtune.train.step import train_step
from test_memory_estimate import B, T, _batch, _model, _saved_bytes

LORA = {"method": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _lora_model(shape: str = "tiny", seed: int = 0) -> Decoder:
    m = init_weights(Decoder(get_shape(shape)), seed)
    torch.manual_seed(seed)
    apply_method(m, LORA)
    freeze_base(m)
    for n, p in m.named_parameters():  # B starts at zero: make it random so that every factor gets a gradient
        if "lora_B" in n:
            p.data.normal_(0, 0.02)
    return m.train()


def _loss_and_grads(m: Decoder, micro: list[dict]) -> tuple[float, dict[str, torch.Tensor]]:
    """One SGD step's loss and the trainable weights after it (lr 1: w - grad, so equal weights = equal gradients)."""
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    prec = resolve_precision("fp32", torch.device("cpu"))
    out = train_step(m, micro, opt, None, prec, torch.device("cpu"), 0.0, params)
    return out["loss"], {n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}


def _micro(cfg) -> list[dict]:
    ids, _ = _batch(cfg)
    return [{"input_ids": ids, "labels": ids.clone()}]


@pytest.mark.parametrize("n", [0, 1, 3])
def test_partial_checkpointing_equals_full_and_recomputes_only_its_blocks(n):
    calls = [0] * 4

    def counted(m):
        for i, blk in enumerate(m.model.layers):
            blk.register_forward_pre_hook(lambda mod, a, i=i: calls.__setitem__(i, calls[i] + 1))
        return m

    ref = _lora_model()
    ref.grad_ckpt = True
    loss_ref, g_ref = _loss_and_grads(ref, _micro(ref.config))
    m = counted(_lora_model())
    m.grad_ckpt, m.ckpt_blocks = True, n
    loss, g = _loss_and_grads(m, _micro(m.config))
    assert loss == loss_ref
    assert all(torch.equal(g[k], g_ref[k]) for k in g_ref)  # bitwise: recomputation replays the same ops
    assert calls == [2 if i < n else 1 for i in range(4)]  # forward + recompute for the first n blocks only
    with pytest.raises(ConfigError, match="ckpt_blocks"):
        m.ckpt_blocks = -1


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4])
def test_partial_checkpointing_saved_bytes_match_the_estimator(n):
    m = _model("tiny", torch.float32, {"r": 8, "target_modules": ["q_proj", "v_proj"]})
    m.ckpt_blocks = n
    act, _ = _saved_bytes(m, autocast=False, ckpt=n > 0)  # (n = 0: the helper would count block 0's unsaved input)
    e = estimate(m.config, "lora", "fp32", "adamw", B, T, True, lora_rank=8, lora_targets=("q_proj", "v_proj"),
                 chunked_loss=False, device="cpu", ckpt_blocks=n)
    d, L, cfg = e["detail"], 4, m.config
    plain = (d["first_block_saved_bytes"] + (L - 1) * d["block_saved_bytes"] if n == 0 else
             (L - n) * d["block_saved_bytes"])
    blocks = n * B * T * cfg.hidden_size * 4 + plain
    assert act == blocks + d["shared_saved_bytes"] + d["head_saved_bytes"] + B * T * cfg.vocab_size * 4 + B * T * 8 + 4


def test_partial_checkpointing_estimate_spans_none_to_all_and_plan_picks_the_fewest():
    cfg = get_shape("llama3-8b")
    kw = dict(method="qlora", batch=4, seq=2048)
    none, every = estimate(cfg, grad_ckpt=False, **kw)["total_bytes"], estimate(cfg, grad_ckpt=True, **kw)["total_bytes"]
    assert estimate(cfg, grad_ckpt=True, ckpt_blocks=0, **kw)["total_bytes"] == none
    assert estimate(cfg, grad_ckpt=True, ckpt_blocks=32, **kw)["total_bytes"] == every
    peaks = [estimate(cfg, grad_ckpt=True, ckpt_blocks=n, **kw)["total_bytes"] for n in range(33)]
    assert all(a > b for a, b in zip(peaks[:32], peaks[1:32]))  # each checkpointed block saves memory, but the last
    assert abs(peaks[31] - peaks[32]) < 0.01 * peaks[32]  # (whose backward comes at once after the loss)
    budget = (peaks[10] + peaks[11]) // 2  # 11 blocks fit, 10 do not
    n = fewest_ckpt_blocks(cfg, budget, "qlora", 4, 2048, {"precision": "bf16-mixed", "optimizer": "adamw"})
    assert n == 11


def test_host_embedding_gives_the_same_step_and_frees_the_table():
    ref = _lora_model()
    m = _lora_model()
    table = m.model.embed_tokens.weight.detach().clone()
    keep_embedding_on_host(m)
    m.to(torch.float64).to(torch.float32)  # moves and casts leave the host table as it is
    emb = m.model.embed_tokens
    assert isinstance(emb, HostEmbedding) and emb.weight.device.type == "cpu" and torch.equal(emb.weight, table)
    micro = _micro(m.config)
    rows = with_host_rows(m, micro)[0]["inputs_embeds"]
    assert torch.equal(rows, F.embedding(micro[0]["input_ids"], table))
    (loss_ref, g_ref), (loss, g) = _loss_and_grads(ref, micro), _loss_and_grads(m, micro)
    assert loss == loss_ref and all(torch.equal(g[k], g_ref[k]) for k in g_ref)
    assert torch.equal(m(micro[0]["input_ids"]), ref(micro[0]["input_ids"]))  # ids given: the same lookup
    e0, e1 = (estimate(get_shape("llama3-8b"), "qlora", host_embedding=h, grad_ckpt=True) for h in (False, True))
    assert e0["weights_bytes"] - e1["weights_bytes"] == 128256 * 4096 * 2


def test_host_embedding_refuses_tied_and_trained_tables():
    tied = init_weights(Decoder(get_shape("tiny-qwen2")), 0)
    freeze_base(tied)
    with pytest.raises(ConfigError, match="tied"):
        keep_embedding_on_host(tied)
    full = init_weights(Decoder(get_shape("tiny")), 0)
    with pytest.raises(ConfigError, match="trains the embedding"):
        keep_embedding_on_host(full)
    with pytest.raises(ConfigError, match="host_embedding"):
        estimate(get_shape("tiny-qwen2"), "lora", host_embedding=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from slimtune.models.config import ModelConfig
    from slimtune.models.save import save_model
    from slimtune.models.tiny import builtin_tokenizer

    cfg = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=[2, 6],
                      pad_token_id=0)
    return save_model(init_weights(Decoder(cfg), 5, std=0.08), tmp_path_factory.mktemp("lev") / "model",
                      tokenizer=builtin_tokenizer())


def _finetune(model_dir: Path, out: Path, capsys, *extra: str) -> list[float]:
    argv = ["finetune", "method=lora", f"model={model_dir}", f"data={sample_path()}", "data_limit=16",
            "max_length=64", "max_steps=3", "batch_size=2", "val_fraction=0", "warmup_steps=0", "lr=1e-2",
            "precision=fp32", "grad_ckpt=true", f"out_dir={out}", "progress=false", "plot=false", "--json", *extra]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    log = Path(summary["out_dir"]) / "metrics.jsonl" if "out_dir" in summary else next(out.rglob("metrics.jsonl"))
    return [json.loads(line)["loss"] for line in log.read_text().splitlines() if '"loss"' in line]


def test_finetune_with_both_keys_trains_the_same_losses(model_dir, tmp_path, capsys):
    plain = _finetune(model_dir, tmp_path / "a", capsys)
    levers = _finetune(model_dir, tmp_path / "b", capsys, "ckpt_blocks=1", "host_embedding=true")
    assert len(plain) == 3 and plain == levers
    assert _finetune(model_dir, tmp_path / "d", capsys, "ckpt_blocks=auto") == plain  # CPU: no prediction, all blocks
    assert main(["finetune", "method=full", f"model={model_dir}", f"data={sample_path()}", "max_steps=1",
                 f"out_dir={tmp_path / 'c'}", "host_embedding=true", "progress=false"]) == 2
    assert "host_embedding" in capsys.readouterr().err


def test_ckpt_blocks_auto_takes_the_fewest_that_fit_the_free_memory(model_dir, tmp_path, monkeypatch):
    """`ckpt_blocks=auto` on a GPU: the estimator's fewest checkpointed blocks within AUTO_SHARE of the free memory,
    given to the model; a number or nothing else is refused (the free memory is what torch.cuda reports, set here)."""
    from slimtune.models.config import ModelConfig
    from slimtune.train import build
    from slimtune.train.config import load_config

    cfg = load_config(None, [f"model={model_dir}", f"data={sample_path()}", "method=lora", "grad_ckpt=true",
                             "ckpt_blocks=auto", "batch_size=64", "max_length=1024", "precision=bf16-mixed"])
    assert cfg.ckpt_blocks == "auto" and load_config(None, ["data=x", "grad_ckpt=true", "ckpt_blocks=3"]).ckpt_blocks == 3
    with pytest.raises(ConfigError, match="ckpt_blocks"):
        load_config(None, ["data=x", "grad_ckpt=true", "ckpt_blocks=most"])
    mcfg = ModelConfig.from_file(model_dir / "config.json")
    kw = dict(precision="bf16-mixed", optimizer="adamw", lora_rank=16, quant_format="nf4", gpus=1, mlp_tile=8192,
              host_embedding=False, fsdp_reshard=True)
    peaks = [estimate(mcfg, "lora", batch=64, seq=1024, grad_ckpt=True, ckpt_blocks=n, **kw)["total_bytes"]
             for n in range(3)]  # the model has 2 blocks
    lines = []
    for free, want in ((10 * peaks[0], 0), (int((peaks[0] + peaks[1]) / 2 / build.AUTO_SHARE), 1),
                       (min(peaks) // 2, None)):  # nothing fits: every block checkpointed (and a warning)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 2 * free))
        e = build.predict_memory(cfg, torch.device("cuda"), lines.append)
        assert e["ckpt_blocks"] == want, (free, peaks, lines[-2:])
        assert (e["total_bytes"] <= build.AUTO_SHARE * free) == (want is not None)
    assert "ckpt_blocks=auto: 1 of 2 blocks checkpointed" in lines and "probably not fit" in lines[-1]
