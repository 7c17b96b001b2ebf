"""Calibrated class probabilities and conformal prediction sets of the class head.

Temperature scaling, per class: p_c = sigmoid(z_c / T_c), one temperature T_c > 0 per class, fitted on the
validation partition at the end of training (evaluate.final_test) or on a labelled set the user trusts
(scripts/calibrate.py) by minimising the binary cross-entropy: a golden-section search on log T_c within
[log 0.05, log 20] (the loss is convex in 1 / T_c, so it has one minimum along log T_c). Why temperature: it is
monotone per class, so a call made by a threshold keeps its order (the tuned thresholds stay where they are, on
the uncalibrated probabilities) and conformal memberships, which depend on ranks alone, do not depend on T_c;
one parameter per class suits a few hundred validation proteins; Platt scaling adds a bias per class, which
moves probabilities across 0.5. A class without both positives and negatives in the set keeps T_c = 1; a class
the set separates perfectly has no finite optimum and stops at a bound (a note says so).

Calibration error, per class: ECE over BINS = 15 equal-width bins of the class's predicted probability
([0, 1/15), [1/15, 2/15), ..., [14/15, 1]): ECE_c = sum_b n_b / N |acc_b - conf_b|, acc_b the fraction of the bin's
proteins that have the class, conf_b their mean probability; Brier_c = mean (p_c - y_c)^2. Macro: the mean over the
classes the set holds (at least one true protein), as the other macro figures.

Prediction sets, split conformal and class-conditional (one threshold per class and one for no signal,
NO_SIGNAL = "Other", the word the outputs use for a protein without any class): for class c the nonconformity of
a protein is s = 1 - p_c (calibrated); for no signal s = max_c p_c. The calibration scores of c are those of the
n_c proteins of the calibration set that have c (for no signal: those without any class), kept sorted in the
checkpoint / model folder, so that the coverage can be chosen at prediction time. At coverage 1 - alpha the
threshold is the k-th smallest score, k = ceil((n_c + 1)(1 - alpha)); c is in a protein's set when s <= threshold;
when k > n_c the threshold is +inf and c is always in the set (a note says so). Then a protein that has c gets c in
its set with probability at least 1 - alpha (and below 1 - alpha + 1 / (n_c + 1) for continuous scores), whatever
the model. The conformal p-value of c is (1 + #{i: s_i >= s}) / (n_c + 1). A class with fewer than MIN_POSITIVES
calibration proteins gets no guarantee: its p-value is null and it is in the set when its calibrated probability
is >= 0.5 (no signal: when every class's is < 0.5). The class memberships depend on the ranks of z_c alone, so
fitting T_c on the same set does not touch them.
"""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from vocab import CLASSES, NO_SIGNAL

BINS = 15
MIN_POSITIVES = 10
SET_NAMES = CLASSES + [NO_SIGNAL]
T_BOUNDS = (0.05, 20.0)
BINNING = ("15 equal-width bins of each class's predicted probability; ECE = sum over bins of n_b / N "
           "|fraction of positives - mean probability|")


class CalibrationError(ValueError):
    """A calibration set or stored calibration that cannot be used; the message names it."""


# --------------------------------------------------------------------------- temperature scaling
def sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, np.float64)))


def fit_temperature(z, y, tol: float = 1e-7) -> float:
    """The T > 0 within T_BOUNDS minimising the mean binary cross-entropy of sigmoid(z / T) against y (golden-section
    search on log T); 1.0 when y lacks positives or negatives."""
    z, y = np.asarray(z, np.float64), np.asarray(y).astype(bool)
    if y.all() or not y.any():
        return 1.0

    def loss(u):
        x = z * math.exp(-u)
        return float(np.mean(np.logaddexp(0.0, x) - y * x))
    a, b = math.log(T_BOUNDS[0]), math.log(T_BOUNDS[1])
    r = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = loss(c), loss(d)
    while b - a > tol:
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = loss(d)
    return math.exp((a + b) / 2)


