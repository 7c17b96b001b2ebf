"""Input of predict.py (inputs.py): FASTA / CSV records checked before any prediction, --skip-invalid, pipes,
byte-order marks."""
import os

import pytest
from helpers import check_failure, records_of, run, write_fasta

import inputs
from data import DataError


def test_duplicate_ids(tmp_path, ckpts, capsys):
    fasta = write_fasta(tmp_path / "dup.fa", [("A", "MKV"), ("B", "MKL"), ("A", "MKW")])
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", fasta], str(fasta), "'A'", "duplicate")
    csv = tmp_path / "dup.csv"
    csv.write_text("Entry,MOTIF,Sequence\nQ1,,MKV\nQ2,,MKL\nQ1,,MKW\n")
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--csv", csv], str(csv), "line 4", "'Q1'", "duplicate")


def test_invalid_and_empty_records(tmp_path, ckpts, capsys):
    fasta = write_fasta(tmp_path / "bad.fa", [("ok", "MKLV"), ("broken", "MKJLV")])
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", fasta], str(fasta), "'broken'", "'J'")
    empty = tmp_path / "empty.fa"
    empty.write_text(">first\nMKLV\n>hollow\n>last\nMKV\n")
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", empty], str(empty), "'hollow'", "empty")


def test_skip_invalid(tmp_path, ckpts, capsys):
    good = [("g1", "MKLVAAR" * 5), ("g2", "MSTQ" * 30), ("g3", "MKW")]
    text = f">g1\n{good[0][1]}\n>bad1\nMKJ*X\n>g2\n{good[1][1]}\n>hollow\n>g3\n{good[2][1]}\n>bad2\nMK1L\n"
    fasta = tmp_path / "mixed.fa"
    fasta.write_text(text)
    out = tmp_path / "res" / "out.json"
    code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", fasta, "--out", out, "--skip-invalid",
                    "--device", "cpu")
    assert code == 0, err
    report = tmp_path / "res" / "out.json.skipped.tsv"
    assert f"listed in {report}" in err
    for name in ("bad1", "hollow", "bad2"):
        assert f"'{name}'" in err
    rows = [line.split("\t") for line in report.read_text().splitlines()]
    assert rows[0] == ["id", "line", "reason"]
    assert [(r[0], r[1]) for r in rows[1:]] == [("bad1", "3"), ("hollow", "7"), ("bad2", "10")]
    assert "invalid residue" in rows[1][2] and "empty" in rows[2][2] and "'1'" in rows[3][2]
    clean = tmp_path / "clean.json"
    code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", write_fasta(tmp_path / "clean.fa", good),
                    "--out", clean, "--device", "cpu")
    assert code == 0, err
    assert records_of(out) == records_of(clean)  # the rest predicted as if alone
    custom = tmp_path / "skipped.txt"
    code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", fasta, "--tsv", tmp_path / "o.tsv",
                    "--skip-invalid", "--skipped", custom, "--device", "cpu")
    assert code == 0 and custom.read_text() == report.read_text()


def test_nothing_left_to_predict(tmp_path, ckpts, capsys):
    fasta = write_fasta(tmp_path / "all_bad.fa", [("x", "MKJ"), ("y", "B@")])
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", fasta, "--skip-invalid",
                                     "--skipped", tmp_path / "res" / "skipped.tsv"], str(fasta), "no record left")


def test_pipe_input_refused_and_byte_order_mark_accepted(tmp_path, ckpts, capsys):
    fifo = tmp_path / "pipe.fa"
    os.mkfifo(fifo)
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", fifo], str(fifo), "not a regular file")
    bom = tmp_path / "bom.fa"
    bom.write_bytes("\ufeff>first\nMKLVA\n>second\nMKW\n".encode("utf-8"))  # as Windows editors save it
    code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", bom, "--out", tmp_path / "bom.json")
    assert code == 0, err
    assert [r["id"] for r in records_of(tmp_path / "bom.json")] == ["first", "second"]


