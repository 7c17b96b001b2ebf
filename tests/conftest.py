"""Shared fixtures: the repository on sys.path, the real data folder, a tiny trained run, checkpoints and a
proteome for prediction."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL_DATA = ROOT.parent / "shared" / "data" / "mutarget"


def tiny_config(tmp_path, **overrides):
    """A config tree for a seconds-long CPU run on a small synthetic dataset."""
    tree = {
        "seed": 0,
        "run_dir": str(tmp_path / "run"),
        "device": "cpu",
        "data": {"root": str(tmp_path / "data"), "max_len": 64, "overlap": 16,
                 "synthetic": {"generate": True, "n_proteins": 120, "seed": 1}},
        "encoder": {"scratch": {"num_layers": 1, "embed_dim": 32, "attention_heads": 4}, "tune": "full"},
        "decoder": {"hidden_dim": 8},
        "train": {"epochs": 2, "batch_size": 16, "lr": 3e-3, "backbone_lr": 3e-3, "patience": 5},
    }
    for key, value in overrides.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def write_config(tmp_path, **overrides) -> Path:
    import yaml
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path, **overrides)))
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Run directory of a finished 2-epoch tiny training run (checkpoints, metrics)."""
    import train
    tmp = tmp_path_factory.mktemp("tiny_run")
    assert train.main(["--config", str(write_config(tmp))]) == 0
    return tmp / "run"


@pytest.fixture(scope="session")
def supcon_run(tmp_path_factory):
    """A finished tiny SupCon run (projection head; centres of both spaces in best.pt; tests/test_space.py and
    tests/test_confidence.py)."""
    import train
    tmp = tmp_path_factory.mktemp("supcon_run")
    config = write_config(tmp, **{"supcon.apply": True, "supcon.hidden_dim": 16, "supcon.out_dim": 8})
    assert train.main(["--config", str(config)]) == 0
    return tmp / "run"


@pytest.fixture(scope="session")
def ckpts(tiny_run, tmp_path_factory):
    """best.pt of the tiny run and two variants with projection heads (they predict a mix of classes)."""
    from helpers import with_heads
    tmp = tmp_path_factory.mktemp("ckpts")
    best = tiny_run / "checkpoints" / "best.pt"
    return {"best": best, "a": with_heads(best, tmp / "a.pt", 0.4, 1), "b": with_heads(best, tmp / "b.pt", 0.8, 2)}


@pytest.fixture(scope="session")
def fasta(tmp_path_factory):
    """A proteome (helpers.proteome) as a FASTA file."""
    from helpers import proteome, write_fasta
    return write_fasta(tmp_path_factory.mktemp("input") / "proteome.fa", proteome())


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: over half a minute on a CPU; skipped unless `pytest -m slow`")


def pytest_collection_modifyitems(config, items):
    """Tests marked slow run only when asked for (`python -m pytest -m slow`), keeping the suite under 5 minutes."""
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with `python -m pytest -m slow`")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
