"""MUTarget data: reading and checking CSV / partition / FASTA files, protein and residue targets by
MUTarget's rules, the five-fold split and the dataset of one split."""
from __future__ import annotations

import itertools
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import Dataset

from synthetic import make_synthetic_dataset
from vocab import CLASS_INDEX, CLASSES, NUM_CLASSES, RESIDUES, SEGMENT_CLASSES, tokenize

MOTIF_RE = re.compile(r"^\s*(\d{1,9})\s*-\s*(\d{1,9})\s*:\s*([A-Za-z_]+)\s*$")  # positions below 10^9
MAX_ID_CHARS = 1000  # a record id longer than this is an error: ids are names (UniProt's are 6-10 characters), and
# every output repeats them (a 1 MB id made a 1.1 GB plot and, padded, a 400 MB embeddings file)


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
    """Uppercase (ASCII letters only), drop ASCII whitespace and one trailing '*'; raise DataError on anything else
    (a non-ASCII letter such as 'ı' or 'ﬀ' is an error, not the residue its uppercase spells)."""
    if not isinstance(raw, str):
        raise DataError(f"{where}: empty sequence")
    seq = re.sub(r"\s+", "", raw, flags=re.ASCII)
    if not seq.isascii():
        pos, ch = next((i, c) for i, c in enumerate(seq) if not c.isascii())
        raise DataError(f"{where}: invalid character {ch!r} (U+{ord(ch):04X}) at position {pos + 1}; sequences "
                        f"hold the ASCII letters {RESIDUES} only")
    seq = seq.upper()
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


def short(text: str, limit: int = 60) -> str:
    """repr of text, cut to about `limit` characters (error messages quote the input, never all of it)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def parse_motif(text, length: int, where: str) -> list[tuple[str, int, int]]:
    """'1-25:SIGNAL|4-11:Nucleus' -> [(label, start, end)] (1-based, inclusive). Empty -> []."""
    if text is None or (isinstance(text, float) and np.isnan(text)) or not str(text).strip():
        return []
    out = []
    for part in str(text).split("|"):
        m = MOTIF_RE.match(part)
        if not m:
            raise DataError(f"{where}: MOTIF part {short(part)} does not parse as 'start-end:Label' (positions "
                            f"up to 9 digits)")
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
def check_id(entry: str, where: str) -> None:
    """A record id longer than MAX_ID_CHARS is a DataError naming the record."""
    if len(entry) > MAX_ID_CHARS:
        raise DataError(f"{where}: an id of {len(entry)} characters ({entry[:40]!r}...); ids longer than "
                        f"{MAX_ID_CHARS} characters are refused (a FASTA id is the header's first word)")


def check_complete(path: Path) -> None:
    """A CSV whose last byte is not a line break ends in the middle of a record: the file was cut (a copy or a
    download that stopped), and its last sequence would be read short. DataError naming the file."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            if size == 0:
                return
            handle.seek(size - 1)
            last = handle.read(1)
    except OSError:  # missing or unreadable: pandas says which
        return
    if last not in (b"\n", b"\r"):
        raise DataError(f"{path}: the file ends in the middle of a line, so its last record looks cut off (an "
                        f"interrupted copy or download?); if the file is complete, end it with a line break")


def iter_csv(path: Path, rows_per_read: int = 10000):
    """Rows of a MUTarget / TargetP style CSV (columns Entry, MOTIF, Sequence; others ignored) one by
    one as (entry, motif, raw sequence, line), read rows_per_read rows at a time. Errors: missing
    file, a file cut in the middle of a record, unreadable CSV, missing columns, empty or over-long Entry."""
    check_complete(path)
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
                check_id(entry, f"{path}: line {row}")
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
                check_id(parts[0], f"{path}: line {lineno}")
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


def root_error(root: Path) -> DataError:
    """data.root is not a folder: the error naming the key (and, for a relative path, the folder it is read from)."""
    what = "a file" if root.is_file() else "not a folder" if root.exists() else "it does not exist"
    relative = "" if root.is_absolute() else f"; a relative path is read from the current folder, {Path.cwd()}"
    return DataError(f"data.root: {root} is not a folder ({what}{relative})")


def find_data_files(root) -> dict:
    """Locate CSVs, partition.csv and dual.fasta in a flat folder or a MUTarget `data/` checkout."""
    root = Path(root)
    if not root.is_dir():
        raise root_error(root)
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
        self.sampler = None  # contrast.ContrastSampler when SupCon is on (training split only)
        self.augmenter = None  # contrast.Augmenter when mutations are on (training split only)
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

    def set_epoch(self, epoch: int, contrastive: bool) -> None:
        """Sampling and mutations depend on (seed, epoch, item); `contrastive` turns pos_neg items
        (or views) on or off."""
        if self.sampler is not None:
            self.sampler.epoch, self.sampler.active = epoch, contrastive
        if self.augmenter is not None:
            self.augmenter.epoch, self.augmenter.active = epoch, contrastive

    def item_lengths(self) -> np.ndarray:
        return self.lengths[self.item_protein]

    def get_pos_samples(self, anchor_idx: int) -> list[int]:
        return self._contrast_sampler().sample(anchor_idx)["pos"]

    def get_neg_samples(self, anchor_idx: int) -> list[int]:
        return self._contrast_sampler().sample(anchor_idx)["neg"]

    def _contrast_sampler(self):
        if self.sampler is None:  # build_datasets does not sample, even with supcon.apply
            raise RuntimeError(f"the {self.name!r} dataset has no positive / negative sampling: call "
                               "contrast.setup_supcon(config, model, dataset, device, log) (or contrast.enable_supcon("
                               "dataset, n_pos, n_neg, ...)) first")
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


def build_datasets(config) -> dict[str, LocalizationDataset]:
    """{'train', 'valid', 'test'} datasets of fold `data.fold` under `data.root`."""
    root = Path(config.data.root)
    synth = config.data.synthetic
    if root.exists() and not root.is_dir():  # before generating into it
        raise root_error(root)
    if synth.generate and not (root / "partition.csv").is_file():
        make_synthetic_dataset(root, synth.n_proteins, synth.seed)
    proteins, partitions = load_proteins(root)
    split = fold_indices(partitions, config.data.fold)
    return {name: LocalizationDataset([proteins[i] for i in idx], name) for name, idx in split.items()}


