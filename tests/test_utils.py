"""Files from outside are data, never code; files written fail cleanly: crafted pickle payloads at every entry
point that reads a torch file, checkpoints of earlier versions and their upgrade, a full disk, bad distance maps,
temporary files left by killed runs."""
import json
import os
import resource
import signal
import stat
import subprocess
import sys
from argparse import Namespace

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, write_config

import cache
import predict
import synthetic
import train
import utils
import weights

sys.path.insert(0, str(ROOT / "scripts"))
import add_centroids  # noqa: E402
import convert_weights  # noqa: E402
import export_model  # noqa: E402
import upgrade_checkpoint  # noqa: E402


class Payload:
    """Unpickled with Python's pickle in full, this runs a shell command (touch MARKER)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def evil(tmp_path):
    """(marker path, write(path, tree) -> path): torch.save of a tree whose 'model' entry carries the payload."""
    marker = tmp_path / "PAYLOAD_RAN"

    def write(path, tree=None):
        tree = dict(tree or {"config": {}, "arch": {}, "classes": []})
        tree["model"] = {"weight": torch.zeros(2), "trap": Payload(marker)}
        torch.save(tree, path)
        return path
    return marker, write


def fasta(tmp_path):
    path = tmp_path / "in.fa"
    path.write_text(">P1\nMKTAYIAKQRQISFVKSHFSRQ\n")
    return path


def hf_config_tree():
    return weights.hf_config({"num_layers": 1, "embed_dim": 16, "attention_heads": 2, "token_dropout": True})


ENTRY_POINTS = ["predict", "resume", "fair_esm", "hf_bin", "convert_weights", "add_centroids", "export_model"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_payload_never_runs(entry, evil, tmp_path, capsys):
    """Every entry point that reads a torch file refuses a crafted one: exit code 2, a message naming the file,
    and the payload's command never ran."""
    marker, write = evil
    path = write(tmp_path / "evil.pt")
    if entry == "predict":
        code = predict.main(["--checkpoint", str(path), "--fasta", str(fasta(tmp_path)), "--out",
                             str(tmp_path / "out.json")])
    elif entry == "resume":
        code = train.main(["--resume", str(path)])
    elif entry == "fair_esm":  # encoder.checkpoint: a fair-esm file (argparse.Namespace allowed, nothing else)
        path = write(tmp_path / "esm2.pt", {"cfg": {"model": Namespace(encoder_layers=1)}})
        code = train.main(["--config", str(write_config(tmp_path, **{"encoder.scratch": None,
                                                                     "encoder.checkpoint": str(path)}))])
    elif entry == "hf_bin":  # a Hugging Face folder whose pytorch_model.bin carries the payload
        folder = tmp_path / "hf"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(hf_config_tree()))
        path = write(folder / "pytorch_model.bin", {})
        code = train.main(["--config", str(write_config(tmp_path, **{"encoder.scratch": None,
                                                                     "encoder.checkpoint": str(folder)}))])
    elif entry == "convert_weights":
        code = convert_weights.main([str(path), str(tmp_path / "converted"), "--to", "hf"])
    elif entry == "add_centroids":
        code = add_centroids.main([str(path), "--device", "cpu"])
    else:
        code = export_model.main([str(path), str(tmp_path / "exported")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{path}: refused" in err and "posix.system" in err and "Traceback" not in err
    assert not marker.exists()
    assert not (tmp_path / "run").exists() and not (tmp_path / "converted").exists()


def legacy_checkpoint(best, path):
    """best.pt as earlier versions wrote it: NumPy's RNG state as NumPy's tuple, class centres as arrays."""
    state = utils.load_checkpoint(best)
    np.random.seed(7)
    state["rng"]["numpy"] = np.random.get_state()
    state["centroids"] = {space: {k: v.numpy() for k, v in fitted.items()} for space, fitted in state["centroids"].items()}
    torch.save(state, path)
    return path


def test_legacy_checkpoint_refused_then_upgraded(tiny_run, tmp_path, capsys):
    best = tiny_run / "checkpoints" / "best.pt"
    old = legacy_checkpoint(best, tmp_path / "old.pt")
    out = tmp_path / "out.tsv"
    assert predict.main(["--checkpoint", str(old), "--fasta", str(fasta(tmp_path)), "--tsv", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{old}: written by an earlier version" in err and f"scripts/upgrade_checkpoint.py {old} NEW.pt" in err
    new = tmp_path / "new.pt"
    assert upgrade_checkpoint.main([str(old), str(new)]) == 0
    assert upgrade_checkpoint.main([str(old), str(new)]) == 2  # never over an existing file
    upgraded = utils.load_checkpoint(new)
    np.random.seed(7)
    assert upgraded["rng"]["numpy"]["key"].tolist() == np.random.get_state()[1].tolist()
    utils.set_rng_state(upgraded["rng"])  # the upgraded state restores NumPy's generator exactly
    after_restore = np.random.random(3)
    np.random.seed(7)
    assert np.array_equal(after_restore, np.random.random(3))
    for source, name in ((best, "a"), (new, "b")):
        assert predict.main(["--checkpoint", str(source), "--fasta", str(fasta(tmp_path)), "--tsv",
                             str(tmp_path / f"{name}.tsv"), "--method", "both", "--device", "cpu"]) == 0
    assert (tmp_path / "a.tsv").read_bytes() == (tmp_path / "b.tsv").read_bytes()


def test_full_disk_while_saving_a_checkpoint(tmp_path):
    """A checkpoint that cannot be written (file size limit: EFBIG, as a full disk gives ENOSPC) ends the run
    with one line naming the file and the reason, exit 2, the same line in train.log, no metrics row for
    the epoch whose checkpoint failed, and no temporary file left."""
    config = write_config(tmp_path)
    synthetic.make_synthetic_dataset(tmp_path / "data", 120, 1)  # written before the limit applies

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))

    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(config)], capture_output=True,
                          text=True, preexec_fn=limit, timeout=300, cwd=tmp_path)
    run = tmp_path / "run"
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert errors == [f"error: {run / 'checkpoints' / 'last.pt'}: cannot write: File too large"]
    assert errors[0] in (run / "train.log").read_text()
    assert not (run / "metrics.jsonl").exists()
    assert [p.name for p in (run / "checkpoints").iterdir()] == []


