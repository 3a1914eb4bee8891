"""What a run records: metrics.jsonl (one JSON object per logged step, flushed line by line), optional TensorBoard
scalars, and the loss curve as a PNG."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimtune.errors import ConfigError


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every line of a metrics.jsonl (an unfinished last line, from a kill, is skipped)."""
    out = []
    p = Path(path)
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def truncate_metrics(path: Path, step: int, final: bool = False) -> None:
    """Drop lines after `step` (written by a run that died after its last checkpoint), so a resumed run's file reads
    as that of an uninterrupted one. `final`: `step` is the last step, whose validation line follows its checkpoint
    (and is written again by the resumed run), so it goes too."""
    if path.exists():
        keep = [json.dumps(r) for r in read_metrics(path) if r.get("step", 0) < step or
                (r.get("step", 0) == step and not (final and "val_loss" in r))]
        path.write_text("".join(line + "\n" for line in keep))


def plot_losses(metrics_path: Path, png: Path) -> Path | None:
    """Training loss per step and validation loss as a PNG (matplotlib's Agg canvas; no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    tr = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    va = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    if not tr and not va:
        return None
    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if tr:
        ax.plot(*zip(*tr), label="train loss", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    return png


class MetricsLogger:
    """metrics.jsonl (appended and flushed line by line), optional TensorBoard scalars in out/tensorboard (flushed
    row by row too, so a killed run's events are complete). `purge_step`: a resumed run logs again from this step;
    TensorBoard hides the earlier run's events from it on (as `truncate_metrics` does for metrics.jsonl)."""

    def __init__(self, out: Path, tensorboard: bool, purge_step: int | None = None) -> None:
        self.path = out / "metrics.jsonl"
        self.f = open(self.path, "a")
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("log_tensorboard=true needs the tensorboard package; fix: pip install tensorboard"
                                  ) from None
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)

    def log(self, row: dict[str, Any]) -> None:
        self.f.write(json.dumps(row) + "\n")
        self.f.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(k, v, row["step"])
            self.tb.flush()

    def close(self) -> None:
        self.f.close()
        if self.tb is not None:
            self.tb.close()


class NullLogger:
    """What a rank that writes nothing logs to (runs on several processes: rank 0 writes the metrics)."""

    def log(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
