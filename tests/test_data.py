"""Targets, windows, folds, datasets and bad input of data.py."""

from pathlib import Path

import numpy as np
import pytest
from conftest import REAL_DATA
from helpers import protein

import data
import synthetic
import utils
import vocab
from data import DataError
from vocab import CLASS_INDEX as C


def ones(p, name):
    return np.flatnonzero(p.targets[C[name]]).tolist()


# ---------------------------------------------------------------- target rules (0-based positions)
def test_site_classes_mark_last_residue_of_peptide():
    for name in ("SIGNAL", "Mitochondrion", "chloroplast"):
        p = protein(f"1-25:{name}")
        assert p.labels.tolist() == [int(c == name) for c in vocab.CLASSES]
        assert ones(p, name) == [24]
        assert p.targets.sum() == 1 and p.masked == ()


def test_er_marks_first_residue_of_motif():
    p = protein("1-20:SIGNAL|97-100:ER")
    assert ones(p, "ER") == [96] and ones(p, "SIGNAL") == [19]
    assert p.labels[C["ER"]] == p.labels[C["SIGNAL"]] == 1 and p.labels.sum() == 2


def test_peroxisome_pts1_first_residue_pts2_last_residue():
    assert ones(protein("98-100:Peroxisome"), "Peroxisome") == [97]   # PTS1 (C-terminal)
    assert ones(protein("1-9:Peroxisome"), "Peroxisome") == [8]       # PTS2 (starts at 1)
    assert ones(protein("15-23:Peroxisome"), "Peroxisome") == [14]    # not at 1: first residue


def test_nls_nes_segments_cover_every_residue():
    p = protein("4-11:Nucleus|59-67:Nucleus_export|30-33:Nucleus")
    assert ones(p, "Nucleus") == list(range(3, 11)) + list(range(29, 33))
    assert ones(p, "Nucleus_export") == list(range(58, 67))
    assert p.labels.sum() == 2


def test_thylakoid_implies_chloroplast_site_before_it():
    p = protein("33-77:Thylakoid")
    assert ones(p, "Thylakoid") == [76]
    assert ones(p, "chloroplast") == [31]  # residue 32 (1-based): just before the thylakoid peptide
    assert p.labels[C["chloroplast"]] == 1 and p.masked == ()


def test_thylakoid_from_residue_one_masks_chloroplast_track():
    p = protein("1-105:Thylakoid", length=200)
    assert p.labels[C["chloroplast"]] == 1 and p.labels[C["Thylakoid"]] == 1
    assert ones(p, "chloroplast") == [] and p.masked == (C["chloroplast"],)
    item = data.LocalizationDataset([p])[0]
    assert item["track_mask"].tolist() == [c != "chloroplast" for c in vocab.CLASSES]


def test_thylakoid_from_one_with_explicit_chloroplast_is_known():
    p = protein("1-60:Thylakoid|1-30:chloroplast")
    assert p.masked == () and ones(p, "chloroplast") == [29]


def test_dual_is_mitochondrion_and_chloroplast_at_presequence_end():
    p = protein("1-85:dual", length=300)
    assert p.labels.sum() == 2
    assert ones(p, "Mitochondrion") == [84] and ones(p, "chloroplast") == [84]


def test_empty_motif_is_other():
    p = protein("")
    assert p.labels.sum() == 0 and p.targets.sum() == 0


def test_sequence_cleaning():
    assert data.clean_sequence("mkt lw\n*", "x") == "MKTLW"
    assert data.clean_sequence("MKBZUX", "x") == "MKBZUX"
    with pytest.raises(DataError, match=r"record 'Q1'.*invalid residue.*'J'.*position 3"):
        data.clean_sequence("MKJ", "f.fa: record 'Q1'")
    with pytest.raises(DataError, match="empty sequence"):
        data.clean_sequence("*", "f.fa: record 'Q1'")