def temperatures_of(block: dict) -> np.ndarray:
    """A stored calibration's temperatures [8] in class order."""
    return np.array([block["temperatures"][c] for c in CLASSES], dtype=np.float64)


def calibrated_probs(logits, temperatures) -> np.ndarray:
    """sigmoid(z / T) [N, 8] (float64) of logits [N, 8] and temperatures [8]."""
    return sigmoid(np.asarray(logits, np.float64) / np.asarray(temperatures, np.float64))


# --------------------------------------------------------------------------- conformal sets
def nonconformity(probs) -> np.ndarray:
    """[N, 9]: 1 - p_c for the classes, then max_c p_c for no signal."""
    probs = np.asarray(probs, np.float64)
    return np.concatenate([1.0 - probs, probs.max(1, keepdims=True)], axis=1)


def positives(labels) -> np.ndarray:
    """[N, 9] bool: the classes a protein has, then no signal (none of them)."""
    labels = np.asarray(labels).astype(bool)
    return np.concatenate([labels, ~labels.any(1, keepdims=True)], axis=1)


def conformal_scores(labels, probs) -> dict:
    """{name: sorted nonconformity scores of the proteins that have it} for SET_NAMES (Python floats)."""
    s, truth = nonconformity(probs), positives(labels)
    return {name: np.sort(s[truth[:, j], j]).tolist() for j, name in enumerate(SET_NAMES)}


def rank(n: int, coverage: float) -> int:
    """k = ceil((n + 1) * coverage): which smallest score is the threshold (k > n: none, +inf)."""
    return math.ceil((n + 1) * coverage - 1e-9)  # 1e-9: (n + 1) * 0.9 may round to just above an integer


def threshold(sorted_scores, coverage: float):
    """The conformal threshold at `coverage` of scores sorted along the last axis ([n] or [..., n]): the k-th
    smallest (rank), +inf when k > n."""
    scores = np.asarray(sorted_scores, np.float64)
    k = rank(scores.shape[-1], coverage)
    if k > scores.shape[-1]:
        return np.full(scores.shape[:-1], np.inf) if scores.ndim > 1 else math.inf
    return scores[..., k - 1]


def p_values(sorted_scores, s) -> np.ndarray:
    """Conformal p-values (1 + #{i: s_i >= s}) / (n + 1) of scores s against sorted calibration scores [n]."""
    scores = np.asarray(sorted_scores, np.float64)
    above = len(scores) - np.searchsorted(scores, np.asarray(s, np.float64), side="left")
    return (1.0 + above) / (len(scores) + 1.0)


