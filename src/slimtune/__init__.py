"""slimtune: fine-tune large language models on the GPU you have.

Importing slimtune changes nothing in other libraries; heavy or optional dependencies are imported where used.
"""
__version__ = "0.1.0"

from slimtune.errors import SlimtuneError  # noqa: F401
