"""A run's folder and its record: an existing run refused before anything is written (--overwrite starts again),
run.json, train.log from the first line with dated timestamps, a finished run's resume, stop signals logged with
the checkpoints' state, the last lines the README quotes, --help without torch."""
import hashlib
import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import train
from conftest import ROOT, write_config


def snapshot(folder):
    """{relative path: (size, mtime_ns)} of every file under folder."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_existing_run_refused_before_anything_is_written(tmp_path, tiny_run, capsys):
    before = snapshot(tiny_run)
    config = write_config(tmp_path, run_dir=str(tiny_run))
    assert train.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds a run" in err[0], err
    assert f"--resume {tiny_run / 'checkpoints' / 'last.pt'}" in err[0] and "--overwrite" in err[0]
    assert snapshot(tiny_run) == before
    assert not (tmp_path / "data").exists()  # refused before the data were generated


def test_overwrite_deletes_the_earlier_run_only(tmp_path, capsys):
    config = write_config(tmp_path, **{"train.epochs": 2})
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "metrics.jsonl").write_text('{"epoch": 0, "from": "the earlier run"}\n' * 5)
    (run / "train.log").write_text("the earlier run's log\n")
    assert train.main(["--config", str(config), "--stop-after", "1", "--overwrite"]) == 0
    assert (run / "notes.txt").read_text() == "mine"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0] and "from" not in rows[0]
    log = (run / "train.log").read_text()
    assert "the earlier run's log" not in log and "--overwrite: deleted the earlier run's metrics.jsonl, train.log" in log
    with pytest.raises(SystemExit):
        train.parse_args(["--resume", str(run / "checkpoints" / "last.pt"), "--overwrite"])
    # resumed: run.json keeps the first start, and what the run began from
    assert train.main(["--resume", str(run / "checkpoints" / "last.pt")]) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["command"][:2] == ["train.py", "--resume"] and record["resumed_from"]["epoch"] == 1
    assert [s["command"][-1] for s in record["earlier_starts"]] == ["--overwrite"]
    assert record["weights"]["source"] == "checkpoint" and record["initial"]["weights"]["source"] == "scratch"
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert best["provenance"]["initial"]["weights"]["source"] == "scratch"


def test_log_starts_with_the_command_and_dates_every_line(tiny_run):
    lines = (tiny_run / "train.log").read_text().splitlines()
    assert lines[0].endswith(f"INFO train.py --config {tiny_run.parent / 'config.yaml'}")
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d[+-]\d{4} (INFO|WARNING|ERROR) ")
    entries = [line for line in lines if stamp.match(line)]
    assert len(entries) > 5 and all(stamp.match(line) for line in lines if " INFO " in line[:40])


def test_run_json_records_the_start(tmp_path, tiny_run):
    record = json.loads((tiny_run / "run.json").read_text())
    assert record["command"][:2] == ["train.py", "--config"] and record["weights"]["source"] == "scratch"
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$", record["started"]["time"])
    assert record["versions"]["torch"] == torch.__version__ and record["versions"]["fair-esm"]
    assert record["code"]["sources_sha256"] and record["device"]["type"] == "cpu"
    best = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    public = best["provenance"]
    assert public["code"] == record["code"] and str(tmp_path.parent) not in json.dumps(public)
    assert best["test"]["threshold_0.5"]["macro_mcc"] == json.loads((tiny_run / "test_metrics.json").read_text())[
        "macro_mcc"]


def test_finished_run_resume_says_so_and_writes_nothing(tiny_run, capsys):
    before = snapshot(tiny_run)
    assert train.main(["--resume", str(tiny_run / "checkpoints" / "last.pt")]) == 0
    err = capsys.readouterr().err
    assert "the run is finished and tested (train.epochs: 2, all trained; to train longer raise it" in err, err
    assert "nothing to do" in err
    assert snapshot(tiny_run) == before


def stop_during(monkeypatch, name: str, epoch: int):
    """Send this process SIGTERM when train.<name> is called for `epoch` (before it runs)."""
    original = getattr(train, name)

    def wrapped(trainer, *args):
        if args[0] == epoch if name == "train_epoch" else args[1] == epoch:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(trainer, *args)
    monkeypatch.setattr(train, name, wrapped)


def test_sigterm_is_logged_with_the_checkpoints_state(tmp_path, monkeypatch):
    config = write_config(tmp_path, **{"train.epochs": 3})
    stop_during(monkeypatch, "train_epoch", 1)
    assert train.main(["--config", str(config)]) == 128 + signal.SIGTERM
    run = tmp_path / "run"
    log = (run / "train.log").read_text()
    assert "WARNING stopped by SIGTERM: " in log and "holds epochs 0-0 (1 of 3 trained; best epoch 0)" in log
    assert f"continue with --resume {run / 'checkpoints' / 'last.pt'}" in log
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is removed again


def test_sigterm_while_an_epoch_is_written_waits_for_its_files(tmp_path, monkeypatch):
    """SIGTERM arrives as epoch 1's files start to be written: all three are written before the run stops."""
    config = write_config(tmp_path, **{"train.epochs": 3})
    original, calls = train.commit_epoch, []

    def commit(*args):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args)
    monkeypatch.setattr(train, "commit_epoch", commit)
    assert train.main(["--config", str(config)]) == 128 + signal.SIGTERM
    run = tmp_path / "run"
    last = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert last["epoch"] == 2 and [r["epoch"] for r in rows] == [0, 1] and len(calls) == 2
    assert "holds epochs 0-1 (2 of 3 trained" in (run / "train.log").read_text()


