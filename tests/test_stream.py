"""Proteome-scale prediction (stream.py, inference.py, inputs.py, outputs.py, plots.py) on the tiny run:
streamed outputs equal one-chunk outputs byte for byte, ensembles, torchrun, GFF3, plots, bad input."""
import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse

import numpy as np
import pytest
import torch
from conftest import ROOT

import data
import inference
import outputs
import predict
import stream
import vocab
from config import resolve_config
from evaluate import run_inference
from model import Encoder

CLASSES = vocab.CLASSES
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
    return np.array([[r["probabilities"][c] for c in CLASSES] for r in records])


def with_heads(src, dst, class_bias: float, seed: int):
    """A copy of checkpoint `src` with shifted class biases and a (random) projection head."""
    state = torch.load(src, weights_only=False)
    state["config"]["supcon"] = {**state["config"].get("supcon", {}), "apply": True, "hidden_dim": 16, "out_dim": 8}
    torch.manual_seed(seed)
    fresh = Encoder(resolve_config(state["config"]), arch=state["arch"]).state_dict()
    state["model"].update({k: v for k, v in fresh.items() if k.startswith("projection.")})
    state["model"]["classifier.bias"] += class_bias
    torch.save(state, dst)
    return dst


@pytest.fixture(scope="module")
def ckpts(tiny_run, tmp_path_factory):
    """best.pt of the tiny run and two variants with projection heads (they predict a mix of classes)."""
    tmp = tmp_path_factory.mktemp("ckpts")
    best = tiny_run / "checkpoints" / "best.pt"
    return {"best": best, "a": with_heads(best, tmp / "a.pt", 0.4, 1), "b": with_heads(best, tmp / "b.pt", 0.8, 2)}


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    return write_fasta(tmp_path_factory.mktemp("input") / "proteome.fa", proteome())


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


