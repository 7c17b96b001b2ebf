"""Prediction from the embedding space (CLEAN's inference) and measurements of that space.

Spaces: 'pooled' (the mean residue embedding the heads read, [N, d]) and 'projection' (the SupCon
projection head's output, [N, k], when the model has one).

- Class centres: the mean embedding of the training proteins of each class; a multi-label protein
  counts for each of its classes (CLEAN's cluster centres).
- Distances: Euclidean, from each protein to each of the 8 centres, [N, 8].
- maxsep: CLEAN's max-separation rule over the 8 sorted distances (no parameters).
- threshold: one distance threshold per class, tuned on validation for MCC; predicts "no signal" when
  no centre is near enough, which max-separation cannot.
- pvalue: CLEAN's p-value rule, and the mixture confidence of each distance (confidence.py).
- Scores for threshold-free metrics: the negative distance.
- kNN: the k nearest training proteins vote per class (majority), k = KNN_K.
- Separation per class: the mean silhouette of the class's proteins in the one-vs-rest split of the
  test proteins, s(i) = (b(i) - a(i)) / max(a(i), b(i)), a(i) the mean distance of protein i to the other
  members of the class, b(i) its mean distance to the non-members; +1: tight and apart, 0: mixed in,
  below 0: nearer the other proteins than its own class.
"""
from __future__ import annotations

import numpy as np
import torch

import confidence
from metrics import classification_metrics, mcc_at_thresholds
from vocab import CLASSES

KNN_K = 5  # odd: a majority vote per class never ties
MAXSEP_NEAREST_ONLY = 5  # a cut at 0-based rank >= 5 (the 6th distance or later): only the nearest class


