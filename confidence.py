"""Confidence and p-values of centroid prediction: CLEAN's two other inference outputs beside the class
centres (space.py), fitted at the end of a run, stored as plain arrays and evaluated with NumPy.

Mixture confidence (CLEAN's infer_confidence_gmm). On the validation split, the distance of each protein
to the centre of each class it has is a *true* distance, to every other centre a *false* one. An
ensemble of N_MIXTURES two-component 1-D Gaussian mixtures (sklearn's GaussianMixture; in 1-D its
'spherical' covariance is the 'full' one, fitted in half the time, k-means++ starts) is fitted, each on
a balanced resample: k true and k false distances drawn with replacement, k = min(#true, #false,
RESAMPLE_CAP) (balanced, so that the two components meet the two populations where false distances
outnumber true ones several times over). Stored: means, variances and weights [M, 2]. The confidence of a distance
d is the mean over the mixtures of the posterior of the component with the smaller mean,
    w_s N(x; mu_s, var_s) / (w_1 N(x; mu_1, var_1) + w_2 N(x; mu_2, var_2)),  x = d clamped into [mu_s, mu_l],
the same for every class (one pool of distances); 0 for a class without a centre (infinite distance).
The clamp is this code's, not CLEAN's: beyond the two means a mixture's posterior turns towards the wider
component, so a protein at its class centre (d below mu_s) could get the confidence of a false assignment
when the true component is the narrower, or a far one that of a true assignment when it is the wider.
Between the means the log posterior ratio has the derivative -(x - mu_s) / var_s + (x - mu_l) / var_l
<= 0: clamped, the confidence never rises with the distance.

p-value rule (CLEAN's write_pvalue_choices, adapted to classes that hold a large share of all
proteins). The null distribution of class c is the distances to c's centre of the training proteins
that do NOT have c (CLEAN: of a random sample of all training proteins, which for a class of a third of
the proteins would be a third its own members), sorted; at most NULL_CAP per class, a seeded subsample
(numpy default_rng(SEED)) beyond that. With n null distances, k of them <= d:
    p = (1 + k) / (n + 1),
and the class is called when p <= the p-value cut alpha; "no signal" when no class is called. The
default alpha is chosen on validation: the value of P_VALUE_GRID that maximises the validation
macro-MCC of the rule (ties: the smallest), the criterion that picks the best epoch and the distance
thresholds. A fixed alpha would not do: the null is made of training proteins, which training can push
further from the centres of classes they lack than it places new proteins, so the p-values of new
proteins need not be uniform under the null, and by how much differs from model to model.
"""
from __future__ import annotations

import numpy as np

from metrics import mcc_at_thresholds

N_MIXTURES = 20  # two-component mixtures of the ensemble (CLEAN's has 40; 20 fits a tiny run's in 0.1 s)
RESAMPLE_CAP = 2000  # at most this many true and as many false distances in each mixture's resample
NULL_CAP = 5000  # null distances kept per class (smallest p-value 1 / 5001)
P_VALUE_GRID = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.2)
SEED = 0
MIXTURE_FIELDS = ("mixture_means", "mixture_variances", "mixture_weights")
FIELDS = MIXTURE_FIELDS + ("null_distances", "p_value")  # what space.fit adds per space: all or none


def calibrated(fitted: dict | None) -> bool:
    """Whether a space's stored centroid fields hold the mixtures, null distances and p-value cut."""
    return bool(fitted) and all(k in fitted for k in FIELDS)


def true_false(distances: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true, false) finite distances, 1-D: of proteins to the centres of the classes they have, and of the others."""
    member, finite = labels.astype(bool), np.isfinite(distances)
    return distances[member & finite].astype(np.float64), distances[~member & finite].astype(np.float64)


def export_mixture(gm) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(means [2], variances [2], weights [2]) of a fitted 1-D two-component sklearn GaussianMixture, any
    covariance_type."""
    if gm.means_.shape != (2, 1):
        raise ValueError(f"expected a two-component mixture of 1-D data, got means of shape {gm.means_.shape}")
    cov = np.asarray(gm.covariances_, dtype=np.float64)
    variances = np.repeat(cov.reshape(1), 2) if gm.covariance_type == "tied" else cov.reshape(2)
    return gm.means_.reshape(2).astype(np.float64), variances, gm.weights_.reshape(2).astype(np.float64)


