"""Models: the flat config (`config`), the decoder (`decoder`, with `attention`, `layers`, `cache`), loading and
saving Hugging Face folders (`load`, `save`, `tokenizer`), named shapes (`shapes`) and the built-in tiny model."""
from slimtune.models.config import ModelConfig  # noqa: F401
from slimtune.models.decoder import Decoder  # noqa: F401
from slimtune.models.load import load_model  # noqa: F401
from slimtune.models.save import save_model  # noqa: F401
from slimtune.models.shapes import SHAPES, build_meta, get_shape  # noqa: F401
from slimtune.models.tokenizer import load_tokenizer  # noqa: F401
