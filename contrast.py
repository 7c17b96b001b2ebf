"""What contrastive learning adds to the MUTarget baseline's data: mutation augmentation (MUTarget's, and
the views of the in-batch losses), positive / negative sampling per anchor (CLEAN's SupCon), class distance
maps for hard negatives, and their re-mining from the model during training (CLEAN's adaptive mining)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data import DataError, LocalizationDataset, Protein
from evaluate import evaluate
from utils import read_json, write_text_atomic
from vocab import CLASSES, STANDARD, TOKENS

_STANDARD_POSITION = np.full(len(TOKENS), -1)  # token id -> index among the 20 standard residues
_STANDARD_POSITION[STANDARD] = np.arange(len(STANDARD))


def signal_mask(protein: Protein) -> np.ndarray:
    """Residues inside any annotated signal region [L] (bool)."""
    mask = np.zeros(len(protein.sequence), dtype=bool)
    for _, start, end in protein.annotations:
        mask[start - 1:end] = True
    return mask


class Augmenter:
    """MUTarget's mutation augmentation: each residue is replaced by a different random standard
    residue with probability pos_rate inside the signal regions and neg_rate outside; labels and
    targets stay. Mutations are drawn from (seed, epoch, item), so they change every epoch and a
    resumed run replays them."""

    def __init__(self, proteins, pos_rate: float, neg_rate: float, views: int = 1, seed: int = 0, apply: bool = True):
        self.masks = [signal_mask(p) for p in proteins]
        self.pos_rate, self.neg_rate, self.views, self.seed, self.apply = pos_rate, neg_rate, views, seed, apply
        self.epoch, self.active = 0, True

    def rng(self, item_index: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch, item_index, 1))

    def mutate(self, index: int, tokens: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        rate = np.where(self.masks[index], self.pos_rate, self.neg_rate)
        where = rng.random(len(tokens)) < rate
        out = tokens.copy()
        position = np.maximum(_STANDARD_POSITION[tokens[where]], 0)  # X, B, Z, U, O count as position 0
        shift = rng.integers(1, len(STANDARD), size=len(position))  # 1..19: never the same residue again
        out[where] = STANDARD[(position + shift) % len(STANDARD)]
        return out

    @staticmethod
    def copies(labels: np.ndarray, max_copies: int) -> np.ndarray:
        """Copies per protein per epoch: ceil(largest class count / count of the protein's rarest
        class), at most max_copies; proteins without a class: 1."""
        counts = labels.sum(0).astype(float)
        rarest = np.where(labels.astype(bool), counts[None, :], np.inf).min(1)
        copies = np.ceil(counts.max() / np.where(np.isfinite(rarest), rarest, counts.max()))
        return np.clip(copies, 1, max_copies).astype(np.int64)


MAP_CLASSES = CLASSES + ["Other"]  # sampling and distance maps treat "no class" as a class of its own, last


def class_membership(labels: np.ndarray) -> np.ndarray:
    """Multi-hot labels [N, 8] -> bool [N, 9]: the classes, then "Other" (no class at all)."""
    labels = labels.astype(bool)
    return np.concatenate([labels, ~labels.any(1, keepdims=True)], axis=1)


FALLBACKS = ("fallback_pos", "fallback_hard", "fallback_neg")


def sample_distinct(rng: np.random.Generator, n: int, k: int) -> list[int]:
    """k distinct integers from range(n) in O(k) (Floyd's algorithm); requires k <= n."""
    chosen: dict[int, None] = {}
    for j in range(n - k, n):
        t = int(rng.integers(0, j + 1))
        chosen[j if t in chosen else t] = None
    return list(chosen)


def draw(rng: np.random.Generator, candidates: np.ndarray, k: int, exclude: int = -1) -> list[int]:
    """k members of `candidates` other than `exclude`: distinct when enough exist, else every
    one of them plus random repeats; [] when there is none."""
    n = len(candidates)
    picked = [int(candidates[i]) for i in sample_distinct(rng, n, min(k + 1, n))]
    picked = [i for i in picked if i != exclude][:k]  # fewer than k only if all n were drawn
    if not picked:
        return []
    return picked + [picked[i] for i in rng.integers(0, len(picked), size=k - len(picked))]


class ContrastSampler:
    """Positives and negatives per anchor, from a protein x class membership matrix built once.

    Positive: shares at least one class with the anchor ("Other" counts as a class), never the
    anchor itself, except when the anchor is the only protein of its classes (then the anchor
    fills the slots; fallback_pos). Negative: shares no class with the anchor. Hard negatives
    (hard_neg): per class of the anchor the nearest other class in the distance map, the
    anchor's own classes removed; drawn from proteins of those template classes that share no
    class with the anchor; empty template or no such protein: ordinary negatives
    (fallback_hard). No negative at all: the anchor fills the slots (fallback_neg; its
    similarity with itself is constant, so it adds no gradient). Cost O(n_pos + n_neg) per
    anchor after a one-off candidate list per distinct label set.
    """

    def __init__(self, labels: np.ndarray, n_pos: int, n_neg: int, hard_neg: bool = False,
                 distance_map: dict | None = None, seed: int = 0):
        self.labels = labels.astype(bool)
        self.n_pos, self.n_neg, self.hard_neg, self.seed = n_pos, n_neg, hard_neg, seed
        self.epoch, self.active = 0, True
        self.membership = class_membership(self.labels)  # [N, 9]
        self.distances = distance_matrix(distance_map) if distance_map is not None else None
        if hard_neg and self.distances is None:
            raise ValueError("hard_neg needs a class distance map")
        self._cache: dict[tuple, tuple] = {}

    def set_distance_map(self, distance_map: dict) -> None:
        """Use a new class distance map from now on (adaptive mining); candidate lists are rebuilt."""
        self.distances = distance_matrix(distance_map)
        self._cache.clear()

    def classes_of(self, index: int) -> tuple[int, ...]:
        return tuple(np.flatnonzero(self.membership[index]).tolist())

    def template(self, classes: tuple[int, ...]) -> list[int]:
        """Nearest other class of each anchor class, minus the anchor's classes."""
        nearest = set()
        for c in classes:
            d = self.distances[c].copy()
            d[c] = np.inf
            if np.isfinite(d).any():
                nearest.add(int(np.argmin(d)))
        return sorted(nearest - set(classes))

    def candidates(self, classes: tuple[int, ...]):
        """(positive, negative, hard negative) candidate index arrays of a label set (cached)."""
        if classes not in self._cache:
            shares = self.membership[:, list(classes)].any(1)
            hard = np.zeros(0, dtype=np.int64)
            if self.hard_neg:
                in_template = self.membership[:, self.template(classes)].any(1)
                hard = np.flatnonzero(in_template & ~shares)
            self._cache[classes] = (np.flatnonzero(shares), np.flatnonzero(~shares), hard)
        return self._cache[classes]

    def sample(self, index: int) -> dict:
        """{'pos': [n_pos indices], 'neg': [n_neg indices], 'fallback_pos' / '_hard' / '_neg': 0|1}."""
        rng = np.random.default_rng((self.seed, self.epoch, index))
        positives, negatives, hard = self.candidates(self.classes_of(index))
        pos = draw(rng, positives, self.n_pos, exclude=index)
        out = {"fallback_pos": int(not pos), "fallback_hard": 0, "fallback_neg": 0}
        neg = draw(rng, hard, self.n_neg) if self.hard_neg else []
        if self.hard_neg and not neg:
            out["fallback_hard"] = 1
        if not neg:
            neg = draw(rng, negatives, self.n_neg)
        if not neg:
            out["fallback_neg"] = 1
        out["pos"] = pos or [index] * self.n_pos
        out["neg"] = neg or [index] * self.n_neg
        return out


def read_distance_map(path) -> dict:
    """A class distance map file (JSON {class: {class: distance or null}}, as build_distance_map.py and
    train.py write it), checked: DataError naming the file and the entry on anything else."""
    path = Path(path)
    tree = read_json(path, "a class distance map", DataError, max_bytes=1 << 20)
    check_distance_map(tree, str(path))
    return tree


def check_distance_map(tree, where: str) -> None:
    """DataError unless `tree` is {class: {class: non-negative finite number or null}} over MAP_CLASSES."""
    if not isinstance(tree, dict) or not tree:
        raise DataError(f"{where}: a class distance map must be a JSON object {{class: {{class: distance}}}}, got "
                        f"{type(tree).__name__}")
    for a, row in tree.items():
        if a not in MAP_CLASSES:
            raise DataError(f"{where}: unknown class {a!r}; known: {', '.join(MAP_CLASSES)}")
        if not isinstance(row, dict):
            raise DataError(f"{where}: entry {a!r} must be an object {{class: distance}}, got {type(row).__name__}")
        for b, value in row.items():
            if b not in MAP_CLASSES:
                raise DataError(f"{where}: entry {a!r}: unknown class {b!r}; known: {', '.join(MAP_CLASSES)}")
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if value is not None and not (number and math.isfinite(value) and value >= 0):
                raise DataError(f"{where}: entry {a!r} -> {b!r}: a distance must be a number >= 0 or null, "
                                f"got {value!r}")


def distance_matrix(distance_map: dict) -> np.ndarray:
    """{class: {class: distance}} (JSON of build_distance_map) -> [9, 9] (Other last); missing = inf."""
    check_distance_map(distance_map, "distance map")
    names = MAP_CLASSES
    d = np.full((len(names), len(names)), np.inf)
    for a, row in distance_map.items():
        for b, value in row.items():
            if value is not None:
                d[names.index(a), names.index(b)] = float(value)
    return d


def class_distance_map(embeddings: np.ndarray, labels: np.ndarray) -> dict:
    """Euclidean distances between class centroids of embeddings [N, d] (a multi-label protein
    counts for each of its classes; "Other" for none) -> {class: {class: distance}}."""
    names, membership = MAP_CLASSES, class_membership(labels)
    present = [c for c in range(len(names)) if membership[:, c].any()]
    centroids = {c: embeddings[membership[:, c]].mean(0) for c in present}
    return {names[a]: {names[b]: float(np.linalg.norm(centroids[a] - centroids[b])) for b in present}
            for a in present}


def enable_supcon(dataset: LocalizationDataset, n_pos: int, n_neg: int, hard_neg: bool = False, distance_map=None,
                  seed: int = 0) -> None:
    """SupCon on a dataset (training split only): its items carry 'pos_neg', each anchor's positives and
    negatives (see ContrastSampler)."""
    dataset.sampler = ContrastSampler(dataset.labels, n_pos, n_neg, hard_neg, distance_map, seed)


def enable_augmentation(dataset: LocalizationDataset, aug, views: int = 1, seed: int = 0) -> None:
    """MUTarget's mutation augmentation on a dataset (training split only): see Augmenter. `aug`: the
    train.augment settings (apply, pos_rate, neg_rate, max_copies). With apply, rarer classes get more copies
    per epoch (up to max_copies); views > 1 adds that many mutated views of each protein to every item (for
    the in-batch contrastive losses)."""
    dataset.augmenter = Augmenter(dataset.proteins, aug.pos_rate, aug.neg_rate, views, seed, aug.apply)
    if aug.apply and aug.max_copies > 1:
        copies = dataset.augmenter.copies(dataset.labels, aug.max_copies)
        dataset.item_protein = np.repeat(np.arange(len(dataset.proteins)), copies)


def anchor_cosines(projection: torch.Tensor, n_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cosine similarity of anchors with their positives and with their negatives."""
    z = torch.nn.functional.normalize(projection.float(), dim=-1)
    cos = torch.einsum("bd,bkd->bk", z[:, 0], z[:, 1:])
    return cos[:, :n_pos].mean(), cos[:, n_pos:].mean()


def distance_map_of(model, proteins, config, device, key: str) -> dict:
    """Class distance map from the model's `key` embeddings ('pooled' or 'projection') of
    `proteins`, each once and unmutated (never the training set's augmented items or copies)."""
    plain = LocalizationDataset(proteins, "train")
    out = evaluate(model, plain, config, device)
    return class_distance_map(out[key], plain.labels)


def remine(model, train_set, config, device, old_map: dict, log) -> dict:
    """Adaptive hard-negative mining (CLEAN): a new class distance map from the current model's
    projections of the training split (unmutated, every protein once); the sampler uses it from
    now on; written to run_dir/distance_map.json. Every process computes the same map."""
    new_map = distance_map_of(model, train_set.proteins, config, device, "projection")
    train_set.sampler.set_distance_map(new_map)
    change = [abs(new_map[a][b] - old_map.get(a, {}).get(b, float("nan"))) for a in new_map for b in new_map[a]]
    changed = [c for c in change if c == c]
    log.info("re-mined the class distance map from the model's projections: mean |change| %.4f over %d pairs",
             sum(changed) / max(len(changed), 1), len(changed))
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return new_map
    write_text_atomic(Path(config.run_dir) / "distance_map.json", json.dumps(new_map, indent=1))
    return new_map


def uses_mutations(config) -> bool:
    """True when training sequences are mutated: augmentation, or the views of an in-batch loss."""
    return config.train.augment.apply or (config.supcon.apply and config.supcon.loss != "hard")


def phase_of(config, epoch: int) -> str:
    """'warm_start' (SupCon only), 'joint' (supervised + SupCon) or 'supervised'."""
    sc = config.supcon
    if sc.apply and epoch < sc.warm_start:
        return "warm_start"
    return "joint" if sc.apply and sc.apply_supcon_loss else "supervised"


def setup_supcon(config, model, train_set, device, log, resume=None):
    """Turn on mutation augmentation / views and positive / negative sampling (supcon.loss: hard)
    for the training split; returns the class distance map used for hard negatives (read from supcon.distance_map, or built from the initial model's
    pooled embeddings of the training split), or None."""
    sc, aug = config.supcon, config.train.augment
    if uses_mutations(config):
        views = max(aug.views, 2) if sc.apply and sc.loss != "hard" else 1
        enable_augmentation(train_set, aug, views, config.seed)
    if not sc.apply or sc.loss != "hard":  # the in-batch losses need views, not sampled pairs
        return None
    distance_map = None
    if sc.hard_neg and resume is not None and resume.get("distance_map") is not None:
        distance_map = resume["distance_map"]
    elif sc.hard_neg and sc.distance_map is not None:
        distance_map = read_distance_map(sc.distance_map)
    elif sc.hard_neg:
        log.info("supcon.distance_map not set: building it from the initial model's pooled embeddings")
        distance_map = distance_map_of(model, train_set.proteins, config, device, "pooled")
    enable_supcon(train_set, sc.n_pos, sc.n_neg, sc.hard_neg, distance_map, config.seed)
    return distance_map
