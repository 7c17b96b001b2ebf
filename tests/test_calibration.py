"""Calibration of the class head (calibration.py): temperature scaling, ECE and Brier score, conformal prediction
sets and p-values against independent expectations; scripts/calibrate.py and scripts/plot_reliability.py; the
calibration in predict.py's outputs."""
import json
import math
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from helpers import records_of, run, write_fasta

import calibration
from vocab import CLASSES

sys.path.insert(0, str(ROOT / "scripts"))
import calibrate  # noqa: E402
import plot_reliability  # noqa: E402


# --------------------------------------------------------------------------- the formulas
@pytest.mark.parametrize("t_true", [2.0, 0.5])
def test_temperature_scaling_recovers_a_known_temperature(t_true):
    """Labels drawn as Bernoulli(sigmoid(z / T)) for 20,000 logits: the fitted T is within 5% of T."""
    rng = np.random.default_rng(7)
    z = rng.normal(0.0, 3.0, 20_000)
    y = rng.random(20_000) < 1.0 / (1.0 + np.exp(-z / t_true))
    assert calibration.fit_temperature(z, y) == pytest.approx(t_true, rel=0.05)
    assert calibration.fit_temperature(z, np.zeros(20_000)) == 1.0  # no positives: nothing to fit


def test_ece_and_brier_by_hand():
    """y = [1, 0, 1, 1], p = [0.9, 0.92, 0.3, 0.1], 15 bins of width 1/15:
    0.9 and 0.92 fall in bin 13 ([13/15, 14/15) = [0.867, 0.933)): 2 proteins, fraction positive 1/2, mean p 0.91,
    |0.5 - 0.91| = 0.41, weight 2/4 -> 0.205; 0.3 in bin 4: |1 - 0.3| = 0.7, weight 1/4 -> 0.175; 0.1 in bin 1:
    |1 - 0.1| = 0.9, weight 1/4 -> 0.225. ECE = 0.205 + 0.175 + 0.225 = 0.605.
    Brier = (0.1^2 + 0.92^2 + 0.7^2 + 0.9^2) / 4 = (0.01 + 0.8464 + 0.49 + 0.81) / 4 = 0.5391.
    A probability of exactly 1 goes to the last bin: y = [1], p = [1.0] -> ECE 0."""
    y, p = [1, 0, 1, 1], [0.9, 0.92, 0.3, 0.1]
    assert calibration.ece(y, p) == pytest.approx(0.605, abs=1e-12)
    assert calibration.brier(y, p) == pytest.approx(0.5391, abs=1e-12)
    count, confidence, positive = calibration.reliability(y, p)
    assert count.tolist() == [0, 1, 0, 0, 1] + [0] * 8 + [2, 0]
    assert confidence[13] == pytest.approx(0.91) and positive[13] == 0.5 and np.isnan(positive[0])
    assert calibration.ece([1], [1.0]) == 0.0


def test_conformal_thresholds_cover_as_promised():
    """Exchangeable continuous scores, 1,000 random calibration / test splits per class: the mean coverage of
    the test positives (score <= threshold) lies in [1 - alpha - 0.005, 1 - alpha + 1 / (n_c + 1) + 0.005]."""
    rng = np.random.default_rng(0)
    splits, n_test = 1000, 100
    for n_c in (19, 50, 137):  # the calibration positives of three classes
        scores = rng.beta(2.0, 5.0, size=(splits, n_c + n_test))  # each row: one random split of one sample
        cal, test = np.sort(scores[:, :n_c], axis=1), scores[:, n_c:]
        for alpha in (0.05, 0.1, 0.2):
            thresholds = calibration.threshold(cal, 1 - alpha)  # [splits], one call for all
            covered = float((test <= thresholds[:, None]).mean())
            assert 1 - alpha - 0.005 <= covered <= 1 - alpha + 1 / (n_c + 1) + 0.005, (n_c, alpha, covered)


