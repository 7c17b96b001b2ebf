"""MUTarget data: reading CSV / partition / FASTA files, protein and residue targets,
windows for long proteins, the dataset, the collate function and the synthetic demo data.

Classes (index order, upstream's order without "Other"; a protein with no class is "Other"):
    ER, Peroxisome, Mitochondrion, SIGNAL, Nucleus, Nucleus_export, chloroplast, Thylakoid
"""
from __future__ import annotations

import itertools
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from utils import write_text_atomic

CLASSES = ["ER", "Peroxisome", "Mitochondrion", "SIGNAL", "Nucleus", "Nucleus_export", "chloroplast", "Thylakoid"]
CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
SITE_CLASSES = ["SIGNAL", "Mitochondrion", "chloroplast", "Thylakoid", "ER", "Peroxisome"]
SEGMENT_CLASSES = ["Nucleus", "Nucleus_export"]
NUM_CLASSES = len(CLASSES)

# Residues fair-esm's ESM-2 alphabet knows (20 standard + X B U Z O).
RESIDUES = "LAGVSERTIDPKQNFYMHWCXBUZO"
# ESM-1b / ESM-2 alphabet: <cls>=0 <pad>=1 <eos>=2 <unk>=3, residues from 4 in this order.
_ESM_TOKENS = "LAGVSERTIDPKQNFYMHWCXBUZO"
BOS_IDX, PAD_IDX, EOS_IDX = 0, 1, 2
_TOKEN_LUT = np.full(256, -1, dtype=np.int64)
for _i, _aa in enumerate(_ESM_TOKENS):
    _TOKEN_LUT[ord(_aa)] = 4 + _i

MOTIF_RE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*:\s*([A-Za-z_]+)\s*$")


class DataError(ValueError):
    """Bad input data; the message names the file, the record and the problem."""


# --------------------------------------------------------------------------- records
@dataclass
class Protein:
    """One protein: sequence, multi-hot labels [8] and residue targets [8, L]."""

    entry: str
    sequence: str
    labels: np.ndarray  # [8] uint8
    targets: np.ndarray  # [8, L] uint8
    masked: tuple = ()  # class indices whose residue track is unknown (not scored, not trained)
    source: str = ""
    annotations: list = field(default_factory=list)  # (label, start, end), 1-based inclusive


def clean_sequence(raw, where: str) -> str:
    """Uppercase, drop whitespace and one trailing '*'; raise DataError on anything else."""
    if not isinstance(raw, str):
        raise DataError(f"{where}: empty sequence")
    seq = re.sub(r"\s+", "", raw).upper()
    if seq.endswith("*"):
        seq = seq[:-1]
    if not seq:
        raise DataError(f"{where}: empty sequence")
    bad = sorted(set(seq) - set(RESIDUES))
    if bad:
        pos = next(i for i, ch in enumerate(seq) if ch in bad) + 1
        raise DataError(f"{where}: invalid residue(s) {''.join(bad)!r} (first at position {pos}); "
                        f"allowed: {RESIDUES} (lowercase and one trailing '*' are accepted)")
    return seq


def parse_motif(text, length: int, where: str) -> list[tuple[str, int, int]]:
    """'1-25:SIGNAL|4-11:Nucleus' -> [(label, start, end)] (1-based, inclusive). Empty -> []."""
    if text is None or (isinstance(text, float) and np.isnan(text)) or not str(text).strip():
        return []
    out = []
    for part in str(text).split("|"):
        m = MOTIF_RE.match(part)
        if not m:
            raise DataError(f"{where}: MOTIF part {part!r} does not parse as 'start-end:Label'")
        start, end, label = int(m.group(1)), int(m.group(2)), m.group(3)
        if label not in CLASS_INDEX and label != "dual":
            raise DataError(f"{where}: unknown label {label!r} in MOTIF; known: {', '.join(CLASSES)}, dual")
        if not 1 <= start <= end <= length:
            raise DataError(f"{where}: MOTIF part {part!r} lies outside the sequence (length {length})")
        out.append((label, start, end))
    return out