# ---------------------------------------------------------------- real data
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="shared MUTarget data not present")
def test_real_data_counts_and_folds():
    proteins, partitions = data.load_proteins(REAL_DATA)
    assert len(proteins) == 5283 + 17
    labels = np.stack([p.labels for p in proteins])
    counts = dict(zip(vocab.CLASSES, labels.sum(0).tolist()))
    # facts doc: SIGNAL 3226, Nucleus 635, ER 146, NES 125, Peroxisome 62, Thylakoid 46;
    # Mitochondrion 793 + 17 dual; chloroplast 348 + 17 dual + Thylakoid-only proteins.
    assert counts["SIGNAL"] == 3226 and counts["Nucleus"] == 635 and counts["ER"] == 146
    assert counts["Nucleus_export"] == 125 and counts["Peroxisome"] == 62 and counts["Thylakoid"] == 46
    assert counts["Mitochondrion"] == 793 + 17
    thylakoid_only = sum(1 for p in proteins if p.labels[C["Thylakoid"]]
                         and not any(a[0] == "chloroplast" for a in p.annotations))
    assert counts["chloroplast"] == 348 + 17 + thylakoid_only
    assert labels.sum(1).min() >= 1  # every training protein has a signal
    for fold in range(5):
        split = data.fold_indices(partitions, fold)
        sets = [set(split[k].tolist()) for k in ("train", "valid", "test")]
        assert sum(map(len, sets)) == len(proteins) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
        assert set(partitions[split["valid"]]) == {fold} and set(partitions[split["test"]]) == {(fold + 1) % 5}
    for p in proteins:  # every residue target lies inside its sequence and on a labelled class
        assert p.targets.shape == (8, len(p.sequence))
        assert ((p.targets.sum(1) > 0) <= p.labels.astype(bool)).all()


def test_upstream_checkout_layout(tmp_path):
    synthetic.make_synthetic_dataset(tmp_path / "flat", 40, 0)
    base = tmp_path / "checkout" / "data" / "parsed_EC7_v2"
    (base / "split" / "type").mkdir(parents=True)
    (base / "fasta" / "type").mkdir(parents=True)
    (base / "SYNTHETIC_uniprot.csv").write_text((tmp_path / "flat" / "SYNTHETIC_uniprot.csv").read_text())
    (base / "split" / "type" / "partition.csv").write_text((tmp_path / "flat" / "partition.csv").read_text())
    (base / "fasta" / "type" / "dual.fasta").write_text((tmp_path / "flat" / "dual.fasta").read_text())
    flat = data.load_proteins(tmp_path / "flat")
    for root in (tmp_path / "checkout" / "data", tmp_path / "checkout"):
        nested = data.load_proteins(root)
        assert [p.entry for p in nested[0]] == [p.entry for p in flat[0]]
        assert (nested[1] == flat[1]).all()


# ---------------------------------------------------------------- bad input
def write_dataset(root, rows, partition=None, header="Entry,MOTIF,LOCATION,Sequence"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "X_uniprot.csv").write_text(header + "\n" + "".join(r + "\n" for r in rows))
    entries = partition if partition is not None else [r.split(",")[0] for r in rows]
    (root / "partition.csv").write_text("entry,type,group,partition\n" +
                                        "".join(f"{e},SIGNAL,{i},{i % 5}\n" for i, e in enumerate(entries)))
    return root


GOOD = "P1,1-5:SIGNAL,x,MKTAYIAKQR"


@pytest.mark.parametrize("rows,pattern", [
    ([GOOD, "P2,1-5SIGNAL,x,MKTAYIAKQR"], r"line 3, entry 'P2'.*'1-5SIGNAL' does not parse"),
    ([GOOD, "P2,3-40:SIGNAL,x,MKTAYIAKQR"], r"entry 'P2'.*outside the sequence \(length 10\)"),
    ([GOOD, "P2,1-5:Golgi,x,MKTAYIAKQR"], r"entry 'P2'.*unknown label 'Golgi'"),
    ([GOOD, "P1,1-5:SIGNAL,x,MKTAYIAKQR"], r"line 3, entry 'P1'.*duplicate entry"),
    ([GOOD, "P2,,x,"], r"entry 'P2'.*empty sequence"),
    ([GOOD, "P2,1-5:SIGNAL,x,MKTJYIAKQR"], r"entry 'P2'.*invalid residue.*'J'"),
])
def test_bad_csv_records(tmp_path, rows, pattern):
    root = write_dataset(tmp_path / "d", rows)
    with pytest.raises(DataError, match=pattern) as err:
        data.load_proteins(root)
    assert "X_uniprot.csv" in str(err.value)


def test_missing_column(tmp_path):
    root = write_dataset(tmp_path / "d", ["P1,1-5:SIGNAL,MKTAYIAKQR"], header="Entry,MOTIF,Seq")
    with pytest.raises(DataError, match=r"X_uniprot.csv: missing column\(s\) Sequence"):
        data.load_proteins(root)