class Sets:
    """Prediction sets at one coverage from stored calibration scores {name: sorted scores} (SET_NAMES)."""

    def __init__(self, scores: dict, coverage: float):
        if not 0.0 < coverage < 1.0:
            raise CalibrationError(f"--coverage must be between 0 and 1 (exclusive), got {coverage}")
        self.coverage, self.stored = coverage, {n: scores[n] for n in SET_NAMES}
        self.scores = [np.asarray(scores[n], np.float64) for n in SET_NAMES]
        self.guaranteed = np.array([len(s) >= MIN_POSITIVES for s in self.scores])
        self.thresholds = np.array([threshold(s, coverage) if len(s) else math.inf for s in self.scores])

    def notes(self) -> list[str]:
        """What the sets cannot promise at this coverage, one line each."""
        lines = []
        weak = [f"{n} ({len(s)})" for n, s, ok in zip(SET_NAMES, self.scores, self.guaranteed) if not ok]
        if weak:
            lines.append(f"no coverage guarantee for {', '.join(weak)}: fewer than {MIN_POSITIVES} calibration "
                         f"proteins; such a class is in a set when its calibrated probability is >= 0.5 ({NO_SIGNAL}: "
                         f"when no class's is), and its p-value is null")
        always = [n for n, t, ok in zip(SET_NAMES, self.thresholds, self.guaranteed) if ok and math.isinf(t)]
        if always:
            lines.append(f"at coverage {self.coverage:g}, {', '.join(always)} is always in the set: too few "
                         f"calibration proteins for a finite threshold (ceil((n + 1) x {self.coverage:g}) > n)")
        return lines

    def members(self, probs) -> np.ndarray:
        """bool [N, 9]: which of SET_NAMES are in each protein's set, from calibrated probabilities [N, 8]."""
        probs = np.asarray(probs, np.float64)
        fallback = np.concatenate([probs >= 0.5, (probs.max(1) < 0.5)[:, None]], axis=1)
        return np.where(self.guaranteed, nonconformity(probs) <= self.thresholds, fallback)

    def p_values(self, probs) -> np.ndarray:
        """[N, 9] conformal p-values, NaN where a class has no guarantee."""
        s = nonconformity(probs)
        return np.stack([p_values(sc, s[:, j]) if ok else np.full(len(s), np.nan)
                         for j, (sc, ok) in enumerate(zip(self.scores, self.guaranteed))], axis=1)

    def fields(self, calibrated) -> dict:
        """record['prediction_set'] of one protein from its calibrated probabilities [8]."""
        inside, p = self.members(np.asarray(calibrated)[None])[0], self.p_values(np.asarray(calibrated)[None])[0]
        chosen = [n for n, hit in zip(SET_NAMES, inside) if hit]
        return {"coverage": self.coverage, "classes": chosen, "size": len(chosen),
                "p_values": {n: None if np.isnan(v) else round(float(v), 4) for n, v in zip(SET_NAMES, p)}}


# --------------------------------------------------------------------------- fitting and storing
def check_finite(logits, where: str) -> None:
    """A CalibrationError naming the class and `where` (the file, the split) when a class's scores hold NaN or inf."""
    bad = ~np.isfinite(np.asarray(logits, np.float64))
    for c in np.flatnonzero(bad.any(0)):
        raise CalibrationError(f"{where}: class {CLASSES[c]}: {int(bad[:, c].sum())} protein(s) with NaN or infinite "
                               f"scores; cannot calibrate on them")


def fit_ensemble(logits: list, labels, source: str, calibrate=calibrated_probs) -> list[dict]:
    """Stored calibrations of an ensemble (one model: a list of one) from each member's logits [N, 8] on one
    labelled set (labels [N, 8]): each member's temperatures from its own logits, conformal scores of the
    ensemble's calibrated probabilities (the mean over the members of calibrate(logits, temperatures), summed in
    member order as prediction averages). Several members get scope 'ensemble' and the same id, so prediction
    uses their scores only with exactly this ensemble."""
    labels = np.asarray(labels).astype(np.int64)
    for z in logits:
        check_finite(z, source)
    temps = [np.array([fit_temperature(z[:, c], labels[:, c]) for c in range(len(CLASSES))]) for z in logits]
    probs = sum(np.asarray(calibrate(z, t), np.float64) for z, t in zip(logits, temps)) / len(logits)
    scores = conformal_scores(labels, probs)
    ensemble = None
    if len(logits) > 1:
        digest = hashlib.sha256(json.dumps([scores, [t.tolist() for t in temps]]).encode()).hexdigest()[:16]
        ensemble = {"id": digest, "size": len(logits)}
    return [{"method": "temperature", "temperatures": dict(zip(CLASSES, map(float, t))), "scores": scores,
             "n_proteins": int(len(labels)), "source": source, "scope": "ensemble" if ensemble else "member",
             "ensemble": ensemble} for t in temps]


def fit(logits, labels, source: str) -> dict:
    """The stored calibration of one model from its logits [N, 8] on a labelled set (labels [N, 8])."""
    return fit_ensemble([np.asarray(logits)], labels, source)[0]