def test_threshold_rank_and_infinity():
    """k = ceil((n + 1)(1 - alpha)): n = 9, coverage 0.8 -> k = 8 (the 8th smallest); coverage 0.95 -> k = 10 > 9,
    +inf (always in the set)."""
    scores = np.arange(1, 10) / 10.0
    assert calibration.threshold(scores, 0.8) == pytest.approx(0.8)
    assert calibration.threshold(scores, 0.95) == math.inf
    assert calibration.rank(99, 0.9) == 90  # (99 + 1) x 0.9 is 90, not 91 after rounding


def test_conformal_p_value_by_hand():
    """Calibration scores [0.1, 0.2, 0.3, 0.4] (n = 4): s = 0.25 has 2 scores >= it -> (1 + 2) / 5 = 0.6;
    s = 0.4 has 1 -> 0.4; s = 0.5 none -> 0.2; s = 0 all four -> 1."""
    assert calibration.p_values([0.1, 0.2, 0.3, 0.4], [0.25, 0.4, 0.5, 0.0]).tolist() == pytest.approx(
        [0.6, 0.4, 0.2, 1.0])


def scores_for(n_per_name: dict) -> dict:
    return {n: np.linspace(0.05, 0.95, n_per_name.get(n, 20)).tolist() for n in calibration.SET_NAMES}


def test_sets_rules():
    """A class with >= 10 calibration proteins: in the set when 1 - p <= its threshold; fewer: no guarantee, in the
    set when p >= 0.5, p-value null; no signal ('Other', s = max p) in the set by its own threshold."""
    scores = scores_for({"ER": 4})
    sets = calibration.Sets(scores, 0.9)
    t_signal = calibration.threshold(scores["SIGNAL"], 0.9)  # 19th of 20 evenly spaced scores: 0.9026
    probs = np.full((2, 8), 0.02)
    probs[0, CLASSES.index("SIGNAL")] = 1 - t_signal + 1e-9  # just inside
    probs[0, CLASSES.index("ER")] = 0.6  # no guarantee, p >= 0.5: in
    probs[1, CLASSES.index("SIGNAL")] = 1 - t_signal - 1e-6  # just outside
    inside = sets.members(probs)
    chosen = [[n for n, hit in zip(calibration.SET_NAMES, row) if hit] for row in inside]
    assert chosen == [["ER", "SIGNAL", "Other"], ["Other"]]  # s = 0.98 for the others: out; max p <= 0.9026: Other in
    assert calibration.Sets(scores, 0.9).members(np.full((1, 8), 0.96))[0].tolist() == [True] * 8 + [False]
    record = sets.fields(probs[1])
    assert "SIGNAL" not in record["classes"] and record["p_values"]["ER"] is None
    assert record["size"] == len(record["classes"]) and record["coverage"] == 0.9
    assert any("no coverage guarantee for ER (4)" in line for line in sets.notes())
    assert any("always in the set" in line for line in calibration.Sets(scores_for({}), 0.97).notes())
    with pytest.raises(calibration.CalibrationError, match="between 0 and 1"):
        calibration.Sets(scores, 1.0)


def test_realised_recall_of_fitted_sets():
    """fit() on 2,000 synthetic proteins, sets at 0.9 on 2,000 more from the same distribution: each class's
    realised recall is near 0.9 (well within sampling noise), the report says so per class."""
    rng = np.random.default_rng(3)
    n = 4000
    logits = rng.normal(-1.5, 2.0, (n, 8))
    labels = rng.random((n, 8)) < calibration.sigmoid(logits)  # calibrated at T = 1
    block = calibration.fit(logits[:2000] * 2.0, labels[:2000], "synthetic")  # twice too confident: T near 2
    assert all(1.6 < t < 2.4 for t in block["temperatures"].values())
    calibrated = calibration.calibrated_probs(logits[2000:] * 2.0, calibration.temperatures_of(block))
    report = calibration.set_report(labels[2000:], calibrated, block["scores"], [0.9])["0.9"]
    for name, m in report["per_class"].items():
        assert m["guarantee"] and abs(m["recall"] - 0.9) < 0.05, (name, m)
    assert calibration.problem(block) is None


