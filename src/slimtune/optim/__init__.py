"""Optimizers and schedules: `make_optimizer` (AdamW, fp32-state AdamW for bf16 weights, 8-bit AdamW, SGD,
CPU-offloaded AdamW; `OPTIMIZERS` names them) and the learning-rate schedule (`schedules`)."""