def build_targets(annotations, length: int):
    """Protein labels [8], residue targets [8, L] and masked class indices, by MUTarget's rules.

    SIGNAL / Mitochondrion / chloroplast / Thylakoid: 1 at the last residue of the peptide.
    ER: 1 at the first residue of the motif. Peroxisome: PTS2 (starts at 1) last residue,
    PTS1 first residue. Nucleus / Nucleus_export: 1 over every residue of each segment.
    dual: Mitochondrion and chloroplast, both at the end of the presequence.
    Thylakoid implies chloroplast, whose site is the residue before the thylakoid peptide;
    if that peptide starts at residue 1 the chloroplast site is unknown (track masked),
    unless the protein also has an explicit chloroplast annotation.
    """
    labels = np.zeros(NUM_CLASSES, dtype=np.uint8)
    targets = np.zeros((NUM_CLASSES, length), dtype=np.uint8)

    def mark(name, pos0):
        labels[CLASS_INDEX[name]] = 1
        targets[CLASS_INDEX[name], pos0] = 1

    explicit_chloroplast = any(label == "chloroplast" for label, _, _ in annotations)
    chloroplast_unknown = False
    for label, start, end in annotations:
        s, e = start - 1, end - 1
        if label in ("SIGNAL", "Mitochondrion", "chloroplast"):
            mark(label, e)
        elif label == "Thylakoid":
            mark(label, e)
            if start > 1:
                mark("chloroplast", s - 1)
            else:
                labels[CLASS_INDEX["chloroplast"]] = 1
                chloroplast_unknown = not explicit_chloroplast
        elif label == "ER":
            mark(label, s)
        elif label == "Peroxisome":
            mark(label, e if start == 1 else s)
        elif label in SEGMENT_CLASSES:
            labels[CLASS_INDEX[label]] = 1
            targets[CLASS_INDEX[label], s:e + 1] = 1
        elif label == "dual":
            mark("Mitochondrion", e)
            mark("chloroplast", e)
    masked = (CLASS_INDEX["chloroplast"],) if chloroplast_unknown else ()
    if masked:
        targets[CLASS_INDEX["chloroplast"]] = 0
    return labels, targets, masked


def make_protein(entry, raw_sequence, motif, where: str) -> Protein:
    seq = clean_sequence(raw_sequence, where)
    annotations = parse_motif(motif, len(seq), where)
    labels, targets, masked = build_targets(annotations, len(seq))
    return Protein(entry, seq, labels, targets, masked, where.split(":")[0], annotations)


# --------------------------------------------------------------------------- files
def iter_csv(path: Path, rows_per_read: int = 10000):
    """Rows of a MUTarget / TargetP style CSV (columns Entry, MOTIF, Sequence; others ignored) one by
    one as (entry, motif, raw sequence, line), read rows_per_read rows at a time. Errors: missing
    file, unreadable CSV, missing columns, empty Entry."""
    try:
        pieces = iter(pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=rows_per_read))
        first = next(pieces, None)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None
    if first is None:
        return
    missing = [c for c in ("Entry", "MOTIF", "Sequence") if c not in first.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, first.columns))}")
    row = 2
    try:
        for df in itertools.chain([first], pieces):
            for entry, motif, seq in zip(df["Entry"], df["MOTIF"], df["Sequence"]):
                entry = entry.strip()
                if not entry:
                    raise DataError(f"{path}: line {row}: empty Entry")
                yield entry, motif, seq, row
                row += 1
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None


def read_csv_file(path: Path) -> list[Protein]:
    """A MUTarget / TargetP style CSV with columns Entry, MOTIF, Sequence (others ignored)."""
    proteins, seen = [], {}
    for entry, motif, seq, row in iter_csv(path):
        where = f"{path}: line {row}, entry {entry!r}"
        if entry in seen:
            raise DataError(f"{where}: duplicate entry (first at line {seen[entry]})")
        seen[entry] = row
        proteins.append(make_protein(entry, seq, motif, where))
    return proteins


