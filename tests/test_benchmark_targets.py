"""`benchmarks/targets.py` on the recorded device calls: the issue-12 targets (2k peak <= 0.9x Unsloth's, longest
sequence >= 1.5x) hold in the calls `vs_unsloth.md` / `long_context.md` cite, the first call's 2k peak missed, and the
LoRA bf16 2.5x of issue 11 is reported as missed there and met in the third session's call; issue 13's FSDP2
speedups, losses and 70B prediction on the recorded x2 calls."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "benchmarks" / "runs"


def verdicts(*args: str) -> dict[str, tuple[str, float]]:
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "targets.py"), *args], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode in (0, 1) and r.stdout, r.stderr
    return {line[15:]: (line[:6].strip(), float(line[7:13])) for line in r.stdout.splitlines()}


def test_recorded_calls_against_the_targets():
    latest = verdicts("--vs", str(RUNS / "2026-11-30-vs_unsloth-levers.jsonl"),
                      "--long", str(RUNS / "2026-11-30-long_context_capped16.jsonl"))
    assert latest["12: QLoRA b1 2k peak <= 0.9x Unsloth's"] == ("met", 0.853)
    assert latest["12: longest QLoRA sequence >= 1.5x Unsloth's"] == ("met", 2.0)
    assert latest["12: offloaded checkpointing's last loss within 1e-2 of plain checkpointing (bf16)"] == ("met", 0.001)
    assert latest["11: QLoRA b1 tokens/s >= 1.3x Unsloth (peak <= 9.31 GiB)"][0] == "met"
    assert latest["11: LoRA bf16 b1 >= 2.5x transformers + PEFT (no more memory)"] == ("MISSED", 2.344)
    first = verdicts("--vs", str(RUNS / "2026-11-30-vs_unsloth.jsonl"))
    assert first["12: QLoRA b1 2k peak <= 0.9x Unsloth's"] == ("MISSED", 1.058)


def test_base_last_call_meets_every_issue_11_and_12_target():
    got = verdicts("--vs", str(RUNS / "2026-11-30-vs_unsloth-base_last.jsonl"))
    assert got == {"11: QLoRA b1 tokens/s >= 1.3x Unsloth (peak <= 9.31 GiB)": ("met", 1.934),
                   "12: QLoRA b1 2k peak <= 0.9x Unsloth's": ("met", 0.853),
                   "11: QLoRA b4 tokens/s >= 1.15x Unsloth": ("met", 1.252),
                   "11: LoRA bf16 b1 >= 2.5x transformers + PEFT (no more memory)": ("met", 2.628),
                   "12: offloaded checkpointing's last loss within 1e-2 of plain checkpointing (bf16)": ("met", 0.001)}


def test_recorded_fsdp_calls_against_issue_13():
    # bf16-stored 4-bit bytes (the second session): QLoRA's losses shifted by 4.6e-2 on two GPUs, 1.83x
    old = verdicts("--fsdp", str(RUNS / "2026-11-30-fsdp_x2_rows4.txt"))
    assert old["13: qlora 8B losses of 2 GPUs within 1e-2 of one GPU"] == ("MISSED", 0.046)
    assert old["13: lora 8B on 2 GPUs >= 1.85x one GPU"] == ("met", 1.874)
    assert old["13: lora 8B losses of 2 GPUs within 1e-2 of one GPU"] == ("met", 0.001)
    # fp32-stored bytes gathered uncast: step 0 bitwise equal, 1.7e-3 over 20 steps; 6 rows per GPU 1.92x
    new = verdicts("--fsdp", str(RUNS / "2026-11-30-fsdp_qlora_fp32storage_x2.txt"))
    assert new == {"13: qlora 8B on 2 GPUs >= 1.85x one GPU": ("met", 1.92),
                   "13: qlora 8B losses of 2 GPUs within 1e-2 of one GPU": ("met", 0.002)}
    huge = verdicts("--fsdp", str(RUNS / "2026-11-30-fsdp_70b_x2.txt"))
    assert huge == {"13: 70B-shape QLoRA peak within 10% of the prediction": ("met", 0.046)}
    # the current layout (third session): LoRA and the 70B shape again
    lora = verdicts("--fsdp", str(RUNS / "2026-11-30-fsdp_lora_base_last_x2.txt"))
    assert lora == {"13: lora 8B on 2 GPUs >= 1.85x one GPU": ("met", 1.869),
                    "13: lora 8B losses of 2 GPUs within 1e-2 of one GPU": ("met", 0.002)}
    huge = verdicts("--fsdp", str(RUNS / "2026-11-30-fsdp_70b_fp32storage_x2.txt"))
    assert huge == {"13: 70B-shape QLoRA peak within 10% of the prediction": ("met", 0.03)}
