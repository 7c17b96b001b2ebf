"""predict.py on the tiny training run: FASTA / CSV input, ensembles, outputs and errors."""
import stat

import helpers
import numpy as np
import pytest
import torch
from helpers import probs_of, records_of, run

import data
import inference
import signals
import vocab
from metrics import classification_metrics

CLASSES = vocab.CLASSES
RNG = np.random.default_rng(3)


def random_seq(n):
    return helpers.random_seq(RNG, n)


SEQS = {"P1": random_seq(40), "P2": random_seq(150), "P3": random_seq(9)}  # P2 spans several 64-residue windows


@pytest.fixture
def ckpt(tiny_run):
    return tiny_run / "checkpoints"


def shifted(ckpt, path, class_bias=1.0, motif_bias=-1.0):
    """A copy of best.pt with shifted head biases (a second, different model)."""
    state = torch.load(ckpt / "best.pt", weights_only=True)
    state["model"]["classifier.bias"] += class_bias
    state["model"]["decoders.b2"] += motif_bias
    torch.save(state, path)
    return path


def write_sample_fasta(path):
    """Multi-line records, a blank line, lowercase and a trailing '*'."""
    s1, s2, s3 = SEQS["P1"], SEQS["P2"], SEQS["P3"]
    path.write_text(f">P1 first protein\n{s1[:25]}\n{s1[25:]}\n\n>P2\n{s2[:60].lower()}\n{s2[60:]}*\n>P3\n{s3}\n")
    return path


def test_fasta_json_and_tsv(tmp_path, ckpt, capsys):
    out, tsv = tmp_path / "out.json", tmp_path / "out.tsv"
    code, err = run(capsys, "--checkpoint", ckpt / "best.pt", "--fasta", write_sample_fasta(tmp_path / "in.fa"),
                    "--out", out, "--tsv", tsv, "--device", "cpu", "--batch-size", 2)
    assert code == 0, err
    records = records_of(out)
    assert [r["id"] for r in records] == list(SEQS)
    assert [r["length"] for r in records] == [len(s) for s in SEQS.values()]
    for r in records:
        assert list(r["probabilities"]) == list(r["probabilities_uncalibrated"]) == CLASSES  # the run is calibrated
        assert all(0.0 <= p <= 1.0 for p in r["probabilities"].values())
        called = [c for c in CLASSES if r["probabilities_uncalibrated"][c] >= 0.5]  # calls: uncalibrated
        assert r["predicted"] == (called or ["Other"])
        assert set(r["sites"]) == {c for c in r["predicted"] if c in vocab.SITE_CLASSES}
        assert all(1 <= pos <= r["length"] for pos in r["sites"].values())
        assert set(r["segments"]) == {c for c in r["predicted"] if c in vocab.SEGMENT_CLASSES}
        for runs in r["segments"].values():
            assert all(1 <= s <= e <= r["length"] for s, e in runs)
    plain = tmp_path / "plain.txt"
    plain.write_text("")  # outputs get the mode open() gives under the umask, not mkstemp's 0600
    assert stat.S_IMODE(out.stat().st_mode) == stat.S_IMODE(tsv.stat().st_mode) == stat.S_IMODE(plain.stat().st_mode)
    lines = tsv.read_text().splitlines()
    header = lines[0].split("\t")
    assert header[:3] == ["id", "length", "predicted"]
    assert header[3:11] == [f"prob_{c}" for c in CLASSES]
    assert header[11:17] == [f"site_{c}" for c in vocab.SITE_CLASSES]
    assert header[17:] == [f"segments_{c}" for c in vocab.SEGMENT_CLASSES] + ["warnings"]
    assert len(lines) == 1 + len(SEQS)
    for line, r in zip(lines[1:], records):
        cells = line.split("\t")
        assert len(cells) == len(header)
        assert cells[:3] == [r["id"], str(r["length"]), ",".join(r["predicted"])]
        assert [float(x) for x in cells[3:11]] == [r["probabilities"][c] for c in CLASSES]
        assert cells[11:17] == [str(r["sites"][c]) if c in r["sites"] else "" for c in vocab.SITE_CLASSES]
        assert cells[17:] == [",".join(f"{s}-{e}" for s, e in r["segments"].get(c, [])) for c in vocab.SEGMENT_CLASSES
                              ] + ["; ".join(r["warnings"])]
    assert records[2]["warnings"] == ["shorter than any training protein (28 residues)"]  # P3: 9 residues
    # the last lines on stderr: where each output is, in the order of the options
    assert err.splitlines()[-2:] == [f"wrote {out}: per-protein records (JSON)", f"wrote {tsv}: one line per protein (TSV)"]


