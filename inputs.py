"""Streaming input of predict.py: FASTA or labelled CSV records read one at a time, in chunks.

scan() reads the whole input once, before anything is predicted, and keeps no sequences: it checks
every record (bad ones are listed by one error, each with its file, line and id, or with skip_invalid
an invalid sequence is a skipped record), finds duplicate ids (8-byte digests of the ids, not the ids
themselves, are held) and counts the records to predict. chunks() then reads the input again and
yields lists of at most chunk_size proteins in input order, so memory depends on the chunk size, not on
the input size.
"""
from __future__ import annotations

import hashlib
import itertools
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

import data
from data import DataError, Problems


@dataclass
class Source:
    """The input: kind 'fasta' or 'csv' (labelled MUTarget / TargetP CSV: Entry, MOTIF, Sequence)."""

    path: Path
    kind: str
    skip_invalid: bool = False


@dataclass
class Record:
    """One input record before checking: its id, MOTIF labels ('' for FASTA), raw sequence,
    line (FASTA header line / CSV line) and `where`, the prefix of error messages."""

    entry: str
    motif: str
    raw: str
    line: int
    where: str


@dataclass
class Skipped:
    """A record left out by --skip-invalid: id, line in the input, reason."""

    entry: str
    line: int
    reason: str


@dataclass
class Scan:
    """What scan() learnt: records to predict, records skipped, which of the wanted ids are there."""

    n_valid: int = 0
    skipped: list = field(default_factory=list)
    found: set = field(default_factory=set)


def fasta_records(path: Path, problems: Problems | None = None) -> Iterator[Record]:
    """FASTA records one by one, with the errors of data.iter_fasta (records with a bad id added to
    `problems`, when given, and left out)."""
    for ident, _, raw, line in data.iter_fasta(path, problems):
        yield Record(ident, "", raw, line, f"{path}: line {line}, record {ident!r}")


def csv_records(path: Path, rows_per_read: int = 10000, problems: Problems | None = None) -> Iterator[Record]:
    """Rows of a labelled CSV (columns Entry, MOTIF, Sequence; others ignored) one by one, read in
    pieces of rows_per_read rows, with the errors of data.iter_csv; no row at all is an error too."""
    n = 0
    for entry, motif, seq, row in data.iter_csv(path, rows_per_read, problems):
        n += 1
        yield Record(entry, motif, seq, row, f"{path}: line {row}, entry {entry!r}")
    if n == 0 and not (problems is not None and problems.count):
        raise DataError(f"{path}: no proteins")


def records(source: Source, problems: Problems | None = None) -> Iterator[Record]:
    if source.kind == "fasta":
        return fasta_records(source.path, problems)
    return csv_records(source.path, problems=problems)


def check_sequence(record: Record, source: Source) -> Skipped | None:
    """None for a usable sequence; a Skipped for an invalid or empty one under skip_invalid;
    otherwise the DataError naming the record."""
    try:
        data.clean_sequence(record.raw, record.where)
    except DataError as err:
        if not source.skip_invalid:
            raise
        reason = str(err)
        if reason.startswith(record.where + ": "):
            reason = reason[len(record.where) + 2:]
        return Skipped(record.entry, record.line, reason)
    return None


def _digest(entry: str) -> int:
    return int.from_bytes(hashlib.blake2b(entry.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def scan(source: Source, wanted=()) -> Scan:
    """Check the whole input once (see the module docstring); `wanted` ids found among the records
    to predict are returned in Scan.found. Reads to the end, then raises one DataError listing the bad
    records (data.Problems: the first data.MAX_LISTED, then a count): an id, a label or (unless
    skip_invalid) a sequence at fault, and duplicate ids."""
    if source.path.exists() and not source.path.is_file():
        raise DataError(f"{source.path}: not a regular file; the input is read twice (checked in full, then "
                        f"predicted chunk by chunk), so a pipe cannot serve: save it to a file first")
    result, digests, wanted, problems = Scan(), array("Q"), set(wanted), Problems()
    for record in records(source, problems):
        digests.append(_digest(record.entry))
        try:
            skipped = check_sequence(record, source)
            if skipped is not None:
                result.skipped.append(skipped)
                continue
            if source.kind == "csv":  # label errors are errors even with skip_invalid
                data.parse_motif(record.motif, len(data.clean_sequence(record.raw, record.where)), record.where)
        except DataError as err:
            problems.add(err)
            continue
        result.n_valid += 1
        if record.entry in wanted:
            result.found.add(record.entry)
    values = np.frombuffer(digests, dtype=np.uint64)
    ordered = np.sort(values)
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    if repeated:
        for message in duplicates(source, repeated):
            problems.add(message)
    problems.check(source.path)
    return result


def duplicates(source: Source, repeated: set) -> Iterator[str]:
    """An error message for each record whose id an earlier record has, among the records whose id digest
    is in `repeated` (none when the digests collided for different ids)."""
    first = {}
    for record in records(source, Problems()):  # records with a bad id: scan() has them already
        if _digest(record.entry) not in repeated:
            continue
        if record.entry in first:
            what = "entry" if source.kind == "csv" else "record id"
            yield f"{record.where}: duplicate {what} (first at line {first[record.entry]})"
        else:
            first[record.entry] = record.line


def proteins(source: Source) -> Iterator[data.Protein]:
    """The records to predict, in input order, as proteins (records skipped by scan() left out)."""
    for record in records(source):
        if check_sequence(record, source) is None:
            yield data.make_protein(record.entry, record.raw, record.motif, record.where)


def chunks(source: Source, chunk_size: int) -> Iterator[list[data.Protein]]:
    """Lists of at most chunk_size proteins, in input order; the next list is read only when asked for."""
    it = proteins(source)
    while True:
        chunk = list(itertools.islice(it, chunk_size))
        if not chunk:
            return
        yield chunk
