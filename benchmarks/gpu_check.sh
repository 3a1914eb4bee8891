#!/usr/bin/env bash
# One device call on one H200: the kernels' CUDA tests, their microbenchmarks, and QLoRA 8B steps with kernels on and
# off and with the tree before the layout change (.old, carried: `git archive 0e17dab src benchmarks | tar -x -C .old`),
# all on one random checkpoint. Everything lands in $OUT (log.txt, results.jsonl, kernels.json).
#   device run (carry [".old"]):  bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
step() {  # step NAME CMD...: log, time, keep JSON lines
  echo "===== $1" | tee -a "$OUT/log.txt"; shift
  local t0=$SECONDS
  timeout "${STEP_LIMIT:-300}" "$@" > /tmp/step.out 2>&1; local rc=$?
  cat /tmp/step.out >> "$OUT/log.txt"; grep '^{' /tmp/step.out >> "$OUT/results.jsonl"
  echo "----- rc=$rc ($((SECONDS - t0)) s)" | tee -a "$OUT/log.txt"; tail -n 3 /tmp/step.out | cut -c1-600
}
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | tee -a "$OUT/log.txt"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  step cuda-tests env PYTHONPATH=src python3 -m pytest -q -p no:cacheprovider tests/test_kernels_nf4.py \
    tests/test_kernels_rmsnorm.py tests/test_kernels_rope.py tests/test_kernels_swiglu.py tests/test_kernels_lora.py \
    tests/test_kernels_cross_entropy.py tests/test_kernels_triton.py tests/test_train_graphed.py ${EXTRA_TESTS:-}
fi
[ "${SKIP_MICRO:-0}" = 1 ] || step kernels-micro env PYTHONPATH=src OUT="$OUT" python3 benchmarks/kernels_check.py --quick
CK=/tmp/slimtune_qlora_model/llama3-8b
IFS=';' read -ra SETS <<< "${ST_RUNS-"--kernels auto --profile;--kernels off --profile"}"
for s in "${SETS[@]}"; do
  step "slimtune $s" env PYTHONPATH=src python3 benchmarks/qlora_8b.py --batch 1 $s
done
[ "${RUN_CURVE:-0}" = 1 ] && step loss-curve env PYTHONPATH=src OUT="$OUT" python3 benchmarks/loss_curve.py
if [ -d .old ] && [ "${SKIP_OLD:-0}" != 1 ]; then
  step "before the layout (0e17dab)" env PYTHONPATH=.old/src python3 .old/benchmarks/qlora_8b.py --batch 1 --model $CK
fi
python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    try: r = json.loads(l)
    except ValueError: continue
    if "stack" not in r: continue
    p = r.get("profile") or {}
    print(r.get("stack"), r.get("mode"), "b", r.get("batch"), "k", r.get("kernels", "-"), "tok/s", r.get("tokens_per_s"),
          "GiB", r.get("peak_gib"), "graph", r.get("graph"), "launches", p.get("launches"), "api", p.get("cpu_launch_calls"),
          "idle", p.get("idle_frac"), "loss", r.get("loss_last"))
PY
