"""Model merging (linear, task arithmetic, TIES, DARE, breadcrumbs, DELLA, SLERP, NuSLERP, Model Stock, passthrough
layer stacking) over checkpoints and LoRA adapters, streamed tensor by tensor from mergekit-style YAML configs.
`merge(load_config(path), out)` is the whole pipeline."""
from slimtune.merge.config import MergeConfig, ModelEntry, load_config, parse_config
from slimtune.merge.plan import plan_merge
from slimtune.merge.stream import merge

__all__ = ["MergeConfig", "ModelEntry", "load_config", "parse_config", "merge", "plan_merge"]