def test_stored_calibration_checks():
    block = calibration.fit(np.zeros((3, 8)) + np.arange(3)[:, None], np.eye(3, 8, dtype=int), "x.csv")
    assert calibration.problem(block) is None and calibration.problem(None) is None
    bad = json.loads(json.dumps(block))
    bad["scores"]["SIGNAL"] = [0.5, float("nan")]
    assert "calibration.scores.SIGNAL" in calibration.problem(bad)
    bad = json.loads(json.dumps(block))
    bad["temperatures"]["ER"] = -1.0
    assert "calibration.temperatures.ER" in calibration.problem(bad)
    logits = np.zeros((4, 8))
    logits[2, 5] = np.nan
    with pytest.raises(calibration.CalibrationError, match=r"labelled\.csv: class Nucleus_export: 1 protein"):
        calibration.fit(logits, np.zeros((4, 8)), "labelled.csv")


def test_ensemble_scores_need_the_same_ensemble():
    one = calibration.fit(np.zeros((2, 8)), np.zeros((2, 8)), "a")
    pair = calibration.fit_ensemble([np.zeros((2, 8)), np.ones((2, 8))], np.zeros((2, 8)), "b")
    assert pair[0]["ensemble"] == pair[1]["ensemble"] and pair[0]["scope"] == "ensemble"
    assert calibration.ensemble_scores(pair) == (pair[0]["scores"], None)
    scores, note = calibration.ensemble_scores([one, pair[0]])  # mixed: pooled, approximate
    assert "pools" in note and len(scores["Other"]) == 4
    assert "ensemble of 2" in calibration.ensemble_scores(pair[:1])[1]  # one member of a calibrated ensemble alone


# --------------------------------------------------------------------------- the script and predict.py
@pytest.fixture(scope="module")
def recalibrated(tiny_run, tmp_path_factory):
    """best.pt of the tiny run calibrated by scripts/calibrate.py on its whole synthetic CSV (118 proteins)."""
    out = tmp_path_factory.mktemp("recalibrated") / "out"
    csv = tiny_run.parent / "data" / "SYNTHETIC_uniprot.csv"
    assert calibrate.main([str(tiny_run / "checkpoints" / "best.pt"), "--csv", str(csv), "--out", str(out),
                           "--device", "cpu"]) == 0
    return out / "best.pt", csv


def test_calibrate_changes_the_calibration_only(tiny_run, recalibrated):
    path, csv = recalibrated
    old, new = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True), torch.load(path, weights_only=True)
    assert set(old) == set(new) and old["model"].keys() == new["model"].keys()
    assert all(torch.equal(old["model"][k], new["model"][k]) for k in old["model"])  # the weights, unchanged
    assert all(old[k] == new[k] for k in ("thresholds", "config", "arch", "classes", "epoch", "best_metric"))
    block = new["calibration"]
    rows = len(csv.read_text().splitlines()) - 1
    assert block["source"] == str(csv) and block["n_proteins"] == rows and calibration.problem(block) is None
    assert old["calibration"]["source"].startswith("validation partition")  # train.py's own, on 27 proteins


def test_predict_coverage_outputs_and_metrics(recalibrated, tmp_path, capsys):
    """--coverage: every record gets its set, size and p-values; TSV two more columns; --metrics the realised
    recall (here on the calibration set itself: at least the coverage for every guaranteed class)."""
    path, csv = recalibrated
    out, tsv, metrics = tmp_path / "out.json", tmp_path / "out.tsv", tmp_path / "metrics.json"
    code, err = run(capsys, "--checkpoint", path, "--csv", csv, "--out", out, "--tsv", tsv, "--metrics", metrics,
                    "--coverage", "0.9", "--device", "cpu")
    assert code == 0, err
    records, m = records_of(out), records_of(metrics)
    for r in records:
        ps = r["prediction_set"]
        assert ps["size"] == len(ps["classes"]) and set(ps["p_values"]) == set(calibration.SET_NAMES)
        assert r["predicted"] == ([c for c in CLASSES if r["probabilities_uncalibrated"][c] >= 0.5] or ["Other"])
    lines = tsv.read_text().splitlines()
    assert lines[0].split("\t")[-3:] == ["prediction_set", "set_size", "warnings"]
    assert [line.split("\t")[-2] for line in lines[1:]] == [str(r["prediction_set"]["size"]) for r in records]
    assert m["calibrated"] is True and m["calibration"]["calibrated"]["macro_ece"] is not None
    for name, s in m["sets"]["0.9"]["per_class"].items():
        if s["guarantee"]:
            assert s["recall"] >= 0.9, (name, s)
    code, err = run(capsys, "--checkpoint", path, "--csv", csv, "--out", tmp_path / "x.json", "--coverage", "1",
                    "--device", "cpu")
    assert code == 2 and err.strip().splitlines() == ["error: --coverage: must be between 0 and 1 (exclusive), got 1.0"]