def quoted_lines(text: str, heading: str) -> list[str]:
    """The first code block after `heading` whose lines start 'test at' (the demo's last lines as quoted)."""
    block = text[text.index(heading):].split("```\ntest at", 1)[1].split("```", 1)[0]
    return ("test at" + block).strip().splitlines()


def as_pattern(line: str, run_dir: str) -> re.Pattern:
    """A quoted line as a pattern: its figures (4 decimals), best epoch and protein count any such numbers,
    runs/demo the run folder."""
    parts = re.split(r"(\d\.\d{4}|(?<=epoch )\d+|\d+(?= test proteins)|runs/demo)", line)
    return re.compile("".join(re.escape(p) if i % 2 == 0 else re.escape(run_dir) if p == "runs/demo" else
                              r"\d\.\d{4}" if "." in p else r"\d+" for i, p in enumerate(parts)) + "$")


def test_demo_console_ends_as_the_readme_and_docs_quote(tmp_path, capsys):
    """The demo's console (configs/demo.yaml, made small): its last three lines have the form, labels and outputs
    the README's demo section and docs/training.md quote, numbers aside."""
    run = tmp_path / "run"
    small = [f"run_dir={run}", f"data.root={tmp_path / 'data'}", "data.synthetic.n_proteins=120", "train.epochs=1",
             "encoder.scratch.num_layers=1", "encoder.scratch.embed_dim=32"]
    assert train.main(["--config", str(ROOT / "configs" / "demo.yaml"), "--set", *small]) == 0
    console = [re.sub(r"^\S+ \S+ INFO ", "", line) for line in capsys.readouterr().err.strip().splitlines()[-3:]]
    for doc, heading in ((ROOT / "README.md", "## Quick start"), (ROOT / "docs" / "training.md", "Progress:")):
        quoted = quoted_lines(doc.read_text(), heading)
        assert len(quoted) == 3 and [line.split(":")[0] for line in quoted] == [
            "test at threshold 0.5", "test at tuned thresholds", "outputs in runs/demo"], (doc, quoted)
        for line, pattern in zip(console, (as_pattern(q, str(run)) for q in quoted)):
            assert pattern.match(line), (doc, line, pattern.pattern)
    metrics = json.loads((run / "test_metrics.json").read_text())  # the first line's figures are test_metrics.json's
    assert f"macro-F1 {metrics['macro_f1']:.4f}, macro-MCC {metrics['macro_mcc']:.4f}" in console[0]


@pytest.mark.parametrize("script,flag", [("train.py", "--overwrite"), ("predict.py", "--coverage LEVEL")])
def test_help_does_not_import_torch(script, flag):
    code = (f"import runpy, sys\nsys.argv = ['{script}', '--help']\n"
            f"try:\n    runpy.run_path('{script}', run_name='__main__')\nexcept SystemExit as stop:\n"
            "    print('exit', stop.code, 'torch' in sys.modules, 'numpy' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert flag in out and out.strip().endswith("exit 0 False False"), out


def test_run_json_hashes_fair_esm_file_and_hf_snapshot(tmp_path, monkeypatch):
    """The resolved weights' SHA-256 in run.json: a fair-esm file named by encoder.checkpoint, and a Hugging Face
    cache snapshot named by encoder.model_name (with its snapshot id)."""
    pytest.importorskip("transformers")
    from test_weights import fair_esm_file, hf_esm, hub_cache
    pt = tmp_path / "esm2_tiny.pt"
    fair_esm_file(pt)
    hf_esm().save_pretrained(tmp_path / "snap")
    commit = "d" * 40
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path / "cache", "testorg/esm2_tiny",
                                                     {commit: tmp_path / "snap"}, {"main": commit})))
    for name, weights_key, value in (("fair", "encoder.checkpoint", str(pt)),
                                     ("hub", "encoder.model_name", "testorg/esm2_tiny")):
        config = write_config(tmp_path / name, **{"encoder.scratch": None, weights_key: value, "encoder.tune": "frozen",
                                                  "train.epochs": 2, "data.synthetic.n_proteins": 60})
        assert train.main(["--config", str(config), "--stop-after", "1"]) == 0
        weights = json.loads((tmp_path / name / "run" / "run.json").read_text())["weights"]
        if name == "fair":
            assert weights["format"] == "fair-esm" and weights["path"] == str(pt.resolve())
            assert weights["files"] == {pt.name: {"bytes": pt.stat().st_size,
                                                  "sha256": hashlib.sha256(pt.read_bytes()).hexdigest()}}
        else:
            snap = tmp_path / "snap" / "model.safetensors"
            assert weights["format"] == "hugging face" and weights["snapshot"] == commit
            assert weights["files"]["model.safetensors"]["sha256"] == hashlib.sha256(snap.read_bytes()).hexdigest()
        log = (tmp_path / name / "run" / "train.log").read_text()
        assert "ESM-2 weights: " in log  # logged before train.log could be opened, and kept
