"""The synthetic demo data: proteins with planted, learnable signals of every class, written in MUTarget's
file formats (a CSV, dual.fasta and partition.csv), so the demo runs anywhere without the real data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from utils import write_text_atomic

_BACKGROUND_AA = "ACDEFGHIKLMNPQRSTVWY"


_BACKGROUND_FREQ = np.array([8.3, 1.4, 5.5, 6.7, 3.9, 7.1, 2.3, 5.9, 5.8, 9.6,
                             2.4, 4.1, 4.7, 3.9, 5.3, 6.6, 5.4, 6.9, 1.1, 2.9])


_BACKGROUND_FREQ = _BACKGROUND_FREQ / _BACKGROUND_FREQ.sum()


def _synthetic_protein(rng: np.random.Generator, kind: str):
    """One synthetic protein with planted signals; returns (sequence, motif string)."""
    def bg(n):
        return "".join(rng.choice(list(_BACKGROUND_AA), size=n, p=_BACKGROUND_FREQ))

    def pick(alphabet, n):
        return "".join(rng.choice(list(alphabet), size=n))

    def signal_peptide():  # n-region (K/R), hydrophobic h-region, c-region ending A-x-A
        return "M" + pick("KR", rng.integers(1, 4)) + pick("LLLAVIF", rng.integers(8, 13)) + pick("GSTP", 2) + "AXA".replace("X", pick("SGL", 1))

    def mito_peptide():  # amphipathic, R-rich, no acidic residues, ends R-x-Y-S
        return "M" + pick("RRLLASSAVR", rng.integers(14, 30)) + "R" + pick("AL", 1) + "YS"

    def chloro_peptide():  # S/T-rich, no acidic residues, ends V-R-A
        return "MA" + pick("SSSTTPAVGLR", rng.integers(26, 50)) + "VRA"

    def thylakoid_peptide():  # hydrophobic core then A-x-A
        return pick("RK", 2) + pick("LLAVIF", rng.integers(10, 15)) + "AQA"

    def nls():
        return "P" + pick("KKKR", rng.integers(5, 8)) + "V"

    def nes():  # hydrophobic positions spaced by hydrophilic residues
        return "L" + pick("EDQS", 3) + "L" + pick("EDQS", 2) + "L" + pick("EDQS", 1) + "I"

    length = int(rng.integers(50, 160))
    motifs = []
    nterm = ""
    if kind in ("SIGNAL", "ER"):
        nterm = signal_peptide()
        motifs.append(f"1-{len(nterm)}:SIGNAL")
    elif kind == "Mitochondrion":
        nterm = mito_peptide()
        motifs.append(f"1-{len(nterm)}:Mitochondrion")
    elif kind == "dual":
        nterm = "MA" + pick("RRSSLLAATTVS", rng.integers(24, 40)) + "RVYA"
        motifs.append(f"1-{len(nterm)}:dual")
    elif kind == "chloroplast":
        nterm = chloro_peptide()
        motifs.append(f"1-{len(nterm)}:chloroplast")
    elif kind == "Thylakoid":
        cp, tp = chloro_peptide(), thylakoid_peptide()
        if rng.random() < 0.7:  # thylakoid annotation after the chloroplast peptide
            motifs.append(f"{len(cp) + 1}-{len(cp) + len(tp)}:Thylakoid")
        else:  # annotated from residue 1: chloroplast site unknown
            motifs.append(f"1-{len(cp) + len(tp)}:Thylakoid")
        nterm = cp + tp
    elif kind == "Peroxisome_PTS2":
        nterm = "RL" + bg(5) + "HL"  # PTS2 annotated from residue 1: site at its last residue
        motifs.append(f"1-{len(nterm)}:Peroxisome")
    body = bg(max(length - len(nterm), 20))
    seq = nterm + body
    if kind in ("Nucleus", "Nucleus_export"):
        pieces = [("Nucleus", nls())] if kind == "Nucleus" or rng.random() < 0.6 else []
        if kind == "Nucleus_export":
            pieces.append(("Nucleus_export", nes()))
        for label, motif in pieces:
            pos = int(rng.integers(len(nterm) + 10, len(seq) - len(motif) - 10))
            seq = seq[:pos] + motif + seq[pos + len(motif):]
            motifs.append(f"{pos + 1}-{pos + len(motif)}:{label}")
    if kind == "ER":  # acidic C-terminal tail ending in the retention motif
        seq = seq + pick("EEDDQ", int(rng.integers(6, 10))) + rng.choice(["KDEL", "HDEL"])
        motifs.append(f"{len(seq) - 3}-{len(seq)}:ER")
    elif kind == "Peroxisome_PTS1":  # basic context before the C-terminal tripeptide
        seq = seq + pick("KRPG", int(rng.integers(4, 7))) + rng.choice(["SKL", "AKL", "SRL"])
        motifs.append(f"{len(seq) - 2}-{len(seq)}:Peroxisome")
    return seq, "|".join(motifs)


def make_synthetic_dataset(root, n_proteins: int = 800, seed: int = 0) -> None:
    """Write SYNTHETIC_uniprot.csv, dual.fasta and partition.csv (5 partitions) into `root`.

    Every class gets planted, learnable signals; about 12% of proteins carry none (Other).
    Files are written to temporary names and renamed, so a crash leaves nothing half-written.
    """
    rng = np.random.default_rng(seed)
    kinds = ["SIGNAL", "Mitochondrion", "chloroplast", "Thylakoid", "ER", "Peroxisome_PTS1",
             "Peroxisome_PTS2", "Nucleus", "Nucleus_export", "Other"]
    weights = np.array([14, 13, 12, 10, 11, 7, 5, 12, 10, 12], dtype=float)
    n_dual = max(n_proteins // 60, 2)
    draws = rng.choice(len(kinds), size=n_proteins - n_dual, p=weights / weights.sum())
    rows = []
    for i, k in enumerate(draws):
        seq, motif = _synthetic_protein(rng, kinds[k])
        rows.append((f"SYN{i:05d}", motif, kinds[k], seq))
    duals = [(f"DUAL{i:03d}",) + _synthetic_protein(rng, "dual") for i in range(n_dual)]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    csv = pd.DataFrame([(e, m, "synthetic " + k, s) for e, m, k, s in rows],
                       columns=["Entry", "MOTIF", "LOCATION", "Sequence"])
    fasta = "".join(f">{e} {m}\n" + "\n".join(s[j:j + 60] for j in range(0, len(s), 60)) + "\n"
                    for e, s, m in duals)
    entries = [r[0] for r in rows] + [d[0] for d in duals]
    types = [r[2].split("_")[0] if r[2] != "Other" else "Other" for r in rows] + ["dual"] * n_dual
    partition = np.empty(len(entries), dtype=np.int64)
    for t in sorted(set(types)):  # stratified by type, as upstream's split is by first label
        idx = np.flatnonzero(np.array(types) == t)
        partition[rng.permutation(idx)] = np.arange(len(idx)) % 5
    part = pd.DataFrame({"entry": entries, "type": types, "group": np.arange(len(entries)), "partition": partition})
    write_text_atomic(root / "SYNTHETIC_uniprot.csv", csv.to_csv(index=False))
    write_text_atomic(root / "dual.fasta", fasta)
    write_text_atomic(root / "partition.csv", part.to_csv(index=False))  # last: marks completion