# --------------------------------------------------------------------------- streaming
def test_small_chunks_equal_one_chunk(tmp_path, ckpts, fasta, capsys):
    """Chunks of 1 and of 7 proteins, token budgets that make one batch of everything, one window per
    batch (96 tokens: the tiny model's 64-residue windows are 96 wide) and at most 2 proteins."""
    whole = predict_all(capsys, tmp_path / "whole", [ckpts["a"]], fasta, "--chunk-size", 1000, "--max-tokens", 100000,
                        jsonl=True)
    for chunk, extra in [(1, []), (7, ["--max-tokens", 96, "--batch-size", 2])]:
        streamed = predict_all(capsys, tmp_path / f"c{chunk}", [ckpts["a"]], fasta, "--chunk-size", chunk, *extra,
                               jsonl=chunk == 7)
        assert streamed.keys() <= whole.keys() and set(OUTPUTS) <= streamed.keys()
        for name in streamed:
            assert streamed[name] == whole[name], (chunk, name)
    records = records_of(tmp_path / "whole" / "out.json")
    assert [r["id"] for r in records] == [i for i, _ in proteome()]  # input order
    assert {len(r["predicted"]) for r in records} != {0}  # something to write in the GFF3
    lines = (tmp_path / "whole" / "out.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == records  # JSON Lines: the same records, one per line
    z = np.load(tmp_path / "whole" / "emb.npz")
    assert sorted(z.files) == ["ids", "pooled", "projection"]
    assert z["ids"].tolist() == [r["id"] for r in records]
    assert z["pooled"].shape == (len(records), 32) and z["projection"].shape == (len(records), 8)
    assert z["pooled"].dtype == np.float32


def test_results_do_not_depend_on_batching(ckpts):
    """Each protein's probabilities, tracks and embeddings are bit-identical however it is batched:
    all in one batch, one window per batch, 3 proteins per batch, or in chunks of 5."""
    proteins = [data.make_protein(i, s, "", i) for i, s in proteome()]
    cpu = torch.device("cpu")
    members = inference.load_ensemble([ckpts["a"]], cpu)
    ref = inference.predict_chunk(members, proteins, cpu, max_tokens=10 ** 6)
    runs = [inference.predict_chunk(members, proteins, cpu, max_tokens=96),
            inference.predict_chunk(members, proteins, cpu, max_proteins=3),
            sum((inference.predict_chunk(members, proteins[i:i + 5], cpu) for i in range(0, len(proteins), 5)), [])]
    for results in runs:
        for a, b in zip(ref, results):
            for key in ("probs", "motif", "pooled", "projection"):
                assert np.array_equal(getattr(a, key), getattr(b, key)), key


def test_plan_batches_hand_worked():
    """Windows of 64 residues overlapping by 16; widths (residues + BOS + EOS) rounded up to 32 tokens:
    10 -> 1 x 32, 30 -> 1 x 32, 40 -> 1 x 64, 100 -> 2 x 96 (starts 0, 36), 200 -> 4 x 96 tokens."""
    lengths = [10, 100, 40, 30, 200]
    assert [inference.window_width(n, 64) for n in lengths] == [32, 96, 64, 32, 96]
    assert inference.plan_batches(lengths, 64, 16, max_tokens=200) == [[0, 3], [2], [1], [4]]  # 200: over budget, alone
    assert inference.plan_batches(lengths, 64, 16, max_tokens=10 ** 6) == [[0, 3], [2], [1, 4]]
    assert inference.plan_batches(lengths, 64, 16, max_tokens=10 ** 6, max_proteins=1) == [[0], [3], [2], [1], [4]]


def test_backbone_call_sizes():
    """Calls of `full` windows (the token budget), the rest in power-of-two calls: few distinct shapes,
    and never more than the budget, also for a protein with more windows than fit in it (titin: 42)."""
    for full in (1, 5, 16, 170):
        for windows in range(1, 3 * full + 2):
            sizes = inference.call_sizes(windows, full)
            assert sum(sizes) == windows and sizes == sorted(sizes, reverse=True) and max(sizes) <= full
            assert all(s == full or s & (s - 1) == 0 for s in sizes)
            assert sizes.count(full) == windows // full
    assert inference.call_sizes(42, 16) == [16, 16, 8, 2]


def test_identical_sequences_are_predicted_once(ckpts, monkeypatch):
    seen = []
    original = inference.run_ensemble

    def counting(members, sequences, *args):
        seen.extend(sequences)
        return original(members, sequences, *args)

    monkeypatch.setattr(inference, "run_ensemble", counting)
    pairs = proteome()
    proteins = [data.make_protein(i, s, "", i) for i, s in pairs]
    cpu = torch.device("cpu")
    results = inference.predict_chunk(inference.load_ensemble([ckpts["a"]], cpu), proteins, cpu, max_tokens=200)
    assert sorted(seen) == sorted({s for _, s in pairs})
    ids = [i for i, _ in pairs]
    assert results[ids.index("copy_of_prot5")] is results[ids.index("prot5")]
    assert results[ids.index("copy_of_prot0")] is results[ids.index("prot0")]


def test_results_match_encoder_forward(ckpts):
    """The streaming path computes what the model's own forward (evaluate.run_inference) computes."""
    proteins = [data.make_protein(i, s, "", i) for i, s in proteome()]
    cpu = torch.device("cpu")
    members = inference.load_ensemble([ckpts["a"]], cpu)
    ours = inference.predict_chunk(members, proteins, cpu, max_tokens=300)
    ref = run_inference(members[0].model, data.LocalizationDataset(proteins), 4, cpu, "none",
                        members[0].max_len, members[0].overlap)
    for i, r in enumerate(ours):
        np.testing.assert_allclose(r.probs, ref["probs"][i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(r.motif, ref["motif_probs"][i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(r.pooled, ref["pooled"][i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(r.projection, ref["projection"][i], rtol=0, atol=1e-5)


def test_ensemble_is_the_mean_of_single_runs(tmp_path, ckpts, fasta, capsys):
    def single(name, *paths):
        folder = tmp_path / name
        code, err = run(capsys, "--checkpoint", *paths, "--fasta", fasta, "--out", folder / "out.json",
                        "--embeddings", folder / "emb.npz", "--device", "cpu", "--chunk-size", 5)
        assert code == 0, err
        return probs_of(records_of(folder / "out.json")), np.load(folder / "emb.npz")

    (pa, za), (pb, zb), (pab, zab) = single("a", ckpts["a"]), single("b", ckpts["b"]), single("ab", ckpts["a"], ckpts["b"])
    assert not np.allclose(pa, pb) and not np.allclose(za["projection"], zb["projection"])
    np.testing.assert_allclose(pab, (pa + pb) / 2, rtol=0, atol=1.01e-4)  # JSON rounds to 4 decimals
    for key in ("pooled", "projection"):
        np.testing.assert_allclose(zab[key], (za[key].astype(np.float64) + zb[key]) / 2, rtol=0, atol=1e-6)


def test_projection_left_out_when_heads_differ(tmp_path, ckpts, fasta, capsys):
    out = tmp_path / "emb.npz"
    code, err = run(capsys, "--checkpoint", ckpts["a"], ckpts["best"], "--fasta", fasta, "--embeddings", out,
                    "--device", "cpu")
    assert code == 0, err
    assert "projection embeddings left out" in err and str(ckpts["best"]) in err
    assert sorted(np.load(out).files) == ["ids", "pooled"]


def test_torchrun_two_processes_write_the_same_files(tmp_path, ckpts, fasta, capsys):
    """2 gloo processes (one thread each under torchrun) against 1 process, a 2-checkpoint ensemble."""
    one = predict_all(capsys, tmp_path / "one", [ckpts["a"], ckpts["b"]], fasta, "--chunk-size", 6, "--max-tokens", 200)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ROOT / "predict.py",
           "--checkpoint", ckpts["a"], ckpts["b"], "--fasta", fasta, "--device", "cpu", "--chunk-size", 6,
           "--max-tokens", 200, "--out", two / "out.json", "--tsv", two / "out.tsv", "--gff3", two / "out.gff3",
           "--embeddings", two / "emb.npz"]
    done = subprocess.run([str(a) for a in cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in two.iterdir()) == sorted(OUTPUTS)  # no temporary files
    for name in OUTPUTS:
        assert (two / name).read_bytes() == one[name], name


# --------------------------------------------------------------------------- GFF3
# Sequence Ontology terms (so.obo) allowed as feature types, with their accessions.
SO_TERMS = {"signal_peptide": "SO:0000418", "transit_peptide": "SO:0000725", "ER_retention_signal": "SO:0001806",
            "peptide_localization_signal": "SO:0001527", "nuclear_localization_signal": "SO:0001528",
            "nuclear_export_signal": "SO:0001531"}
SEQID = re.compile(r"^(?:[a-zA-Z0-9.:^*$@!+_?|-]|%[0-9A-Fa-f]{2})+$")  # spec: escape anything else
VALUE = re.compile(r"^(?:[^;=&,%\t\n\r\x00-\x1f\x7f]|%[0-9A-Fa-f]{2})+$")  # column 9 tag / value


def check_gff3(text: str, lengths: dict) -> list[tuple]:
    """Check a GFF3 file against the specification (gff3.md of The-Sequence-Ontology/Specifications);
    `lengths` maps sequence ids (unescaped) to lengths. Returns (id, source, type, start, end, score or None
    for '.', attributes)."""
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    assert re.fullmatch(r"##gff-version 3(\.\d+){0,2}", lines[0]), lines[0]
    regions, features = {}, []
    for line in lines[1:]:
        if line.startswith("##"):
            name, *fields = line[2:].split(" ")
            if name == "sequence-region":
                seqid, start, end = fields
                assert SEQID.match(seqid) and seqid not in regions  # one per sequence
                regions[seqid] = (int(start), int(end))
            continue
        assert not line.startswith("#") and line.strip(), line
        columns = line.split("\t")
        assert len(columns) == 9, line
        seqid, source, kind, start, end, score, strand, phase, attributes = columns
        assert SEQID.match(seqid) and not seqid.startswith(">"), seqid
        assert source and "\t" not in source
        assert kind in SO_TERMS, kind
        start, end = int(start), int(end)
        name = urllib.parse.unquote(seqid)
        assert 1 <= start <= end <= lengths[name], line
        lo, hi = regions[seqid]  # a ##sequence-region precedes the features and bounds them
        assert lo <= start and end <= hi and hi == lengths[name]
        score = None if score == "." else float(score)
        assert strand in {"+", "-", ".", "?"} and phase == "."  # phase: CDS features only
        pairs = {}
        for pair in attributes.split(";"):
            tag, value = pair.split("=")  # exactly one unescaped '='
            assert VALUE.match(tag) and VALUE.match(value), pair
            pairs[urllib.parse.unquote(tag)] = urllib.parse.unquote(value)
        features.append((name, source, kind, start, end, score, pairs))
    return features


def test_gff3_follows_the_specification(tmp_path, ckpts, capsys):
    pairs = proteome(seed=9) + [("tab\there", random_seq(np.random.default_rng(2), 90))]
    csv = tmp_path / "labelled.csv"
    quoted = [f'"{i}"' if "\t" in i or "," in i or '"' in i else i for i, _ in pairs]
    csv.write_text("Entry,MOTIF,Sequence\n" + "".join(f"{q},,{s}\n" for q, (_, s) in zip(quoted, pairs)))
    gff, out, tsv = tmp_path / "out.gff3", tmp_path / "out.json", tmp_path / "out.tsv"
    code, err = run(capsys, "--checkpoint", ckpts["a"], ckpts["b"], "--csv", csv, "--gff3", gff, "--out", out,
                    "--tsv", tsv, "--device", "cpu", "--chunk-size", 4)
    assert code == 0, err
    lengths = {i: len(s) for i, s in pairs}
    features = check_gff3(gff.read_text(encoding="utf-8"), lengths)
    records = records_of(out)
    assert len(features) > 20 and {f[0] for f in features} >= {"we;ird=id,a&b%c", ">starts_with_gt", "tab\there"}
    expected = [(r["id"], src, kind, s, e, round(p, 4), a) for r in records
                for src, kind, s, e, p, a in outputs.gff3_features(r)]
    assert [(n, src, k, s, e, round(p, 4), a) for n, src, k, s, e, p, a in features] == expected
    for name, source, kind, start, end, score, attributes in features:
        record = records[[r["id"] for r in records].index(name)]
        assert attributes["class"] in record["predicted"] and score == record["probabilities"][attributes["class"]]
    assert tsv.read_text(encoding="utf-8").count("tab%09here") == 1  # TSV cells escape tabs too


def test_gff3_features_hand_worked():
    record = {"id": "X", "length": 100, "predicted": ["ER", "Peroxisome", "SIGNAL", "Nucleus", "Nucleus_export"],
              "probabilities": {"ER": 0.61, "Peroxisome": 0.7, "SIGNAL": 0.9876, "Nucleus": 0.55, "Nucleus_export": 0.5},
              "sites": {"ER": 97, "Peroxisome": 12, "SIGNAL": 23},
              "segments": {"Nucleus": [[30, 35], [60, 60]], "Nucleus_export": []}}
    assert outputs.gff3_features(record) == [
        ("MUTarget", "peptide_localization_signal", 1, 12, 0.7, {"class": "Peroxisome", "signal": "PTS2"}),
        ("MUTarget", "signal_peptide", 1, 23, 0.9876, {"class": "SIGNAL"}),
        ("MUTarget", "nuclear_localization_signal", 30, 35, 0.55, {"class": "Nucleus"}),
        ("MUTarget", "nuclear_localization_signal", 60, 60, 0.55, {"class": "Nucleus"}),
        ("MUTarget", "ER_retention_signal", 97, 100, 0.61, {"class": "ER"})]
    record["sites"]["Peroxisome"] = 98  # C-terminal half: PTS1, from its first residue to the end
    assert outputs.gff3_features(record)[-1] == ("MUTarget", "peptide_localization_signal", 98, 100, 0.7,
                                                 {"class": "Peroxisome", "signal": "PTS1"})
    # centroid prediction's features: their own source, no score, the distance in the attributes
    record["centroid"] = {"space": "pooled", "rule": "maxsep", "distances": {"SIGNAL": 0.25}, "predicted": ["SIGNAL"],
                          "sites": {"SIGNAL": 20}, "segments": {}}
    assert ("MUTarget-centroid", "signal_peptide", 1, 20, None,
            {"class": "SIGNAL", "distance": "0.2500", "rule": "maxsep", "space": "pooled"}) in outputs.gff3_features(record)
    assert outputs.gff3_seqid("sp|P1|A_B.1") == "sp|P1|A_B.1"
    assert outputs.gff3_seqid(">a b%é~") == "%3Ea%20b%25%C3%A9%7E"
    assert outputs.gff3_value("a;b=c&d,e%f\tg h") == "a%3Bb%3Dc%26d%2Ce%25f%09g h"


# --------------------------------------------------------------------------- plots
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def check_png(path):
    import matplotlib.image
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_plots_for_chosen_ids(tmp_path, ckpts, capsys):
    pairs = [("a.b", "MKLV" * 20), ("a_b", "MSTQ" * 9), ("we;ird$id$", "MKKRRKL" * 12), ("other", "MAAA" * 5)]
    fasta = write_fasta(tmp_path / "in.fa", pairs)
    plots = tmp_path / "plots" / "deep"
    code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", fasta, "--plot-dir", plots,
                    "--plot-ids", "we;ird$id$", "a.b", "a_b", "--device", "cpu", "--chunk-size", 2)
    assert code == 0, err
    assert sorted(p.name for p in plots.iterdir()) == ["a_b.png", "a_b_2.png", "we_ird_id_.png"]
    for p in plots.iterdir():
        check_png(p)
    limited = tmp_path / "limited"
    code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", fasta, "--plot-dir", limited, "--plot-limit", 2,
                    "--device", "cpu")
    assert code == 0, err
    assert sorted(p.name for p in limited.iterdir()) == ["a_b.png", "a_b_2.png"]  # the first two proteins


def test_plot_names():
    used = set()
    assert [outputs.plot_name(i, used) for i in ["P1", "p1", "x/y", "x_y", "x.y", "ü"]] == [
        "P1.png", "p1_2.png", "x_y.png", "x_y_2.png", "x_y_3.png", "_.png"]


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


def test_duplicate_ids(tmp_path, ckpts, capsys):
    fasta = write_fasta(tmp_path / "dup.fa", [("A", "MKV"), ("B", "MKL"), ("A", "MKW")])
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", fasta], str(fasta), "'A'", "duplicate")
    csv = tmp_path / "dup.csv"
    csv.write_text("Entry,MOTIF,Sequence\nQ1,,MKV\nQ2,,MKL\nQ1,,MKW\n")
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--csv", csv], str(csv), "line 4", "'Q1'", "duplicate")


def test_invalid_and_empty_records(tmp_path, ckpts, capsys):
    fasta = write_fasta(tmp_path / "bad.fa", [("ok", "MKLV"), ("broken", "MKJLV")])
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", fasta], str(fasta), "'broken'", "'J'")
    empty = tmp_path / "empty.fa"
    empty.write_text(">first\nMKLV\n>hollow\n>last\nMKV\n")
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", empty], str(empty), "'hollow'", "empty")


def test_skip_invalid(tmp_path, ckpts, capsys):
    good = [("g1", "MKLVAAR" * 5), ("g2", "MSTQ" * 30), ("g3", "MKW")]
    text = f">g1\n{good[0][1]}\n>bad1\nMKJ*X\n>g2\n{good[1][1]}\n>hollow\n>g3\n{good[2][1]}\n>bad2\nMK1L\n"
    fasta = tmp_path / "mixed.fa"
    fasta.write_text(text)
    out = tmp_path / "res" / "out.json"
    code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", fasta, "--out", out, "--skip-invalid",
                    "--device", "cpu")
    assert code == 0, err
    report = tmp_path / "res" / "out.json.skipped.tsv"
    assert f"listed in {report}" in err
    for name in ("bad1", "hollow", "bad2"):
        assert f"'{name}'" in err
    rows = [line.split("\t") for line in report.read_text().splitlines()]
    assert rows[0] == ["id", "line", "reason"]
    assert [(r[0], r[1]) for r in rows[1:]] == [("bad1", "3"), ("hollow", "7"), ("bad2", "10")]
    assert "invalid residue" in rows[1][2] and "empty" in rows[2][2] and "'1'" in rows[3][2]
    clean = tmp_path / "clean.json"
    code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", write_fasta(tmp_path / "clean.fa", good),
                    "--out", clean, "--device", "cpu")
    assert code == 0, err
    assert records_of(out) == records_of(clean)  # the rest predicted as if alone
    custom = tmp_path / "skipped.txt"
    code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", fasta, "--tsv", tmp_path / "o.tsv",
                    "--skip-invalid", "--skipped", custom, "--device", "cpu")
    assert code == 0 and custom.read_text() == report.read_text()


def test_nothing_left_to_predict(tmp_path, ckpts, capsys):
    fasta = write_fasta(tmp_path / "all_bad.fa", [("x", "MKJ"), ("y", "B@")])
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", fasta, "--skip-invalid",
                                     "--skipped", tmp_path / "res" / "skipped.tsv"], str(fasta), "no record left")


