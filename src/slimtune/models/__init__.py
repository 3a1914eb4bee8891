"""Models: the config, the decoder, named shapes and the built-in tiny model."""
from slimtune.models.config import ModelConfig  # noqa: F401
from slimtune.models.decoder import Decoder, KVCache  # noqa: F401
from slimtune.models.shapes import SHAPES, build_meta, get_shape  # noqa: F401
