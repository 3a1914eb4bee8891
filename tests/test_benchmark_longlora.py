"""benchmarks/longlora.py --tiny: the GPU script's whole path (stdlib data, pre-training, perplexities, LongLoRA,
timed steps with S^2-Attn and full attention) runs on the CPU at toy sizes and reports every number it should."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path


def test_longlora_benchmark_tiny(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "longlora.py"
    spec = importlib.util.spec_from_file_location("bench_longlora", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.main(["--tiny", "--pretrain-s", "1.5", "--extend-s", "1"])
    phases = [r["phase"] for r in rows]
    assert phases[:3] == ["data", "pretrain", "eval"] and phases[-1] == "done"
    assert rows[0]["train_tokens"] > 100_000 and rows[0]["val_tokens"] > 1000
    evals = {(r["model"], r["context"]): r for r in rows if r["phase"] == "eval"}
    assert set(evals) == {("base", 32), ("base (no extension)", 128), ("position interpolation, no training", 128),
                          ("LongLoRA", 128), ("LongLoRA", 32)}
    assert all(math.isfinite(r["ppl"]) and r["ppl"] > 1 for r in evals.values())
    assert "ppl_beyond_short" in evals[("LongLoRA", 128)]
    steps = [(r["seq"], r["attention"]) for r in rows if r["phase"] == "steps"]
    assert steps == [(64, "s2"), (64, "full"), (128, "s2"), (128, "full")]
    assert all(r["ok"] and r["tokens_per_s"] > 0 for r in rows if r["phase"] == "steps")
    assert "| LongLoRA | 128 |" in capsys.readouterr().out