def test_uncalibrated_checkpoint_says_so(tmp_path, capsys):
    """A checkpoint written before calibration existed predicts as before, with one line saying so; --metrics
    records it; --coverage needs a calibration."""
    fixture = ROOT / "tests" / "fixtures" / "best_510a3f0.pt"
    a, b = "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "MSTNPKPQRKTKRNTNRRPQDVKFPGG"
    fasta = write_fasta(tmp_path / "in.fa", [("A", a), ("B", b)])
    csv = tmp_path / "in.csv"
    csv.write_text(f"Entry,MOTIF,Sequence\nA,1-10:SIGNAL,{a}\nB,,{b}\n")
    code, err = run(capsys, "--checkpoint", fixture, "--csv", csv, "--out", tmp_path / "o.json", "--metrics",
                    tmp_path / "m.json", "--device", "cpu")
    assert code == 0 and [line for line in err.splitlines() if line.startswith("note:") and "uncalibrated" in line] == [
        f"note: probabilities are uncalibrated: {fixture} holds no calibration (add one with scripts/calibrate.py)"]
    metrics = records_of(tmp_path / "m.json")
    assert metrics["calibrated"] is False and metrics["calibration"]["calibrated"] is None
    assert "probabilities_uncalibrated" not in records_of(tmp_path / "o.json")[0]
    code, err = run(capsys, "--checkpoint", fixture, "--fasta", fasta, "--out", tmp_path / "p.json", "--coverage",
                    "0.9", "--device", "cpu")
    assert code == 2 and "holds no calibration" in err and not (tmp_path / "p.json").exists()


def test_calibrate_on_a_config_split(tiny_run, tmp_path):
    """--config CONFIG --split valid: the fold's validation split, as the final test of training calibrated it
    (the same temperatures up to the two inference paths' rounding)."""
    best = tiny_run / "checkpoints" / "best.pt"
    out = tmp_path / "out"
    assert calibrate.main([str(best), "--config", str(tiny_run / "config.yaml"), "--split", "valid", "--out", str(out),
                           "--device", "cpu"]) == 0
    trained, refit = (torch.load(p, weights_only=True)["calibration"] for p in (best, out / "best.pt"))
    assert refit["n_proteins"] == trained["n_proteins"] == 27 and "valid split of fold 0" in refit["source"]
    for c in CLASSES:
        assert refit["temperatures"][c] == pytest.approx(trained["temperatures"][c], rel=1e-3)
        assert len(refit["scores"][c]) == len(trained["scores"][c])


def test_calibrate_refusals(tiny_run, tmp_path, capsys):
    best = tiny_run / "checkpoints" / "best.pt"
    csv = tmp_path / "odd.csv"
    csv.write_text("Entry,MOTIF,Sequence\nA,1-10:Golgi,MKTAYIAKQRQISFVKSHFSRQ\n")
    assert calibrate.main([str(best), "--csv", str(csv), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "Golgi" in capsys.readouterr().err and not (tmp_path / "o").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    assert calibrate.main([str(best), "--csv", str(csv), "--out", str(tmp_path / "full")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_plot_reliability_of_a_run(tiny_run, tmp_path, capsys):
    out = plot_reliability.main([str(tiny_run), "--out", str(tmp_path / "rel.png")])
    assert out == 0 and (tmp_path / "rel.png").stat().st_size > 10_000
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"macro_f1": 0.5}))  # test metrics from before calibration existed
    assert plot_reliability.main([str(old)]) == 2 and "holds no calibration figures" in capsys.readouterr().err