def fit_mixtures(true: np.ndarray, false: np.ndarray, n: int = N_MIXTURES, cap: int = RESAMPLE_CAP,
                 seed: int = SEED) -> dict:
    """The mixture ensemble on balanced resamples (see the module docstring): {'mixture_means',
    'mixture_variances', 'mixture_weights'}, each [n, 2] float64. Needs at least 2 true and 2 false distances."""
    from sklearn.mixture import GaussianMixture  # imported here: only the end of a run fits
    rng = np.random.default_rng(seed)
    k = min(len(true), len(false), cap)
    if k < 2:
        raise ValueError(f"too few distances for the mixtures: {len(true)} true, {len(false)} false (need 2 each)")
    rows = []
    for m in range(n):
        x = np.concatenate([rng.choice(true, k), rng.choice(false, k)])
        rows.append(export_mixture(GaussianMixture(2, covariance_type="spherical", init_params="k-means++",
                                                   random_state=seed + m).fit(x[:, None])))
    return dict(zip(MIXTURE_FIELDS, (np.stack(a) for a in zip(*rows))))


def _no_nan(distances: np.ndarray, what: str) -> np.ndarray:
    d = np.asarray(distances, dtype=np.float64)
    if np.isnan(d).any():
        raise ValueError(f"{what}: {int(np.isnan(d).sum())} NaN distance(s) (an embedding holding NaN or "
                         f"infinite values); a distance is a number, or infinite for a class without a centre")
    return d


def posterior(x, means, variances, weights) -> np.ndarray:
    """Posterior [..., M] of the smaller-mean component of each of the M mixtures (means, variances,
    weights [M, 2]) at finite x [..., M] (or [..., 1]), as GaussianMixture.predict_proba computes it."""
    means, variances, weights = (np.asarray(a, dtype=np.float64) for a in (means, variances, weights))
    x = np.asarray(x, dtype=np.float64)[..., None]  # [..., M, 1] against [M, 2]
    with np.errstate(divide="ignore"):  # a weight of 0: log 0 = -inf, a posterior of 0
        log = np.log(weights) - 0.5 * (np.log(2 * np.pi * variances) + (x - means) ** 2 / variances)
    log = log - log.max(-1, keepdims=True)
    small = np.argmin(means, axis=1)  # [M]
    return (np.exp(log) / np.exp(log).sum(-1, keepdims=True))[..., np.arange(len(small)), small]


def mixture_confidence(distances, means, variances, weights) -> np.ndarray:
    """Confidence of each distance (any shape): the mean over the M mixtures (means, variances, weights
    [M, 2]) of the smaller-mean component's posterior at the distance clamped into [smaller mean, larger
    mean] of that mixture (module docstring); 0 at an infinite distance."""
    d = _no_nan(distances, "mixture confidence")
    means = np.asarray(means, dtype=np.float64)
    finite = np.isfinite(d)
    x = np.clip(np.where(finite, d, 0.0)[..., None], means.min(1), means.max(1))  # [..., M]
    return np.where(finite, posterior(x, means, variances, weights).mean(-1), 0.0)


def null_distances(train_distances: np.ndarray, train_labels: np.ndarray, cap: int = NULL_CAP,
                   seed: int = SEED) -> np.ndarray:
    """Null distributions [C, K] float32: row c the sorted finite distances to c's centre of the training
    proteins without c (a seeded subsample of `cap` beyond that), +inf after them; K = the longest row (>= 1)."""
    rng = np.random.default_rng(seed)
    member = train_labels.astype(bool)
    rows = []
    for c in range(member.shape[1]):
        values = train_distances[~member[:, c], c]
        values = values[np.isfinite(values)]
        if len(values) > cap:
            values = rng.choice(values, cap, replace=False)
        rows.append(np.sort(values.astype(np.float32)))
    out = np.full((len(rows), max([1] + [len(r) for r in rows])), np.inf, dtype=np.float32)
    for c, row in enumerate(rows):
        out[c, :len(row)] = row
    return out


def p_values(distances: np.ndarray, null: np.ndarray) -> np.ndarray:
    """p-values [N, C] of distances [N, C] under the null distributions [C, K] (null_distances):
    (1 + #{null <= d}) / (n + 1), n the finite null distances of the class; 1 when n is 0 or d infinite."""
    d = _no_nan(distances, "p-values")
    null = np.asarray(null)
    n = np.isfinite(null).sum(1)
    below = np.stack([np.searchsorted(null[c], d[:, c], side="right") for c in range(null.shape[0])], 1)
    below = np.where(np.isfinite(d), np.minimum(below, n), n)
    return (1.0 + below) / (n + 1.0)