def test_non_ascii_letters_are_not_residues(tmp_path, ckpts, capsys):
    """'ı', 'ſ' and 'ﬀ' uppercase to I, S and FF; a sequence holding one is an error naming the record, the
    character and its position, not a prediction for a longer or different protein."""
    for char in ("ı", "ſ", "ﬀ"):
        fasta = write_fasta(tmp_path / "odd.fa", [("ok", "MKLV"), ("odd", f"MKT{char}L")])
        check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", fasta], str(fasta), "'odd'",
                      repr(char), "position 4")


def test_an_over_long_id_is_refused_before_prediction(tmp_path, ckpts, capsys):
    """A 1,001-character id is refused with the line it is on (a 1 MB id made a 1.1 GB plot and a 400 MB .npz);
    1,000 characters are accepted, and written whole."""
    fasta = write_fasta(tmp_path / "long.fa", [("ok", "MKLV"), ("x" * 1001, "MKLV")])
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", fasta], str(fasta), "line 3",
                  "1001 characters")
    fasta = write_fasta(tmp_path / "fine.fa", [("ok", "MKLV"), ("y" * 1000, "MKLV")])
    code, _ = run(capsys, "--checkpoint", ckpts["a"], "--fasta", fasta, "--out", tmp_path / "out.json")
    assert code == 0 and [r["id"] for r in records_of(tmp_path / "out.json")] == ["ok", "y" * 1000]


def test_one_error_lists_every_bad_record(tmp_path):
    """The checking pass reads to the end and names every bad record (id, sequence, label, duplicate) with its
    line, in one error; with skip_invalid the invalid sequences are skipped and only the others are listed."""
    fasta = tmp_path / "bad.fa"
    fasta.write_text(">ok\nMKLV\n>\nMKV\n>broken\nMKJLV\n>hollow\n>ok\nMKW\n>fine\nMKV\n")
    with pytest.raises(DataError) as err:
        inputs.scan(inputs.Source(fasta, "fasta"))
    assert str(err.value).splitlines() == [
        f"{fasta}: 4 problems (fix them all, then run again):",
        f"  {fasta}: line 3: header without an identifier",
        f"  {fasta}: line 5, record 'broken': invalid residue(s) 'J' (first at position 3); allowed: "
        "LAGVSERTIDPKQNFYMHWCXBUZO (lowercase and one trailing '*' are accepted)",
        f"  {fasta}: line 7, record 'hollow': empty sequence",
        f"  {fasta}: line 8, record 'ok': duplicate record id (first at line 1)"]
    with pytest.raises(DataError) as err:
        inputs.scan(inputs.Source(fasta, "fasta", skip_invalid=True))
    assert [line.split(": ", 2)[-1] for line in str(err.value).splitlines()[1:]] == [
        "header without an identifier", "duplicate record id (first at line 1)"]
    csv = tmp_path / "bad.csv"
    csv.write_text("Entry,MOTIF,Sequence\nQ1,,MKV\nQ2,1-9:SIGNAL,MKL\nQ3,,MK1\nQ1,,MKW\n")
    with pytest.raises(DataError) as err:
        inputs.scan(inputs.Source(csv, "csv", skip_invalid=True))
    lines = str(err.value).splitlines()
    assert lines[0] == f"{csv}: 2 problems (fix them all, then run again):"
    assert lines[1].startswith(f"  {csv}: line 3, entry 'Q2': MOTIF part '1-9:SIGNAL' lies outside the sequence")
    assert lines[2] == f"  {csv}: line 5, entry 'Q1': duplicate entry (first at line 2)"
    fasta.write_text(">ok\nMKLV\n>broken\nMKJLV\n")
    scan = inputs.scan(inputs.Source(fasta, "fasta", skip_invalid=True))
    assert scan.n_valid == 1 and [(s.entry, s.line) for s in scan.skipped] == [("broken", 3)]
