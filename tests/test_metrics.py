import json
import os
import sys

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    jaccard_score,
    matthews_corrcoef,
    precision_score,
    recall_score,
    roc_auc_score,
)

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from metrics import (  # noqa: E402
    CLASSES,
    SEGMENT_CLASSES,
    SITE_CLASSES,
    classification_metrics,
    format_table,
    residue_metrics,
    tune_thresholds,
)

C = len(CLASSES)
IDX = {n: i for i, n in enumerate(CLASSES)}


def random_data(n=200, seed=0, decimals=None):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, C)) < 0.3).astype(int)
    p = np.clip(0.35 * y + 0.65 * rng.random((n, C)), 0, 1)
    y[:, 1] = 0                  # class without positives
    p[:, 2] *= 0.45              # class never predicted at 0.5
    y[:, 7] = 1                  # class without negatives
    if decimals is not None:
        p = np.round(p, decimals)  # create ties
    return y, p


def test_constants():
    assert CLASSES == ["ER", "Peroxisome", "Mitochondrion", "SIGNAL", "Nucleus",
                       "Nucleus_export", "chloroplast", "Thylakoid"]
    assert set(SITE_CLASSES) | set(SEGMENT_CLASSES) == set(CLASSES)


@pytest.mark.parametrize("use_thr", [False, True])
def test_classification_matches_sklearn(use_thr):
    y, p = random_data()
    thr = np.random.default_rng(1).uniform(0.2, 0.8, C) if use_thr else None
    m = classification_metrics(y, p, thr)
    pred = (p >= (0.5 if thr is None else thr[None, :])).astype(int)
    assert pred[:, 2].sum() == 0 or use_thr
    for c, name in enumerate(CLASSES):
        pc, yt, yp = m["per_class"][name], y[:, c], pred[:, c]
        assert pc["support"] == int(yt.sum()) and pc["predicted"] == int(yp.sum())
        if name == "Peroxisome":  # no true protein in the set: no per-class figures, out of the macro averages
            assert pc["precision"] is pc["recall"] is pc["f1"] is pc["mcc"] is None
            continue
        assert pc["precision"] == pytest.approx(precision_score(yt, yp, zero_division=0))
        assert pc["recall"] == pytest.approx(recall_score(yt, yp, zero_division=0))
        assert pc["f1"] == pytest.approx(f1_score(yt, yp, zero_division=0))
        assert pc["mcc"] == pytest.approx(matthews_corrcoef(yt, yp))
        assert pc["threshold"] == pytest.approx(0.5 if thr is None else thr[c])
        if name in ("Peroxisome", "Thylakoid"):
            assert pc["roc_auc"] is None and pc["average_precision"] is None
        else:
            assert pc["roc_auc"] == pytest.approx(roc_auc_score(yt, p[:, c]))
            assert pc["average_precision"] == pytest.approx(average_precision_score(yt, p[:, c]))
    defined = [n for n in CLASSES if n not in ("Peroxisome", "Thylakoid")]
    assert m["macro_roc_auc"] == pytest.approx(
        np.mean([roc_auc_score(y[:, IDX[n]], p[:, IDX[n]]) for n in defined]))
    held = [c for c in range(C) if c != IDX["Peroxisome"]]  # the classes the set holds
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro", zero_division=0, labels=held))
    assert m["macro_precision"] == pytest.approx(
        precision_score(y, pred, average="macro", zero_division=0, labels=held))
    assert m["macro_mcc"] == pytest.approx(np.mean([matthews_corrcoef(y[:, c], pred[:, c]) for c in held]))
    assert m["absent_classes"] == ["Peroxisome"]
    assert m["predicted_absent"] == int(pred[:, IDX["Peroxisome"]].sum())
    assert m["subset_accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["jaccard"] == pytest.approx(
        jaccard_score(y, pred, average="samples", zero_division=1))
    json.dumps(m)


def test_jaccard_empty_rows_and_macro_none():
    y = np.zeros((3, C), int)
    p = np.zeros((3, C))
    p[0, 0] = 0.9
    m = classification_metrics(y, p)
    assert m["jaccard"] == pytest.approx(2 / 3)
    assert m["subset_accuracy"] == pytest.approx(2 / 3)
    assert m["macro_roc_auc"] is None and m["macro_average_precision"] is None
    json.dumps(m)


def _candidates(p):
    u = np.unique(p)
    return np.concatenate([(u[:-1] + u[1:]) / 2, [0.5]])


@pytest.mark.parametrize("decimals", [None, 2])
def test_tune_thresholds_brute_force(decimals):
    y, p = random_data(n=100, seed=3, decimals=decimals)
    thr = tune_thresholds(y, p)
    assert thr.shape == (C,)
    assert thr[IDX["Peroxisome"]] == 0.5 and thr[IDX["Thylakoid"]] == 0.5
    for c in range(C):
        if c in (IDX["Peroxisome"], IDX["Thylakoid"]):
            continue
        cand = _candidates(p[:, c])
        assert np.any(np.isclose(cand, thr[c], rtol=0, atol=1e-12))
        scores = [matthews_corrcoef(y[:, c], (p[:, c] >= t).astype(int)) for t in cand]
        got = matthews_corrcoef(y[:, c], (p[:, c] >= thr[c]).astype(int))
        assert got == pytest.approx(max(scores), abs=1e-12)
        assert got >= matthews_corrcoef(y[:, c], (p[:, c] >= 0.5).astype(int)) - 1e-12
    m = classification_metrics(y, p, thr)
    assert m["macro_mcc"] >= classification_metrics(y, p)["macro_mcc"] - 1e-12


