"""TensorBoard logging, read back with TensorBoard's own event reader: every scalar of metrics.jsonl at its step; each
row on disk as soon as it is logged (as metrics.jsonl, so a killed run's events are complete); a resumed run's
re-logged steps replace those of the run it resumes (TensorBoard's purge_step)."""
from __future__ import annotations

import pytest

from slimtune.data import sample_path
from slimtune.train import load_config, train
from slimtune.train.metrics import MetricsLogger, read_metrics

pytest.importorskip("tensorboard")


def scalars(folder) -> dict[str, dict[int, float]]:
    """tag -> {step: value} as TensorBoard shows them (orphaned events purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        out[tag] = {e.step: e.value for e in events}
        assert len(out[tag]) == len(events), f"{tag}: a step shown twice"
    return out


def test_scalars_match_metrics_jsonl(tmp_path):
    argv = ["model=builtin", f"data={sample_path()}", "data_limit=30", "max_length=128", "val_fraction=0.2",
            "batch_size=4", "max_steps=6", "eval_every=3", "save_every=3", "log_tensorboard=true", "progress=false",
            "plot=false", "save_final=false", "lr=1e-3", f"out_dir={tmp_path}"]
    train(load_config(None, argv), log=lambda m: None)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    tb = scalars(tmp_path / "tensorboard")
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                assert tb[k][r["step"]] == pytest.approx(v, rel=1e-6), (k, r["step"])
    assert set(tb["loss"]) == set(range(1, 7)) and set(tb["val_loss"]) == {0, 3, 6}
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1


def test_each_row_is_on_disk_when_logged(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(1, 4):
        log.log({"step": step, "loss": 1.0 / step})
        assert scalars(tmp_path / "tensorboard")["loss"] == pytest.approx({s: 1.0 / s for s in range(1, step + 1)})
    log.close()


def test_resumed_run_replaces_the_steps_it_logs_again(tmp_path):
    log = MetricsLogger(tmp_path, tensorboard=True)
    for step in range(1, 6):  # a run killed after step 5, its last checkpoint at step 3
        log.log({"step": step, "loss": float(step)})
    log.close()
    log = MetricsLogger(tmp_path, tensorboard=True, purge_step=4)
    for step in range(4, 7):
        log.log({"step": step, "loss": 10.0 + step})
    log.close()
    assert scalars(tmp_path / "tensorboard")["loss"] == {1: 1.0, 2: 2.0, 3: 3.0, 4: 14.0, 5: 15.0, 6: 16.0}
