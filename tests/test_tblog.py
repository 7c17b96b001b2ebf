"""log.tensorboard: event files read back with TensorBoard's own reader; resume; missing package."""
import json
import math
import sys
import time

import pytest
from conftest import write_config

import data
import train
from config import DEFAULTS, load_config

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def read_scalars(folder) -> dict:
    """{tag: [(step, value), ...]} as TensorBoard itself reads the folder (all events kept; events
    an interrupted session wrote past a restart's step purged, as TensorBoard does)."""
    acc = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def batches_per_epoch(config_path) -> int:
    config = load_config(config_path)
    return math.ceil(len(data.build_datasets(config)["train"]) / config.train.batch_size)


def test_off_by_default(tiny_run):
    assert DEFAULTS["log"]["tensorboard"] is False
    assert not (tiny_run / "tensorboard").exists()


def test_scalars_read_back_and_resume_continues_the_curves(tmp_path):
    config = write_config(tmp_path, **{"log.tensorboard": True})
    run = tmp_path / "run"
    assert train.main(["--config", str(config), "--stop-after", "1"]) == 0
    n = batches_per_epoch(config)
    # leftovers of a session killed in the middle of epoch 1, after last.pt of epoch 0
    from torch.utils.tensorboard import SummaryWriter
    # TensorBoard reads a folder's event files in name order: <whole seconds>.<host>.<pid>.<counter>. In one
    # process within one second the counter decides, compared as text ("10" < "9"): real sessions are
    # seconds apart, so the test waits a second between its sessions too.
    time.sleep(1.1)
    with SummaryWriter(str(run / "tensorboard" / "step")) as stale:
        for step in range(n, n + 2):
            stale.add_scalar("step/loss", 999.0, step)
    time.sleep(1.1)
    assert train.main(["--resume", str(run / "checkpoints" / "last.pt")]) == 0

    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [0, 1]
    steps = read_scalars(run / "tensorboard" / "step")
    assert set(steps) == {"step/loss", "step/class_loss", "step/motif_loss", "step/lr"}
    for tag, points in steps.items():
        assert [s for s, _ in points] == list(range(2 * n)), tag  # every batch once, across the resume
    assert 999.0 not in [v for _, v in steps["step/loss"]]
    for r in records:  # the epoch means in metrics.jsonl are the means of the per-batch values
        e = r["epoch"]
        for tag, key in (("step/loss", "train_loss"), ("step/class_loss", "train_class_loss"),
                         ("step/motif_loss", "train_motif_loss")):
            values = [v for s, v in steps[tag] if e * n <= s < (e + 1) * n]
            assert sum(values) / n == pytest.approx(r[key], rel=1e-5), (tag, e)
    lrs = [v for _, v in steps["step/lr"]]
    assert max(lrs) == pytest.approx(3e-3) and min(lrs) >= 0  # warm-up then cosine decay of train.lr 3e-3

    epochs = read_scalars(run / "tensorboard" / "epoch")
    numeric = {k for r in records for k, v in r.items()
               if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert set(epochs) == {f"epoch/{k}" for k in numeric}
    assert {"epoch/train_loss", "epoch/val_macro_f1", "epoch/val_macro_mcc", "epoch/lr"} <= set(epochs)
    for key in numeric:
        expected = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        got = epochs[f"epoch/{key}"]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), key


def test_supcon_warm_start_logs_the_contrastive_loss(tmp_path):
    config = write_config(tmp_path, **{"log.tensorboard": True, "supcon.apply": True, "supcon.warm_start": 1,
                                       "supcon.hidden_dim": 16, "supcon.out_dim": 8})
    assert train.main(["--config", str(config)]) == 0
    n = batches_per_epoch(config)
    steps = read_scalars(tmp_path / "run" / "tensorboard" / "step")
    assert [s for s, _ in steps["step/supcon_loss"]] == list(range(2 * n))
    assert [s for s, _ in steps["step/class_loss"]] == list(range(n, 2 * n))  # the heads run after the warm start
    records = read_metrics(tmp_path / "run")
    for r in records:
        values = [v for s, v in steps["step/supcon_loss"] if r["epoch"] * n <= s < (r["epoch"] + 1) * n]
        assert sum(values) / n == pytest.approx(r["train_supcon_loss"], rel=1e-5)
    epochs = read_scalars(tmp_path / "run" / "tensorboard" / "epoch")
    assert "epoch/train_supcon_loss" in epochs and "epoch/supcon_fallback_pos" in epochs


def test_missing_tensorboard_package_is_a_start_up_error(tmp_path, monkeypatch, capsys):
    for name in ("tensorboard", "torch.utils.tensorboard"):
        monkeypatch.setitem(sys.modules, name, None)  # import now raises ImportError
    config = write_config(tmp_path, **{"log.tensorboard": True})
    assert train.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "log.tensorboard is true but the tensorboard package cannot be imported" in err
    assert "pip install tensorboard" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()  # nothing done or written
