"""Helpers shared by the tests: independent reference computations and small input builders."""
import json

import numpy as np
import torch
from conftest import write_config

import batching
import data
import train
import vocab
from config import resolve_config


def stitch_average(window_values: np.ndarray, starts, length: int) -> np.ndarray:
    """Reference stitching: average per-residue values of overlapping windows, [n_windows, W, ...] ->
    [length, ...], written as plain loops (the model's stitch_windows does it with index_add)."""
    total = np.zeros((length,) + window_values.shape[2:], dtype=np.float64)
    count = np.zeros(length)
    for values, s in zip(window_values, starts):
        n = min(values.shape[0], length - s)
        total[s:s + n] += values[:n]
        count[s:s + n] += 1
    return total / count.reshape((-1,) + (1,) * (total.ndim - 1))


def protein(motif, length=100, seq=None):
    """A protein 'P1' (all alanine unless `seq`) with this MOTIF annotation."""
    return data.make_protein("P1", seq or "A" * length, motif, "test.csv: line 2, entry 'P1'")


def window_padding(batches, lengths, max_len=1022, overlap=200):
    """Share of padding among the window tokens (BOS/EOS included) the backbone would see."""
    total = padding = 0
    for batch in batches:
        widths = [min(max_len, lengths[i] - s) + 2 for i in batch for s in vocab.window_starts(lengths[i], max_len, overlap)]
        total += max(widths) * len(widths)
        padding += max(widths) * len(widths) - sum(widths)
    return padding / total


def make_config(**encoder):
    """A resolved config of a 2-layer, 32-dim scratch ESM-2 (tune: full) with these encoder keys."""
    tree = {"encoder": {"scratch": {"num_layers": 2, "embed_dim": 32, "attention_heads": 4}, "tune": "full"}}
    tree["encoder"].update(encoder)
    return resolve_config(tree)


def batch_of(lengths, max_len=20, overlap=6, seed=0):
    """A collated batch of random proteins of these lengths, in windows of max_len overlapping by `overlap`."""
    rng = torch.Generator().manual_seed(seed)
    proteins = []
    for i, n in enumerate(lengths):
        seq = "".join(vocab.RESIDUES[j] for j in torch.randint(0, 20, (n,), generator=rng).tolist())
        proteins.append(data.make_protein(f"P{i}", seq, "", "t"))
    ds = data.LocalizationDataset(proteins)
    return batching.Collate(max_len, overlap)([ds[i] for i in range(len(ds))])


def read_metrics(run_dir):
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def cached_run(tmp_path, name, cache_dir, **sets):
    """A 1-epoch tiny run (2 layers, last one trainable) with the frozen-layer cache under cache_dir."""
    overrides = {"data.root": str(tmp_path / "data"), "train.epochs": 1, "encoder.scratch.num_layers": 2,
                 "encoder.tune": "last_k", "encoder.trainable_layers": 1, "encoder.cache_dtype": "float32",
                 "decoder.dropout": 0.0, "decoder.class_dropout": 0.0, **sets}
    if cache_dir is not None:
        overrides["encoder.cache_dir"] = str(cache_dir)
    assert train.main(["--config", str(write_config(tmp_path / name, **overrides))]) == 0
    return tmp_path / name / "run"
