"""Markdown tables comparing the cv_summary.json files of several configurations.

python scripts/results_table.py NAME=SUMMARY.json [NAME=SUMMARY.json ...] [--update FILE]

Prints (or, with --update, writes between the `<!-- results-table:begin -->` and
`<!-- results-table:end -->` lines of FILE) these tables: the macro metrics and wall time (mean ± std
over runs), each run's macro-F1 / macro-MCC, per-class F1, MCC, tuned-threshold MCC and average
precision, and per-class site accuracy (Nucleus, Nucleus_export: IoU); and between the
`<!-- space-table:begin -->` and `<!-- space-table:end -->` lines the embedding-space tables (centroid
prediction, kNN and silhouettes of the pooled and projection spaces, space.py). Every number is a value of the summaries, rounded to 3 decimals
(wall time to seconds), so the tables can be checked against them.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cv import fmt, residue_key  # noqa: E402

from space import KNN_K  # noqa: E402
from utils import write_text_atomic  # noqa: E402
from vocab import CLASSES  # noqa: E402

BEGIN, END = "<!-- results-table:begin -->", "<!-- results-table:end -->"
SPACE_BEGIN, SPACE_END = "<!-- space-table:begin -->", "<!-- space-table:end -->"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def tables(summaries: dict[str, dict]) -> str:
    """summaries: {name: cv_summary} -> the Markdown text."""
    names = list(summaries)
    first = summaries[names[0]]
    runs = [(r["fold"], r["seed"]) for r in first["runs"]]
    for name, s in summaries.items():
        if [(r["fold"], r["seed"]) for r in s["runs"]] != runs:
            raise ValueError(f"{name}: runs {[(r['fold'], r['seed']) for r in s['runs']]} differ from {names[0]}'s {runs}")
    out = [f"Mean ± std over {len(runs)} runs (fold, seed) = {', '.join(map(str, runs))}, each on its fold's test "
           "partition with the epoch of best validation macro-MCC. macro-F1 / macro-MCC at threshold 0.5; "
           "*tuned*: one threshold per class chosen on validation to maximise its MCC; macro AP: mean "
           "over classes of the average precision (threshold-free).", ""]
    keys = ("macro_f1", "macro_mcc", "tuned_macro_f1", "tuned_macro_mcc", "macro_average_precision",
            "macro_site_accuracy", "macro_iou")
    out += table(["configuration", "macro-F1", "macro-MCC", "macro-F1, tuned", "macro-MCC, tuned", "macro AP",
                  "site accuracy", "NLS/NES IoU", "wall s / run"],
                 [[n, *(fmt(s["mean"][k], s["std"][k]) for k in keys),
                   fmt(s["mean"]["wall_s"], s["std"]["wall_s"], 0)] for n, s in summaries.items()])
    calibrated = {n: s for n, s in summaries.items() if s["mean"].get("calibrated_macro_ece") is not None}
    if calibrated:  # runs with calibration (earlier summaries have none)
        out += ["", "Calibration on test (ECE: 15 equal-width bins per class, macro over classes) and the conformal "
                "prediction sets at coverage 0.9 (recall averaged over classes with at least 20 test proteins):", ""]
        keys = ("uncalibrated_macro_ece", "calibrated_macro_ece", "set_recall_0.9", "set_size_0.9",
                "set_singletons_0.9")
        out += table(["configuration", "ECE", "ECE, calibrated", "set recall 0.9", "mean set size 0.9", "singletons 0.9"],
                     [[n, *(fmt(s["mean"].get(k), s["std"].get(k)) for k in keys)] for n, s in calibrated.items()])
    out += ["", "Each run: macro-F1 / macro-MCC / macro-MCC tuned / macro AP (a column is one split, so the rows "
            "of a column can be compared pairwise):", ""]
    keys = ("macro_f1", "macro_mcc", "tuned_macro_mcc", "macro_average_precision")
    out += table(["configuration"] + [f"fold {f} seed {s}" for f, s in runs],
                 [[n] + [" / ".join(fmt(r[k], None) for k in keys) for r in s["runs"]] for n, s in summaries.items()])
    for title, key in (("Per-class F1 (threshold 0.5)", "per_class_f1"), ("Per-class MCC (threshold 0.5)", "per_class_mcc"),
                       ("Per-class MCC, thresholds tuned on validation", "tuned_per_class_mcc"),
                       ("Per-class average precision (threshold-free)", "per_class_average_precision")):
        out += ["", f"{title}:", ""]
        out += table(["class"] + names, [[c] + [fmt(s["mean"][key][c], s["std"][key][c]) for s in summaries.values()]
                                         for c in CLASSES])
    out += ["", "Residue level, on the true-positive proteins of each class: site accuracy (share whose predicted "
            "site, the argmax of the class track, is the true site exactly); Nucleus, Nucleus_export: IoU of "
            "the predicted and true signal residues:", ""]
    out += table(["class"] + names,
                 [[c] + [fmt(s["mean"][residue_key(c)][c], s["std"][residue_key(c)][c]) for s in summaries.values()]
                  for c in CLASSES])
    return "\n".join(out) + "\n"


def space_tables(summaries: dict[str, dict]) -> str:
    """The embedding-space tables (space.py's figures on the test split) of {name: cv_summary}; summaries
    written before the space figures existed are left out."""
    summaries = {n: s for n, s in summaries.items() if s["mean"].get("pooled_macro_silhouette") is not None}
    if not summaries:
        return "No summary holds embedding-space figures.\n"
    names = list(summaries)
    out = ["Mean ± std over the same runs. *head*: the classifier's macro-MCC with validation-tuned thresholds "
           "and its macro AP (the tables above); *max-sep* / *threshold*: macro-MCC of centroid prediction "
           "(distances to the training split's class centres; CLEAN's max-separation rule, or one distance "
           "threshold per class tuned on validation); *centroid AP*: macro AP of the negative distances; "
           f"*{KNN_K}-NN*: macro-MCC of a majority vote of the {KNN_K} nearest training proteins; *silhouette*: mean over "
           "classes of the one-vs-rest silhouette of the class's test proteins.", ""]
    for space, what in (("pooled", "Pooled embeddings (what the heads read)"),
                        ("projection", "Projection-head outputs (what the contrastive loss shapes)")):
        rows = [n for n in names if summaries[n]["mean"][f"{space}_macro_silhouette"] is not None]
        if not rows:
            continue
        keys = [f"{space}_{k}" for k in ("maxsep_macro_mcc", "threshold_macro_mcc", "centroid_macro_ap",
                                         "knn_macro_mcc", "macro_silhouette")]
        out += [f"{what}:", ""]
        out += table(["configuration", "head MCC (tuned)", "head AP", "max-sep MCC", "threshold MCC", "centroid AP",
                      f"{KNN_K}-NN MCC", "silhouette"],
                     [[n, *(fmt(summaries[n]["mean"][k], summaries[n]["std"][k])
                            for k in ("tuned_macro_mcc", "macro_average_precision", *keys))] for n in rows])
        out += [""]
    out += ["Each run, pooled embeddings: silhouette / threshold MCC / head MCC (tuned), for pairwise comparison:", ""]
    runs = [(r["fold"], r["seed"]) for r in summaries[names[0]]["runs"]]
    keys = ("pooled_macro_silhouette", "pooled_threshold_macro_mcc", "tuned_macro_mcc")
    out += table(["configuration"] + [f"fold {f} seed {s}" for f, s in runs],
                 [[n] + [" / ".join(fmt(r[k], None) for k in keys) for r in s["runs"]] for n, s in summaries.items()])
    out += ["", "Per-class silhouette of the pooled embeddings:", ""]
    out += table(["class"] + names, [[c] + [fmt(s["mean"]["pooled_silhouette"][c], s["std"]["pooled_silhouette"][c])
                                            for s in summaries.values()] for c in CLASSES])
    return "\n".join(out) + "\n"


def update(path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """Replace the block between the `begin` and `end` lines of `path` with `text`."""
    doc = path.read_text()
    if begin not in doc or end not in doc:
        raise ValueError(f"{path}: needs the lines {begin} and {end}")
    head, rest = doc.split(begin, 1)
    tail = rest.split(end, 1)[1]
    write_text_atomic(path, f"{head}{begin}\n{text}{end}{tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("summaries", nargs="+", metavar="NAME=SUMMARY.json")
    p.add_argument("--update", help="Markdown file whose results-table block to replace")
    args = p.parse_args(argv)
    summaries = {}
    for item in args.summaries:
        name, sep, path = item.partition("=")
        if not sep:
            print(f"error: {item!r}: expected NAME=SUMMARY.json", file=sys.stderr)
            return 2
        try:
            summaries[name] = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            return 2
    try:
        text, space_text = tables(summaries), space_tables(summaries)
        if args.update:
            update(Path(args.update), text)
            update(Path(args.update), space_text, SPACE_BEGIN, SPACE_END)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text + "\n" + space_text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
