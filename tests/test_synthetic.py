"""The synthetic demo data (synthetic.py): deterministic across processes, every class present."""
import os

import numpy as np

import data


def test_synthetic_data_is_deterministic_and_covers_every_class(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT
    for name, hash_seed in (("a", "1"), ("b", "2")):  # separate processes: string hashing differs
        code = f"import synthetic; synthetic.make_synthetic_dataset({str(tmp_path / name)!r}, 300, 7)"
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={**os.environ, "PYTHONHASHSEED": hash_seed})
    for name in ("SYNTHETIC_uniprot.csv", "partition.csv", "dual.fasta"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    proteins, partitions = data.load_proteins(tmp_path / "a")
    labels = np.stack([p.labels for p in proteins])
    assert (labels.sum(0) >= 10).all() and (labels.sum(1) == 0).sum() >= 10
    assert sorted(set(partitions.tolist())) == [0, 1, 2, 3, 4]