def class_centres(embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Centres [8, d]: mean of embeddings [N, d] over the proteins having each class (labels [N, 8]);
    NaN for a class without proteins."""
    member = labels.astype(bool)
    counts = member.sum(0)
    sums = member.T.astype(np.float64) @ embeddings.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sums / counts[:, None]).astype(np.float32)


def centre_distances(embeddings: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Euclidean distances [N, 8] of embeddings [N, d] to centres [8, d]; inf for a missing centre."""
    diff = embeddings[:, None, :].astype(np.float64) - centres[None, :, :].astype(np.float64)
    d = np.sqrt((diff ** 2).sum(-1))
    return np.where(np.isnan(d), np.inf, d)


def max_separation(distances: np.ndarray) -> np.ndarray:
    """CLEAN's max-separation rule, per protein, over its finite class distances sorted ascending,
    d_1 <= ... <= d_n: gamma = (d_2, ..., d_n, and d_n ten times more); separations s_i = |d_i -
    mean(gamma)|; gaps g_i = |s_i - s_(i+1)|; the cut falls at the first gap larger than the mean gap,
    and the classes before it are predicted. A cut at rank 6 or later (0-based index >= 5), or no gap
    above the mean, predicts the nearest class only. distances [N, C] -> predicted bool [N, C]."""
    predicted = np.zeros(distances.shape, dtype=bool)
    for i, row in enumerate(distances):
        order = np.argsort(row, kind="stable")
        finite = order[np.isfinite(row[order])]
        keep = 1
        if len(finite) > 1:
            d = row[finite].astype(np.float64)
            gamma = np.concatenate([d[1:], np.repeat(d[-1], 10)])
            separation = np.abs(d - gamma.mean())
            gaps = np.abs(np.diff(separation))
            large = np.flatnonzero(gaps > gaps.mean())
            if len(large) and large[0] < MAXSEP_NEAREST_ONLY:
                keep = large[0] + 1
        predicted[i, finite[:keep]] = True
    return predicted


def best_threshold(y: np.ndarray, score: np.ndarray) -> float:
    """The MCC-optimal threshold t of one class (predicted when score >= t): y bool [N], score [N].
    Candidates: midpoints between consecutive distinct scores and both ends; ties go to the largest
    threshold (fewest positives). Without positives: +inf (never predicted); all positive: -inf."""
    if not y.any():
        return float("inf")
    if y.all():
        return float("-inf")
    u = np.unique(score)
    candidates = np.concatenate([[u[0] - 1.0], (u[:-1] + u[1:]) / 2, [u[-1] + 1.0]])
    mcc = mcc_at_thresholds(y, score, candidates)
    return float(candidates[np.flatnonzero(mcc >= mcc.max() - 1e-12)[-1]])


def tune_distance_thresholds(labels: np.ndarray, distances: np.ndarray) -> np.ndarray:
    """Per-class distance thresholds [8] maximising validation MCC: class c is predicted when the
    distance to its centre is <= the threshold (score -distance >= -threshold)."""
    labels = labels.astype(bool)
    return np.array([-best_threshold(labels[:, c], -distances[:, c]) for c in range(labels.shape[1])])


def squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances [N, M] between a [N, d] and b [M, d] (float64, |a|^2 + |b|^2 - 2 a.b,
    clipped at 0): memory N x M, not N x M x d."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.maximum((a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :] - 2 * a @ b.T, 0)


def knn_predict(train_emb: np.ndarray, train_labels: np.ndarray, query: np.ndarray, k: int = KNN_K,
                block: int = 1024) -> np.ndarray:
    """Majority vote per class of the k nearest training proteins (Euclidean): [M, 8] bool. The
    queries go in blocks of `block` rows, so memory stays block x len(train_emb)."""
    labels = train_labels.astype(bool)
    votes = [labels[np.argsort(squared_distances(query[a:a + block], train_emb), axis=1, kind="stable")[:, :k]].sum(1)
             for a in range(0, len(query), block)]
    return np.concatenate(votes) * 2 > k if votes else np.zeros((0, labels.shape[1]), dtype=bool)


def class_silhouettes(embeddings: np.ndarray, labels: np.ndarray) -> dict:
    """Per class: the mean silhouette of its proteins in the one-vs-rest split (see the module
    docstring); None for a class with fewer than 2 members or no non-member."""
    dist = np.sqrt(squared_distances(embeddings, embeddings))
    out = {}
    for c, name in enumerate(CLASSES):
        member = labels[:, c].astype(bool)
        if member.sum() < 2 or member.all():
            out[name] = None
            continue
        rows = dist[member]
        a = rows[:, member].sum(1) / (member.sum() - 1)  # the zero self-distance is in the sum, not in the count
        b = rows[:, ~member].mean(1)
        out[name] = float(np.mean((b - a) / np.maximum(np.maximum(a, b), 1e-12)))
    return out


def fit(train_emb: np.ndarray, train_labels: np.ndarray, valid_emb: np.ndarray, valid_labels: np.ndarray) -> dict:
    """Centres from the training split, distance thresholds tuned on validation: {'centres' [8, d],
    'counts' [8], 'thresholds' [8]}, and confidence.fit's mixtures [M, 2], null distances [8, K] and p-value
    cut (when validation allows them): what a checkpoint stores for centroid prediction."""
    centres = class_centres(train_emb, train_labels)
    valid_distances = centre_distances(valid_emb, centres)
    thresholds = tune_distance_thresholds(valid_labels, valid_distances)
    thresholds[~np.isfinite(centres).all(1)] = -np.inf  # a class without training proteins: never predicted
    return {"centres": centres, "counts": train_labels.astype(bool).sum(0), "thresholds": thresholds,
            **confidence.fit(centre_distances(train_emb, centres), train_labels, valid_distances, valid_labels)}


def to_stored(fitted: dict) -> dict:
    """fit()'s results per space, {space: {'centres', 'counts', 'thresholds', ...}}, as a checkpoint stores them:
    tensors, which torch.load(weights_only=True) reads (it reads no NumPy arrays)."""
    return {name: {k: torch.from_numpy(np.asarray(v)) for k, v in f.items()} for name, f in fitted.items()}


def from_stored(stored: dict | None) -> dict | None:
    """A checkpoint's class centres (to_stored) as NumPy arrays again; None stays None."""
    if stored is None:
        return None
    return {name: {k: v.numpy() if torch.is_tensor(v) else np.asarray(v) for k, v in f.items()}
            for name, f in stored.items()}


def finite_or_none(value) -> float | None:
    """A float for JSON; None (null) for +-inf or NaN, which strict JSON cannot hold."""
    return float(value) if np.isfinite(value) else None


def _macro(labels, predicted) -> dict:
    m = classification_metrics(labels, predicted.astype(float))  # 0 / 1 scores at threshold 0.5
    return {"macro_f1": m["macro_f1"], "macro_mcc": m["macro_mcc"],
            "per_class_f1": {c: m["per_class"][c]["f1"] for c in CLASSES}}


def centroid_metrics(labels: np.ndarray, distances: np.ndarray, thresholds: np.ndarray, p_values=None,
                     p_value: float | None = None) -> dict:
    """Centroid prediction scored against labels [N, 8] from distances [N, 8]: macro-F1 / MCC (and
    per-class F1) of both rules (and of the p-value rule, p_values [N, 8] <= p_value, when given), and
    macro AP / ROC-AUC of the scores -distance."""
    scores = classification_metrics(labels, np.where(np.isfinite(distances), -distances, -1e30))
    rules = {"maxsep": _macro(labels, max_separation(distances)),
             "threshold": {**_macro(labels, distances <= np.asarray(thresholds)[None, :]),
                           "thresholds": dict(zip(CLASSES, map(finite_or_none, thresholds)))}}
    if p_values is not None and p_value is not None:
        rules["pvalue"] = {**_macro(labels, np.asarray(p_values) <= p_value), "p_value": float(p_value)}
    return {**rules, "macro_average_precision": scores["macro_average_precision"],
            "macro_roc_auc": scores["macro_roc_auc"]}


def space_metrics(train: tuple, valid: tuple, test: tuple, k: int = KNN_K, fitted: dict | None = None) -> dict:
    """Metrics of one embedding space on the test split; each of train, valid, test is (embeddings
    [N, d], labels [N, 8]); fitted: fit()'s result on train and valid when already computed."""
    fitted = fitted or fit(*train, *valid)
    test_emb, test_labels = test
    silhouettes = class_silhouettes(test_emb, test_labels)
    defined = [v for v in silhouettes.values() if v is not None]
    distances = centre_distances(test_emb, fitted["centres"])
    pvalues = (confidence.p_values(distances, fitted["null_distances"]), fitted["p_value"]) if (
        confidence.calibrated(fitted)) else ()
    return {**centroid_metrics(test_labels, distances, fitted["thresholds"], *pvalues),
            "knn": {"k": k, **_macro(test_labels, knn_predict(*train, test_emb, k))},
            "silhouette": silhouettes, "macro_silhouette": float(np.mean(defined)) if defined else None}
