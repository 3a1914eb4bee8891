"""Post-training quantization of a whole checkpoint: quantize every linear layer (one format, or a mixed-bit budget),
measure size, weight error and perplexity before / after, and write a Hugging Face folder that slimtune loads back.

The folder's config.json carries `quantization_config = {"quant_method": "slimtune", "format", "group_size",
"double_quant", "skip", "layers": {name: format}}`; model.safetensors holds each QuantLinear's buffers (4-bit layers
in bitsandbytes' key layout), the other tensors as they were; the tokenizer files are copied (`slimtune.models.save.
save_quantized`); `slimtune.models.load.load_quantized` reads it.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimtune.errors import ConfigError
from slimtune.quant.codecs import GROUPED

PTQ_FORMATS = ("int8", "int4", "nf4", "fp4", "fp8", "w8a8")


def _state_bytes(model: nn.Module) -> int:
    seen, n = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        n += t.numel() * t.element_size()
    return n


def quant_config(fmt: str, group_size: int | None, double_quant: bool, skip: tuple[str, ...],
                 layers: dict[str, str]) -> dict[str, Any]:
    """The config.json `quantization_config` entry of a slimtune-quantized checkpoint."""
    return {"quant_method": "slimtune", "format": fmt, "group_size": group_size, "double_quant": double_quant,
            "skip": list(skip), "layers": layers}


# ---- evaluation ---------------------------------------------------------------------------------------------------
class TextRows:
    """Rows of `max_length` tokens cut from one plain text (every token trained); the `TokenDataset` batch API."""

    def __init__(self, ids: list[int], max_length: int) -> None:
        n = len(ids) // max_length
        self.rows = torch.tensor(ids[: n * max_length], dtype=torch.long).view(n, max_length)  # (rows, T)

    def __len__(self) -> int:
        return self.rows.shape[0]

    def collate(self, indices) -> dict[str, torch.Tensor]:
        x = self.rows[list(indices)]
        return {"input_ids": x, "labels": x.clone()}


def eval_data(path: str | Path | None, tokenizer, limit: int, max_length: int):
    """(calibration rows, evaluation rows) from an instruction / chat / text-record file (default: the bundled Alpaca
    sample): its first `limit` records split half and half (seeded), tokenized and packed by `slimtune.data`. A plain
    `.txt` file is tokenized whole and cut into rows, alternately calibration and evaluation.

    Raises:
        DataError: an unreadable file, too little text for two rows.
    """
    from slimtune.data import DataConfig, build_datasets, sample_path
    from slimtune.errors import DataError

    if path is not None and Path(path).suffix.lower() == ".txt":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read it as UTF-8 text ({type(e).__name__})") from None
        rows = TextRows(tokenizer(text)["input_ids"], max_length)
        if len(rows) < 2:
            raise DataError(f"{path}: fewer than 2 x {max_length} tokens of text; fix: a longer file or a smaller "
                            "--max-length")
        calib, val = TextRows([], max_length), TextRows([], max_length)
        calib.rows, val.rows = rows.rows[0::2], rows.rows[1::2]
        return calib, val
    dc = DataConfig(path=str(path or sample_path()), limit=limit, max_length=max_length, pack=True,
                    val_fraction=0.5, seed=0)
    calib, val, _ = build_datasets(dc, tokenizer)
    return calib, val


def mean_loss(model: nn.Module, dataset, batch_size: int = 8, max_rows: int | None = None) -> float:
    """Mean next-token loss (nats) over the dataset's rows (the first `max_rows` when given)."""
    from slimtune.train.evaluate import evaluate

    return evaluate(model, dataset, batch_size, max_rows=max_rows)["val_loss"]