def test_unreadable_checkpoint(tmp_path, ckpts, fasta, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], junk, "--fasta", fasta], str(junk), "not a readable")


def test_windowing_mismatch(tmp_path, ckpts, fasta, capsys):
    state = torch.load(ckpts["a"], weights_only=False)
    state["config"]["data"]["overlap"] = 8
    odd = tmp_path / "odd_window.pt"
    torch.save(state, odd)
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], odd, "--fasta", fasta], str(odd), "data.overlap=8",
                  str(ckpts["a"]))


def test_plot_ids_not_in_input(tmp_path, ckpts, fasta, capsys):
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", fasta, "--plot-ids", "prot1", "nope"],
                  "--plot-ids", "'nope'")


def test_failure_midway_leaves_nothing(tmp_path, ckpts, fasta, capsys, monkeypatch):
    calls, original = [], inference.run_ensemble

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return original(*args)

    monkeypatch.setattr(inference, "run_ensemble", failing)
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", fasta, "--max-tokens", 100],
                  "disk full")
    assert len(calls) == 3


def test_sigterm_midway_leaves_nothing(tmp_path, ckpts):
    """SIGTERM (a batch system's time limit; torchrun stopping the other ranks) removes the temporary
    outputs as any error does, and exits 128 + 15."""
    rng = np.random.default_rng(9)
    big = write_fasta(tmp_path / "big.fa", [(f"p{i}", "".join(rng.choice(list(vocab.RESIDUES[:20]), size=300)))
                                            for i in range(20000)])
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(ckpts["a"]), "--fasta",
                             str(big), "--out", str(out / "p.jsonl"), "--tsv", str(out / "p.tsv"), "--chunk-size", "50"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    for _ in range(600):  # until the staged outputs exist (predicting has begun)
        if list(out.glob(".*.tmp")) or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "predict.py ended before it could be stopped"
    proc.terminate()
    assert proc.wait(timeout=60) == 143
    assert list(out.iterdir()) == []


