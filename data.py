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

from config import relative_note, relative_text
from problems import MAX_LISTED, DataError, Problems, report  # noqa: F401  (DataError: raised by data)
from synthetic import make_synthetic_dataset
from vocab import CLASS_INDEX, CLASSES, NUM_CLASSES, RESIDUES, SEGMENT_CLASSES, tokenize

MOTIF_RE = re.compile(r"^\s*(\d{1,9})\s*-\s*(\d{1,9})\s*:\s*([A-Za-z_]+)\s*$")  # positions below 10^9
MAX_ID_CHARS = 1000  # a record id longer than this is an error: ids are names (UniProt's are 6-10 characters), and
# every output repeats them (a 1 MB id made a 1.1 GB plot and, padded, a 400 MB embeddings file)


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
def id_problem(entry: str, where: str) -> str | None:
    """The error message for a record id longer than MAX_ID_CHARS, naming the record; None for a fine id."""
    if len(entry) <= MAX_ID_CHARS:
        return None
    return (f"{where}: an id of {len(entry)} characters ({entry[:40]!r}...); ids longer than {MAX_ID_CHARS} "
            f"characters are refused (a FASTA id is the header's first word)")


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


def iter_csv(path: Path, rows_per_read: int = 10000, problems: Problems | None = None):
    """Rows of a MUTarget / TargetP style CSV (columns Entry, MOTIF, Sequence; others ignored) one by
    one as (entry, motif, raw sequence, line), read rows_per_read rows at a time. Errors: missing
    file, a file cut in the middle of a record, unreadable CSV, missing columns; a row with an empty or
    over-long Entry is left out and added to `problems` (without it: raised)."""
    check_complete(path)
    try:
        pieces = iter(pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=rows_per_read))
        first = next(pieces, None)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found{relative_note(path)}") from None
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
                problem = f"{path}: line {row}: empty Entry" if not entry else id_problem(entry, f"{path}: line {row}")
                if problem is None:
                    yield entry, motif, seq, row
                else:
                    report(problems, problem)
                row += 1
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None


def read_csv_file(path: Path, problems: Problems | None = None) -> list[Protein]:
    """A MUTarget / TargetP style CSV with columns Entry, MOTIF, Sequence (others ignored). Bad records are
    added to `problems` and left out; without it every record is read, then one DataError lists the bad ones."""
    own = problems is None
    problems = Problems() if own else problems
    proteins, seen = [], {}
    for entry, motif, seq, row in iter_csv(path, problems=problems):
        where = f"{path}: line {row}, entry {entry!r}"
        if entry in seen:
            problems.add(f"{where}: duplicate entry (first at line {seen[entry]})")
            continue
        seen[entry] = row
        try:
            proteins.append(make_protein(entry, seq, motif, where))
        except DataError as err:
            problems.add(err)
    if own:
        problems.check(path)
    return proteins


def iter_fasta(path: Path, problems: Problems | None = None):
    """FASTA records one by one as (id, description, raw sequence, header line); multi-line records
    and blank lines allowed. Errors: missing file, sequence before the first header, no record at all;
    a record whose header has no id or an over-long one is left out and added to `problems` (without
    it: raised)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found{relative_note(path)}")
    header, chunks, header_line, seen_header = None, [], 0, False  # header None: no record being read
    with open(path, encoding="utf-8-sig", errors="replace") as handle:  # -sig: a byte-order mark is dropped
        for lineno, line in enumerate(handle, start=1):
            line = line.strip()
            if not line:
                continue
            if line.startswith(">"):
                if header is not None:
                    yield (*header, "".join(chunks), header_line)
                seen_header, header, chunks, header_line = True, None, [], lineno
                parts = line[1:].split(None, 1)
                problem = (f"{path}: line {lineno}: header without an identifier" if not parts
                           else id_problem(parts[0], f"{path}: line {lineno}"))
                if problem is None:
                    header = (parts[0], parts[1] if len(parts) > 1 else "")
                else:
                    report(problems, problem)  # the record's sequence lines are passed over
            elif not seen_header:
                raise DataError(f"{path}: line {lineno}: sequence data before the first '>' header")
            elif header is not None:
                chunks.append(line)
    if not seen_header:
        raise DataError(f"{path}: no FASTA records found")
    if header is not None:
        yield (*header, "".join(chunks), header_line)


def fasta_records(path: Path, problems: Problems) -> list[tuple[str, str, str, int]]:
    """FASTA -> [(id, description, raw sequence, header line)] (see iter_fasta); a duplicate id is a problem
    naming both lines, and its later records are left out."""
    records, first = [], {}
    for record in iter_fasta(path, problems):
        ident, line = record[0], record[3]
        if ident in first:
            problems.add(f"{path}: line {line}, record {ident!r}: duplicate record id (first at line {first[ident]})")
            continue
        first[ident] = line
        records.append(record)
    return records


def read_fasta(path: Path) -> list[tuple[str, str, str]]:
    """FASTA -> [(id, description, raw sequence)] (see iter_fasta); duplicate ids are errors, listed with the
    file's other bad records in one DataError."""
    problems = Problems()
    records = fasta_records(path, problems)
    problems.check(path)
    return [record[:3] for record in records]