def test_segments_runs():
    mask = np.array([0, 1, 1, 0, 1, 0, 0, 1], bool)
    assert signals.runs(mask) == [[2, 3], [5, 5], [8, 8]]
    assert signals.runs(np.zeros(4, bool)) == []


def test_ensemble_is_mean(tmp_path, ckpt, capsys):
    fasta = write_sample_fasta(tmp_path / "in.fa")
    best, last = ckpt / "best.pt", ckpt / "last.pt"
    a, b = torch.load(best, weights_only=True), torch.load(last, weights_only=True)
    if all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]):  # best epoch = last: make them differ
        last = shifted(ckpt, tmp_path / "last_shifted.pt")

    def predict_with(name, *paths):
        out = tmp_path / f"{name}.json"
        code, err = run(capsys, "--checkpoint", *paths, "--fasta", fasta, "--out", out, "--device", "cpu")
        assert code == 0, err
        return probs_of(records_of(out))

    p_best, p_last = predict_with("best", best), predict_with("last", last)
    assert not np.allclose(p_best, p_last)
    np.testing.assert_array_equal(predict_with("twice", best, best), p_best)
    np.testing.assert_allclose(predict_with("both", best, last), (p_best + p_last) / 2, atol=1.1e-4)

    # motif tracks are averaged too
    proteins = [data.make_protein(k, s, "", k) for k, s in SEQS.items()]
    cpu = torch.device("cpu")
    single = [inference.predict_chunk(inference.load_ensemble([p], cpu), proteins, inference.Settings(cpu, max_tokens=200))
              for p in (best, last)]
    members = inference.load_ensemble([best, last], cpu)
    np.testing.assert_array_equal(inference.ensemble_thresholds(members, False), 0.5)
    both = inference.predict_chunk(members, proteins, inference.Settings(cpu, max_tokens=200))
    for i in range(len(proteins)):
        np.testing.assert_allclose(both[i].motif, (single[0][i].motif + single[1][i].motif) / 2, rtol=0, atol=1e-12)
        np.testing.assert_allclose(both[i].probs, (single[0][i].probs + single[1][i].probs) / 2, rtol=0, atol=1e-12)


def test_tuned_thresholds(tmp_path, ckpt, capsys):
    out = tmp_path / "out.json"
    code, err = run(capsys, "--checkpoint", ckpt / "best.pt", "--fasta", write_sample_fasta(tmp_path / "in.fa"),
                    "--out", out, "--device", "cpu", "--tuned-thresholds")
    assert code == 0, err
    stored = torch.load(ckpt / "best.pt", weights_only=True)["thresholds"]
    for r in records_of(out):
        raw = r["probabilities_uncalibrated"]  # the tuned thresholds are on the uncalibrated probabilities
        for c in CLASSES:  # probabilities are rounded to 4 decimals: skip those too close to call
            if abs(raw[c] - stored[c]) > 1e-4:
                assert (c in r["predicted"]) == (raw[c] > stored[c]), (r["id"], c)