def test_pipe_input_refused_and_byte_order_mark_accepted(tmp_path, ckpts, capsys):
    fifo = tmp_path / "pipe.fa"
    os.mkfifo(fifo)
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", fifo], str(fifo), "not a regular file")
    bom = tmp_path / "bom.fa"
    bom.write_bytes("\ufeff>first\nMKLVA\n>second\nMKW\n".encode("utf-8"))  # as Windows editors save it
    code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", bom, "--out", tmp_path / "bom.json")
    assert code == 0, err
    assert [r["id"] for r in records_of(tmp_path / "bom.json")] == ["first", "second"]


# --------------------------------------------------------------------------- files, precision, progress
def test_output_modes_follow_the_umask(tmp_path, ckpts, capsys):
    fasta = write_fasta(tmp_path / "in.fa", [("x", "MKLV" * 10)])
    old = os.umask(0o027)
    try:
        code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", fasta, "--out", tmp_path / "o.json",
                        "--embeddings", tmp_path / "e.npz", "--plot-dir", tmp_path / "p", "--device", "cpu")
    finally:
        os.umask(old)
    assert code == 0, err
    for path in (tmp_path / "o.json", tmp_path / "e.npz", tmp_path / "p" / "x.png"):
        assert path.stat().st_mode & 0o777 == 0o640, path