def iter_fasta(path: Path):
    """FASTA records one by one as (id, description, raw sequence, header line); multi-line records
    and blank lines allowed. Errors: missing file, header without id, sequence before the first
    header, no record at all."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    header, chunks, header_line = None, [], 0
    with open(path, encoding="utf-8-sig", errors="replace") as handle:  # -sig: a byte-order mark is dropped
        for lineno, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            if line.startswith(">"):
                if header is not None:
                    yield (*header, "".join(chunks), header_line)
                parts = line[1:].split(None, 1)
                if not parts:
                    raise DataError(f"{path}: line {lineno}: header without an identifier")
                header, chunks, header_line = (parts[0], parts[1] if len(parts) > 1 else ""), [], lineno
            elif header is None:
                raise DataError(f"{path}: line {lineno}: sequence data before the first '>' header")
            else:
                chunks.append(line)
    if header is None:
        raise DataError(f"{path}: no FASTA records found")
    yield (*header, "".join(chunks), header_line)


def read_fasta(path: Path) -> list[tuple[str, str, str]]:
    """FASTA -> [(id, description, raw sequence)] (see iter_fasta); duplicate ids are an error."""
    records = [record[:3] for record in iter_fasta(path)]
    ids = [r[0] for r in records]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise DataError(f"{path}: duplicate record id(s) {', '.join(dupes[:5])}")
    return records


def read_fasta_proteins(path: Path) -> list[Protein]:
    """FASTA records as proteins; a header like '>ID 1-85:dual' carries the MOTIF."""
    proteins = []
    for ident, desc, raw in read_fasta(path):
        where = f"{path}: record {ident!r}"
        proteins.append(make_protein(ident, raw, desc if MOTIF_RE.match(desc.split("|")[0] or "-") else "", where))
    return proteins


def find_data_files(root) -> dict:
    """Locate CSVs, partition.csv and dual.fasta in a flat folder or a MUTarget `data/` checkout."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data.root is not a folder")
    for base in (root, root / "parsed_EC7_v2", root / "data" / "parsed_EC7_v2"):
        csvs = sorted(base.glob("*_uniprot.csv"))
        if not csvs:
            continue
        for part in (base / "partition.csv", base / "split" / "type" / "partition.csv"):
            if part.is_file():
                break
        else:
            raise DataError(f"{base}: found {len(csvs)} *_uniprot.csv file(s) but no partition.csv "
                            f"(looked in {base} and {base / 'split' / 'type'})")
        dual = next((p for p in (base / "dual.fasta", base / "fasta" / "type" / "dual.fasta") if p.is_file()), None)
        return {"csvs": csvs, "partition": part, "dual": dual}
    raise DataError(f"{root}: no *_uniprot.csv files (expected a flat folder or a MUTarget data/ "
                    f"checkout with parsed_EC7_v2/)")


def read_partition(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None
    missing = [c for c in ("entry", "partition") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, df.columns))}")
    bad = df[~df["partition"].isin([str(k) for k in range(5)])]
    if len(bad):
        row = bad.index[0] + 2
        raise DataError(f"{path}: line {row}, entry {bad['entry'].iloc[0]!r}: partition "
                        f"{bad['partition'].iloc[0]!r} is not one of 0-4")
    dupes = df["entry"][df["entry"].duplicated()]
    if len(dupes):
        raise DataError(f"{path}: duplicate entry {dupes.iloc[0]!r}")
    return df


def load_proteins(root) -> tuple[list[Protein], np.ndarray]:
    """All proteins under `root` with their partition (0-4), checked for consistency."""
    files = find_data_files(root)
    proteins: list[Protein] = []
    for path in files["csvs"]:
        proteins.extend(read_csv_file(path))
    if files["dual"] is not None:
        proteins.extend(read_fasta_proteins(files["dual"]))
    first_seen = {}
    for p in proteins:
        if p.entry in first_seen:
            raise DataError(f"entry {p.entry!r} appears in both {first_seen[p.entry]} and {p.source}")
        first_seen[p.entry] = p.source
    part = read_partition(files["partition"])
    part_of = dict(zip(part["entry"], part["partition"].astype(int)))
    absent = [p for p in proteins if p.entry not in part_of]
    if absent:
        names = ", ".join(f"{p.entry!r} ({p.source})" for p in absent[:5])
        raise DataError(f"{files['partition']}: {len(absent)} entr{'y' if len(absent) == 1 else 'ies'} of the "
                        f"data missing from the partition file: {names}")
    unused = len(part_of) - len(proteins)
    if unused:
        warnings.warn(f"{files['partition']}: {unused} entries have no sequence in the data files; ignored")
    return proteins, np.array([part_of[p.entry] for p in proteins], dtype=np.int64)


def fold_indices(partitions: np.ndarray, fold: int) -> dict[str, np.ndarray]:
    """Fold k: valid = partition k, test = (k + 1) mod 5, train = the other three."""
    if not 0 <= fold <= 4:
        raise DataError(f"data.fold must be 0-4, got {fold}")
    valid, test = fold, (fold + 1) % 5
    return {"train": np.flatnonzero((partitions != valid) & (partitions != test)),
            "valid": np.flatnonzero(partitions == valid),
            "test": np.flatnonzero(partitions == test)}


