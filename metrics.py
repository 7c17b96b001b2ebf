"""Evaluation metrics for multi-label targeting-signal prediction.

Protein level: per-class precision / recall / F1 / MCC / ROC-AUC / AP, macro
averages over the classes the set holds, subset accuracy and sample Jaccard; MCC-optimal
threshold tuning.
Residue level: site accuracy (exact and +-2) for site classes and IoU for
segment classes, on true-positive proteins only.
All returned dicts hold plain Python floats / ints / None (JSON-safe).
"""
import numpy as np

from vocab import CLASSES, SEGMENT_CLASSES, SITE_CLASSES


def _num(x):
    """numpy scalar / None -> Python float (None stays None)."""
    return None if x is None else float(x)


def _mean_defined(values):
    """Mean of the non-None values as float, None if there are none."""
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _check(y_true, y_other):
    y_true, y_other = np.asarray(y_true), np.asarray(y_other)
    if y_true.ndim != 2 or y_true.shape != y_other.shape or y_true.shape[1] != len(CLASSES):
        raise ValueError(f"expected two [N, {len(CLASSES)}] arrays, got "
                         f"{y_true.shape} and {y_other.shape}")
    return y_true.astype(bool), y_other


def _confusion_scores(tp, fp, fn, tn):
    """Precision, recall, F1, MCC from confusion counts (float arrays [C] or [K]);
    0.0 wherever a score is undefined."""
    def div(a, b):
        return np.divide(a, b, out=np.zeros_like(a, dtype=float), where=b > 0)
    precision = div(tp, tp + fp)
    recall = div(tp, tp + fn)
    f1 = div(2 * tp, 2 * tp + fp + fn)
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    mcc = div(tp * tn - fp * fn, denom)
    return precision, recall, f1, mcc


def classification_metrics(y_true, y_prob, thresholds=None):
    """Protein-level metrics.

    y_true: int [N, C] 0/1; y_prob: float [N, C]; thresholds: float [C] or None (0.5).
    A class is predicted when y_prob >= threshold.
    Macro averages run over the classes the set holds (at least one true protein): an external set
    (TargetP, DeepLoc) holds a few of the eight. A class it does not hold gets null precision, recall,
    F1 and MCC, and is listed in "absent_classes"; "predicted_absent" counts the proteins predicted
    with such a class (false positives no per-class figure can show).
    Returns {"per_class": {name: {...}}, "macro_*": ..., "absent_classes", "predicted_absent",
    "subset_accuracy", "jaccard"}.
    """
    y_true, y_prob = _check(y_true, y_prob)
    y_prob = y_prob.astype(float)
    n_cls = y_true.shape[1]
    thr = np.full(n_cls, 0.5) if thresholds is None else np.asarray(thresholds, float)
    pred = y_prob >= thr[None, :]

    tp = (pred & y_true).sum(0).astype(float)
    fp = (pred & ~y_true).sum(0).astype(float)
    fn = (~pred & y_true).sum(0).astype(float)
    tn = (~pred & ~y_true).sum(0).astype(float)
    precision, recall, f1, mcc = _confusion_scores(tp, fp, fn, tn)

    from sklearn.metrics import average_precision_score, roc_auc_score  # here: 1.3 s of importing, not at start-up
    present = y_true.any(0)  # classes the set holds: at least one true protein
    per_class = {}
    for c, name in enumerate(CLASSES):
        both = 0 < y_true[:, c].sum() < len(y_true)  # AUC/AP need both label values
        scores = {"precision": float(precision[c]), "recall": float(recall[c]), "f1": float(f1[c]),
                  "mcc": float(mcc[c])} if present[c] else dict.fromkeys(("precision", "recall", "f1", "mcc"))
        per_class[name] = {
            **scores,
            "roc_auc": _num(roc_auc_score(y_true[:, c], y_prob[:, c])) if both else None,
            "average_precision": (_num(average_precision_score(y_true[:, c], y_prob[:, c]))
                                  if both else None),
            "threshold": float(thr[c]), "support": int(y_true[:, c].sum()), "predicted": int(pred[:, c].sum()),
        }

    inter = (pred & y_true).sum(1)
    union = (pred | y_true).sum(1)
    jac = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    out = {"per_class": per_class}
    for key in ["precision", "recall", "f1", "mcc", "roc_auc", "average_precision"]:
        out["macro_" + key] = _mean_defined([m[key] for m in per_class.values()])
    out["absent_classes"] = [name for c, name in enumerate(CLASSES) if not present[c]]
    out["predicted_absent"] = int(pred[:, ~present].any(1).sum())  # proteins given a class the set does not hold
    out["subset_accuracy"] = float((pred == y_true).all(1).mean()) if len(y_true) else 0.0
    out["jaccard"] = float(jac.mean()) if len(y_true) else 0.0
    return out


def mcc_at_thresholds(y, score, candidates):
    """MCC of predicting score >= t, for each candidate t: y bool [N], score float [N], candidates [K] -> [K].
    One sort and cumulative counts, not a [K, N] prediction matrix."""
    n_pos = int(y.sum())
    order = np.argsort(score, kind="stable")
    pos_cum = np.concatenate([[0], np.cumsum(y[order])])
    below = np.searchsorted(score[order], candidates, side="left")  # samples with score < t
    tp = (n_pos - pos_cum[below]).astype(float)
    fp = len(score) - below - tp
    return _confusion_scores(tp, fp, n_pos - tp, len(score) - n_pos - fp)[3]


