"""Where predict.py places signals (signals.py): the windows of C-terminal and PTS2 sites and the segment rule,
their figures recomputed from the real MUTarget data, the GFF3 scores of each feature, the warnings."""
import csv
import math
from collections import defaultdict

import numpy as np
import pytest
from conftest import REAL_DATA

import outputs
import signals
import vocab
from vocab import CLASSES, NO_SIGNAL

THRESHOLDS = np.full(8, 0.5)


def probs_of(*called):
    """Class probabilities [8]: 0.9 for the called classes, 0.1 for the others."""
    return np.array([0.9 if c in called else 0.1 for c in CLASSES])


def tracks(length, **peaks):
    """Motif tracks [8, L] of 0.01 with {class: {1-based residue: value}} set."""
    motif = np.full((8, length), 0.01)
    for c, values in peaks.items():
        for pos, v in values.items():
            motif[CLASSES.index(c), pos - 1] = v
    return motif


# --------------------------------------------------------------------------- the figures of the real data
def annotations():
    """(label, start, end, length, entry) of every MOTIF annotation of the three CSVs, and the protein lengths."""
    out, lengths = [], []
    for name in ("ANIMALS_uniprot.csv", "PLANTS_uniprot.csv", "FUNGI_uniprot.csv"):
        with open(REAL_DATA / name, newline="") as handle:
            for row in csv.DictReader(handle):
                n = len(row["Sequence"])
                lengths.append(n)
                for item in filter(None, row["MOTIF"].split("|")):
                    span, label = item.split(":")
                    start, end = map(int, span.split("-"))
                    out.append((label, start, end, n, row["Entry"]))
    return out, lengths


def window_rule(figure: int) -> int:
    """The rule the windows follow (vocab.py): the figure + max(4, 20%) residues, rounded up to a multiple of 5."""
    return 5 * math.ceil((figure + max(4, math.ceil(0.2 * figure))) / 5)


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="shared MUTarget data not present")
def test_windows_and_lengths_cover_the_real_data():
    """Sites as training marks them (data.build_targets): ER the motif's first residue; Peroxisome from residue 1
    (PTS2) its last residue, else its first."""
    ann, lengths = annotations()
    assert len(lengths) == 5283 and min(lengths) == vocab.MIN_TRAINING_LENGTH == 28
    shortest = {c: min(e - s + 1 for label, s, e, _, _ in ann if label == c) for c in CLASSES}
    assert shortest == vocab.MIN_SIGNAL_LENGTH
    # ER: every motif ends at the C-terminus; the site is at most the 4th last residue
    er = [(s, e, n) for label, s, e, n, _ in ann if label == "ER"]
    assert len(er) == 146 and all(e == n for _, e, n in er)
    assert max(n - s + 1 for s, _, n in er) == 4 and vocab.ER_WINDOW == window_rule(4) == 10
    # Peroxisome PTS2 (from residue 1): the site (its last residue) at most 58
    per = [(s, e, n, entry) for label, s, e, n, entry in ann if label == "Peroxisome"]
    assert len(per) == 62
    assert max(e for s, e, _, _ in per if s == 1) == 58 and vocab.PTS2_WINDOW == window_rule(58) == 70
    # PTS1 (not from residue 1, ending in the last tenth): the site (its first residue) at most the 11th last
    pts1 = [(s, n) for s, e, n, _ in per if s > 1 and n - e < n / 10]
    assert len(pts1) == 46 and max(n - s + 1 for s, n in pts1) == 11 and vocab.PTS1_WINDOW == window_rule(11) == 15
    # the others end at least 35% of the length before the C-terminus: two lie within the PTS2 window, two are
    # internal (the membrane-protein signal 190-199 of PMP34 and its mouse ortholog), outside both windows
    rest = [(s, e, n, entry) for s, e, n, entry in per if s > 1 and n - e >= n / 10]
    assert all(n - e >= 0.35 * n for _, e, n, _ in rest)
    sites = {entry: (e if s == 1 else s, n) for s, e, n, entry in per}
    outside = sorted(entry for entry, (site, n) in sites.items()
                     if site > vocab.PTS2_WINDOW and n - site + 1 > vocab.PTS1_WINDOW)
    assert outside == ["O43808", "O70579"] and all(sites[x] == (190, 307) for x in outside)
    # segments: shortest annotation per class; gaps between two annotations of one class in one protein
    gaps = defaultdict(list)
    for c in vocab.SEGMENT_CLASSES:
        spans = defaultdict(list)
        for label, s, e, _, entry in ann:
            if label == c:
                spans[entry].append((s, e))
        for runs in spans.values():
            runs.sort()
            gaps[c] += [b[0] - a[1] - 1 for a, b in zip(runs, runs[1:])]
    assert vocab.SEGMENT_MIN_LENGTH == {c: shortest[c] for c in vocab.SEGMENT_CLASSES} == {"Nucleus": 2,
                                                                                         "Nucleus_export": 4}
    assert min(gaps["Nucleus_export"]) == 4 == vocab.SEGMENT_MERGE_GAP + 1
    assert len(gaps["Nucleus"]) == 191 and sorted(g for g in gaps["Nucleus"] if g <= vocab.SEGMENT_MERGE_GAP) == [
        0, 1, 1, 3]


