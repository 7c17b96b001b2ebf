"""Where predict.py places each predicted signal on the residue tracks, what scores it, and what warns the reader.

motif: one protein's residue tracks [8, L] (vocab.CLASSES order; residue probabilities, the model's sigmoid);
positions are 1-based and inclusive, as in every output.

- Sites (SIGNAL, Mitochondrion, chloroplast, Thylakoid, ER, Peroxisome): the argmax of the class's track
  within the residues the class allows (window_mask): ER the last ER_WINDOW residues; Peroxisome residues
  1-PTS2_WINDOW (PTS2) or the last PTS1_WINDOW (PTS1); the N-terminal peptides anywhere. When the whole
  track peaks outside the window, a note says where; the site stays in the window, and there is none when no
  residue inside it reaches SITE_MIN_PROBABILITY (0.5, the cut of segments too).
- Segments (Nucleus, Nucleus_export): runs of residue probability > 0.5; runs at most SEGMENT_MERGE_GAP
  residues apart are merged, then runs shorter than SEGMENT_MIN_LENGTH[class] are dropped.
- Scores (the GFF3 score): a site's track value; a segment's mean track value over its residues.
The windows and lengths are figures of the real MUTarget data (vocab.py, docs/prediction.md).
"""
from __future__ import annotations

import numpy as np

from vocab import (
    CLASS_INDEX,
    ER_WINDOW,
    MIN_SIGNAL_LENGTH,
    MIN_TRAINING_LENGTH,
    NO_SIGNAL,
    PTS1_WINDOW,
    PTS2_WINDOW,
    SEGMENT_CLASSES,
    SEGMENT_MERGE_GAP,
    SEGMENT_MIN_LENGTH,
    SITE_CLASSES,
    SITE_MIN_PROBABILITY,
)

DECIMALS = 4  # scores as the probabilities are written


def called(classes) -> list:
    """A list of called classes as every output writes it: [NO_SIGNAL] ("Other") when there is none."""
    return list(classes) or [NO_SIGNAL]


def merge_warnings(*lists) -> list:
    """The warnings of several lists, each once, in order."""
    return list(dict.fromkeys(w for warnings in lists for w in warnings))


def window_mask(cls: str, length: int) -> np.ndarray | None:
    """Residues [L] (bool) where a site of `cls` may lie; None: anywhere."""
    if cls == "ER":
        mask = np.zeros(length, bool)
        mask[-ER_WINDOW:] = True
        return mask
    if cls == "Peroxisome":
        mask = np.zeros(length, bool)
        mask[:PTS2_WINDOW] = True
        mask[-PTS1_WINDOW:] = True
        return mask
    return None


def window_text(cls: str) -> str:
    """The window of a class, in words (for the notes)."""
    if cls == "ER":
        return f"the last {ER_WINDOW} residues"
    return f"residues 1-{PTS2_WINDOW} (PTS2) and the last {PTS1_WINDOW} (PTS1)"


def peroxisome_signal(site: int, length: int) -> str:
    """'PTS1' (C-terminal) or 'PTS2' (N-terminal) for a Peroxisome site (1-based) of a protein of `length`: PTS1
    when the site is in the last PTS1_WINDOW residues and not in the first PTS2_WINDOW; in both (proteins of up to
    PTS1_WINDOW + PTS2_WINDOW residues) the nearer half decides; a site outside both (only given by hand) is
    read as PTS1 in the second half."""
    c_window, n_window = length - site < PTS1_WINDOW, site <= PTS2_WINDOW
    if c_window != n_window:
        return "PTS1" if c_window else "PTS2"
    return "PTS1" if site > length // 2 else "PTS2"