def read_fasta_proteins(path: Path, problems: Problems | None = None) -> list[Protein]:
    """FASTA records as proteins; a header like '>ID 1-85:dual' carries the MOTIF. Bad records as in
    read_csv_file."""
    own = problems is None
    problems = Problems() if own else problems
    proteins = []
    for ident, desc, raw, line in fasta_records(path, problems):
        where = f"{path}: line {line}, record {ident!r}"
        try:
            proteins.append(make_protein(ident, raw, desc if MOTIF_RE.match(desc.split("|")[0] or "-") else "",
                                         where))
        except DataError as err:
            problems.add(err)
    if own:
        problems.check(path)
    return proteins


def root_error(root: Path) -> DataError:
    """data.root is not a folder: the error naming the key (and, for a relative path, the absolute path it
    stands for: relative paths are read from the current directory)."""
    what = "a file" if root.is_file() else "not a folder" if root.exists() else "it does not exist"
    relative = relative_text(root)
    return DataError(f"data.root: {root} is not a folder ({what}{'; ' + relative if relative else ''})")


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
                    f"checkout with parsed_EC7_v2/){relative_note(root)}")


def read_partition(path: Path, problems: Problems | None = None) -> pd.DataFrame:
    """partition.csv (columns entry, partition; others ignored). Unreadable file or missing columns: DataError;
    rows whose partition is not 0-4 and repeated entries: added to `problems` (without it: one DataError listing
    them), and left out."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV file ({err})") from None
    missing = [c for c in ("entry", "partition") if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(map(str, df.columns))}")
    own = problems is None
    problems = Problems() if own else problems
    bad = ~df["partition"].isin([str(k) for k in range(5)])
    repeated = df["entry"].duplicated() & ~bad
    if bad.any() or repeated.any():  # per row only when something is wrong: the real file has 5,000 rows
        first_line = {}
        for index, entry, part, wrong in zip(df.index, df["entry"], df["partition"], bad):
            line = index + 2  # the header is line 1
            if wrong:
                problems.add(f"{path}: line {line}, entry {entry!r}: partition {short(part)} is not one of 0-4")
            elif entry in first_line:
                problems.add(f"{path}: line {line}, entry {entry!r}: duplicate entry (first at line "
                             f"{first_line[entry]})")
            else:
                first_line[entry] = line
        df = df[~bad & ~repeated]
    if own:
        problems.check(path)
    return df


def load_proteins(root) -> tuple[list[Protein], np.ndarray]:
    """All proteins under `root` with their partition (0-4), checked for consistency. Every file is read to the
    end: one DataError lists the bad records of all of them (the first MAX_LISTED, then a count)."""
    files = find_data_files(root)
    problems = Problems()
    proteins: list[Protein] = []
    for path, read in [(path, read_csv_file) for path in files["csvs"]] + (
            [(files["dual"], read_fasta_proteins)] if files["dual"] is not None else []):
        try:
            proteins.extend(read(path, problems))
        except DataError as err:  # the file as a whole (unreadable, a column missing): the others still read
            problems.add(err)
    first_seen, unique = {}, []
    for p in proteins:
        if p.entry in first_seen:
            problems.add(f"entry {p.entry!r} appears in both {first_seen[p.entry]} and {p.source}")
        else:
            first_seen[p.entry] = p.source
            unique.append(p)
    proteins = unique
    try:
        part = read_partition(files["partition"], problems)
    except DataError as err:
        problems.add(err)
        part = None
    if part is not None:
        part_of = dict(zip(part["entry"], part["partition"].astype(int)))
        absent = [p for p in proteins if p.entry not in part_of]
        if absent:
            names = ", ".join(f"{p.entry!r} ({p.source})" for p in absent[:MAX_LISTED])
            more = f" and {len(absent) - MAX_LISTED} more" if len(absent) > MAX_LISTED else ""
            problems.add(f"{files['partition']}: {len(absent)} entr{'y' if len(absent) == 1 else 'ies'} of the "
                         f"data missing from the partition file: {names}{more}")
    problems.check(f"the data under {root}")
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