# --------------------------------------------------------------------------- windows
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


def stitch_average(window_values: np.ndarray, starts, length: int) -> np.ndarray:
    """Average per-residue values of overlapping windows: [n_windows, W, ...] -> [length, ...]."""
    total = np.zeros((length,) + window_values.shape[2:], dtype=np.float64)
    count = np.zeros(length)
    for values, s in zip(window_values, starts):
        n = min(values.shape[0], length - s)
        total[s:s + n] += values[:n]
        count[s:s + n] += 1
    return total / count.reshape((-1,) + (1,) * (total.ndim - 1))


def tokenize(sequence: str) -> np.ndarray:
    """Residues -> ESM-2 token ids [L] (no BOS / EOS)."""
    return _TOKEN_LUT[np.frombuffer(sequence.encode("ascii"), dtype=np.uint8)]


# --------------------------------------------------------------------------- dataset
class LocalizationDataset(Dataset):
    """Proteins of one split. Item: dict with index, entry, tokens [L], labels [8],
    targets [8, L] and track_mask [8] (False = residue track unknown)."""

    def __init__(self, proteins: list[Protein], name: str = ""):
        self.proteins = proteins
        self.name = name
        self.tokens = [tokenize(p.sequence) for p in proteins]
        self.labels = np.stack([p.labels for p in proteins]) if proteins else np.zeros((0, NUM_CLASSES), np.uint8)
        self.lengths = np.array([len(p.sequence) for p in proteins], dtype=np.int64)
        self.sampler = None  # ContrastSampler when SupCon is on (training split only)
        self.augmenter = None  # Augmenter when train.augment is on (training split only)
        self.item_protein = np.arange(len(proteins))  # item -> protein (copies repeat proteins)

    def __len__(self):
        return len(self.item_protein)

    def __getitem__(self, item_index):
        index = int(self.item_protein[item_index])
        p = self.proteins[index]
        track_mask = np.ones(NUM_CLASSES, dtype=bool)
        track_mask[list(p.masked)] = False
        item = {"index": index, "entry": p.entry, "tokens": self.tokens[index], "labels": p.labels,
                "targets": p.targets, "track_mask": track_mask}
        if self.augmenter is not None:
            rng = self.augmenter.rng(item_index)
            if self.augmenter.apply:
                item["tokens"], item["mutated"] = self.augmenter.mutate(index, self.tokens[index], rng), True
            if self.augmenter.views > 1 and self.augmenter.active:
                item["views"] = [self.augmenter.mutate(index, self.tokens[index], rng) for _ in range(self.augmenter.views)]
        if self.sampler is not None and self.sampler.active:
            item["pos_neg"] = self.sampler.sample(index)
            samples = item["pos_neg"]["pos"] + item["pos_neg"]["neg"]
            item["pos_neg"]["tokens"] = {i: self.tokens[i] for i in samples}
            item["pos_neg"]["entries"] = {i: self.proteins[i].entry for i in samples}
        return item

    # SupCon: positives and negatives of an anchor (training split only; see ContrastSampler)
    def enable_supcon(self, n_pos: int, n_neg: int, hard_neg: bool = False, distance_map=None, seed: int = 0):
        self.sampler = ContrastSampler(self.labels, n_pos, n_neg, hard_neg, distance_map, seed)

    def set_epoch(self, epoch: int, contrastive: bool) -> None:
        """Sampling and mutations depend on (seed, epoch, item); `contrastive` turns pos_neg items
        (or views) on or off."""
        if self.sampler is not None:
            self.sampler.epoch, self.sampler.active = epoch, contrastive
        if self.augmenter is not None:
            self.augmenter.epoch, self.augmenter.active = epoch, contrastive

    def enable_augmentation(self, apply: bool, pos_rate: float, neg_rate: float, max_copies: int = 1,
                            views: int = 1, seed: int = 0) -> None:
        """MUTarget's mutation augmentation (training split only): see Augmenter. With apply, rarer
        classes get more copies per epoch (up to max_copies); views > 1 adds that many mutated
        views of each protein to every item (for the in-batch contrastive losses)."""
        self.augmenter = Augmenter(self.proteins, pos_rate, neg_rate, views, seed, apply)
        if apply and max_copies > 1:
            copies = self.augmenter.copies(self.labels, max_copies)
            self.item_protein = np.repeat(np.arange(len(self.proteins)), copies)

    def item_lengths(self) -> np.ndarray:
        return self.lengths[self.item_protein]

    def get_pos_samples(self, anchor_idx: int) -> list[int]:
        return self._contrast_sampler().sample(anchor_idx)["pos"]

    def get_neg_samples(self, anchor_idx: int) -> list[int]:
        return self._contrast_sampler().sample(anchor_idx)["neg"]

    def _contrast_sampler(self) -> "ContrastSampler":
        if self.sampler is None:  # build_datasets does not sample, even with supcon.apply
            raise RuntimeError(f"the {self.name!r} dataset has no positive / negative sampling: call "
                               "train.setup_supcon(config, model, dataset, device, log) (or dataset.enable_supcon("
                               "n_pos, n_neg, ...)) first")
        return self.sampler

    def class_counts(self) -> np.ndarray:
        return self.labels.sum(0).astype(np.int64)

    def residue_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """Positive and negative residues per class track over scored residues ([8], [8])."""
        pos, total = np.zeros(NUM_CLASSES), np.zeros(NUM_CLASSES)
        for p in self.proteins:
            scored = np.ones(NUM_CLASSES, dtype=bool)
            scored[list(p.masked)] = False
            pos += p.targets.sum(1) * scored
            total += len(p.sequence) * scored
        return pos, total - pos