def fit_notes(block: dict) -> list[str]:
    """What a fitted calibration cannot do well, one line each (for the log and the script's output)."""
    lines, n = [], block["n_proteins"]
    for c in CLASSES:
        k, t = len(block["scores"][c]), block["temperatures"][c]
        if k in (0, n):
            lines.append(f"{c}: {'no' if k == 0 else 'only'} positive proteins in the calibration set; temperature 1")
        elif min(abs(t - b) / b for b in T_BOUNDS) < 1e-3:
            lines.append(f"{c}: temperature at its bound {t:.3g} (the set separates the class perfectly)")
    weak = [f"{name} ({len(block['scores'][name])})" for name in SET_NAMES
            if len(block["scores"][name]) < MIN_POSITIVES]
    if weak:
        lines.append(f"fewer than {MIN_POSITIVES} calibration proteins, no coverage guarantee: {', '.join(weak)}")
    return lines


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def problem(block) -> str | None:
    """What makes a stored calibration (a checkpoint's or model folder member's 'calibration') unusable, naming
    the field, or None (None: no calibration, fine)."""
    if block is None:
        return None
    if not isinstance(block, dict):
        return f"calibration: {type(block).__name__}, expected a mapping"
    temps, scores = block.get("temperatures"), block.get("scores")
    if not isinstance(temps, dict) or set(temps) != set(CLASSES):
        return f"calibration.temperatures: not one number for each of the {len(CLASSES)} classes"
    for c, t in temps.items():
        if not _is_number(t) or t <= 0:
            return f"calibration.temperatures.{c}: must be a positive finite number, got {repr(t)[:40]}"
    if not isinstance(scores, dict) or set(scores) != set(SET_NAMES):
        return f"calibration.scores: not one list for each of {', '.join(SET_NAMES)}"
    for name, values in scores.items():
        if not isinstance(values, list) or not all(_is_number(v) and 0 <= v <= 1 for v in values):
            return f"calibration.scores.{name}: not a list of numbers from 0 to 1 (NaN?)"
        if any(a > b for a, b in zip(values, values[1:])):
            return f"calibration.scores.{name}: not sorted"
    if not isinstance(block.get("n_proteins"), int) or block["n_proteins"] < 0:
        return "calibration.n_proteins: not a count"
    scope, ensemble = block.get("scope"), block.get("ensemble")
    if scope not in ("member", "ensemble"):
        return f"calibration.scope: must be member or ensemble, got {repr(scope)[:40]}"
    if scope == "ensemble" and not (isinstance(ensemble, dict) and isinstance(ensemble.get("id"), str)
                                    and isinstance(ensemble.get("size"), int) and ensemble["size"] >= 2):
        return "calibration.ensemble: an ensemble calibration needs an id and a size of at least 2"
    return None


def ensemble_scores(blocks: list[dict]) -> tuple[dict, str | None]:
    """(conformal scores, note) of the ensemble whose members hold these calibrations. One model, or members
    calibrated together as exactly this ensemble (scripts/calibrate.py): their scores, no note. Otherwise (say
    the folds of a cross-validation, each calibrated on its own validation partition) the members' scores pooled,
    with a note: approximate sets, without the finite-sample guarantee."""
    first = blocks[0]
    same = len({json.dumps(b.get("ensemble"), sort_keys=True) for b in blocks}) == 1
    if (len(blocks) == 1 and first["scope"] == "member") or (
            same and first["scope"] == "ensemble" and first["ensemble"]["size"] == len(blocks)):
        return first["scores"], None
    pooled = {n: sorted(v for b in blocks for v in b["scores"][n]) for n in SET_NAMES}
    what = (f"its calibration was fitted for an ensemble of {first['ensemble']['size']}" if len(blocks) == 1
            else "this ensemble pools its members' own calibration scores")
    return pooled, (f"prediction sets: {what}: approximate, without the finite-sample guarantee; calibrate the "
                    f"models you predict with as a whole on a labelled set with scripts/calibrate.py")


