"""The vocabulary: the eight signal classes, ESM-2's alphabet, tokenisation and windows.

Classes (index order, upstream's order without "Other"; a protein with no class is "Other"):
    ER, Peroxisome, Mitochondrion, SIGNAL, Nucleus, Nucleus_export, chloroplast, Thylakoid
Light on purpose (NumPy only): the model, the caches and prediction import it without the data machinery.
"""
from __future__ import annotations

import numpy as np

CLASSES = ["ER", "Peroxisome", "Mitochondrion", "SIGNAL", "Nucleus", "Nucleus_export", "chloroplast", "Thylakoid"]
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
SITE_CLASSES = ["SIGNAL", "Mitochondrion", "chloroplast", "Thylakoid", "ER", "Peroxisome"]
SEGMENT_CLASSES = ["Nucleus", "Nucleus_export"]
NUM_CLASSES = len(CLASSES)
NO_SIGNAL = "Other"  # upstream's class 0: a protein without any class, so named in every output

# Where predict.py's outputs may place a signal, from the real MUTarget data (5283 proteins; recomputed by
# tests/test_signals.py). Each window = the largest figure in the data + max(4, 20%) residues, rounded up to 5.
# Site: the residue the class's track is trained to peak at (data.build_targets).
ER_WINDOW = 10  # ER site within the last 10 residues: all 146 ER motifs end at the C-terminus, site <= 4th last
PTS1_WINDOW = 15  # Peroxisome PTS1 site within the last 15 residues: the 46 annotations not from residue 1 that end
# in the last tenth have their site (first residue) <= 11th last (ATM's SRL, 3046 of 3056); of the 62 Peroxisome
# sites only PMP34's internal 190 of 307 (O43808, O70579) lies in neither window
PTS2_WINDOW = 70  # Peroxisome PTS2 site within residues 1-70: <= 58 (PTS2 annotations from residue 1 end at 7-58)
# Nucleus / Nucleus_export segments (runs of residue probability > 0.5): runs at most SEGMENT_MERGE_GAP residues
# apart are merged (the smallest gap between two NES annotations of one protein is 4 residues; 4 of the 191 gaps
# between NLS annotations are <= 3), then runs shorter than the class's shortest annotation are dropped.
SEGMENT_MERGE_GAP = 3
# A windowed site (ER, Peroxisome) whose track peaks outside the window is the highest residue inside it only when
# that residue's probability reaches this (the segments' cut); otherwise the called class gets no site.
SITE_MIN_PROBABILITY = 0.5
SEGMENT_MIN_LENGTH = {"Nucleus": 2, "Nucleus_export": 4}
# Shortest training protein and shortest annotated signal of each class (1-based inclusive spans): a protein
# shorter than these gets a warning in the outputs.
MIN_TRAINING_LENGTH = 28
MIN_SIGNAL_LENGTH = {"ER": 3, "Peroxisome": 3, "Mitochondrion": 6, "SIGNAL": 7, "Nucleus": 2, "Nucleus_export": 4,
                     "chloroplast": 10, "Thylakoid": 16}

# ESM-1b / ESM-2 alphabet, in token-id order: fair-esm's Alphabet "ESM-1b", the same as Hugging Face's vocab.txt.
TOKENS = ["<cls>", "<pad>", "<eos>", "<unk>", *"LAGVSERTIDPKQNFYMHWCXBUZO", ".", "-", "<null_1>", "<mask>"]
BOS_IDX, PAD_IDX, EOS_IDX, MASK_IDX = (TOKENS.index(t) for t in ("<cls>", "<pad>", "<eos>", "<mask>"))
RESIDUES = "".join(t for t in TOKENS if len(t) == 1 and t.isalpha())  # 20 standard + X B U Z O, as sequences hold them
STANDARD_RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
STANDARD = np.array([TOKENS.index(a) for a in STANDARD_RESIDUES])  # token ids of the 20 standard residues
_TOKEN_LUT = np.full(256, -1, dtype=np.int64)
_TOKEN_LUT[[ord(a) for a in RESIDUES]] = [TOKENS.index(a) for a in RESIDUES]


def tokenize(sequence: str) -> np.ndarray:
    """Residues -> ESM-2 token ids [L] (no BOS / EOS)."""
    return _TOKEN_LUT[np.frombuffer(sequence.encode("ascii"), dtype=np.uint8)]


def window_starts(length: int, max_len: int, overlap: int) -> list[int]:
    """Start offsets of windows of at most `max_len` residues overlapping by >= `overlap`.

    The last window ends at the last residue, so every window but a short protein's only
    one is exactly `max_len` long.
    """
    if length <= max_len:
        return [0]
    step = max_len - overlap
    starts = list(range(0, length - max_len, step))
    starts.append(length - max_len)
    return starts