def test_sites_and_segments(tmp_path, ckpt, capsys):
    """A model that predicts every class: a site for each site class, segments for each segment class."""
    model = shifted(ckpt, tmp_path / "all.pt", class_bias=20.0, motif_bias=0.0)
    out = tmp_path / "out.json"
    code, err = run(capsys, "--checkpoint", model, "--fasta", write_sample_fasta(tmp_path / "in.fa"), "--out", out,
                    "--device", "cpu")
    assert code == 0, err
    proteins = [data.make_protein(k, s, "", k) for k, s in SEQS.items()]
    cpu = torch.device("cpu")
    motifs = [r.motif for r in inference.predict_chunk(inference.load_ensemble([model], cpu), proteins, inference.Settings(cpu))]
    for r, motif in zip(records_of(out), motifs):
        assert r["predicted"] == CLASSES
        n = r["length"]
        allowed = {"ER": np.arange(n) >= n - 10, "Peroxisome": (np.arange(n) < 70) | (np.arange(n) >= n - 15)}
        expected = {}
        for c in vocab.SITE_CLASSES:  # the argmax within the class's window (ER: last 10; PTS2 1-70 or PTS1 last 15)
            track = np.where(allowed.get(c, True), motif[CLASSES.index(c)], -1.0)
            expected[c] = int(np.argmax(track)) + 1
        assert r["sites"] == {c: expected[c] for c in CLASSES if c in vocab.SITE_CLASSES}
        assert all(1 <= pos <= n for pos in r["sites"].values())
        assert list(r["segments"]) == [c for c in CLASSES if c in vocab.SEGMENT_CLASSES]
        for c, runs in r["segments"].items():  # residues above 0.5 grouped across gaps of <= 3, short groups dropped
            groups = []
            for pos in np.flatnonzero(motif[CLASSES.index(c)] > 0.5) + 1:
                if groups and pos - groups[-1][-1] - 1 <= 3:
                    groups[-1].append(int(pos))
                else:
                    groups.append([int(pos)])
            assert runs == [[g[0], g[-1]] for g in groups if g[-1] - g[0] + 1 >= vocab.SEGMENT_MIN_LENGTH[c]]


def test_csv_metrics(tmp_path, ckpt, capsys):
    rows = [("Q1", "1-20:SIGNAL", random_seq(80), ["SIGNAL"]),
            ("Q2", "", random_seq(60), []),
            ("Q3", "1-30:Mitochondrion", random_seq(120), ["Mitochondrion"]),
            ("Q4", "50-56:Nucleus", random_seq(90), ["Nucleus"]),
            ("Q5", "1-25:SIGNAL|70-73:ER", random_seq(73), ["ER", "SIGNAL"])]
    csv = tmp_path / "labelled.csv"
    csv.write_text(",Entry,MOTIF,Sequence\n" + "".join(f"{i},{e},{m},{s}\n" for i, (e, m, s, _) in enumerate(rows)))
    out, metrics_path = tmp_path / "out.json", tmp_path / "metrics.json"
    code, err = run(capsys, "--checkpoint", ckpt / "best.pt", "--csv", csv, "--out", out,
                    "--metrics", metrics_path, "--device", "cpu")
    assert code == 0, err
    records, metrics = records_of(out), records_of(metrics_path)
    chunked = tmp_path / "metrics_chunked.json"  # streamed in chunks of 2: the same metrics
    code, err = run(capsys, "--checkpoint", ckpt / "best.pt", "--csv", csv, "--metrics", chunked, "--device", "cpu",
                    "--chunk-size", 2)
    assert code == 0, err
    assert records_of(chunked) == metrics
    assert [r["id"] for r in records] == [r[0] for r in rows]
    assert {"macro_f1", "macro_mcc", "residue"} <= set(metrics)
    assert list(metrics["per_class"]) == CLASSES
    y_true = np.array([[int(c in labels) for c in CLASSES] for *_, labels in rows])
    expected = classification_metrics(y_true, probs_of(records))
    for key in ("macro_f1", "macro_mcc", "macro_precision", "macro_recall", "subset_accuracy", "jaccard"):
        assert metrics[key] == pytest.approx(expected[key]), key
    for c in CLASSES:
        for key in ("f1", "mcc", "support"):
            want = expected["per_class"][c][key]  # None for a class the set does not hold
            assert metrics["per_class"][c][key] == (want if want is None else pytest.approx(want)), (c, key)


