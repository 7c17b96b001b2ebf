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
