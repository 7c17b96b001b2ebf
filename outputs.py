"""Output files of predict.py, written while the chunks stream past and renamed into place at the end.

Per-protein record (the JSON / JSON Lines output; the other formats are derived from it):
    id, length, probabilities {class: p, 4 decimals; calibrated when the model has a calibration, the uncalibrated
    ones then in probabilities_uncalibrated}, predicted [classes with uncalibrated p >= threshold; ["Other"]
    (vocab.NO_SIGNAL) when none is], sites {site class: 1-based residue}, site_scores {site class: residue
    probability there}, segments {segment class: [[start, end], ...]}, segment_scores {segment class: [mean residue
    probability of each segment]} (signals.py), with --coverage prediction_set; then warnings [text, ...] (empty
    when none: a protein shorter than the training data, a site kept inside its class's window...).
These are the classification heads' fields. Centroid prediction (--method centroid | both) adds its
fields under record["centroid"] (centroid_fields), so the heads' fields keep their meaning and readers
of today's files keep working; --method centroid leaves the heads' fields out.

Every file goes to a temporary file in its target folder (Staging) and is renamed into place by
commit(), with the mode the umask gives a new file; on any error abort() removes the temporary
files and the folders the run created, and a commit that fails midway puts the previous outputs
back. Nothing is held in memory between chunks: records go straight to their files, embedding
rows to temporary files on disk until the .npz is assembled.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import signals
from space import max_separation
from utils import new_temp_file, remove_stale_temps
from vocab import CLASS_INDEX, CLASSES, NO_SIGNAL, SEGMENT_CLASSES, SITE_CLASSES

# GFF3 feature type per class: Sequence Ontology terms (so.obo): signal_peptide SO:0000418,
# transit_peptide SO:0000725, ER_retention_signal SO:0001806, nuclear_localization_signal SO:0001528,
# nuclear_export_signal SO:0001531; SO has no peroxisomal targeting signal term, so PTS1 / PTS2 take
# their parent, peptide_localization_signal SO:0001527 (the attribute signal= tells which).
SO_TYPES = {"SIGNAL": "signal_peptide", "Mitochondrion": "transit_peptide", "chloroplast": "transit_peptide",
            "Thylakoid": "transit_peptide", "ER": "ER_retention_signal", "Peroxisome": "peptide_localization_signal",
            "Nucleus": "nuclear_localization_signal", "Nucleus_export": "nuclear_export_signal"}
GFF3_SOURCE = "MUTarget"
SEQID_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.:^*$@!+_?-|")


# --------------------------------------------------------------------------- records
def protein_record(entry: str, probs: np.ndarray, motif: np.ndarray, thresholds, calibrated=None, sets=None) -> dict:
    """The heads' record of one protein from its class probabilities [8] and motif tracks [8, L]. With calibrated
    probabilities [8] (calibration.py) those are 'probabilities' and the uncalibrated ones
    'probabilities_uncalibrated'; the calls stay on the uncalibrated ones (thresholds). With sets
    (calibration.Sets, --coverage): 'prediction_set'. Sites, segments, their scores and the warnings: signals.py."""
    if np.shape(probs) != (len(CLASSES),) or np.ndim(motif) != 2 or np.shape(motif)[0] != len(CLASSES):
        raise ValueError(f"{entry}: probabilities must be [{len(CLASSES)}] and motif tracks [{len(CLASSES)}, L], got "
                         f"{np.shape(probs)} and {np.shape(motif)}")
    predicted = signals.called([c for i, c in enumerate(CLASSES) if probs[i] >= thresholds[i]])
    shown = probs if calibrated is None else calibrated
    record = {"id": entry, "length": int(motif.shape[1]),
              "probabilities": {c: round(float(shown[i]), 4) for i, c in enumerate(CLASSES)}}
    if calibrated is not None:
        record["probabilities_uncalibrated"] = {c: round(float(probs[i]), 4) for i, c in enumerate(CLASSES)}
    fields, notes = signals.locate(predicted, motif)
    record.update(predicted=predicted, **fields)
    if sets is not None:
        record["prediction_set"] = sets.fields(calibrated)
    record["warnings"] = signals.merge_warnings(signals.length_warnings(record["length"], predicted), notes)
    return record


@dataclass
class Centroid:
    """Centroid prediction settings: the embedding space, the distance thresholds [8], the rule
    ('threshold', 'maxsep' or 'pvalue') whose classes are 'predicted' (and go to the TSV, GFF3 and plots)
    and the p-value cut of the p-value rule (None: the checkpoints store no p-values, confidence.py)."""

    space: str
    thresholds: np.ndarray
    rule: str = "threshold"
    p_value: float | None = None


def centroid_fields(distances: np.ndarray, motif: np.ndarray, centroid: Centroid, confidence=None,
                    p_values=None, notes: list | None = None) -> dict:
    """record['centroid']: space, rule, distances {class: Euclidean distance to its centre}, the
    classes of each rule (maxsep: CLEAN's max-separation; threshold: distance <= the class's
    validation-tuned threshold; pvalue: p-value <= the cut p_value, null without p-values; ["Other"] when a rule
    calls no class), confidence {class: mixture confidence} and p_values {class: p-value} (null without them),
    predicted (the chosen rule's) and their sites / segments and scores (signals.locate; its notes are appended to
    `notes` when given)."""
    by_rule = {"maxsep": max_separation(distances[None])[0], "threshold": distances <= centroid.thresholds}
    scored = p_values is not None and centroid.p_value is not None
    if scored:
        by_rule["pvalue"] = p_values <= centroid.p_value
    chosen = {rule: signals.called([c for i, c in enumerate(CLASSES) if hit[i]]) for rule, hit in by_rule.items()}
    fields, found = signals.locate(chosen[centroid.rule], motif)
    if notes is not None:
        notes += found
    return {"space": centroid.space, "rule": centroid.rule,
            "distances": {c: round(float(distances[i]), 4) if np.isfinite(distances[i]) else None  # null: no centre
                          for i, c in enumerate(CLASSES)},
            "maxsep": chosen["maxsep"], "threshold": chosen["threshold"], "pvalue": chosen.get("pvalue"),
            "p_value": centroid.p_value if scored else None,
            "confidence": {c: round(float(v), 4) for c, v in zip(CLASSES, confidence)} if scored else None,
            "p_values": {c: float(f"{v:.4g}") for c, v in zip(CLASSES, p_values)} if scored else None,
            "predicted": chosen[centroid.rule], **fields}


def make_record(entry: str, result, method: str, thresholds, centroid: Centroid | None, sets=None) -> dict:
    """A protein's record for predict.py --method head | centroid | both: the heads' fields at the top
    (head, both), warnings (of both methods' calls), and the centroid prediction under 'centroid' (centroid, both)."""
    record = (protein_record(entry, result.probs, result.motif, thresholds, result.calibrated, sets)
              if method != "centroid"
              else {"id": entry, "length": int(result.motif.shape[1]), "warnings": []})
    if method != "head":
        notes = []
        cen = centroid_fields(result.distances, result.motif, centroid, result.confidence, result.p_values, notes)
        record["warnings"] = signals.merge_warnings(record["warnings"], signals.length_warnings(record["length"],
                                                                                        cen["predicted"]), notes)
        record["centroid"] = cen
    return record


# --------------------------------------------------------------------------- staging
class Staging:
    """Temporary files beside their targets; commit() renames them into place, abort() removes them."""

    def __init__(self):
        self.pending = []  # (temporary file, target)
        self.scratch = []  # temporary files that never become outputs
        self.handles = []
        self.created = []  # folders this run created, parents first
        self.cleaned = set()  # existing folders already rid of stale temporary files

    def _folder(self, folder: Path) -> None:
        """Create `folder` if missing (remembered for abort); in an existing one, remove the temporary
        files that killed runs left (utils.remove_stale_temps)."""
        missing, p = [], folder.absolute()
        while not p.exists():
            missing.append(p)
            p = p.parent
        if not missing and p not in self.cleaned:
            self.cleaned.add(p)
            remove_stale_temps(p)
        folder.mkdir(parents=True, exist_ok=True)
        self.created += reversed(missing)

    def temp(self, target, scratch: bool = False) -> Path:
        """A new empty temporary file in target's folder (created if missing), registered."""
        target = Path(target)
        if target.is_dir():
            raise IsADirectoryError(f"{target}: is a folder, not a file name")
        self._folder(target.parent)
        tmp = new_temp_file(target.parent, target.name)  # the umask's mode, ready for the rename
        if scratch:
            self.scratch.append(Path(tmp))
        else:
            self.pending.append((Path(tmp), target))
        return Path(tmp)

    def open(self, target, binary: bool = False, scratch: bool = False):
        path = self.temp(target, scratch)
        handle = open(path, "wb") if binary else open(path, "w", encoding="utf-8", newline="\n")
        self.handles.append(handle)
        return handle

    def commit(self) -> None:
        """Rename every temporary file onto its target, all or none: each existing target first gets a second
        name (a hard link, or a copy), so that when a rename fails the previous outputs are put back."""
        for handle in self.handles:
            handle.close()
        kept, done = [], set()  # (second name, target) of the previous outputs; targets renamed onto
        try:
            for _, target in self.pending:
                if os.path.lexists(target):
                    kept.append((self._keep(target), target))
            for tmp, target in self.pending:
                os.replace(tmp, target)
                done.add(target)
        except OSError:
            for backup, target in kept:
                if target in done:
                    _quietly(os.replace, backup, target)  # the previous output back in place
                    done.discard(target)
                else:
                    _quietly(os.unlink, backup)  # its target was not touched
            for target in done:  # new files where there was none
                _quietly(os.unlink, target)
            self.abort()
            raise
        for backup, _ in kept:
            _quietly(os.unlink, backup)
        self.pending = []
        self.abort()  # scratch files only now

    @staticmethod
    def _keep(target: Path) -> Path:
        """A temporary second name for target's file (removed with the other stale temporary files if killed)."""
        backup = Path(new_temp_file(target.parent, target.name))
        try:
            os.unlink(backup)
            os.link(target, backup, follow_symlinks=False)
        except OSError:  # no hard links on this file system
            try:
                shutil.copy2(target, backup, follow_symlinks=False)
            except OSError:
                _quietly(os.unlink, backup)
                raise
        return backup

    def abort(self) -> None:
        for handle in self.handles:
            try:
                handle.close()
            except OSError:
                pass
        for tmp in [t for t, _ in self.pending] + self.scratch:
            if tmp.exists():
                tmp.unlink()
        for folder in reversed(self.created):
            try:
                folder.rmdir()
            except OSError:  # not empty: other files were put there meanwhile
                pass
        self.pending, self.scratch, self.created = [], [], []


def _quietly(operation, *paths) -> None:
    """operation(*paths), an OSError ignored (putting back what a failed commit touched: best effort)."""
    try:
        operation(*paths)
    except OSError:
        pass


# --------------------------------------------------------------------------- writers
class JsonWriter:
    """--out: a JSON array with one record per line, or JSON Lines when the name ends in .jsonl."""

    def __init__(self, staging: Staging, path):
        self.handle = staging.open(path)
        self.lines = Path(path).suffix.lower() == ".jsonl"
        self.n = 0

    def add(self, record: dict, result) -> None:
        text = json.dumps(record)
        self.handle.write(text + "\n" if self.lines else ("[\n" if self.n == 0 else ",\n") + text)
        self.n += 1

    def finish(self) -> None:
        if not self.lines:
            self.handle.write("\n]\n" if self.n else "[]\n")


FORMULA_STARTS = ("=", "+", "-", "@")  # a spreadsheet cell starting so is read as a formula


def tsv_cell(text: str) -> str:
    """A text cell: tabs and line breaks (possible in CSV Entry fields) as %09, %0A, %0D; a cell that starts with
    =, +, - or @ (an id like "=cmd|' /C calc'!A0" would be a live formula in a spreadsheet) gets a leading
    apostrophe, as spreadsheets expect of text (OWASP's advice for CSV injection)."""
    text = text.replace("\t", "%09").replace("\n", "%0A").replace("\r", "%0D")
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def format_runs(runs) -> str:
    return ",".join(f"{s}-{e}" for s, e in runs)


TSV_HEADER = (["id", "length", "predicted"] + [f"prob_{c}" for c in CLASSES] + [f"site_{c}" for c in SITE_CLASSES]
              + [f"segments_{c}" for c in SEGMENT_CLASSES])
TSV_SETS = ["prediction_set", "set_size"]  # with --coverage: the conformal set (calibration.py) and its size
TSV_CENTROID = (["centroid_predicted", "centroid_maxsep", "centroid_threshold", "centroid_pvalue"]
                + [f"{k}_{c}" for k in ("distance", "centroid_confidence", "centroid_pvalue") for c in CLASSES]
                + [f"centroid_site_{c}" for c in SITE_CLASSES] + [f"centroid_segments_{c}" for c in SEGMENT_CLASSES])
TSV_WARNINGS = "warnings"  # the last column, whatever the method: the record's warnings joined by "; "


class TsvWriter:
    """--tsv: one line per protein, several classes or runs joined by commas. Columns: TSV_HEADER
    (the heads; --method head, both; prob_<class>: the calibrated probabilities when the model has a calibration),
    with sets (--coverage) TSV_SETS, then TSV_CENTROID (--method centroid, both; without the heads: id, length,
    then TSV_CENTROID), then TSV_WARNINGS."""

    def __init__(self, staging: Staging, path, method: str = "head", sets: bool = False):
        self.handle, self.method, self.sets = staging.open(path), method, sets and method != "centroid"
        header = (TSV_HEADER + (TSV_SETS if self.sets else [])) if method != "centroid" else TSV_HEADER[:2]
        self.handle.write("\t".join(header + (TSV_CENTROID if method != "head" else []) + [TSV_WARNINGS]) + "\n")

    def add(self, record: dict, result) -> None:
        cells = [tsv_cell(record["id"]), str(record["length"])]
        if self.method != "centroid":
            cells += ([",".join(record["predicted"])] + [f"{record['probabilities'][c]:.4f}" for c in CLASSES]
                      + [str(record["sites"].get(c, "")) for c in SITE_CLASSES]
                      + [format_runs(record["segments"].get(c, [])) for c in SEGMENT_CLASSES])
        if self.sets:
            cells += [",".join(record["prediction_set"]["classes"]), str(record["prediction_set"]["size"])]
        if self.method != "head":
            cen = record["centroid"]
            cells += ([",".join(cen[k] or []) for k in ("predicted", "maxsep", "threshold", "pvalue")]
                      + ["" if cen["distances"][c] is None else f"{cen['distances'][c]:.4f}" for c in CLASSES]
                      + ["" if cen["p_values"] is None else f"{cen['confidence'][c]:.4f}" for c in CLASSES]
                      + ["" if cen["p_values"] is None else f"{cen['p_values'][c]:.4g}" for c in CLASSES]
                      + [str(cen["sites"].get(c, "")) for c in SITE_CLASSES]
                      + [format_runs(cen["segments"].get(c, [])) for c in SEGMENT_CLASSES])
        cells.append(tsv_cell("; ".join(record["warnings"])))
        self.handle.write("\t".join(cells) + "\n")

    def finish(self) -> None:
        pass


def gff3_seqid(entry: str) -> str:
    """Column 1 of GFF3: characters outside [a-zA-Z0-9.:^*$@!+_?-|] percent-encoded (UTF-8 bytes)."""
    return "".join(ch if ch in SEQID_SAFE else "".join(f"%{b:02X}" for b in ch.encode("utf-8")) for ch in entry)


def gff3_value(text: str) -> str:
    """A column-9 tag or value: percent, control characters (tab, line breaks...) and ; = & , encoded."""
    return "".join(f"%{ord(ch):02X}" if ch in "%;=&," or ord(ch) < 0x20 or ord(ch) == 0x7F else ch for ch in text)


def gff3_features(record: dict) -> list[tuple]:
    """(source, SO type, start, end, score, attributes) of the predicted signals, 1-based inclusive,
    sorted by position: N-terminal peptides (SIGNAL, Mitochondrion, chloroplast, Thylakoid, Peroxisome
    PTS2) 1..site; C-terminal motifs (ER, Peroxisome PTS1) site..length; NLS / NES their segments
    (signals.py: a Peroxisome site in the last PTS1_WINDOW residues is PTS1, in the first PTS2_WINDOW PTS2).
    Score: the feature's own residue probability (site_scores: the track at the site; segment_scores: its mean
    over the segment). The heads' features: source MUTarget, class_probability (the protein-level probability,
    calibrated when the model has a calibration) in the attributes; centroid prediction's: source
    MUTarget-centroid, the distance to the class centre, the rule, the space (and the confidence and p-value when
    stored) in the attributes. A class without a site or segment (NO_SIGNAL) has no feature."""
    features = []
    if "predicted" in record:
        features += _features(record["length"], record, GFF3_SOURCE,
                              lambda c: {"class_probability": f"{record['probabilities'][c]:.4f}"})
    if "centroid" in record:
        cen = record["centroid"]
        features += _features(record["length"], cen, GFF3_SOURCE + "-centroid", lambda c: {
            "distance": f"{cen['distances'][c]:.4f}", "rule": cen["rule"], "space": cen["space"],
            **({} if cen.get("p_values") is None else {"confidence": f"{cen['confidence'][c]:.4f}",
                                                       "p_value": f"{cen['p_values'][c]:.4g}"})})
    return sorted(features, key=lambda f: (f[2], f[3], CLASS_INDEX[f[5]["class"]], f[0]))


def _features(length: int, fields: dict, source: str, attributes_of) -> list[tuple]:
    """gff3_features of one prediction's fields (predicted, sites, site_scores, segments, segment_scores)."""
    features = []
    for c in fields["predicted"]:
        if c in fields["sites"]:
            site, attributes = fields["sites"][c], {"class": c}
            c_terminal = c == "ER"
            if c == "Peroxisome":
                attributes["signal"] = signals.peroxisome_signal(site, length)
                c_terminal = attributes["signal"] == "PTS1"
            features.append((source, SO_TYPES[c], site if c_terminal else 1, length if c_terminal else site,
                             fields["site_scores"][c], {**attributes, **attributes_of(c)}))
        for (start, end), score in zip(fields["segments"].get(c, []), fields["segment_scores"].get(c, [])):
            features.append((source, SO_TYPES[c], start, end, score, {"class": c, **attributes_of(c)}))
    return features


def gff3_comments(record: dict) -> list[str]:
    """The GFF3 comment lines of a record: '# SEQID: Other (no signal predicted by SOURCE)' for each prediction
    (the heads: MUTarget; centroid: MUTarget-centroid) that calls no class, and '# SEQID: warning: TEXT' for each
    warning."""
    seqid = gff3_seqid(record["id"])
    lines = [f"# {seqid}: {NO_SIGNAL} (no signal predicted by {source})"
             for source, fields in ((GFF3_SOURCE, record), (GFF3_SOURCE + "-centroid", record.get("centroid")))
             if fields is not None and fields.get("predicted") == [NO_SIGNAL]]
    return lines + [f"# {seqid}: warning: {' '.join(w.split())}" for w in record.get("warnings", [])]  # one line


class Gff3Writer:
    """--gff3: '##gff-version 3', then per protein a ##sequence-region line when it has features, its comment
    lines (gff3_comments: no signal predicted, warnings) and one feature line per signal (9 tab-separated
    columns; strand and phase '.')."""

    def __init__(self, staging: Staging, path):
        self.handle = staging.open(path)
        self.handle.write("##gff-version 3\n")

    def add(self, record: dict, result) -> None:
        features = gff3_features(record)
        seqid = gff3_seqid(record["id"])
        lines = ([f"##sequence-region {seqid} 1 {record['length']}"] if features else []) + gff3_comments(record)
        for source, kind, start, end, score, attributes in features:
            column9 = ";".join(f"{gff3_value(k)}={gff3_value(v)}" for k, v in attributes.items())
            score = "." if score is None else f"{score:.4f}"
            lines.append("\t".join([seqid, source, kind, str(start), str(end), score, ".", ".", column9]))
        if lines:
            self.handle.write("\n".join(lines) + "\n")

    def finish(self) -> None:
        pass


class EmbeddingWriter:
    """--embeddings FILE.npz: ids [N] (unicode), pooled [N, d] float32, when the ensemble has
    projection heads projection [N, k] float32, and with centroid prediction centroid_distances [N, 8]. Rows are appended to temporary files chunk by chunk
    and the .npz (a zip of .npy files, fixed timestamps: same input, same bytes) is assembled at the
    end, copying block by block."""

    def __init__(self, staging: Staging, path, dim: int, projection_dim: int | None, distances: bool = False):
        self.staging, self.path = staging, Path(path)
        self.ids = staging.open(path, scratch=True)
        sizes = {"pooled": dim, "projection": projection_dim, "centroid_distances": len(CLASSES) if distances else None}
        self.arrays = {name: (staging.open(path, binary=True, scratch=True), size)
                       for name, size in sizes.items() if size is not None}
        self.n, self.id_width = 0, 1

    def add(self, record: dict, result) -> None:
        self.ids.write(json.dumps(record["id"]) + "\n")
        self.id_width = max(self.id_width, len(record["id"]))
        values = {"pooled": result.pooled, "projection": result.projection, "centroid_distances": result.distances}
        for name, (handle, _) in self.arrays.items():
            handle.write(np.ascontiguousarray(values[name], dtype="<f4").tobytes())
        self.n += 1

    def finish(self, block: int = 4096) -> None:
        self.ids.close()
        for handle, _ in self.arrays.values():
            handle.close()
        out = self.staging.open(self.path, binary=True)
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            ids_dtype = np.dtype(f"<U{self.id_width}")
            with self._member(zf, "ids", ids_dtype, (self.n,)) as member, open(self.ids.name, encoding="utf-8") as ids:
                while True:
                    lines = [json.loads(line) for _, line in zip(range(block), ids)]
                    if not lines:
                        break
                    member.write(np.array(lines, dtype=ids_dtype).tobytes())
            for name, (handle, dim) in self.arrays.items():
                with self._member(zf, name, np.dtype("<f4"), (self.n, dim)) as member, open(handle.name, "rb") as rows:
                    while chunk := rows.read(1 << 20):
                        member.write(chunk)
        out.close()

    @staticmethod
    def _member(zf, name: str, dtype, shape):
        info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
        member = zf.open(info, "w", force_zip64=True)
        np.lib.format.write_array_header_1_0(member, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                      "fortran_order": False, "shape": shape})
        return member


