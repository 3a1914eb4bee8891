"""Parameter-efficient fine-tuning: apply a method's adapters to any nn.Module, freeze the rest explicitly, switch,
disable, combine, merge and unload adapters, and read / write Hugging Face PEFT adapter folders.

    cfg = method_config_from_dict({"method": "lora", "r": 16, "lora_alpha": 32, "target_modules": "all-linear"})
    apply_method(model, cfg); freeze_base(model); trainable_report(model); ...; save_adapter(model, "out/")

Layout: `base` (method configs, the option table, the registry), `layer` (AdapterLayer, the adapters a model
carries), `targets` (which modules a method adapts), `api` (the functions below), `files` (PEFT folders), one module
per method (`lora`, `ia3`, `bitfit`, `houlsby`, `prompt`, `prefix`, `ptuning`, `partial`, `qat`).
"""
from slimtune.peft.api import (adapter_parameters, apply_method, combine_adapters, delete_adapter,  # noqa: F401
                               disable_adapters, freeze_base, mark_trainable, merge_and_unload,
                               method_config_from_dict, set_adapter, trainable_report, unload)
from slimtune.peft.base import METHODS, MethodConfig, MethodSpec, get_method, load_methods, register  # noqa: F401
from slimtune.peft.files import load_adapter, read_adapter_config, save_adapter  # noqa: F401
from slimtune.peft.layer import (AdapterLayer, active_adapters, adapter_layers, layer_parameters,  # noqa: F401
                                 model_adapters, set_active_adapters)
from slimtune.peft.targets import find_targets, iter_modules, replace_module  # noqa: F401

load_methods()
