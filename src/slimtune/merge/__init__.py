"""Model merging (linear, task arithmetic, TIES, DARE, SLERP) over checkpoints and LoRA adapters, streamed tensor by
tensor from mergekit-style YAML configs. `merge(load_config(path), out)` is the whole pipeline."""
from slimtune.merge.config import MergeConfig, ModelEntry, load_config, parse_config
from slimtune.merge.stream import merge, plan_merge

__all__ = ["MergeConfig", "ModelEntry", "load_config", "parse_config", "merge", "plan_merge"]
