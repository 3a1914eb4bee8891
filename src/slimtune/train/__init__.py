"""Training: the flat `TrainConfig`, precision policies, the one loop for every method, and exactly resumable
checkpoints. `train(load_config("configs/lora.yaml", ["lr=1e-4"]))` runs a whole fine-tuning."""
from slimtune.train.checkpoint import find_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from slimtune.train.config import TrainConfig, load_config, save_config
from slimtune.train.loop import (TrainingError, build_data, build_model, build_optimizer, evaluate, lr_at,
                                 train, train_step)
from slimtune.train.precision import AdamWFp32State, Precision, apply_precision, resolve_precision

__all__ = ["find_checkpoint", "list_checkpoints", "load_checkpoint", "save_checkpoint", "TrainConfig",
           "load_config", "save_config", "TrainingError", "build_data", "build_model", "build_optimizer", "evaluate",
           "lr_at", "train", "train_step", "AdamWFp32State", "Precision", "apply_precision", "resolve_precision"]
