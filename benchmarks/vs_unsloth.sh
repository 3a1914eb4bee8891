#!/usr/bin/env bash
# One device call, one checkpoint: transformers + PEFT (+ bitsandbytes), Unsloth and slimtune side by side on the
# random Llama-3-8B-shape checkpoint (seq 2048, LoRA r16 on the 7 projections), results in $OUT/results.jsonl.
#
# Needs ../shared/bench copied into .bench (ignored by git) and carried:  rm -rf .bench; cp -r ../shared/bench .bench
#   device run (carry [".bench"]):  bash benchmarks/vs_unsloth.sh
# HF_RUNS (default "qlora:1 lora:1"), UNSLOTH_BATCHES (default 1,4), ST_RUNS (slimtune argument sets, ';'-separated).
set -u
B=.bench
OUT=${OUT:-/tmp/vs_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 TOKENIZERS_PARALLELISM=false
mkdir -p /tmp/site_base /tmp/site_uns
[ -f /tmp/site_base/.done ] || { tar -C /tmp/site_base -xJf "$B/wheels/base.tar.xz" && touch /tmp/site_base/.done; }
[ -f /tmp/site_uns/.done ] || { tar -C /tmp/site_uns -xJf "$B/wheels/uns.tar.xz" && touch /tmp/site_uns/.done; }
CK=/tmp/anchor_model
run() {  # run NAME CMD...: log everything, keep the JSON result lines
  echo "===== $1" | tee -a "$OUT/log.txt"; shift
  local t0=$SECONDS
  "$@" > /tmp/run.out 2>&1; local rc=$?
  cat /tmp/run.out >> "$OUT/log.txt"; grep '^{' /tmp/run.out >> "$OUT/results.jsonl"
  echo "----- rc=$rc ($((SECONDS - t0)) s)" | tee -a "$OUT/log.txt"; tail -n 1 /tmp/run.out | cut -c1-400
}
for r in ${HF_RUNS-qlora:1 lora:1}; do
  run "hf ${r}" env PYTHONPATH=/tmp/site_base python3 "$B/hf_baseline.py" --workdir $CK --mode "${r%:*}" --batch "${r#*:}"
done
[ -f "$CK/config.json" ] || \
  PYTHONPATH=/tmp/site_base python3 "$B/hf_baseline.py" --workdir $CK --mode qlora --seq 256 --steps 1 --warmup 0 >/dev/null 2>&1
if [ "${UNSLOTH_BATCHES-1,4}" != "" ]; then
  run unsloth env PYTHONPATH=/tmp/site_uns:/tmp/site_base python3 "$B/unsloth_bench.py" --model $CK \
      --batches "${UNSLOTH_BATCHES-1,4}" ${UNSLOTH_ARGS:-}
fi
IFS=';' read -ra SETS <<< "${ST_RUNS-"--batch 1;--batch 4;--mode lora --batch 1;--batch 1 --kernels off"}"
for s in "${SETS[@]}"; do
  run "slimtune $s" env PYTHONPATH=src python3 benchmarks/qlora_8b.py --model $CK $s
done
python3 - "$OUT/results.jsonl" <<'PY'
import json, sys
for l in open(sys.argv[1]):
    try: r = json.loads(l)
    except ValueError: continue
    print(r.get("stack"), r.get("mode"), "b", r.get("batch"), "seq", r.get("seq"), "k", r.get("kernels", "-"),
          "tok/s", r.get("tokens_per_s"), "GiB", r.get("peak_gib"), r.get("error", ""))
PY
python3 benchmarks/targets.py --vs "$OUT/results.jsonl" | tee -a "$OUT/log.txt"  # issues 11 / 12: one verdict each
