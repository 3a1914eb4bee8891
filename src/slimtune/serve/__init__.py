"""Serving: an OpenAI-compatible HTTP server over one base model and many LoRA adapters decoded in the same batches.

    from slimtune.serve.build import ServeOptions, build      # load the model and adapters, start the engine
    from slimtune.serve.app import create_app                 # the Starlette app (run it with uvicorn)

Modules: build (assembly), engine (continuous batching), runner (forward passes, CUDA graphs), cache (paged KV
cache), lora (mixed-adapter LoRA), sampling (per-row sampling), detok (incremental text), protocol (request checks),
app (HTTP routes). See docs/serving.md.
"""