def choose_p_value(labels: np.ndarray, p: np.ndarray, grid=P_VALUE_GRID) -> float:
    """The alpha of `grid` maximising the macro-MCC (over the classes `labels` [N, C] holds) of calling
    p <= alpha on the p-values p [N, C]; ties: the smallest alpha."""
    labels, grid = labels.astype(bool), np.asarray(grid, dtype=np.float64)
    present = [c for c in range(labels.shape[1]) if labels[:, c].any()]
    if not present:
        return float(grid[0])
    macro = np.mean([mcc_at_thresholds(labels[:, c], -p[:, c], -grid) for c in present], axis=0)
    return float(grid[np.flatnonzero(macro >= macro.max() - 1e-12)[0]])


def fit(train_distances: np.ndarray, train_labels: np.ndarray, valid_distances: np.ndarray,
        valid_labels: np.ndarray) -> dict:
    """FIELDS of one space from its distances [N, C] to the class centres: the mixtures (validation), the
    null distances (training) and the p-value cut (validation); {} when validation has fewer than 2 true or
    2 false distances."""
    true, false = true_false(valid_distances, valid_labels)
    if min(len(true), len(false)) < 2:
        return {}
    null = null_distances(train_distances, train_labels)
    alpha = choose_p_value(valid_labels, p_values(valid_distances, null))
    return {**fit_mixtures(true, false), "null_distances": null, "p_value": np.float64(alpha)}


def member_scores(distances: np.ndarray, fitted: dict) -> tuple[np.ndarray, np.ndarray]:
    """(confidence [N, C], p-values [N, C]) of one checkpoint's distances [N, C] with its stored FIELDS;
    NaN rows (a broken embedding, refused by the caller with the protein's name) stay NaN."""
    ok = ~np.isnan(distances).any(1)
    confidence, p = np.full(distances.shape, np.nan), np.full(distances.shape, np.nan)
    confidence[ok] = mixture_confidence(distances[ok], *(fitted[k] for k in MIXTURE_FIELDS))
    p[ok] = p_values(distances[ok], fitted["null_distances"])
    return confidence, p


def stored_problem(fitted: dict, n_classes: int) -> str | None:
    """What makes a space's stored FIELDS unusable, as 'field: problem', or None (also when none is stored)."""
    present = [k for k in FIELDS if k in fitted]
    if not present:
        return None
    if len(present) < len(FIELDS):
        return f"{[k for k in FIELDS if k not in fitted][0]}: missing (the confidence fields come all together)"
    arrays = {k: np.asarray(fitted[k]) for k in FIELDS}
    shape = arrays["mixture_means"].shape
    for key in MIXTURE_FIELDS:
        a = arrays[key]
        if a.ndim != 2 or a.shape[1] != 2 or not len(a) or a.shape != shape:
            return f"{key}: shape {a.shape}, expected (M, 2) with M >= 1, the same for means, variances and weights"
        if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all():
            return f"{key}: not all finite floating-point numbers"
    if (arrays["mixture_variances"] <= 0).any():
        return "mixture_variances: a variance <= 0"
    weights = arrays["mixture_weights"]
    if (weights < 0).any() or (np.abs(weights.sum(1) - 1) > 1e-6).any():
        return "mixture_weights: each mixture's two weights must be >= 0 and sum to 1"
    null = arrays["null_distances"]
    if null.ndim != 2 or null.shape[0] != n_classes or null.shape[1] < 1 or not np.issubdtype(null.dtype, np.floating):
        return f"null_distances: shape {null.shape} {null.dtype}, expected floating point ({n_classes}, K), K >= 1"
    if np.isnan(null).any() or (null < 0).any() or not (null[:, 1:] >= null[:, :-1]).all():
        return "null_distances: each row must hold distances >= 0 in ascending order (inf after them), no NaN"
    alpha = arrays["p_value"]
    if alpha.shape != () or not np.issubdtype(alpha.dtype, np.floating) or not 0 < float(alpha) < 1:
        return f"p_value: {repr(alpha.tolist())[:40]}, expected one number between 0 and 1"
    return None