def test_bf16_on_cpu_is_close_to_fp32(ckpts):
    """Tolerances: 0.01 on class probabilities, 0.02 on residue probabilities, 2% of the largest
    pooled value (measured: 0.0009, 0.002, 0.25%)."""
    proteins = [data.make_protein(i, s, "", i) for i, s in proteome()]
    cpu = torch.device("cpu")
    members = inference.load_ensemble([ckpts["a"]], cpu)
    assert inference.autocast_dtype("auto", cpu) is None and inference.autocast_dtype("bf16", cpu) is torch.bfloat16
    fp32 = inference.predict_chunk(members, proteins, cpu, None)
    bf16 = inference.predict_chunk(members, proteins, cpu, torch.bfloat16)
    assert any(not np.array_equal(a.probs, b.probs) for a, b in zip(fp32, bf16))  # bf16 really ran
    for a, b in zip(fp32, bf16):
        assert np.abs(a.probs - b.probs).max() <= 0.01
        assert np.abs(a.motif - b.motif).max() <= 0.02
        assert np.abs(a.pooled - b.pooled).max() <= 0.02 * np.abs(a.pooled).max()
        assert b.probs.dtype == np.float64 and b.pooled.dtype == np.float32


def test_bf16_flag_end_to_end(tmp_path, ckpts, fasta, capsys):
    out32, out16 = tmp_path / "fp32.json", tmp_path / "bf16.json"
    for precision, out in (("fp32", out32), ("bf16", out16)):
        code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", fasta, "--out", out, "--device", "cpu",
                        "--precision", precision)
        assert code == 0, err
    assert np.abs(probs_of(records_of(out32)) - probs_of(records_of(out16))).max() <= 0.01


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_log_lines_without_a_terminal():
    clock, text = FakeClock(), io.StringIO()
    progress = stream.Progress(100, stream=text, interval=30.0, clock=clock)
    for step in (10, 10, 10):  # t = 10, 20, 30 s: 30 s since the start only at the third
        clock.now += 10
        progress.update(step)
    clock.now += 5
    progress.update(20)  # 35 s: 5 s after the last line
    clock.now += 5
    progress.close()
    lines = text.getvalue().splitlines()
    assert lines == ["predict: 30/100 proteins (30%), 1.0 proteins/s, about 70 s left",
                     "predict: 50 proteins in 40.0 s (1.2 proteins/s)"]


