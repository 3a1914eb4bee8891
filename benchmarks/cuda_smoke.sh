#!/usr/bin/env bash
# End-to-end CUDA smoke run of the user-facing commands on the built-in model (run on the GPU machine):
# quickstart, LoRA and QLoRA fine-tuning (memory prediction, bf16-mixed, fused AdamW), generation with an adapter
# (CUDA-graph decoding through LoRA layers), the QLoRA merge, and the CPU reference tests on this torch.
set -euo pipefail
D=${1:-/tmp/slimtune_smoke}
rm -rf "$D"; mkdir -p "$D"
DATA=src/slimtune/data/alpaca_sample.json
slimtune() { python3 -m slimtune "$@"; }
slimtune quickstart --device cuda --steps 30 --out "$D/qs" --json
slimtune finetune configs/lora.yaml model=builtin data=$DATA max_steps=20 batch_size=4 grad_accum=1 \
    max_length=256 device=cuda out_dir="$D/lora" eval_every=0 save_every=10 2>&1 | grep -v "it/s" | tail -8
slimtune finetune configs/qlora.yaml model=builtin data=$DATA max_steps=20 batch_size=4 grad_accum=1 \
    max_length=256 device=cuda out_dir="$D/qlora" eval_every=0 save_every=0 2>&1 | grep -v "it/s" | tail -8
slimtune generate --model builtin --adapter "$D/lora/adapter" --device cuda --max-new-tokens 24 --json
slimtune merge-adapter --model builtin --adapter "$D/qlora/adapter" --out "$D/merged" --qlora --device cuda
slimtune generate --model "$D/merged" --device cuda --max-new-tokens 8 --json
python3 -m pytest -q -p no:cacheprovider tests/test_models_hf.py tests/test_generate.py tests/test_quant_linear.py 2>&1 | tail -2