def for_prediction(blocks: list, names: list, coverage: float | None) -> tuple[Sets | None, list[str]]:
    """(Sets at `coverage`, or None without one; notes for stderr) of the ensemble whose checkpoints (`names`)
    hold these calibrations (None: none stored). A model without calibration predicts as before, with a note
    (one line); --coverage needs every checkpoint's calibration (CalibrationError naming the first without)."""
    missing = [name for name, block in zip(names, blocks) if block is None]
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    if missing and coverage is not None:
        raise CalibrationError(f"--coverage: {missing[0]}{more} holds no calibration (conformal scores); add one with "
                               f"scripts/calibrate.py")
    if missing:
        return None, [f"probabilities are uncalibrated: {missing[0]}{more} holds no calibration (add one with "
                      f"scripts/calibrate.py)"]
    if coverage is None:
        return None, []
    scores, note = ensemble_scores(blocks)
    sets = Sets(scores, coverage)
    return sets, ([note] if note else []) + sets.notes()


# --------------------------------------------------------------------------- reports
def reliability(y, p, bins: int = BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin of the predicted probability: counts [B], mean probability [B] and fraction of positives [B] (NaN
    in empty bins)."""
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    count = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return count, np.bincount(index, p, bins) / count, np.bincount(index, y, bins) / count


def ece(y, p, bins: int = BINS) -> float:
    """Expected calibration error of probabilities p [N] against 0/1 labels y [N] (module docstring)."""
    count, conf, acc = reliability(y, p, bins)
    full = count > 0
    return float(np.sum(count[full] * np.abs(acc[full] - conf[full])) / max(count.sum(), 1.0))


def brier(y, p) -> float:
    return float(np.mean((np.asarray(p, np.float64) - np.asarray(y, np.float64)) ** 2)) if len(y) else 0.0


def _summary(labels, probs) -> dict:
    labels, per_class = np.asarray(labels), {}
    for c, name in enumerate(CLASSES):
        count, conf, acc = reliability(labels[:, c], probs[:, c])
        per_class[name] = {"ece": ece(labels[:, c], probs[:, c]), "brier": brier(labels[:, c], probs[:, c]),
                           "bins": {"count": count.astype(int).tolist(),
                                    "confidence": [None if np.isnan(v) else float(v) for v in conf],
                                    "positive_rate": [None if np.isnan(v) else float(v) for v in acc]}}
    held = [n for c, n in enumerate(CLASSES) if labels[:, c].any()]
    mean = (lambda key: float(np.mean([per_class[n][key] for n in held])) if held else None)
    return {"macro_ece": mean("ece"), "macro_brier": mean("brier"), "per_class": per_class}


def calibration_report(labels, probs, calibrated=None, block: dict | None = None) -> dict:
    """ECE and Brier score per class and macro, of the uncalibrated and (when given) calibrated probabilities."""
    return {"binning": BINNING,
            "note": "the calls and their figures (0.5 and tuned thresholds) are computed on the uncalibrated "
                    "probabilities; calibration is monotone per class and changes no call",
            "temperatures": None if block is None else block["temperatures"],
            "uncalibrated": _summary(labels, np.asarray(probs, np.float64)),
            "calibrated": None if calibrated is None else _summary(labels, np.asarray(calibrated, np.float64))}


def set_report(labels, calibrated, scores: dict, coverages) -> dict:
    """Per coverage: per class (and no signal) the realised recall of the sets (the fraction of the proteins that
    have it whose set holds it), whether it is guaranteed, and the sets' mean size and share of singletons."""
    truth, out = positives(labels), {}
    for coverage in coverages:
        sets = Sets(scores, coverage)
        inside = sets.members(calibrated)
        size = inside.sum(1)
        out[f"{coverage:g}"] = {
            "per_class": {n: {"recall": float(inside[truth[:, j], j].mean()) if truth[:, j].any() else None,
                              "support": int(truth[:, j].sum()), "guarantee": bool(sets.guaranteed[j]),
                              "threshold": float(sets.thresholds[j]) if sets.guaranteed[j] and math.isfinite(
                                  sets.thresholds[j]) else None}
                          for j, n in enumerate(SET_NAMES)},
            "mean_size": float(size.mean()) if len(size) else None,
            "singletons": float((size == 1).mean()) if len(size) else None,
            "notes": sets.notes()}
    return out
