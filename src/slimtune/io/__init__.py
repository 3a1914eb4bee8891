"""Files on disk: safetensors reading and writing (`safetensors`), the one atomic, fsynced folder writer (`folders`),
and model folders from a path or the Hugging Face hub (`hub`). Nothing here knows about models or training."""