class Collate:
    """Batch of proteins -> windows for the backbone plus protein-level tensors.

    Returns tokens [W, T] (BOS + residues + EOS, padded to the longest window of the batch),
    window_protein / window_start / window_len [W], window_keys [(entry, start)] * W,
    residue_mask [M, L], labels [B, 8],
    targets [B, 8, L] and target_mask [B, 8, L] (real residues of known tracks), lengths [M],
    indices [M], entries (list of B). M = B for plain batches.

    SupCon (items with 'pos_neg'): the B anchors come first, then every other distinct
    protein the anchors sampled, once each (M proteins in all; dedup=False gives every slot a
    row of its own); group_index [B, 1 + P + N] gives, per anchor, the rows of the anchor, its
    positives and its negatives.
    """

    def __init__(self, max_len: int = 1022, overlap: int = 200, dedup: bool = True):
        if not 0 <= overlap < max_len:
            raise ValueError(f"window overlap {overlap} must be in [0, max_len={max_len})")
        self.max_len, self.overlap, self.dedup = max_len, overlap, dedup

    def __call__(self, items):
        indices = [it["index"] for it in items]
        sequences = [it["tokens"] for it in items]
        entries = [it["entry"] for it in items]
        extended = "pos_neg" in items[0]
        if "views" in items[0]:  # in-batch contrastive losses: V mutated views per anchor, own rows
            groups = []
            for it in items:
                groups.append(list(range(len(indices), len(indices) + len(it["views"]))))
                indices += [it["index"]] * len(it["views"])
                sequences += it["views"]
                entries += [it["entry"]] * len(it["views"])
        elif extended:
            row = {idx: r for r, idx in enumerate(indices) if not items[r].get("mutated")}  # shareable rows
            groups = []
            for anchor_row, it in enumerate(items):
                group = [anchor_row]
                for idx in it["pos_neg"]["pos"] + it["pos_neg"]["neg"]:
                    if idx not in row or not self.dedup:  # dedup=False: every slot its own row
                        row[idx] = len(indices)
                        indices.append(idx)
                        sequences.append(it["pos_neg"]["tokens"][idx])
                        entries.append(it["pos_neg"]["entries"][idx])
                    group.append(row[idx])
                groups.append(group)
        lengths = [len(toks) for toks in sequences]
        windows = []  # (protein, start, token slice)
        for b, toks in enumerate(sequences):
            for s in window_starts(lengths[b], self.max_len, self.overlap):
                windows.append((b, s, toks[s:s + self.max_len]))
        width = max(len(w[2]) for w in windows) + 2
        tokens = torch.full((len(windows), width), PAD_IDX, dtype=torch.long)
        for w, (_, _, toks) in enumerate(windows):
            tokens[w, 0] = BOS_IDX
            tokens[w, 1:len(toks) + 1] = torch.from_numpy(toks)
            tokens[w, len(toks) + 1] = EOS_IDX
        L = max(lengths)
        residue_mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
        targets = torch.zeros(len(items), NUM_CLASSES, L)
        for b, it in enumerate(items):
            targets[b, :, :lengths[b]] = torch.from_numpy(it["targets"].astype(np.float32))
        track_mask = torch.from_numpy(np.stack([it["track_mask"] for it in items]))
        batch = {
            "tokens": tokens,
            "window_protein": torch.tensor([w[0] for w in windows]),
            "window_start": torch.tensor([w[1] for w in windows]),
            "window_len": torch.tensor([len(w[2]) for w in windows]),
            "window_keys": [(entries[w[0]], w[1]) for w in windows],  # identify windows across batches
            "residue_mask": residue_mask,
            "labels": torch.from_numpy(np.stack([it["labels"] for it in items]).astype(np.float32)),
            "targets": targets,
            "target_mask": residue_mask[:len(items), None, :] & track_mask[:, :, None],
            "lengths": torch.tensor(lengths),
            "indices": torch.tensor(indices),
            "entries": entries[:len(items)],
        }
        if extended:
            batch["fallback"] = torch.tensor([[it["pos_neg"][k] for k in FALLBACKS] for it in items]).sum(0)
        if extended or "views" in items[0]:
            batch["group_index"] = torch.tensor(groups)
        return batch


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A permutation that depends only on (seed, epoch): resumed runs replay the same order."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self):
        return self.n


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batches of similar length, reshuffled every epoch; every sample once per epoch.

    Each epoch: a permutation depending on (seed, epoch) is cut into pools of
    `pool_batches * batch_size` proteins; each pool is sorted by length and cut into batches;
    the batches of all pools are shuffled. Yields lists of indices (a batch_sampler).
    """

    def __init__(self, lengths, batch_size: int, seed: int, pool_batches: int = 64):
        self.lengths, self.batch_size, self.seed = np.asarray(lengths), batch_size, seed
        self.pool = batch_size * pool_batches
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).numpy()
        batches = []
        for start in range(0, len(perm), self.pool):
            pool = perm[start:start + self.pool]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            batches += [pool[i:i + self.batch_size].tolist() for i in range(0, len(pool), self.batch_size)]
        order = torch.randperm(len(batches), generator=g).tolist()
        return iter([batches[i] for i in order])

    def __len__(self):
        n, pool, size = len(self.lengths), self.pool, self.batch_size
        return sum(-(-min(pool, n - start) // size) for start in range(0, n, pool))


class RankSlice(torch.utils.data.Sampler):
    """This process's part of every global batch, for DistributedDataParallel: the global batch
    sampler (same on every rank, seeded by (seed, epoch)) is cut into `world` near-equal
    contiguous parts and rank r yields part r (never empty: a too-small batch lends its first
    protein). The ranks together see exactly the global batch of a single-process run."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self):
        for batch in self.batches:
            part = np.array_split(np.asarray(batch), self.world)[self.rank]
            yield part.tolist() if len(part) else [batch[0]]

    def __len__(self):
        return len(self.batches)


