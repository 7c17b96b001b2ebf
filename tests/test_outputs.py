"""Output files of predict.py (outputs.py): GFF3 by the specification, file names, modes, nothing left after a failure."""
import os
import re
import urllib.parse

import numpy as np
from helpers import proteome, random_seq, records_of, run, write_fasta

import outputs

SO_TERMS = {"signal_peptide": "SO:0000418", "transit_peptide": "SO:0000725", "ER_retention_signal": "SO:0001806",
            "peptide_localization_signal": "SO:0001527", "nuclear_localization_signal": "SO:0001528",
            "nuclear_export_signal": "SO:0001531"}


SEQID = re.compile(r"^(?:[a-zA-Z0-9.:^*$@!+_?|-]|%[0-9A-Fa-f]{2})+$")  # spec: escape anything else


VALUE = re.compile(r"^(?:[^;=&,%\t\n\r\x00-\x1f\x7f]|%[0-9A-Fa-f]{2})+$")  # column 9 tag / value


def check_gff3(text: str, lengths: dict) -> list[tuple]:
    """Check a GFF3 file against the specification (gff3.md of The-Sequence-Ontology/Specifications);
    `lengths` maps sequence ids (unescaped) to lengths. Returns (id, source, type, start, end, score or None
    for '.', attributes)."""
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    assert re.fullmatch(r"##gff-version 3(\.\d+){0,2}", lines[0]), lines[0]
    regions, features = {}, []
    for line in lines[1:]:
        if line.startswith("##"):
            name, *fields = line[2:].split(" ")
            if name == "sequence-region":
                seqid, start, end = fields
                assert SEQID.match(seqid) and seqid not in regions  # one per sequence
                regions[seqid] = (int(start), int(end))
            continue
        assert not line.startswith("#") and line.strip(), line
        columns = line.split("\t")
        assert len(columns) == 9, line
        seqid, source, kind, start, end, score, strand, phase, attributes = columns
        assert SEQID.match(seqid) and not seqid.startswith(">"), seqid
        assert source and "\t" not in source
        assert kind in SO_TERMS, kind
        start, end = int(start), int(end)
        name = urllib.parse.unquote(seqid)
        assert 1 <= start <= end <= lengths[name], line
        lo, hi = regions[seqid]  # a ##sequence-region precedes the features and bounds them
        assert lo <= start and end <= hi and hi == lengths[name]
        score = None if score == "." else float(score)
        assert strand in {"+", "-", ".", "?"} and phase == "."  # phase: CDS features only
        pairs = {}
        for pair in attributes.split(";"):
            tag, value = pair.split("=")  # exactly one unescaped '='
            assert VALUE.match(tag) and VALUE.match(value), pair
            pairs[urllib.parse.unquote(tag)] = urllib.parse.unquote(value)
        features.append((name, source, kind, start, end, score, pairs))
    return features


def test_gff3_follows_the_specification(tmp_path, ckpts, capsys):
    pairs = proteome(seed=9) + [("tab\there", random_seq(np.random.default_rng(2), 90))]
    csv = tmp_path / "labelled.csv"
    quoted = [f'"{i}"' if "\t" in i or "," in i or '"' in i else i for i, _ in pairs]
    csv.write_text("Entry,MOTIF,Sequence\n" + "".join(f"{q},,{s}\n" for q, (_, s) in zip(quoted, pairs)))
    gff, out, tsv = tmp_path / "out.gff3", tmp_path / "out.json", tmp_path / "out.tsv"
    code, err = run(capsys, "--checkpoint", ckpts["a"], ckpts["b"], "--csv", csv, "--gff3", gff, "--out", out,
                    "--tsv", tsv, "--device", "cpu", "--chunk-size", 4)
    assert code == 0, err
    lengths = {i: len(s) for i, s in pairs}
    features = check_gff3(gff.read_text(encoding="utf-8"), lengths)
    records = records_of(out)
    assert len(features) > 20 and {f[0] for f in features} >= {"we;ird=id,a&b%c", ">starts_with_gt", "tab\there"}
    expected = [(r["id"], src, kind, s, e, round(p, 4), a) for r in records
                for src, kind, s, e, p, a in outputs.gff3_features(r)]
    assert [(n, src, k, s, e, round(p, 4), a) for n, src, k, s, e, p, a in features] == expected
    for name, source, kind, start, end, score, attributes in features:
        record = records[[r["id"] for r in records].index(name)]
        assert attributes["class"] in record["predicted"] and score == record["probabilities"][attributes["class"]]
    assert tsv.read_text(encoding="utf-8").count("tab%09here") == 1  # TSV cells escape tabs too


