"""Output files of predict.py (outputs.py): GFF3 by the specification, file names, modes, nothing left after a failure."""
import os
import re
import urllib.parse

import numpy as np
from helpers import proteome, random_seq, records_of, run, write_fasta

import outputs
import stream
from vocab import NO_SIGNAL

SO_TERMS = {"signal_peptide": "SO:0000418", "transit_peptide": "SO:0000725", "ER_retention_signal": "SO:0001806",
            "peptide_localization_signal": "SO:0001527", "nuclear_localization_signal": "SO:0001528",
            "nuclear_export_signal": "SO:0001531"}


SEQID = re.compile(r"^(?:[a-zA-Z0-9.:^*$@!+_?|-]|%[0-9A-Fa-f]{2})+$")  # spec: escape anything else


VALUE = re.compile(r"^(?:[^;=&,%\t\n\r\x00-\x1f\x7f]|%[0-9A-Fa-f]{2})+$")  # column 9 tag / value


COMMENT = re.compile(r"^# (\S+): (?:Other \(no signal predicted by MUTarget(?:-centroid)?\)|warning: .+)$")


def check_gff3(text: str, lengths: dict, comments: list | None = None) -> list[tuple]:
    """Check a GFF3 file against the specification (gff3.md of The-Sequence-Ontology/Specifications);
    `lengths` maps sequence ids (unescaped) to lengths; the comment lines (gff3_comments) go to `comments`.
    Returns (id, source, type, start, end, score or None for '.', attributes)."""
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
        if line.startswith("#"):
            match = COMMENT.match(line)
            assert match and SEQID.match(match.group(1)), line
            if comments is not None:
                comments.append(line)
            continue
        assert line.strip(), line
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
    lengths, comments = {i: len(s) for i, s in pairs}, []
    features = check_gff3(gff.read_text(encoding="utf-8"), lengths, comments)
    records = records_of(out)
    assert len(features) > 20 and {f[0] for f in features} >= {"we;ird=id,a&b%c", ">starts_with_gt", "tab\there"}
    expected = [(r["id"], src, kind, s, e, round(p, 4), a) for r in records
                for src, kind, s, e, p, a in outputs.gff3_features(r)]
    assert [(n, src, k, s, e, round(p, 4), a) for n, src, k, s, e, p, a in features] == expected
    assert comments == [line for r in records for line in outputs.gff3_comments(r)]
    for name, source, kind, start, end, score, attributes in features:
        record = records[[r["id"] for r in records].index(name)]
        c = attributes["class"]
        assert c in record["predicted"] and float(attributes["class_probability"]) == record["probabilities"][c]
        own = ([record["site_scores"][c]] if c in record["sites"]
               else [p for (s, e), p in zip(record["segments"][c], record["segment_scores"][c]) if (s, e) == (start, end)])
        assert own == [score]  # the feature's own residue probability
    assert tsv.read_text(encoding="utf-8").count("tab%09here") == 1  # TSV cells escape tabs too


