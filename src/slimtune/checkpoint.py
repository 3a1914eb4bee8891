"""Deprecated location, kept for one release: what used to live here is now in `slimtune.models` (load_model,
save_model, load_tokenizer), `slimtune.io` (safetensors reading / writing, atomic folders, hub ids) and
`slimtune.precision` (dtype names, the precision guard). Import from there; this module only re-exports.
"""
from slimtune.io.folders import write_folder_atomically  # noqa: F401
from slimtune.io.hub import resolve  # noqa: F401
from slimtune.io.safetensors import (DEFAULT_SHARD, ST_DTYPES, TensorLoc, iter_tensors,  # noqa: F401
                                     read_safetensors_header, read_tensor, save_state_dict, tensor_index,
                                     write_shards)
from slimtune.models.load import load_model  # noqa: F401
from slimtune.models.save import TOKENIZER_FILES, copy_tokenizer_files, save_model  # noqa: F401
from slimtune.models.tokenizer import load_tokenizer  # noqa: F401
from slimtune.precision.formats import DTYPES, parse_dtype  # noqa: F401
from slimtune.precision.guard import check_cast  # noqa: F401