def test_gff3_features_hand_worked():
    record = {"id": "X", "length": 100, "predicted": ["ER", "Peroxisome", "SIGNAL", "Nucleus", "Nucleus_export"],
              "probabilities": {"ER": 0.61, "Peroxisome": 0.7, "SIGNAL": 0.9876, "Nucleus": 0.55, "Nucleus_export": 0.5},
              "sites": {"ER": 97, "Peroxisome": 12, "SIGNAL": 23},
              "segments": {"Nucleus": [[30, 35], [60, 60]], "Nucleus_export": []}}
    assert outputs.gff3_features(record) == [
        ("MUTarget", "peptide_localization_signal", 1, 12, 0.7, {"class": "Peroxisome", "signal": "PTS2"}),
        ("MUTarget", "signal_peptide", 1, 23, 0.9876, {"class": "SIGNAL"}),
        ("MUTarget", "nuclear_localization_signal", 30, 35, 0.55, {"class": "Nucleus"}),
        ("MUTarget", "nuclear_localization_signal", 60, 60, 0.55, {"class": "Nucleus"}),
        ("MUTarget", "ER_retention_signal", 97, 100, 0.61, {"class": "ER"})]
    record["sites"]["Peroxisome"] = 98  # C-terminal half: PTS1, from its first residue to the end
    assert outputs.gff3_features(record)[-1] == ("MUTarget", "peptide_localization_signal", 98, 100, 0.7,
                                                 {"class": "Peroxisome", "signal": "PTS1"})
    # centroid prediction's features: their own source, no score, the distance in the attributes
    record["centroid"] = {"space": "pooled", "rule": "maxsep", "distances": {"SIGNAL": 0.25}, "predicted": ["SIGNAL"],
                          "sites": {"SIGNAL": 20}, "segments": {}}
    assert ("MUTarget-centroid", "signal_peptide", 1, 20, None,
            {"class": "SIGNAL", "distance": "0.2500", "rule": "maxsep", "space": "pooled"}) in outputs.gff3_features(record)
    assert outputs.gff3_seqid("sp|P1|A_B.1") == "sp|P1|A_B.1"
    assert outputs.gff3_seqid(">a b%é~") == "%3Ea%20b%25%C3%A9%7E"
    assert outputs.gff3_value("a;b=c&d,e%f\tg h") == "a%3Bb%3Dc%26d%2Ce%25f%09g h"


def test_plot_names():
    used = set()
    assert [outputs.plot_name(i, used) for i in ["P1", "p1", "x/y", "x_y", "x.y", "ü"]] == [
        "P1.png", "p1_2.png", "x_y.png", "x_y_2.png", "x_y_3.png", "_.png"]


# --------------------------------------------------------------------------- files, precision, progress
def test_output_modes_follow_the_umask(tmp_path, ckpts, capsys):
    fasta = write_fasta(tmp_path / "in.fa", [("x", "MKLV" * 10)])
    old = os.umask(0o027)
    try:
        code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", fasta, "--out", tmp_path / "o.json",
                        "--embeddings", tmp_path / "e.npz", "--plot-dir", tmp_path / "p", "--device", "cpu")
    finally:
        os.umask(old)
    assert code == 0, err
    for path in (tmp_path / "o.json", tmp_path / "e.npz", tmp_path / "p" / "x.png"):
        assert path.stat().st_mode & 0o777 == 0o640, path


# Sequence Ontology terms (so.obo) allowed as feature types, with their accessions.


def test_tsv_text_cells_are_never_spreadsheet_formulas():
    """A cell starting with =, +, - or @ gets a leading apostrophe (OWASP's advice: a spreadsheet shows it as
    text); other ids are written as they are; tabs and line breaks stay escaped."""
    assert outputs.tsv_cell("=cmd|' /C calc'!A0") == "'=cmd|' /C calc'!A0"
    for start in "+-@":
        assert outputs.tsv_cell(start + "SUM(A1)") == "'" + start + "SUM(A1)"
    assert outputs.tsv_cell("sp|P12345|ABC_HUMAN") == "sp|P12345|ABC_HUMAN"
    assert outputs.tsv_cell("a\tb=c") == "a%09b=c"


def test_a_full_disk_while_predicting_names_the_outputs(tmp_path, ckpts, capsys, monkeypatch):
    """Every write failing with ENOSPC (files opened on /dev/full): exit 2 naming the output files, and nothing
    is left at their names."""
    if not os.path.exists("/dev/full"):
        import pytest
        pytest.skip("no /dev/full here")
    real_open = outputs.Staging.open

    def full_disk(self, target, binary=False, scratch=False):
        real_open(self, target, binary, scratch).close()
        handle = open("/dev/full", "wb" if binary else "w")
        self.handles.append(handle)
        return handle
    monkeypatch.setattr(outputs.Staging, "open", full_disk)
    fasta = write_fasta(tmp_path / "in.fa", [("A", "MKTAYIAKQR"), ("B", "MLSRAVCG")])
    out, tsv = tmp_path / "res" / "out.json", tmp_path / "res" / "out.tsv"
    code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", fasta, "--out", out, "--tsv", tsv)
    assert code == 2 and str(out) in err and str(tsv) in err and "No space left on device" in err, err
    assert not out.exists() and not tsv.exists()
