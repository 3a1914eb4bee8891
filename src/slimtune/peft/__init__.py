"""Parameter-efficient fine-tuning: inject a method's adapters into any nn.Module, freeze, save and load PEFT files."""
from slimtune.peft.base import METHODS, MethodConfig, MethodSpec, get_method, load_methods, register  # noqa: F401