def _best_threshold(y, p):
    """MCC-optimal threshold for one class. y: bool [N], p: float [N] -> float."""
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == len(y):
        return 0.5
    u = np.unique(p)
    cand = np.concatenate([(u[:-1] + u[1:]) / 2, [0.5]])
    mcc = mcc_at_thresholds(y, p, cand)
    ok = mcc >= mcc.max() - 1e-12  # ties (up to rounding) -> closest to 0.5
    idx = np.flatnonzero(ok)[np.argmin(np.abs(cand[ok] - 0.5))]
    return float(cand[idx])


def tune_thresholds(y_true, y_prob):
    """Per-class threshold maximising MCC. y_true: int [N, C], y_prob: float [N, C] -> [C].

    Candidates are midpoints between consecutive distinct probabilities plus 0.5;
    classes without both positives and negatives keep 0.5.
    """
    y_true, y_prob = _check(y_true, y_prob)
    y_prob = y_prob.astype(float)
    return np.array([_best_threshold(y_true[:, c], y_prob[:, c])
                     for c in range(y_true.shape[1])])


def residue_metrics(y_true, y_pred, motif_probs, targets, target_masks):
    """Residue-level metrics on true-positive proteins.

    y_true, y_pred: int [N, C]; motif_probs: list of N float [C, L_i];
    targets: list of N 0/1 [C, L_i]; target_masks: list of N bool [C, L_i].
    Site classes -> site_accuracy, site_accuracy_pm2, n_site;
    segment classes -> iou, n_iou. A track with an all-False mask is skipped.
    """
    y_true, y_pred = _check(y_true, y_pred)
    y_pred = y_pred.astype(bool)
    exact = {n: [] for n in SITE_CLASSES}
    near = {n: [] for n in SITE_CLASSES}
    ious = {n: [] for n in SEGMENT_CLASSES}
    for i in range(len(y_true)):
        probs = np.asarray(motif_probs[i], float)
        tgt = np.asarray(targets[i]) > 0
        mask = np.asarray(target_masks[i], bool)
        for c, name in enumerate(CLASSES):
            if not (y_true[i, c] and y_pred[i, c]) or not mask[c].any():
                continue
            true_pos = tgt[c] & mask[c]
            if not true_pos.any():
                continue
            if name in exact:
                allowed = np.flatnonzero(mask[c])
                site = allowed[np.argmax(probs[c][allowed])]
                dist = np.abs(np.flatnonzero(true_pos) - site).min()
                exact[name].append(dist == 0)
                near[name].append(dist <= 2)
            else:
                pred_pos = (probs[c] > 0.5) & mask[c]
                union = (pred_pos | true_pos).sum()
                ious[name].append((pred_pos & true_pos).sum() / union if pred_pos.any() else 0.0)

    per_class = {}
    for name in CLASSES:
        if name in exact:
            n = len(exact[name])
            per_class[name] = {"site_accuracy": float(np.mean(exact[name])) if n else None,
                               "site_accuracy_pm2": float(np.mean(near[name])) if n else None,
                               "n_site": n}
        else:
            n = len(ious[name])
            per_class[name] = {"iou": float(np.mean(ious[name])) if n else None, "n_iou": n}
    return {"per_class": per_class,
            "macro_site_accuracy": _mean_defined(
                [per_class[n]["site_accuracy"] for n in SITE_CLASSES]),
            "macro_iou": _mean_defined([per_class[n]["iou"] for n in SEGMENT_CLASSES])}


def score(outputs: dict, thresholds=None) -> dict:
    """Protein-level and residue-level metrics of run_inference outputs."""
    m = classification_metrics(outputs["labels"], outputs["probs"], thresholds)
    thr = 0.5 if thresholds is None else np.asarray(thresholds)[None, :]
    y_pred = (outputs["probs"] >= thr).astype(np.int64)
    m["residue"] = residue_metrics(outputs["labels"], y_pred, outputs["motif_probs"], outputs["targets"],
                                   outputs["target_masks"])
    return m


def format_table(metrics):
    """Fixed-width text table of classification_metrics output; if
    metrics["residue"] holds residue_metrics output, adds a site-acc / IoU column."""
    res = metrics.get("residue", {}).get("per_class", {})

    def fmt(v, width=7):
        return f"{'-':>{width}}" if v is None else f"{v:>{width}.3f}"

    def res_cell(name):
        r = res.get(name, {})
        if "site_accuracy" in r:
            return fmt(r["site_accuracy"]) + f" (n={r['n_site']})"
        if "iou" in r:
            return fmt(r["iou"]) + f" (n={r['n_iou']})"
        return ""

    head = f"{'class':<15}{'support':>8}" + "".join(
        f"{h:>7}" for h in ["prec", "recall", "F1", "MCC", "AUC", "AP"])
    if res:
        head += f"{'site/IoU':>9}"
    lines = [head, "-" * len(head)]
    keys = ["precision", "recall", "f1", "mcc", "roc_auc", "average_precision"]
    for name, m in metrics["per_class"].items():
        line = f"{name:<15}{m['support']:>8}" + "".join(fmt(m[k]) for k in keys)
        lines.append(line + (" " + res_cell(name) if res else ""))
    lines.append("-" * len(head))
    macro = f"{'macro':<15}{'':>8}" + "".join(fmt(metrics.get('macro_' + k)) for k in keys)
    if res:
        r = metrics["residue"]
        macro += f" site={fmt(r['macro_site_accuracy'], 0)} iou={fmt(r['macro_iou'], 0)}"
    lines.append(macro)
    lines.append(f"subset_accuracy={metrics['subset_accuracy']:.3f}  "
                 f"jaccard={metrics['jaccard']:.3f}")
    return "\n".join(lines)