# ---- quantizing -----------------------------------------------------------------------------------------------------
def quantize_layers(model: nn.Module, plan: dict[str, str], group_size: int | None,
                    double_quant: bool | None = None) -> dict[str, Any]:
    """Replace each layer of `plan` ({name: format}) by its QuantLinear, in place, one at a time.

    Returns:
        {'errors': {name: ||W - Q(W)||_F / ||W||_F}, 'sq_err', 'sq_norm' (sums over layers), 'outliers': [...],
         'code_bits': sum of n_l * bits_l, 'overhead_bits': sum of scale / zero bits, 'params': sum of n_l}.
    Raises:
        ConfigError: a group size that does not divide a layer's width. PrecisionError: NaN / inf weights.
    """
    from slimtune.precision.guard import outlier_message, scan_weight
    from slimtune.quant.codecs import get_codec
    from slimtune.quant.codecs.fourbit import FORMATS_4BIT
    from slimtune.quant.linear import QuantLinear
    from slimtune.quant.mixed import overhead_bits

    rep: dict[str, Any] = {"errors": {}, "sq_err": 0.0, "sq_norm": 0.0, "outliers": [], "code_bits": 0,
                           "overhead_bits": 0.0, "params": 0}
    for n, fmt in plan.items():
        lin = model.get_submodule(n)
        w = lin.weight.detach()
        msg = outlier_message(f"{n}.weight", scan_weight(f"{n}.weight", w, fmt))
        if msg:
            rep["outliers"].append(msg)
        g = group_size if fmt in GROUPED else None
        dq = (fmt in FORMATS_4BIT) if double_quant is None else (double_quant and fmt in FORMATS_4BIT)
        q = QuantLinear.from_weight(w, lin.bias, fmt, g, dq, f"{n}.weight")
        wf = w.float()
        e2 = (q.dequantize(torch.float32) - wf).pow(2).sum().item()
        n2 = wf.pow(2).sum().item()
        rep["errors"][n] = math.sqrt(e2 / max(n2, 1e-30))
        rep["sq_err"] += e2
        rep["sq_norm"] += n2
        rep["code_bits"] += w.numel() * get_codec(fmt).code_bits
        scale_bits = (q.nbytes() * 8 - w.numel() * get_codec(fmt).code_bits) if fmt in FORMATS_4BIT else \
            overhead_bits(fmt, w.shape[1], q.group_size) * w.numel()
        rep["overhead_bits"] += scale_bits
        rep["params"] += w.numel()
        model.set_submodule(n, q)
        del lin, w, wf, q
    return rep


# ---- the whole job --------------------------------------------------------------------------------------------------
def _check_job(fmt: str | None, group_size: int | None, bits: float | None, counts: dict[str, int]) -> None:
    """Raise ConfigError unless exactly one of fmt / bits is given, the format is one PTQ offers, a group size goes
    only with a grouped format, the budget is one 2-8 bit layers can average, and the counts are in range
    (`counts`: flag -> value; --max-length needs 2, the others 1)."""
    for flag, n in counts.items():
        low = 2 if flag == "--max-length" else 1
        if n is not None and n < low:
            raise ConfigError(f"quantize: {flag} {n} is too small; fix: give {low} or more")
    if (fmt is None) == (bits is None):
        raise ConfigError("quantize: give either --format (one format for every layer) or --bits (a mixed budget)")
    if fmt is not None and fmt not in PTQ_FORMATS:
        raise ConfigError(f"quantize: unknown format {fmt!r}; choose one of {', '.join(PTQ_FORMATS)}")
    if fmt is not None and fmt not in GROUPED and group_size is not None:
        raise ConfigError(f"quantize: format {fmt} is per channel and takes no --group; drop --group {group_size}")
    if bits is not None and not 2 <= bits <= 8:
        raise ConfigError(f"quantize: --bits {bits:g} is outside what 2, 3, 4 and 8-bit layers can average; choose "
                          "a value in [2, 8]")


