"""The data pipeline: read JSON / JSONL / Parquet records, validate and render them with a chat template, tokenize
with the prompt masked out of the loss, pack into rows, and iterate resumably. `build_datasets` does it all."""
from slimtune.data.dataset import DataConfig, DataIterator, TokenDataset, build_datasets, sample_path
from slimtune.data.formats import FORMATS, Example, detect_format, to_example, to_examples
from slimtune.data.pack import collate_padded, model_inputs, pack_examples
from slimtune.data.readers import Record, read_many, read_records
from slimtune.data.templates import TEMPLATE_NAMES, TEMPLATES, Renderer, get_renderer
from slimtune.data.tokenize import IGNORE_INDEX, Tokenized, tokenize_examples

__all__ = ["DataConfig", "DataIterator", "TokenDataset", "build_datasets", "sample_path", "FORMATS", "Example",
           "detect_format", "to_example", "to_examples", "collate_padded", "model_inputs",
           "pack_examples", "Record", "read_many", "read_records", "TEMPLATE_NAMES", "TEMPLATES", "Renderer",
           "get_renderer", "IGNORE_INDEX", "Tokenized", "tokenize_examples"]