def test_gff3_features_hand_worked():
    record = {"id": "X", "length": 100, "predicted": ["ER", "Peroxisome", "SIGNAL", "Nucleus", "Nucleus_export"],
              "probabilities": {"ER": 0.61, "Peroxisome": 0.7, "SIGNAL": 0.9876, "Nucleus": 0.55, "Nucleus_export": 0.5},
              "sites": {"ER": 97, "Peroxisome": 12, "SIGNAL": 23},
              "site_scores": {"ER": 0.4, "Peroxisome": 0.35, "SIGNAL": 0.81},
              "segments": {"Nucleus": [[30, 35], [60, 61]], "Nucleus_export": []},
              "segment_scores": {"Nucleus": [0.7, 0.52], "Nucleus_export": []}, "warnings": []}
    p = {c: {"class_probability": f"{v:.4f}"} for c, v in record["probabilities"].items()}
    assert outputs.gff3_features(record) == [
        ("MUTarget", "peptide_localization_signal", 1, 12, 0.35, {"class": "Peroxisome", "signal": "PTS2",
                                                                  **p["Peroxisome"]}),
        ("MUTarget", "signal_peptide", 1, 23, 0.81, {"class": "SIGNAL", **p["SIGNAL"]}),
        ("MUTarget", "nuclear_localization_signal", 30, 35, 0.7, {"class": "Nucleus", **p["Nucleus"]}),
        ("MUTarget", "nuclear_localization_signal", 60, 61, 0.52, {"class": "Nucleus", **p["Nucleus"]}),
        ("MUTarget", "ER_retention_signal", 97, 100, 0.4, {"class": "ER", **p["ER"]})]
    record["sites"]["Peroxisome"] = 98  # in the last 15 residues: PTS1, from its first residue to the end
    assert outputs.gff3_features(record)[-1] == ("MUTarget", "peptide_localization_signal", 98, 100, 0.35,
                                                 {"class": "Peroxisome", "signal": "PTS1", **p["Peroxisome"]})
    # centroid prediction's features: their own source, the distance in the attributes
    record["centroid"] = {"space": "pooled", "rule": "maxsep", "distances": {"SIGNAL": 0.25}, "predicted": ["SIGNAL"],
                          "sites": {"SIGNAL": 20}, "site_scores": {"SIGNAL": 0.66}, "segments": {}, "segment_scores": {}}
    assert ("MUTarget-centroid", "signal_peptide", 1, 20, 0.66,
            {"class": "SIGNAL", "distance": "0.2500", "rule": "maxsep", "space": "pooled"}) in outputs.gff3_features(record)
    assert outputs.gff3_seqid("sp|P1|A_B.1") == "sp|P1|A_B.1"
    assert outputs.gff3_seqid(">a b%é~") == "%3Ea%20b%25%C3%A9%7E"
    assert outputs.gff3_value("a;b=c&d,e%f\tg h") == "a%3Bb%3Dc%26d%2Ce%25f%09g h"


def test_no_signal_reads_other_in_every_output(tmp_path, ckpts, capsys, monkeypatch):
    """A protein without calls (thresholds above any probability): 'Other' in the TSV's predicted cell, the JSON's
    predicted list, a GFF3 comment and the plot title, all from vocab.NO_SIGNAL; the 3-residue 'MKL' also gets its
    warning in the JSON, the TSV's last column and a GFF3 comment."""
    from matplotlib.figure import Figure
    monkeypatch.setattr(stream, "ensemble_thresholds", lambda members, tuned: np.full(8, 2.0))
    titles, real = [], Figure.suptitle
    monkeypatch.setattr(Figure, "suptitle", lambda self, text, **kw: titles.append(text) or real(self, text, **kw))
    fasta = write_fasta(tmp_path / "in.fa", [("none", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEV"), ("MKL", "MKL")])
    out, tsv, gff = tmp_path / "o.json", tmp_path / "o.tsv", tmp_path / "o.gff3"
    code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", fasta, "--out", out, "--tsv", tsv, "--gff3", gff,
                    "--plot-dir", tmp_path / "plots", "--plot-ids", "none", "--device", "cpu")
    assert code == 0, err
    warning = "shorter than any training protein (28 residues)"
    records = records_of(out)
    assert [r["predicted"] for r in records] == [[NO_SIGNAL]] * 2 == [["Other"]] * 2
    assert [(r["sites"], r["segments"], r["warnings"]) for r in records] == [({}, {}, []), ({}, {}, [warning])]
    header, *rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    assert [row[header.index("predicted")] for row in rows] == ["Other", "Other"]
    assert header[-1] == "warnings" and [row[-1] for row in rows] == ["", warning]
    assert gff.read_text() == ("##gff-version 3\n# none: Other (no signal predicted by MUTarget)\n"
                               f"# MKL: Other (no signal predicted by MUTarget)\n# MKL: warning: {warning}\n")
    assert titles == ["none  (32 residues; predicted: Other)"]
    assert err.splitlines()[-4:] == [f"wrote {out}: per-protein records (JSON)", f"wrote {tsv}: one line per protein (TSV)",
                                     f"wrote {gff}: signal features (GFF3)", f"wrote {tmp_path / 'plots'}: 1 plot(s) (PNG)"]


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
