"""ReLoRA (Lialin et al. 2023, "ReLoRA: High-Rank Training Through Low-Rank Updates"): LoRA whose update is merged
into the base weights every N steps and then started afresh, so that a sequence of low-rank updates adds up to a
high-rank one; for pre-training (from a random init, `from_scratch`) and full fine-tuning at LoRA's memory.

This module is the method (the config and which parameters train); the restarts themselves (merge, re-initialization,
the optimizer's jagged reset, the learning rate's warm restart) run in the training loop, `train/relora.py`. The
parameters LoRA does not wrap (embeddings, norms, output head) train in full (`relora_train_rest`, as the authors'
pre-training runs). The result of a run is the merged model, saved as a Hugging Face folder.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from slimtune.errors import ConfigError
from slimtune.peft import lora
from slimtune.peft.base import MethodSpec, option, register
from slimtune.peft.layer import layer_parameters, model_adapters
from slimtune.peft.lora import LoraConfig, LoraLinear


@dataclass
class ReLoraConfig(LoraConfig):
    """LoRA's options (all linear layers of the blocks by default), plus the restarts: every relora_every optimizer
    steps the update is merged and LoRA restarts; relora_prune of the LoRA parameters' optimizer state (the smallest
    magnitudes) is zeroed; the learning rate warms up again over relora_warmup steps."""

    method = "relora"
    peft_type = None  # the result is the merged model, not an adapter file
    target_modules: list[str] | str | None = option("all-linear", flat="targets",
                                                    help="modules to adapt: names / suffixes, a regex, or all-linear")
    relora_every: int = option(500, flat="relora_every", help="ReLoRA: merge and restart LoRA every N steps")
    relora_prune: float = option(0.99, flat="relora_prune",
                                 help="ReLoRA: share of the LoRA optimizer state zeroed at a restart (by magnitude)")
    relora_warmup: int = option(50, flat="relora_warmup", help="ReLoRA: learning-rate warmup steps after a restart")
    relora_train_rest: bool = option(True, flat="relora_train_rest",
                                     help="ReLoRA: train what LoRA does not wrap (embeddings, norms, head) in full")

    def validate(self) -> None:
        super().validate()
        if isinstance(self.relora_every, bool) or not isinstance(self.relora_every, int) or self.relora_every < 1:
            raise ConfigError(f"relora_every must be an integer >= 1, got {self.relora_every!r}")
        if not 0.0 <= self.relora_prune <= 1.0:
            raise ConfigError(f"relora_prune must be in [0, 1], got {self.relora_prune!r}")
        if isinstance(self.relora_warmup, bool) or not isinstance(self.relora_warmup, int) or self.relora_warmup < 0:
            raise ConfigError(f"relora_warmup must be an integer >= 0, got {self.relora_warmup!r}")
        if self.use_dora or self.lora_bias or self.modules_to_save:
            raise ConfigError("relora merges plain LoRA updates: use_dora, lora_bias and modules_to_save do not apply")


def rest_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's parameters outside LoRA-wrapped linears and outside adapters (embeddings, norms, head)."""
    skip = set()
    for m in model.modules():
        if isinstance(m, LoraLinear):
            skip |= {id(p) for p in m.parameters()}
    return [p for p in model.parameters() if id(p) not in skip]


def parameters(model: nn.Module, name: str = "default") -> list[nn.Parameter]:
    """LoRA's factors of adapter `name`, and with relora_train_rest the parameters LoRA does not wrap."""
    cfg = model_adapters(model).get(name)
    rest = rest_parameters(model) if cfg is None or cfg.relora_train_rest else []
    return layer_parameters(model, name) + rest


def state_dict(model: nn.Module, name: str = "default") -> dict[str, Tensor]:
    return lora.state_dict(model, name)


SPEC = register(MethodSpec("relora", ReLoraConfig, lora.apply, state_dict, shapes=lora.shapes,
                           parameters=parameters))