# --------------------------------------------------------------------------- sites inside their windows
def test_pts1_far_from_the_c_terminus_is_not_called():
    """A 5400-residue protein called Peroxisome whose track peaks at 3096 (far from both termini): no PTS1 from
    3096 to 5400. Inside the windows nothing reaches 0.5: no site and no feature, a warning says why; with a
    residue of 0.6 in the last 15, that one is the site (PTS1 from 5390), and the warning says where the track
    peaked."""
    motif = tracks(5400, Peroxisome={3096: 0.9, 5390: 0.3, 40: 0.2})
    record = outputs.protein_record("P", probs_of("Peroxisome"), motif, THRESHOLDS)
    assert record["predicted"] == ["Peroxisome"] and record["sites"] == {} and outputs.gff3_features(record) == []
    assert record["warnings"] == ["Peroxisome: the residue track peaks at 3096, outside residues 1-70 (PTS2) and "
                                  "the last 15 (PTS1); no site given (the highest inside them, 5390, has residue "
                                  "probability 0.30 < 0.5)"]
    motif[CLASSES.index("Peroxisome"), 5389] = 0.6
    record = outputs.protein_record("P", probs_of("Peroxisome"), motif, THRESHOLDS)
    assert record["sites"] == {"Peroxisome": 5390} and record["site_scores"] == {"Peroxisome": 0.6}
    assert record["warnings"] == ["Peroxisome: the residue track peaks at 3096, outside residues 1-70 (PTS2) and "
                                  "the last 15 (PTS1): site 5390 is the highest inside them"]
    features = outputs.gff3_features(record)
    assert features == [("MUTarget", "peptide_localization_signal", 5390, 5400, 0.6,
                         {"class": "Peroxisome", "signal": "PTS1", "class_probability": "0.9000"})]
    # the same track with its N-terminal value higher: PTS2, residues 1-40
    motif[CLASSES.index("Peroxisome"), 39] = 0.7
    record = outputs.protein_record("P", probs_of("Peroxisome"), motif, THRESHOLDS)
    assert record["sites"] == {"Peroxisome": 40}
    assert [f[2:4] + (f[5]["signal"],) for f in outputs.gff3_features(record)] == [(1, 40, "PTS2")]
    # ER: the last 10 residues only
    motif = tracks(300, ER={150: 0.8, 295: 0.55})
    record = outputs.protein_record("E", probs_of("ER"), motif, THRESHOLDS)
    assert record["sites"] == {"ER": 295} and "ER: the residue track peaks at 150" in record["warnings"][0]
    assert outputs.gff3_features(record)[0][2:5] == (295, 300, 0.55)
    # inside the windows: the plain argmax, no warning; N-terminal peptides are not windowed
    motif = tracks(300, ER={297: 0.8}, SIGNAL={250: 0.7})
    record = outputs.protein_record("E", probs_of("ER", "SIGNAL"), motif, THRESHOLDS)
    assert record["sites"] == {"ER": 297, "SIGNAL": 250} and record["warnings"] == []


def test_peroxisome_signal_of_short_proteins():
    """In the first 70 residues only: PTS2; in the last 15 only: PTS1; in both (proteins of up to 85 residues) or
    in neither (a site given by hand): the half it lies in."""
    assert [signals.peroxisome_signal(s, 400) for s in (1, 70, 71, 385, 386, 400)] == [
        "PTS2", "PTS2", "PTS2", "PTS1", "PTS1", "PTS1"]
    assert [signals.peroxisome_signal(s, 60) for s in (30, 31, 45, 46, 60)] == ["PTS2", "PTS2", "PTS2", "PTS1", "PTS1"]
    assert [signals.peroxisome_signal(s, 20) for s in (1, 10, 11, 20)] == ["PTS2", "PTS2", "PTS1", "PTS1"]
    assert signals.find_site("Peroxisome", np.array([0.1, 0.9, 0.2])) == (2, None)  # a 3-residue protein
    with pytest.raises(ValueError, match=r"Peroxisome: a residue track must be one non-empty row, got shape \(0,\)"):
        signals.find_site("Peroxisome", np.zeros(0))


