"""Helpers shared by the tests: independent reference computations and small input builders."""
import json

import numpy as np
import torch
from conftest import write_config

import batching
import data
import predict
import train
import vocab
from config import resolve_config
from model import Encoder


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


AA = list("ACDEFGHIKLMNPQRSTVWY")


def random_seq(rng, n):
    return "".join(rng.choice(AA, size=n))


def proteome(seed=5):
    """(id, sequence) pairs: 1 to 230 residues (the tiny model's windows hold 64), repeated sequences
    under other ids, ids with characters GFF3 and file names must escape."""
    rng = np.random.default_rng(seed)
    seqs = [random_seq(rng, int(n)) for n in rng.integers(1, 230, size=22)] + [random_seq(rng, 64), random_seq(rng, 65)]
    ids = [f"prot{i}" for i in range(len(seqs))]
    ids[1], ids[2], ids[3] = "sp|P0A7Z4|RL1_ECOLI", "we;ird=id,a&b%c", ">starts_with_gt"
    pairs = list(zip(ids, seqs))
    pairs += [("copy_of_prot5", seqs[5]), ("copy_of_prot0", seqs[0]), ("copy2_of_prot5", seqs[5])]
    return pairs


def write_fasta(path, pairs):
    path.write_text("".join(f">{i}\n{s}\n" for i, s in pairs))
    return path


def run(capsys, *argv):
    code = predict.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def records_of(path):
    return json.loads(path.read_text())


def probs_of(records):
    """The uncalibrated class probabilities [N, 8] of predict.py records (what the calls and metrics use; a
    calibrated model's records show the calibrated ones as 'probabilities')."""
    return np.array([[r.get("probabilities_uncalibrated", r["probabilities"])[c] for c in vocab.CLASSES]
                     for r in records])


def with_heads(src, dst, class_bias: float, seed: int):
    """A copy of checkpoint `src` with shifted class biases and a (random) projection head."""
    state = torch.load(src, weights_only=True)
    state["config"]["supcon"] = {**state["config"].get("supcon", {}), "apply": True, "hidden_dim": 16, "out_dim": 8}
    torch.manual_seed(seed)
    fresh = Encoder(resolve_config(state["config"]), arch=state["arch"]).state_dict()
    state["model"].update({k: v for k, v in fresh.items() if k.startswith("projection.")})
    state["model"]["classifier.bias"] += class_bias
    torch.save(state, dst)
    return dst


OUTPUTS = ("out.json", "out.tsv", "out.gff3", "emb.npz")


def predict_all(capsys, folder, ckpt_paths, fasta, *extra, jsonl=False):
    """Every streamable output into `folder` (JSON Lines too with jsonl); returns {name: bytes}."""
    code, err = run(capsys, "--checkpoint", *ckpt_paths, "--fasta", fasta, "--out", folder / "out.json",
                    "--tsv", folder / "out.tsv", "--gff3", folder / "out.gff3", "--embeddings", folder / "emb.npz",
                    "--device", "cpu", *extra)
    assert code == 0, err
    if jsonl:
        code, err = run(capsys, "--checkpoint", *ckpt_paths, "--fasta", fasta, "--out", folder / "out.jsonl",
                        "--device", "cpu", *extra)
        assert code == 0, err
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# --------------------------------------------------------------------------- bad input
def check_failure(capsys, tmp_path, argv, *needles):
    out, plots = tmp_path / "res" / "out.json", tmp_path / "res" / "plots"
    code, err = run(capsys, *argv, "--out", out, "--gff3", tmp_path / "res" / "out.gff3", "--plot-dir", plots,
                    "--embeddings", tmp_path / "res" / "emb.npz", "--device", "cpu", "--chunk-size", 2)
    assert code == 2, err
    assert err.startswith("error: ") or "\nerror: " in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not (tmp_path / "res").exists()  # no output, no temporary file, not even the folder
