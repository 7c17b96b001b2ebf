"""Checkpoints as a transaction (checkpoints.py): metrics.jsonl, last.pt and best.pt agree after a write that fails
(or a kill) between any two of them; resuming checks every field and best.pt before writing anything; an output
commit that fails midway (outputs.Staging) leaves the previous outputs in place."""
import errno
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_config
from helpers import read_metrics

import checkpoints
import outputs
import train
import utils

# 3 epochs on 60 proteins: validation macro-MCC improves at epochs 0 and 2 (the last), not at 1
SETS = {"seed": 1, "train.epochs": 3, "data.synthetic.n_proteins": 60}
TIMING = {"time_s", "anchors_per_s", "tokens_per_s", "padded_tokens_per_s", "model_tflops_per_s",
          "hardware_tflops_per_s"}


def strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def final_metrics(run_dir):
    """test_metrics.json without the checkpoint's path."""
    result = json.loads((run_dir / "test_metrics.json").read_text())
    result.pop("checkpoint")
    return result


def snapshot(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(folder).rglob("*"))}


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    """The run directory of an uninterrupted run."""
    tmp = tmp_path_factory.mktemp("whole")
    assert train.main(["--config", str(write_config(tmp, **SETS))]) == 0
    rows = read_metrics(tmp / "run")
    assert [r["epoch"] for r in rows if r["best"]] == [0, 2], "the scenarios below need these best epochs"
    return tmp / "run"


def fail_rename(monkeypatch, name: str, nth: int) -> None:
    """The nth rename of a temporary file onto a file called `name` fails (disk full): the file is not written,
    as when the process is killed while writing it."""
    real, calls = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == name:
            calls.append(dst)
            if len(calls) == nth:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)
    monkeypatch.setattr(os, "replace", replace)


def test_failed_best_write_of_the_last_epoch_then_resume_tests_the_best_epoch(tmp_path, monkeypatch, whole):
    """Epoch 2 improves, its last.pt is written, its best.pt is not: the resumed run (nothing left to train)
    re-creates best.pt from last.pt and tests epoch 2's model, as the uninterrupted run does (before: epoch 0's)."""
    fail_rename(monkeypatch, "best.pt", 2)  # best.pt of epochs 0 and 2: the second fails
    assert train.main(["--config", str(write_config(tmp_path, **SETS))]) == 2
    monkeypatch.undo()
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    last = utils.load_checkpoint(ckpts / "last.pt")
    assert (last["epoch"], last["best_epoch"]) == (3, 2)
    assert utils.load_checkpoint(ckpts / "best.pt")["best_epoch"] == 0  # what the failed write left
    assert train.main(["--resume", str(ckpts / "last.pt")]) == 0
    best = utils.load_checkpoint(ckpts / "best.pt")
    assert (best["epoch"], best["best_epoch"], best["best_metric"]) == (3, 2, last["best_metric"])
    assert all(torch.equal(best["model"][k], v) for k, v in last["model"].items())
    result = final_metrics(run)
    assert result["best_epoch"] == 2 and result["valid"]["macro_mcc"] == pytest.approx(last["best_metric"], abs=1e-9)
    assert result == final_metrics(whole) and strip(read_metrics(run)) == strip(read_metrics(whole))
    assert "re-created" in (run / "train.log").read_text()


def test_failed_metrics_write_then_resume_rebuilds_every_row(tmp_path, monkeypatch, whole):
    """Epoch 1's last.pt is written, its metrics.jsonl row is not: the resumed run's rows are [0, 1, 2], those of
    the uninterrupted run (before: [0, 2]), rebuilt from the history last.pt holds."""
    fail_rename(monkeypatch, "metrics.jsonl", 2)
    assert train.main(["--config", str(write_config(tmp_path, **SETS))]) == 2
    monkeypatch.undo()
    run = tmp_path / "run"
    assert [r["epoch"] for r in read_metrics(run)] == [0]
    assert utils.load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2
    assert train.main(["--resume", str(run / "checkpoints" / "last.pt")]) == 0
    assert [r["epoch"] for r in read_metrics(run)] == [0, 1, 2]
    assert strip(read_metrics(run)) == strip(read_metrics(whole)) and final_metrics(run) == final_metrics(whole)


def copy_run(whole, folder):
    shutil.copytree(whole, folder)
    return folder, folder / "checkpoints" / "last.pt"


def test_damaged_metrics_file_does_not_break_resume(tmp_path, whole):
    """A garbage line (and a lost row) in metrics.jsonl: the rows are rewritten from last.pt."""
    run, last = copy_run(whole, tmp_path / "run")
    rows = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text(rows[0] + "\n{\"epoch\": 1, \"val_m\n\x00garbage\n" + rows[2] + "\n")
    assert train.main(["--resume", str(last), "--set", f"run_dir={run}"]) == 0
    assert read_metrics(run) == read_metrics(whole)


def wrong_adam_shape(ckpt):
    next(iter(ckpt["optimizer"]["state"].values()))["exp_avg"] = torch.zeros(3, 3)