def plot_name(entry: str, used: set) -> str:
    """File name for an id: characters other than ASCII letters and digits become '_' (as SignalP
    does), at most 100 of them; a name already taken (ignoring case) gets _2, _3, ..."""
    base = re.sub(r"[^A-Za-z0-9]", "_", entry)[:100]
    name, k = base, 1
    while name.lower() in used:
        k += 1
        name = f"{base}_{k}"
    used.add(name.lower())
    return f"{name}.png"


class PlotWriter:
    """--plot-dir: one PNG per chosen protein (the ids in `ids`, or else the first `limit` proteins)."""

    def __init__(self, staging: Staging, folder, thresholds, ids=None, limit: int = 100):
        self.staging, self.folder, self.thresholds = staging, Path(folder), thresholds
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"{self.folder}: exists and is not a folder")
        self.ids, self.left = (set(ids), None) if ids else (None, limit)
        self.used, self.written = set(), 0

    def add(self, record: dict, result) -> None:
        if self.ids is not None and record["id"] not in self.ids:
            return
        if self.ids is None:
            if self.left <= 0:
                return
            self.left -= 1
        import plots  # matplotlib only when plotting
        tmp = self.staging.temp(self.folder / plot_name(record["id"], self.used))
        head = record if "predicted" in record else protein_record(record["id"], result.probs, result.motif,
                                                                    self.thresholds, result.calibrated)
        plots.draw(tmp, head, result.motif, self.thresholds, record.get("centroid"))
        self.written += 1

    def finish(self) -> None:
        pass


def write_skipped(staging: Staging, path, skipped) -> None:
    """--skip-invalid report: id, line, reason per skipped record (header only if none)."""
    handle = staging.open(path)
    handle.write("id\tline\treason\n")
    for s in skipped:
        handle.write(f"{tsv_cell(s.entry)}\t{s.line}\t{tsv_cell(s.reason)}\n")
