"""Streaming input of predict.py: FASTA or labelled CSV records read one at a time, in chunks.

scan() reads the whole input once, before anything is predicted, and keeps no sequences: it checks
every record (a bad one is an error naming the file and the record, or with skip_invalid a skipped
record), finds duplicate ids (8-byte digests of the ids, not the ids themselves, are held) and counts
the records to predict. chunks() then reads the input again and yields lists of at most chunk_size
proteins in input order, so memory depends on the chunk size, not on the input size.
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
from data import DataError


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


def fasta_records(path: Path) -> Iterator[Record]:
    """FASTA records one by one, with the errors of data.iter_fasta."""
    for ident, _, raw, line in data.iter_fasta(path):
        yield Record(ident, "", raw, line, f"{path}: record {ident!r}")


def csv_records(path: Path, rows_per_read: int = 10000) -> Iterator[Record]:
    """Rows of a labelled CSV (columns Entry, MOTIF, Sequence; others ignored) one by one, read in
    pieces of rows_per_read rows, with the errors of data.iter_csv; no row at all is an error too."""
    n = 0
    for entry, motif, seq, row in data.iter_csv(path, rows_per_read):
        n += 1
        yield Record(entry, motif, seq, row, f"{path}: line {row}, entry {entry!r}")
    if n == 0:
        raise DataError(f"{path}: no proteins")


def records(source: Source) -> Iterator[Record]:
    return fasta_records(source.path) if source.kind == "fasta" else csv_records(source.path)


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
    to predict are returned in Scan.found. Raises DataError on the first bad record (unless
    skip_invalid and the problem is the sequence) and on duplicate ids."""
    if source.path.exists() and not source.path.is_file():
        raise DataError(f"{source.path}: not a regular file; the input is read twice (checked in full, then "
                        f"predicted chunk by chunk), so a pipe cannot serve: save it to a file first")
    result, digests, wanted = Scan(), array("Q"), set(wanted)
    for record in records(source):
        digests.append(_digest(record.entry))
        skipped = check_sequence(record, source)
        if skipped is not None:
            result.skipped.append(skipped)
            continue
        if source.kind == "csv":  # label errors are errors even with skip_invalid
            data.parse_motif(record.motif, len(data.clean_sequence(record.raw, record.where)), record.where)
        result.n_valid += 1
        if record.entry in wanted:
            result.found.add(record.entry)
    values = np.frombuffer(digests, dtype=np.uint64)
    ordered = np.sort(values)
    repeated = set(ordered[1:][ordered[1:] == ordered[:-1]].tolist())
    error = duplicate_error(source, repeated) if repeated else None
    if error is not None:
        raise error
    return result


def duplicate_error(source: Source, repeated: set) -> DataError | None:
    """The DataError naming the duplicate ids among the records whose id digest is in `repeated`
    (None when the digests collided for different ids)."""
    first, dupes = {}, []
    for record in records(source):
        if _digest(record.entry) not in repeated:
            continue
        if record.entry in first:
            dupes.append((record, first[record.entry]))
        else:
            first[record.entry] = record.line
    if not dupes:  # two different ids with the same 64-bit digest: no duplicate after all
        return None
    if source.kind == "csv":
        record, line = dupes[0]
        return DataError(f"{record.where}: duplicate entry (first at line {line})")
    listed = ", ".join(f"{r.entry!r} (lines {line} and {r.line})" for r, line in dupes[:5])
    more = f" and {len(dupes) - 5} more" if len(dupes) > 5 else ""
    return DataError(f"{source.path}: duplicate record id(s) {listed}{more}")


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