def test_malformed_csv(tmp_path):
    root = write_dataset(tmp_path / "d", [GOOD])
    (root / "X_uniprot.csv").write_bytes(b'Entry,MOTIF,LOCATION,Sequence\n"P1,1-5:SIGNAL,x,MKT\n')
    with pytest.raises(DataError, match="X_uniprot.csv: not a readable CSV"):
        data.load_proteins(root)


def test_entry_missing_from_partition(tmp_path):
    root = write_dataset(tmp_path / "d", [GOOD, "P2,1-5:SIGNAL,x,MKTAYIAKQR"], partition=["P1"])
    with pytest.raises(DataError, match=r"partition.csv: 1 entry of the data missing from the partition file: 'P2'"):
        data.load_proteins(root)


def test_missing_data_files(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        data.load_proteins(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \*_uniprot.csv"):
        data.load_proteins(tmp_path / "empty")
    root = write_dataset(tmp_path / "d", [GOOD])
    (root / "partition.csv").unlink()
    with pytest.raises(DataError, match="no partition.csv"):
        data.load_proteins(root)


def test_fasta_parsing(tmp_path):
    path = tmp_path / "in.fa"
    path.write_text(">A desc text\nmkt\n\nayi*\n>B 1-3:dual\nMKTAY\n")
    assert data.read_fasta(path) == [("A", "desc text", "mktayi*"), ("B", "1-3:dual", "MKTAY")]
    proteins = data.read_fasta_proteins(path)
    assert proteins[0].sequence == "MKTAYI" and proteins[0].labels.sum() == 0
    assert proteins[1].labels[C["Mitochondrion"]] == 1 and proteins[1].labels[C["chloroplast"]] == 1
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"in.fa: no FASTA records"):
        data.read_fasta(path)
    path.write_text("MKT\n>A\nMKT\n")
    with pytest.raises(DataError, match="before the first '>' header"):
        data.read_fasta(path)




def test_every_bad_record_is_listed_with_its_file_and_line(tmp_path):
    """One run names every bad record of every data file (CSV rows, FASTA records, partition rows), each with its
    file, line and id, instead of stopping at the first; the good records around them are read as before."""
    rows = [GOOD, "P2,1-5SIGNAL,x,MKTAYIAKQR", ",,x,MKTAYIAKQR", "P3,,x,MKTJY", GOOD.replace("P1", "P4"), GOOD]
    root = write_dataset(tmp_path / "d", rows, partition=["P1", "P2", "P3", "P4", "P5"])
    (root / "partition.csv").write_text("entry,type,group,partition\nP1,S,0,0\nP2,S,0,1\nP3,S,0,5\nP4,S,0,2\n"
                                        "P4,S,0,3\nD1,S,0,4\n")
    (root / "dual.fasta").write_text(">D1 1-3:dual\nMKTA\n>\nMKT\n>D2\nMK1\n")
    with pytest.raises(DataError) as err:
        data.load_proteins(root)
    lines = str(err.value).splitlines()
    assert lines[0] == f"the data under {root}: 8 problems (fix them all, then run again):"
    csv, fasta, part = root / "X_uniprot.csv", root / "dual.fasta", root / "partition.csv"
    expected = [f"{csv}: line 3, entry 'P2': MOTIF part '1-5SIGNAL' does not parse", f"{csv}: line 4: empty Entry",
                f"{csv}: line 5, entry 'P3': invalid residue(s) 'J'", f"{csv}: line 7, entry 'P1': duplicate entry "
                "(first at line 2)", f"{fasta}: line 3: header without an identifier",
                f"{fasta}: line 5, record 'D2': invalid residue(s) '1'", f"{part}: line 4, entry 'P3': partition "
                "'5' is not one of 0-4", f"{part}: line 6, entry 'P4': duplicate entry (first at line 5)"]
    assert len(lines) == 1 + len(expected)
    for line, start in zip(lines[1:], expected):
        assert line.startswith("  " + start), (line, start)


def test_bad_records_beyond_the_limit_are_counted(tmp_path):
    """A file of thousands of bad records gives one message of MAX_LISTED lines and a count, not thousands."""
    bad = [f"Q{i},,x,MK1" for i in range(data.MAX_LISTED + 7)]
    path = tmp_path / "many.csv"
    path.write_text("Entry,MOTIF,Sequence\n" + "".join(f"{r.replace(',x', '')}\n" for r in [GOOD] + bad))
    with pytest.raises(DataError) as err:
        data.read_csv_file(path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: {len(bad)} problems (fix them all, then run again):"
    assert len(lines) == 1 + data.MAX_LISTED + 1 and lines[-1] == "  ... and 7 more"
    assert lines[1].startswith(f"  {path}: line 3, entry 'Q0': invalid residue(s) '1'")


def test_relative_paths_in_errors_name_the_absolute_path(tmp_path, monkeypatch):
    """A relative data.root or input file that is not there: the message says the path is relative to the current
    directory and which absolute path that made."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=rf"^data.root: nope is not a folder \(it does not exist; relative to the "
                                        rf"current directory: {tmp_path / 'nope'}\)$"):
        data.load_proteins("nope")
    for read, name in ((data.read_fasta, "in.fa"), (data.read_csv_file, "in.csv")):
        with pytest.raises(DataError) as err:
            read(Path(name))
        assert str(err.value) == f"{name}: file not found (relative to the current directory: {tmp_path / name})"


# ---------------------------------------------------------------- hostile or damaged files
def test_a_csv_cut_in_the_middle_of_a_record_is_refused(tmp_path):
    """A training CSV cut in half (an interrupted copy) ends inside its last sequence: refused, naming the file,
    instead of training on a shortened protein; a row cut before its sequence is refused with its line."""
    rows = "Entry,MOTIF,LOCATION,Sequence\nP1,1-20:SIGNAL,x,MKTAYIAKQRQISFVKSHFSRQLEERLG\nP2,,y,MLSRAVCGTSRQ\n"
    whole = tmp_path / "whole.csv"
    whole.write_text(rows)
    assert [p.sequence for p in data.read_csv_file(whole)] == ["MKTAYIAKQRQISFVKSHFSRQLEERLG", "MLSRAVCGTSRQ"]
    cut = tmp_path / "cut.csv"
    cut.write_text(rows[:len(rows) - 6])
    with pytest.raises(DataError, match=r"cut\.csv: the file ends in the middle of a line"):
        data.read_csv_file(cut)
    short = tmp_path / "short.csv"  # a row cut before its sequence: its line named
    short.write_text("Entry,MOTIF,LOCATION,Sequence\nP1,,x,MKTAYIAK\nP2,,\n")
    with pytest.raises(DataError, match=r"short\.csv: line 3, entry 'P2': empty sequence"):
        data.read_csv_file(short)


def test_motif_positions_of_thousands_of_digits_are_a_clear_error():
    """A MOTIF position of 4,400 digits (beyond Python's int parsing limit) is a short DataError, not a ValueError
    traceback; the message quotes the part cut short."""
    with pytest.raises(DataError, match="does not parse") as err:
        data.parse_motif("1" * 4400 + "-3:SIGNAL", 10, "t.csv: line 2")
    assert len(str(err.value)) < 300


def test_non_ascii_uppercase_letters_are_errors():
    """str.upper() maps 'ı' to I, 'ſ' to S and 'ﬀ' to FF: such letters are refused with their position, so a
    30-character sequence never predicts as 31 residues; ASCII lowercase and whitespace stay accepted."""
    assert data.clean_sequence("mk tl\n*", "x") == "MKTL"
    for char in ("ı", "ſ", "ﬀ", "\u00a0"):
        with pytest.raises(DataError, match="at position 3"):
            data.clean_sequence(f"MK{char}L", "x")


@pytest.mark.parametrize("text,problem", [("[" * 100000 + "]" * 100000, "nested too deeply"),
                                          ('{"ER": {"ER": ' + "9" * 5000 + "}}", "5000 digits"),
                                          ("\xff\xfe", "not UTF-8")])
def test_json_from_outside_is_bounded(tmp_path, text, problem):
    """Deep nesting, a 5,000-digit integer, binary bytes, an over-large file: DataError naming the file."""
    path = tmp_path / "map.json"
    path.write_bytes(text.encode("latin-1") if problem == "not UTF-8" else text.encode())
    with pytest.raises(DataError, match=problem):
        utils.read_json(path, "a class distance map", DataError)
    path.write_text("[" + "0," * 600 + "0]")
    with pytest.raises(DataError, match="more than the 1000"):
        utils.read_json(path, "a class distance map", DataError, max_bytes=1000)