def find_site(cls: str, track: np.ndarray) -> tuple[int | None, str | None]:
    """The site of `cls` (1-based) on its track [L] and a note when the whole track peaks outside the class's
    window: the site is then the highest residue inside it when that one reaches SITE_MIN_PROBABILITY, else there
    is no site (None; the class stays called)."""
    if track.ndim != 1 or track.size == 0:
        raise ValueError(f"{cls}: a residue track must be one non-empty row, got shape {track.shape}")
    peak = int(np.argmax(track))
    mask = window_mask(cls, track.size)
    if mask is None or mask[peak]:
        return peak + 1, None
    site = int(np.flatnonzero(mask)[np.argmax(track[mask])])
    where = f"{cls}: the residue track peaks at {peak + 1}, outside {window_text(cls)}"
    if track[site] < SITE_MIN_PROBABILITY:
        return None, (f"{where}; no site given (the highest inside them, {site + 1}, has residue probability "
                      f"{track[site]:.2f} < {SITE_MIN_PROBABILITY})")
    return site + 1, f"{where}: site {site + 1} is the highest inside them"


def runs(mask: np.ndarray) -> list[list[int]]:
    """Runs of True in mask [L] as 1-based inclusive [start, end] pairs."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(mask).astype(np.int8), [0]])))
    return [[int(s) + 1, int(e)] for s, e in zip(edges[::2], edges[1::2])]


def merge_runs(spans, gap: int, min_length: int) -> list[list[int]]:
    """Sorted 1-based [start, end] runs: runs at most `gap` residues apart joined (the gap residues included),
    then runs shorter than `min_length` residues dropped."""
    merged = []
    for start, end in spans:
        if merged and start - merged[-1][1] - 1 <= gap:
            merged[-1][1] = end
        else:
            merged.append([start, end])
    return [s for s in merged if s[1] - s[0] + 1 >= min_length]


def find_segments(cls: str, track: np.ndarray) -> list[list[int]]:
    """The segments of a segment class on its track [L] (merge_runs of the runs above 0.5)."""
    return merge_runs(runs(track > 0.5), SEGMENT_MERGE_GAP, SEGMENT_MIN_LENGTH[cls])


def locate(predicted, motif: np.ndarray) -> tuple[dict, list[str]]:
    """Fields of the predicted classes on the tracks [8, L]: sites {site class: residue}, site_scores {site class:
    track value there}, segments {segment class: [[start, end], ...]}, segment_scores {segment class: [mean over
    each segment]} (other names, such as vocab.NO_SIGNAL, have none); and the notes (a site taken inside its window,
    a segment class without a segment)."""
    if motif.ndim != 2 or motif.shape[0] != len(CLASS_INDEX):
        raise ValueError(f"motif tracks must be [{len(CLASS_INDEX)}, L], got shape {motif.shape}")
    fields = {"sites": {}, "site_scores": {}, "segments": {}, "segment_scores": {}}
    notes = []
    for c in predicted:
        if c not in CLASS_INDEX:
            continue
        track = motif[CLASS_INDEX[c]]
        if c in SITE_CLASSES:
            site, note = find_site(c, track)
            if site is not None:
                fields["sites"][c] = site
                fields["site_scores"][c] = round(float(track[site - 1]), DECIMALS)
            notes += [note] if note else []
        elif c in SEGMENT_CLASSES:
            spans = find_segments(c, track)
            fields["segments"][c] = spans
            fields["segment_scores"][c] = [round(float(track[s - 1:e].mean()), DECIMALS) for s, e in spans]
            if not spans:
                notes.append(f"{c}: no segment of {SEGMENT_MIN_LENGTH[c]} or more residues with residue probability "
                             f"> 0.5")
    return fields, notes


def length_warnings(length: int, predicted) -> list[str]:
    """Warnings of a protein shorter than any training protein, and for each predicted class whose shortest
    training signal is longer than the protein."""
    out = [f"shorter than any training protein ({MIN_TRAINING_LENGTH} residues)"] if length < MIN_TRAINING_LENGTH else []
    return out + [f"{c}: shorter than any training {c} signal ({MIN_SIGNAL_LENGTH[c]} residues)"
                  for c in predicted if c in MIN_SIGNAL_LENGTH and length < MIN_SIGNAL_LENGTH[c]]