def test_tune_thresholds_tie_break():
    y = np.zeros((4, C), int)
    y[2:, :] = 1
    p = np.tile(np.array([[0.1], [0.2], [0.7], [0.9]]), (1, C))
    p[:, 1] = [0.1, 0.2, 0.3, 0.4]
    thr = tune_thresholds(y, p)
    assert thr[0] == 0.5                     # 0.45 and 0.5 both perfect -> closest to 0.5
    assert thr[1] == pytest.approx(0.25)    # only perfect split


def _protein(length=10):
    return np.full((C, length), 0.01), np.zeros((C, length), int), np.ones((C, length), bool)


def test_residue_metrics_hand_made():
    S, M, K, T = IDX["SIGNAL"], IDX["Mitochondrion"], IDX["chloroplast"], IDX["Thylakoid"]
    NU, NE = IDX["Nucleus"], IDX["Nucleus_export"]
    y_true = np.zeros((4, C), int)
    y_pred = np.zeros((4, C), int)
    probs, tgts, masks = zip(*[_protein() for _ in range(4)])

    # protein 0: SIGNAL two true sites (3, 5), argmax 5 -> exact;
    # Mito site 2, argmax 4 -> only +-2; Nucleus true 6..9, pred 5..7 -> IoU 2/5
    y_true[0, [S, M, NU]] = y_pred[0, [S, M, NU]] = 1
    tgts[0][S, [3, 5]] = 1; probs[0][S, 5] = 0.9
    tgts[0][M, 2] = 1; probs[0][M, 4] = 0.9
    tgts[0][NU, 6:10] = 1; probs[0][NU, 5:8] = 0.8

    # protein 1: SIGNAL site unknown (mask all False) -> skipped;
    # Mito site 1, argmax 8 -> wrong; Nucleus predicted empty -> IoU 0
    y_true[1, [S, M, NU]] = y_pred[1, [S, M, NU]] = 1
    masks[1][S] = False; probs[1][S, 0] = 0.9
    tgts[1][M, 1] = 1; probs[1][M, 8] = 0.9
    tgts[1][NU, 2:5] = 1; probs[1][NU, 2:5] = 0.5   # exactly 0.5 is not > 0.5

    # protein 2: SIGNAL false negative -> not evaluated; Thylakoid false positive -> not
    # evaluated; chloroplast site 5, argmax 7 -> +-2 only; Nucleus no target -> skipped
    y_true[2, [S, K, NU]] = 1
    y_pred[2, [T, K, NU]] = 1
    tgts[2][S, 4] = 1; probs[2][S, 4] = 0.9
    tgts[2][T, 4] = 1; probs[2][T, 4] = 0.9
    tgts[2][K, 5] = 1; probs[2][K, 7] = 0.9
    probs[2][NU, :] = 0.9

    # protein 3: SIGNAL site 4, global max at masked-out 9 -> masked argmax 4 -> exact;
    # Mito site 0, argmax 0 -> exact; Nucleus_export true 2..3, pred 2..3 (+ masked-out 8)
    y_true[3, [S, M, NE]] = y_pred[3, [S, M, NE]] = 1
    tgts[3][S, 4] = 1; masks[3][S, 7:] = False; probs[3][S, 9] = 0.99; probs[3][S, 4] = 0.8
    tgts[3][M, 0] = 1; probs[3][M, 0] = 0.9
    tgts[3][NE, 2:4] = 1; probs[3][NE, [2, 3, 8]] = 0.9; masks[3][NE, 8] = False

    r = residue_metrics(y_true, y_pred, list(probs), list(tgts), list(masks))
    pc = r["per_class"]
    assert pc["SIGNAL"] == {"site_accuracy": 1.0, "site_accuracy_pm2": 1.0, "n_site": 2}
    assert pc["Mitochondrion"] == {"site_accuracy": 1 / 3, "site_accuracy_pm2": 2 / 3,
                                   "n_site": 3}
    assert pc["chloroplast"] == {"site_accuracy": 0.0, "site_accuracy_pm2": 1.0, "n_site": 1}
    for name in ("Thylakoid", "ER", "Peroxisome"):
        assert pc[name] == {"site_accuracy": None, "site_accuracy_pm2": None, "n_site": 0}
    assert pc["Nucleus"]["n_iou"] == 2 and pc["Nucleus"]["iou"] == pytest.approx(0.2)
    assert pc["Nucleus_export"] == {"iou": 1.0, "n_iou": 1}
    assert r["macro_site_accuracy"] == pytest.approx((1.0 + 1 / 3 + 0.0) / 3)
    assert r["macro_iou"] == pytest.approx(0.6)
    json.dumps(r)

    m = classification_metrics(y_true, y_pred.astype(float))
    m["residue"] = r
    json.dumps(m)
    table = format_table(m)
    assert all(name in table for name in CLASSES) and "site/IoU" in table
    assert "site/IoU" not in format_table(classification_metrics(y_true, y_pred.astype(float)))


def test_residue_metrics_empty():
    y = np.zeros((1, C), int)
    probs, tgts, masks = _protein(5)
    r = residue_metrics(y, y, [probs], [tgts], [masks])
    assert r["macro_site_accuracy"] is None and r["macro_iou"] is None
    json.dumps(r)