def length_sorted_batches(lengths, batch_size: int) -> list[list[int]]:
    """Evaluation batches of similar lengths (less padding); order is restored by indices."""
    order = np.argsort(lengths, kind="stable")
    return [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]


STANDARD = np.array([4 + _ESM_TOKENS.index(a) for a in "ACDEFGHIKLMNPQRSTVWY"])  # token ids of the 20
_STANDARD_POSITION = np.full(64, -1)
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
    try:
        text = path.read_bytes().decode("utf-8")
        tree = json.loads(text)
    except OSError as err:
        raise DataError(f"{path}: cannot read the class distance map ({err.strerror or err})") from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not a class distance map: not UTF-8 text (a binary file?)") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not a class distance map: invalid JSON ({err})") from None
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


def build_datasets(config) -> dict[str, LocalizationDataset]:
    """{'train', 'valid', 'test'} datasets of fold `data.fold` under `data.root`."""
    root = Path(config.data.root)
    synth = config.data.synthetic
    if synth.generate and not (root / "partition.csv").is_file():
        make_synthetic_dataset(root, synth.n_proteins, synth.seed)
    proteins, partitions = load_proteins(root)
    split = fold_indices(partitions, config.data.fold)
    return {name: LocalizationDataset([proteins[i] for i in idx], name) for name, idx in split.items()}


# --------------------------------------------------------------------------- synthetic data
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
