"""The names a run key may be written as: its own; an alias (the torchtune / axolotl / transformers / PEFT spelling,
declared once: run keys in `RUN_ALIASES` below, method options on their field with `option(..., aliases=)`);
or a dotted form. For a name that is none of these: a suggestion that names a real key, or what to write instead.

Dotted forms (also nested YAML mappings under a section name, e.g. `optimizer: {lr: 1e-4}`):
- `SECTION.KEY` with SECTION one of `DOTTED_SECTIONS` or a method name: KEY read as above (`optimizer.lr`,
  `training.learning_rate`, `model.lora_rank`, `tokenizer.max_seq_len`, `lora.alpha`);
- `METHOD.FIELD`, a field of that method's config (`lora.r`, `lora.init_lora_weights`): its flat key where it has
  one, else `method_args[FIELD]`;
- `method_args.FIELD`: `method_args[FIELD]`.
"""
from __future__ import annotations

import difflib
from collections.abc import Collection, Mapping

# section names that group keys in torchtune / axolotl / transformers configs and carry no meaning of their own
DOTTED_SECTIONS = ("training", "train", "trainer", "optimizer", "optim", "lr_scheduler", "scheduler", "dataset",
                   "tokenizer", "model", "peft", "adapter", "checkpointer")
# difflib ratio for "did you mean": typos score 0.8-0.95 ('bach_size' / batch_size 0.95, 'lrr' / lr 0.8); unrelated
# names that share letters stay below ('lora_r' / log_every 0.4, which a cutoff of 0.5 still let through once)
SUGGEST_CUTOFF = 0.75

# other spellings of run keys, as torchtune, axolotl, transformers' TrainingArguments and TRL write them (same meaning
# and values): read as the key, never written back. Method options declare theirs on their field
# (`peft.base.option(..., aliases=...)`: lora_r, lora_rank, lora_alpha, lora_dropout, lora_target_modules, ...).
RUN_ALIASES: dict[str, tuple[str, ...]] = {
    "model": ("base_model", "model_name_or_path"), "method": ("adapter",),
    "data": ("train_file",), "max_length": ("sequence_len", "max_seq_length", "max_seq_len", "cutoff_len"),
    "packing": ("sample_packing", "packed"), "train_on_prompt": ("train_on_inputs",), "val_fraction": ("val_set_size",),
    "grad_ckpt": ("gradient_checkpointing", "enable_activation_checkpointing"),
    "batch_size": ("micro_batch_size", "per_device_train_batch_size"), "grad_accum": ("gradient_accumulation_steps",),
    "epochs": ("num_epochs", "num_train_epochs"), "lr": ("learning_rate",), "warmup_steps": ("num_warmup_steps",),
    "schedule": ("lr_scheduler", "lr_scheduler_type"), "max_grad_norm": ("clip_grad_norm",),
    "eval_every": ("eval_steps",), "save_every": ("save_steps",), "keep_last": ("save_total_limit",),
    "resume": ("resume_from_checkpoint",), "out_dir": ("output_dir",), "log_every": ("logging_steps",),
}
# foreign keys whose value means something else than here: refused with the slimtune setting to write instead
INSTEAD: dict[str, str] = {
    "lora_target_linear": "targets=all-linear", "load_in_4bit": "method=qlora (quant=nf4)",
    "load_in_8bit": "method=qlora quant=int8", "bf16": "precision=bf16-mixed (or bf16-true)",
    "fp16": "precision=fp16-mixed", "optim": "optimizer=adamw, adamw8bit or sgd",
    "datasets": "data=FILE (a .json / .jsonl / .parquet file, or a list of them)",
    "lora_attn_modules": "targets=q_proj,k_proj,v_proj,o_proj (or all-linear)",
    "_component_": "method=..., optimizer=... and schedule=... (slimtune builds the objects itself)",
}


def alias_map(run_aliases: Mapping[str, Collection[str]],
              option_aliases: Mapping[str, Collection[str]]) -> dict[str, str]:
    """alias -> key, from the run keys' and the method options' declarations."""
    out: dict[str, str] = {}
    for table in (run_aliases, option_aliases):
        for key, names in table.items():
            out.update(dict.fromkeys(names, key))
    return out


def resolve_key(key: str, keys: Collection[str], aliases: Mapping[str, str],
                method_fields: Mapping[str, Mapping[str, str | None]]) -> tuple[str, str | None] | None:
    """The key a written name sets.

    Args:
        keys: every run key (the run's fields and the methods' flat options).
        aliases: alias -> key (`alias_map`).
        method_fields: method -> {field: its flat key or None}.
    Returns:
        (key, None) for a run key; ('method_args', field) for a method field without a flat key; None if unknown.
    """
    if key in keys:
        return key, None
    if key in aliases:
        return aliases[key], None
    head, dot, rest = key.partition(".")
    if not dot or not rest:
        return None
    if head == "method_args":
        return "method_args", rest
    fields = method_fields.get(head, {})
    if rest in fields:
        flat = fields[rest]
        return (flat, None) if flat else ("method_args", rest)
    if head in DOTTED_SECTIONS or head in method_fields:
        found = resolve_key(rest, keys, aliases, {}) if "." not in rest else None
        return found
    return None


def unknown_key_hint(key: str, keys: Collection[str], aliases: Mapping[str, str], instead: Mapping[str, str],
                     method_names: Collection[str]) -> str:
    """The end of the one-line error for an unknown name: what to write instead (a foreign key whose value differs
    from a plain rename), the closest real key (its own name, also when the closest spelling is an alias), the
    dotted forms (for a dotted name), or the valid keys."""
    leaf = key.rpartition(".")[2]
    if key in instead or leaf in instead:
        return f"; write {instead.get(key) or instead[leaf]} instead"
    spelled = {**{k: k for k in keys}, **aliases}
    close = difflib.get_close_matches(leaf, list(spelled), n=1, cutoff=SUGGEST_CUTOFF)
    if close:
        return f"; did you mean '{spelled[close[0]]}'?"
    if "." in key:
        return (f"; dotted keys are SECTION.KEY (SECTION: {', '.join(DOTTED_SECTIONS)} or a method: "
                f"{', '.join(sorted(method_names))}), METHOD.FIELD or method_args.FIELD")
    return f"; valid keys: {', '.join(keys)}"