def test_csv_metrics_average_the_classes_the_set_holds(tmp_path, ckpt, capsys):
    """An external set holds a few of the eight classes (TargetP: signal peptides, transit peptides, none):
    its macro figures average those only; the others are null, and the proteins predicted with a class the
    set does not hold are counted."""
    rng = np.random.default_rng(11)
    rows = [(f"S{i}", f"1-{int(rng.integers(15, 30))}:SIGNAL", random_seq(int(rng.integers(60, 200)))) for i in range(12)]
    rows += [(f"N{i}", "", random_seq(int(rng.integers(30, 200)))) for i in range(12)]
    csv = tmp_path / "signal_only.csv"
    csv.write_text("Entry,MOTIF,Sequence\n" + "".join(f"{e},{m},{s}\n" for e, m, s in rows))
    out, metrics_path = tmp_path / "out.json", tmp_path / "metrics.json"
    code, err = run(capsys, "--checkpoint", ckpt / "best.pt", "--csv", csv, "--out", out, "--metrics", metrics_path,
                    "--device", "cpu", "--tuned-thresholds")
    assert code == 0, err
    metrics, records = records_of(metrics_path), records_of(out)
    signal = metrics["per_class"]["SIGNAL"]
    assert metrics["macro_mcc"] == signal["mcc"] and metrics["macro_f1"] == signal["f1"]
    truth = np.array([e.startswith("S") for e, _, _ in rows])
    predicted = np.array(["SIGNAL" in r["predicted"] for r in records])
    from sklearn.metrics import matthews_corrcoef
    assert signal["mcc"] == pytest.approx(matthews_corrcoef(truth, predicted))
    absent = [c for c in CLASSES if c != "SIGNAL"]
    assert metrics["absent_classes"] == absent
    assert all(metrics["per_class"][c][k] is None for c in absent for k in ("precision", "recall", "f1", "mcc"))
    assert metrics["predicted_absent"] == sum(any(c != "SIGNAL" for c in r["predicted"]) for r in records)


def check_failure(capsys, tmp_path, argv, *needles):
    out = tmp_path / "out.json"
    code, err = run(capsys, *argv, "--out", out, "--tsv", tmp_path / "out.tsv", "--device", "cpu")
    assert code == 2
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err
    assert not out.exists() and not (tmp_path / "out.tsv").exists()
    assert not list(tmp_path.glob(".out.*"))  # no temporary files left either


def test_fasta_without_records(tmp_path, ckpt, capsys):
    fasta = tmp_path / "empty.fa"
    fasta.write_text("\n\n")
    check_failure(capsys, tmp_path, ["--checkpoint", ckpt / "best.pt", "--fasta", fasta], str(fasta), "no FASTA records")


def test_invalid_residue(tmp_path, ckpt, capsys):
    fasta = tmp_path / "bad.fa"
    fasta.write_text(f">ok\n{SEQS['P1']}\n>broken_rec\nMKLVJAA\n")
    check_failure(capsys, tmp_path, ["--checkpoint", ckpt / "best.pt", "--fasta", fasta], str(fasta), "broken_rec", "'J'")


def test_missing_checkpoint(tmp_path, ckpt, capsys):
    missing = tmp_path / "nope.pt"
    check_failure(capsys, tmp_path, ["--checkpoint", ckpt / "best.pt", missing, "--fasta", write_sample_fasta(tmp_path / "in.fa")],
                  str(missing))


def test_tuned_thresholds_missing(tmp_path, ckpt, capsys):
    state = torch.load(ckpt / "best.pt", weights_only=True)
    state.pop("thresholds", None)
    bare = tmp_path / "bare.pt"
    torch.save(state, bare)
    check_failure(capsys, tmp_path, ["--checkpoint", ckpt / "best.pt", bare, "--fasta", write_sample_fasta(tmp_path / "in.fa"),
                                     "--tuned-thresholds"], str(bare), "threshold")


def test_classes_mismatch(tmp_path, ckpt, capsys):
    state = torch.load(ckpt / "best.pt", weights_only=True)
    state["classes"] = list(reversed(CLASSES))
    odd = tmp_path / "odd.pt"
    torch.save(state, odd)
    check_failure(capsys, tmp_path, ["--checkpoint", odd, "--fasta", write_sample_fasta(tmp_path / "in.fa")], str(odd), "classes")


def test_truncated_checkpoint(tmp_path, ckpt, capsys):
    whole = (ckpt / "best.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(whole[: len(whole) // 3])
    check_failure(capsys, tmp_path, ["--checkpoint", cut, "--fasta", write_sample_fasta(tmp_path / "in.fa")], str(cut),
                  "not a readable checkpoint")
