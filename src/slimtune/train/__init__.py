"""Training: the flat `TrainConfig` (`config`), building a run (`build`), one step (`step`), the loss (`loss`),
evaluation (`evaluate`), metrics (`metrics`), activation offload (`offload`), exactly resumable checkpoints
(`checkpoint`) and the one loop for every method (`loop`). `train(load_config("configs/lora.yaml", ["lr=1e-4"]))`
runs a whole fine-tuning.

The names below are loaded on first use, so that importing one submodule (e.g. `slimtune.train.loss` from a method)
does not import the whole loop.
"""
import importlib

_EXPORTS = {
    "TrainConfig": "config", "load_config": "config", "save_config": "config",
    "train": "loop", "Run": "loop", "save_result": "loop",
    "TrainingError": "step", "train_step": "step", "forward_loss": "step",
    "build_data": "build", "build_model": "build", "build_optimizer": "build", "method_config": "build",
    "evaluate": "evaluate",
    "find_checkpoint": "checkpoint", "list_checkpoints": "checkpoint", "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"slimtune.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'slimtune.train' has no attribute {name!r}")