def quantize_checkpoint(model_path: str | Path, out: str | Path, fmt: str | None = None,
                        group_size: int | None = None, bits: float | None = None, eval_path: str | Path | None = None,
                        eval_limit: int = 200, max_length: int = 256, evaluate: bool = True,
                        device: str | torch.device = "cpu", skip: tuple[str, ...] = ("lm_head",),
                        calib_rows: int = 8) -> dict[str, Any]:
    """Quantize `model_path` (one format, or a mixed int2/3/4/8 budget of `bits` average code bits), save to `out`.

    Sensitivities for a budget are measured on the first `calib_rows` rows of the calibration half of the data; the
    perplexity on the other (held-out) half.

    Returns:
        the report: sizes before / after, weight relative error (overall and worst layer), losses and perplexities
        before / after on the evaluation half of `eval_path` (default: the bundled Alpaca sample), and for a budget
        the allocation table with sensitivities, the achieved bits and the scale / zero overhead.
    Raises:
        ConfigError: an unknown format, both or neither of fmt and bits, a group size that does not divide a width.
        CheckpointError, DataError, PrecisionError: from loading the model and the data.
    """
    from slimtune.io.hub import resolve
    from slimtune.models.fallback import require_decoder
    from slimtune.models.load import load_model
    from slimtune.models.save import save_quantized
    from slimtune.models.tiny import BUILTIN_NAMES
    from slimtune.models.tokenizer import load_tokenizer
    from slimtune.quant.linear import QuantLinear, linear_names
    from slimtune.quant.mixed import allocate_bits, layer_format, measure_sensitivity

    _check_job(fmt, group_size, bits, {"--group": group_size, "--max-length": max_length,
                                       "--eval-limit": eval_limit, "--calib-rows": calib_rows})
    t0 = time.perf_counter()
    model, _ = load_model(model_path, device=device)
    require_decoder(model, "post-training quantization")
    tok = load_tokenizer(model_path)
    names = linear_names(model, skip)
    if not names:
        raise ConfigError(f"quantize: {model_path} has no linear layer outside {', '.join(skip)}")
    for n in names:  # a bad group size fails now, before any evaluation
        lin = model.get_submodule(n)
        for f in [fmt] if fmt else ["int2", "int3", "int4"]:
            QuantLinear(lin.in_features, lin.out_features, f, group_size=group_size if f in GROUPED else None,
                        device="meta", name=f"{n}.weight")
    calib = val = None
    if evaluate or bits is not None:
        calib, val = eval_data(eval_path, tok, eval_limit, max_length)
    rep: dict[str, Any] = {"model": str(model_path), "out": str(out), "format": fmt or "mixed",
                           "group_size": group_size, "layers": len(names), "bytes_before": _state_bytes(model)}
    if val is not None and evaluate:
        rep["loss_before"] = mean_loss(model, val)
    if bits is not None:
        g = group_size or 64
        sizes = {n: model.get_submodule(n).weight.numel() for n in names}
        base, sens = measure_sensitivity(model, names, lambda m: mean_loss(m, calib, max_rows=calib_rows), g)
        alloc, exact = allocate_bits(sizes, sens, bits)
        plan = {n: layer_format(b) for n, b in alloc.items()}
        rep.update(group_size=g, bits_target=bits, exact=exact, calib_loss=base,
                   allocation=[{"layer": n, "params": sizes[n], "bits": alloc[n], "format": plan[n],
                                "sensitivity": {str(b): s for b, s in sens[n].items()}} for n in names])
    else:
        plan = {n: fmt for n in names}
    q = quantize_layers(model, plan, group_size if bits is None else rep["group_size"])
    dq = any(f in ("nf4", "fp4") for f in plan.values())
    qcfg = quant_config(fmt or "mixed", rep["group_size"] if any(f in GROUPED for f in plan.values()) else None,
                        dq, skip, plan)
    rep["group_size"] = qcfg["group_size"]
    rep.update(bytes_after=_state_bytes(model), weight_rel_error=math.sqrt(q["sq_err"] / max(q["sq_norm"], 1e-30)),
               max_layer_rel_error=max(q["errors"].values()), bits_codes=q["code_bits"] / q["params"],
               bits_overhead=q["overhead_bits"] / q["params"], outliers=q["outliers"],
               layer_errors=q["errors"])
    for row in rep.get("allocation", []):
        row["rel_error"] = q["errors"][row["layer"]]
    if val is not None and evaluate:
        rep["loss_after"] = mean_loss(model, val)
        rep["ppl_before"], rep["ppl_after"] = math.exp(rep["loss_before"]), math.exp(rep["loss_after"])
        rep["ppl_change"] = rep["ppl_after"] - rep["ppl_before"]
        rep["eval_rows"] = len(val)
    builtin = str(model_path) in BUILTIN_NAMES
    save_quantized(model, out, qcfg, tokenizer=tok if builtin else None,
                   tokenizer_dir=None if builtin else resolve(model_path))
    rep["seconds"] = time.perf_counter() - t0
    return rep