# --------------------------------------------------------------------------- segments and scores
def test_segment_merge_and_drop_rule_hand_worked():
    """Runs above 0.5 at 31, 81-87, 90, 93-94, 120-121 and 140-143: gaps of at most 3 residues merge 81-87, 90 and
    93-94 into 81-94; then Nucleus drops runs under 2 residues (31), Nucleus_export under 4 (31, 120-121)."""
    above = [31, *range(81, 88), 90, 93, 94, 120, 121, *range(140, 144)]
    spans = signals.runs(np.isin(np.arange(1, 201), above))
    assert spans == [[31, 31], [81, 87], [90, 90], [93, 94], [120, 121], [140, 143]]
    assert signals.merge_runs(spans, 3, 2) == [[81, 94], [120, 121], [140, 143]]
    assert signals.merge_runs(spans, 3, 4) == [[81, 94], [140, 143]]
    assert signals.merge_runs(spans, 0, 1) == spans and signals.merge_runs([], 3, 2) == []
    assert signals.merge_runs([[1, 5], [9, 9]], 3, 1) == [[1, 9]]  # a gap of exactly 3 (6, 7, 8) merges
    assert signals.merge_runs([[1, 5], [10, 10]], 3, 1) == [[1, 5], [10, 10]]  # 4 does not


def test_gff3_score_is_the_features_own_residues():
    """Segment score: the track's mean over the segment's residues (the merged gap included); site score: the
    track at the site; the protein-level probability in class_probability."""
    nucleus = {10: 0.9, 11: 0.7, 12: 0.2, 13: 0.6, 50: 0.95}  # 10-13 (12 merged in); 50 alone: dropped
    motif = tracks(100, Nucleus=nucleus, SIGNAL={20: 0.8})
    record = outputs.protein_record("N", probs_of("Nucleus", "SIGNAL"), motif, THRESHOLDS)
    assert record["segments"] == {"Nucleus": [[10, 13]]}
    assert record["segment_scores"] == {"Nucleus": [0.6]}  # (0.9 + 0.7 + 0.2 + 0.6) / 4
    assert record["site_scores"] == {"SIGNAL": 0.8}
    assert outputs.gff3_features(record) == [
        ("MUTarget", "signal_peptide", 1, 20, 0.8, {"class": "SIGNAL", "class_probability": "0.9000"}),
        ("MUTarget", "nuclear_localization_signal", 10, 13, 0.6, {"class": "Nucleus", "class_probability": "0.9000"})]
    # a segment class whose runs are all dropped: still called, no feature, a warning
    motif = tracks(100, Nucleus_export={10: 0.9, 11: 0.9, 12: 0.9})
    record = outputs.protein_record("X", probs_of("Nucleus_export"), motif, THRESHOLDS)
    assert record["segments"] == {"Nucleus_export": []} and outputs.gff3_features(record) == []
    assert record["warnings"] == ["Nucleus_export: no segment of 4 or more residues with residue probability > 0.5"]


# --------------------------------------------------------------------------- warnings
def test_short_protein_warnings():
    """'MKL' called ER and SIGNAL: shorter than any training protein (28) and than any training signal peptide (7);
    ER motifs can be 3 residues, so no ER warning. A 27-residue protein called nothing: the first warning only."""
    record = outputs.protein_record("MKL", probs_of("ER", "SIGNAL"), tracks(3, SIGNAL={2: 0.9}), THRESHOLDS)
    assert record["warnings"] == ["shorter than any training protein (28 residues)",
                                  "SIGNAL: shorter than any training SIGNAL signal (7 residues)"]
    record = outputs.protein_record("short", np.zeros(8), tracks(27), THRESHOLDS)
    assert record["predicted"] == [NO_SIGNAL] and record["warnings"] == ["shorter than any training protein (28 residues)"]
    assert outputs.protein_record("long", np.zeros(8), tracks(28), THRESHOLDS)["warnings"] == []
    gff = "".join(outputs.gff3_comments(outputs.protein_record("a b", np.zeros(8), tracks(5), THRESHOLDS)))
    assert gff == "# a%20b: Other (no signal predicted by MUTarget)# a%20b: warning: shorter than any training protein (28 residues)"
    with pytest.raises(ValueError, match=r"bad: probabilities must be \[8\] and motif tracks \[8, L\], got \(3,\)"):
        outputs.protein_record("bad", np.zeros(3), tracks(5), THRESHOLDS)