@pytest.mark.parametrize("content,problem", [
    (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not UTF-8 text"),
    (b'{"SIGNAL": {"ER": 1.0', "invalid JSON"),
    (b'[1, 2, 3]', "must be a JSON object"),
    (b'{"SIGNAL": [1, 2]}', "entry 'SIGNAL' must be an object"),
    (b'{"SIGNAL": {"ER": "far"}}', "a distance must be a number >= 0 or null, got 'far'"),
    (b'{"SIGNAL": {"ER": -1}}', "got -1"),
    (b'{"Golgi": {"ER": 1.0}}', "unknown class 'Golgi'"),
])
def test_bad_distance_map_file(content, problem, tmp_path, capsys):
    path = tmp_path / "map.json"
    path.write_bytes(content)
    config = write_config(tmp_path, **{"supcon.apply": True, "supcon.hard_neg": True,
                                       "supcon.distance_map": str(path)})
    assert train.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and problem in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def stale_files(folder):
    """(stale temporary file of a killed run, a live process's, another host's) in folder."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f".last.pt.mutarget.{utils.HOST}.{dead_pid()}.0123456789ab.tmp",
             f".last.pt.mutarget.{utils.HOST}.{os.getpid()}.0123456789ab.tmp",
             f".last.pt.mutarget.otherhost.{dead_pid()}.0123456789ab.tmp"]
    for name in names:
        (folder / name).write_text("partial")
    return [folder / name for name in names]


def test_stale_temporary_files_of_killed_runs_are_removed(tmp_path, capsys):
    run = stale_files(tmp_path / "run" / "checkpoints")
    assert train.main(["--config", str(write_config(tmp_path, **{"train.epochs": 1}))]) == 0
    assert [p.exists() for p in run] == [False, True, True]
    outputs = stale_files(tmp_path / "predicted")
    assert predict.main(["--checkpoint", str(tmp_path / "run" / "checkpoints" / "best.pt"), "--fasta",
                         str(fasta(tmp_path)), "--out", str(tmp_path / "predicted" / "out.json")]) == 0
    assert [p.exists() for p in outputs] == [False, True, True]
    entries = stale_files(tmp_path / "cache" / "abc")
    cache.DiskCache(tmp_path / "cache", "abc")
    assert [p.exists() for p in entries] == [False, True, True]
    temp = utils.new_temp_file(tmp_path, "x.json")  # what this project names its temporary files
    assert utils.TEMP_RE.match(os.path.basename(temp))


def test_checkpoint_holds_no_pickled_objects(tiny_run):
    """The project's own checkpoints load with weights_only=True (no allow-list needed), and resume restores
    every RNG exactly."""
    ckpt = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "rng", "config", "centroids"} <= set(ckpt)
    state = utils.rng_state()
    expected = (np.random.random(), torch.rand(1).item())
    utils.set_rng_state(torch.load(_saved(state), weights_only=True))
    assert (np.random.random(), torch.rand(1).item()) == expected
    assert yaml.safe_dump(ckpt["config"])  # plain data


def _saved(tree):
    import io
    buffer = io.BytesIO()
    torch.save(tree, buffer)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077], ids=oct)
def test_atomic_writes_get_the_mode_a_plain_file_gets(tmp_path, mask):
    old = os.umask(mask)
    try:
        (tmp_path / "plain.txt").write_text("x")  # the independent expectation: what open() gives
        utils.write_text_atomic(tmp_path / "a.txt", "x")
        utils.write_yaml(tmp_path / "b.yaml", {"a": 1})
        utils.save_checkpoint({"a": torch.zeros(2)}, tmp_path / "c.pt")
        utils.write_text_atomic(tmp_path / "a.txt", "y")  # replacing an existing file too
    finally:
        os.umask(old)
    plain = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert plain == 0o666 & ~mask
    for name in ("a.txt", "b.yaml", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == plain, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.yaml", "c.pt", "plain.txt"]  # no temp left