def test_ensemble_of_backbones_of_different_sizes(tmp_path, ckpts, fasta, capsys):
    """Probabilities and tracks average across backbone sizes; the mean embedding does not exist, so
    only --embeddings is refused (naming the file)."""
    state = torch.load(ckpts["best"], weights_only=False)
    arch = {**state["arch"], "embed_dim": state["arch"]["embed_dim"] // 2}
    state["config"]["encoder"]["scratch"] = {k: arch[k] for k in ("num_layers", "embed_dim", "attention_heads")}
    torch.manual_seed(5)
    state["model"] = Encoder(resolve_config(state["config"]), arch=arch).state_dict()
    state["arch"] = arch
    torch.save(state, tmp_path / "narrow.pt")
    code, err = run(capsys, "--checkpoint", ckpts["best"], tmp_path / "narrow.pt", "--fasta", fasta,
                    "--out", tmp_path / "out.jsonl", "--tsv", tmp_path / "out.tsv")
    assert code == 0, err
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == fasta.read_text().count("\n>") + 1
    code, err = run(capsys, "--checkpoint", ckpts["best"], tmp_path / "narrow.pt", "--fasta", fasta,
                    "--embeddings", tmp_path / "emb.npz")
    assert code == 2 and "narrow.pt" in err and "size" in err and not (tmp_path / "emb.npz").exists()