BAD_FIELDS = [  # (field named in the message, how the checkpoint is spoilt: values of allowed types only)
    ("epoch", lambda c: c.update(epoch="3")),
    ("epoch", lambda c: c.update(epoch=7)),  # past train.epochs
    ("best_metric", lambda c: c.update(best_metric=math.nan)),
    ("best_epoch", lambda c: c.update(best_epoch=3)),  # not before epoch
    ("bad_epochs", lambda c: c.update(bad_epochs=-1)),
    ("history", lambda c: c.update(history=c["history"][:2])),
    ("rng", lambda c: c["rng"].pop("numpy")),
    ("rng.torch", lambda c: c["rng"].update(torch=c["rng"]["torch"][:10])),
    ("rng.numpy", lambda c: c["rng"]["numpy"].update(pos="x")),
    ("scheduler.base_lrs", lambda c: c["scheduler"].update(base_lrs=c["scheduler"]["base_lrs"][:1])),
    ("scheduler.last_epoch", lambda c: c["scheduler"].update(last_epoch=2.5)),
    ("scaler.scale", lambda c: c.update(scaler={"scale": "big", "growth_factor": 2.0, "backoff_factor": 0.5,
                                                "growth_interval": 10, "_growth_tracker": 0})),
    ("optimizer.param_groups", lambda c: c["optimizer"]["param_groups"].pop()),
    ("optimizer.param_groups[0].lr", lambda c: c["optimizer"]["param_groups"][0].update(lr="fast")),
    ("].exp_avg", wrong_adam_shape),
]


@pytest.mark.parametrize("field,spoil", BAD_FIELDS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_FIELDS)])
def test_bad_resume_field_exits_2_before_writing(tmp_path, whole, capsys, field, spoil):
    ckpt = torch.load(whole / "checkpoints" / "last.pt", weights_only=True)
    spoil(ckpt)
    bad = tmp_path / "last.pt"
    torch.save(ckpt, bad)
    before = snapshot(whole)  # the stored config's run_dir
    assert train.main(["--resume", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: field '") and field in err[0], err
    assert snapshot(whole) == before


def test_best_pt_that_last_pt_does_not_name_is_refused(tmp_path, whole, capsys):
    """last.pt names best epoch 0 but is epoch 2's state: a best.pt of another epoch (here a later one), or none,
    cannot be reconciled: exit 2 with one line naming both files, nothing written."""
    run, last = copy_run(whole, tmp_path / "run")
    ckpt = torch.load(last, weights_only=True)
    ckpt.update(best_epoch=0, best_metric=ckpt["history"][0]["val_macro_mcc"], bad_epochs=2)
    torch.save(ckpt, last)
    for remove in (False, True):
        if remove:
            (run / "checkpoints" / "best.pt").unlink()
        before = snapshot(run)
        assert train.main(["--resume", str(last), "--set", f"run_dir={run}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(run / "checkpoints" / "best.pt") in err[0], err
        assert f"{last} names best epoch 0" in err[0]
        assert ("is missing" in err[0]) == remove, err
        assert snapshot(run) == before


def test_best_pt_beside_the_checkpoint_is_brought_along(tmp_path, whole):
    """Resuming into a new run_dir from a last.pt that is not its best epoch's state takes the best.pt beside it."""
    src = tmp_path / "src"
    src.mkdir()
    ckpt = torch.load(whole / "checkpoints" / "last.pt", weights_only=True)
    best_metric = ckpt["history"][0]["val_macro_mcc"]
    ckpt.update(best_epoch=0, best_metric=best_metric, bad_epochs=2)
    torch.save(ckpt, src / "last.pt")
    ckpt.update(epoch=1, bad_epochs=0)  # stands for epoch 0's state
    torch.save(ckpt, src / "best.pt")
    run = tmp_path / "new"
    assert train.main(["--resume", str(src / "last.pt"), "--set", f"run_dir={run}"]) == 0
    best = utils.load_checkpoint(run / "checkpoints" / "best.pt")
    assert (best["epoch"], best["best_epoch"], best["best_metric"]) == (1, 0, best_metric) and "thresholds" in best
    assert final_metrics(run)["best_epoch"] == 0 and [r["epoch"] for r in read_metrics(run)] == [0, 1, 2]


def test_failed_output_commit_puts_the_previous_outputs_back(tmp_path, monkeypatch):
    old = {"a.json": "old a", "b.tsv": "old b"}
    for name, text in old.items():
        (tmp_path / name).write_text(text)
    staging = outputs.Staging()
    for name in ("a.json", "b.tsv", "c.gff3"):  # c.gff3 is new
        staging.open(tmp_path / name).write(f"new {name}")
    real, fail_on = os.replace, staging.pending[1][0]  # b.tsv's rename fails, after a.json's

    def replace(src, dst):
        if Path(src) == fail_on:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        staging.commit()
    monkeypatch.undo()
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == old  # no new file, no temporary file
    staging = outputs.Staging()
    for name in ("a.json", "c.gff3"):
        staging.open(tmp_path / name).write(f"new {name}")
    staging.commit()
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {"a.json": "new a.json", "b.tsv": "old b",
                                                                   "c.gff3": "new c.gff3"}


def test_final_test_refuses_a_best_pt_of_another_epoch(whole):
    """The final test evaluates best.pt only if it holds the best epoch the run records."""
    with pytest.raises(utils.CheckpointError, match=r"best\.pt holds the state after epoch 2 with best epoch 2 .* "
                                                    r"but the run's best epoch is 0"):
        checkpoints.best_for_test(whole / "checkpoints", 0, 0.5)


def test_checkpoint_without_history_reads_the_rows_it_can(tmp_path):
    """A checkpoint of an earlier version holds no rows: those of metrics.jsonl before its epoch are kept, lines
    that are no rows are dropped with a note, instead of a JSONDecodeError."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 0, "a": 1}\n{"epoch": 1, "a\n\n[1]\n{"epoch": 1, "a": 2}\n{"epoch": 2, "a": 3}\n')
    rows, notes = checkpoints._check_history({}, tmp_path / "last.pt", tmp_path, 2)
    assert rows == [{"epoch": 0, "a": 1}, {"epoch": 1, "a": 2}]
    assert len(notes) == 1 and "3 line(s)" in notes[0]
