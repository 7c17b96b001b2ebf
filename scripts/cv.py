"""Cross-validation: train folds (and seeds) of one config, summarise the test metrics.

python scripts/cv.py --config CONFIG --folds 0 1 2 3 4 [--seeds 0 1 2] --out DIR [--set KEY=VALUE ...]

Each (fold, seed) trains with `data.fold`, `seed` and `run_dir = DIR/runs/fold{F}_seed{S}` set, and is
evaluated on its own test partition (train.py's final test, best epoch by validation macro-MCC).
A run directory that already holds test_metrics.json is reused, one holding checkpoints/last.pt is resumed
(train.py --resume), and one stopped before its first epoch ended starts again (--overwrite), so an interrupted
CV continues.
Writes DIR/cv_summary.json:
  {"config", "overrides", "runs": [{"fold", "seed", "run_dir", "wall_s", "best_epoch", <metrics>}],
   "mean": {<metrics>}, "std": {<metrics>}}
with <metrics> = macro_f1, macro_mcc (threshold 0.5), tuned_macro_f1, tuned_macro_mcc (per-class
thresholds tuned on validation), macro_roc_auc, macro_average_precision (threshold-free),
macro_site_accuracy, macro_iou, per_class_f1 {class}, per_class_mcc {class}, tuned_per_class_mcc
{class}, per_class_average_precision {class}, site_accuracy {class}, iou {class}, uncalibrated_macro_ece /
calibrated_macro_ece and set_recall_C / set_size_C / set_singletons_C at coverages C 0.8, 0.9, 0.95 (the
conformal sets' recall averaged over classes with at least 20 test proteins), and per embedding
space S (pooled, projection; None without a projection head): S_maxsep_macro_f1 / _mcc, S_threshold_macro_f1
/ _mcc (centroid prediction, space.py), S_centroid_macro_ap, S_knn_macro_f1 / _mcc, S_macro_silhouette,
S_silhouette {class}; and DIR/cv_summary.md (a Markdown table).
"""
from __future__ import annotations

import argparse
import functools
import json
import operator
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

import train  # noqa: E402
from config import ConfigError, load_config  # noqa: E402
from utils import write_text_atomic  # noqa: E402
from vocab import CLASSES, SEGMENT_CLASSES, SITE_CLASSES  # noqa: E402


def run_metrics(test: dict) -> dict:
    """The summarised numbers of one test_metrics.json."""
    residue = test["residue"]["per_class"]
    tuned = test["tuned"]
    return {"macro_f1": test["macro_f1"], "macro_mcc": test["macro_mcc"],
            "tuned_macro_f1": tuned["macro_f1"], "tuned_macro_mcc": tuned["macro_mcc"],
            "macro_roc_auc": test["macro_roc_auc"], "macro_average_precision": test["macro_average_precision"],
            "macro_site_accuracy": test["residue"]["macro_site_accuracy"], "macro_iou": test["residue"]["macro_iou"],
            "per_class_f1": {c: test["per_class"][c]["f1"] for c in CLASSES},
            "per_class_mcc": {c: test["per_class"][c]["mcc"] for c in CLASSES},
            "tuned_per_class_mcc": {c: tuned["per_class"][c]["mcc"] for c in CLASSES},
            "per_class_average_precision": {c: test["per_class"][c]["average_precision"] for c in CLASSES},
            "site_accuracy": {c: residue[c]["site_accuracy"] for c in SITE_CLASSES},
            "iou": {c: residue[c]["iou"] for c in SEGMENT_CLASSES},
            **calibration_metrics(test), **space_metrics(test.get("space", {}))}


COVERAGES = ("0.8", "0.9", "0.95")
MIN_SUPPORT = 20  # test proteins a class needs for its set recall to enter the average


def calibration_metrics(test: dict) -> dict:
    """ECE (macro, uncalibrated and calibrated) and, per coverage, the sets' realised recall averaged over the
    classes with at least MIN_SUPPORT test proteins, their mean size and share of singletons (None for runs
    from before calibration)."""
    cal, sets = test.get("calibration") or {}, test.get("sets") or {}
    out = {f"{kind}_macro_ece": (cal.get(kind) or {}).get("macro_ece") for kind in ("uncalibrated", "calibrated")}
    for coverage in COVERAGES:
        at = sets.get(coverage)
        recalls = [] if at is None else [c["recall"] for name, c in at["per_class"].items()
                                         if name in CLASSES and c["support"] >= MIN_SUPPORT and c["recall"] is not None]
        out[f"set_recall_{coverage}"] = sum(recalls) / len(recalls) if recalls else None
        out[f"set_size_{coverage}"] = None if at is None else at["mean_size"]
        out[f"set_singletons_{coverage}"] = None if at is None else at["singletons"]
    return out


SPACES = ("pooled", "projection")


def space_metrics(space: dict) -> dict:
    """The embedding-space figures of test_metrics.json's 'space' block, flat, per space (None where a
    run has no such space: no projection head, or a run from before the space metrics)."""
    figures = {"maxsep_macro_f1": ("maxsep", "macro_f1"), "maxsep_macro_mcc": ("maxsep", "macro_mcc"),
               "threshold_macro_f1": ("threshold", "macro_f1"), "threshold_macro_mcc": ("threshold", "macro_mcc"),
               "centroid_macro_ap": ("macro_average_precision",), "knn_macro_f1": ("knn", "macro_f1"),
               "knn_macro_mcc": ("knn", "macro_mcc"), "macro_silhouette": ("macro_silhouette",)}
    out = {}
    for name in SPACES:
        m = space.get(name)
        for key, path in figures.items():
            out[f"{name}_{key}"] = None if m is None else functools.reduce(operator.getitem, path, m)
        out[f"{name}_silhouette"] = {c: None if m is None else m["silhouette"][c] for c in CLASSES}
    return out


def aggregate(runs: list[dict], reducer) -> dict:
    """reducer over runs of every metric (None values left out; None if fewer than needed)."""
    def reduce(values):
        values = [v for v in values if v is not None]
        try:
            return reducer(values)
        except (statistics.StatisticsError, ValueError):
            return None
    out = {}
    for key, value in run_metrics_template(runs[0]).items():
        if isinstance(value, dict):
            out[key] = {c: reduce([r[key][c] for r in runs]) for c in value}
        else:
            out[key] = reduce([r[key] for r in runs])
    out["wall_s"] = reduce([r["wall_s"] for r in runs])
    return out


def run_metrics_template(run: dict) -> dict:
    return {k: v for k, v in run.items() if k not in ("fold", "seed", "run_dir", "wall_s", "best_epoch")}


def residue_key(name: str) -> str:
    """The summary key of a class's residue-level metric: site_accuracy, or iou for NLS / NES."""
    return "site_accuracy" if name in SITE_CLASSES else "iou"


def fmt(mean, std, digits: int = 3) -> str:
    """'mean ± std' with `digits` decimals; '-' for a missing mean, no '± std' for a missing std."""
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def markdown(summary: dict) -> str:
    mean, std = summary["mean"], summary["std"]
    lines = [f"Config `{summary['config']}` {' '.join(summary['overrides'])}, {len(summary['runs'])} runs "
             f"(folds {sorted({r['fold'] for r in summary['runs']})}, seeds {sorted({r['seed'] for r in summary['runs']})}); "
             "mean ± std over runs.", "",
             "| metric | value |", "|---|---|"]
    for key in ("macro_f1", "macro_mcc", "tuned_macro_f1", "tuned_macro_mcc", "macro_roc_auc", "macro_average_precision",
                "macro_site_accuracy", "macro_iou", "uncalibrated_macro_ece", "calibrated_macro_ece",
                *(f"set_{kind}_{c}" for c in COVERAGES for kind in ("recall", "size", "singletons")), "wall_s"):
        lines.append(f"| {key} | {fmt(mean[key], std[key])} |")
    lines += ["", "| class | F1 | MCC | site accuracy / IoU |", "|---|---|---|---|"]
    for c in CLASSES:
        lines.append(f"| {c} | {fmt(mean['per_class_f1'][c], std['per_class_f1'][c])} | "
                     f"{fmt(mean['per_class_mcc'][c], std['per_class_mcc'][c])} | "
                     f"{fmt(mean[residue_key(c)][c], std[residue_key(c)][c])} |")
    return "\n".join(lines) + "\n"


def check_same_config(run_dir: Path, tree: dict) -> None:
    """A fold to resume must have been started with the config asked for now (its run_dir/config.yaml)."""
    stored = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else None
    if stored != tree:
        raise ConfigError(f"{run_dir} holds a fold started with another config (or none: {run_dir / 'config.yaml'}); "
                          f"use a new --out, or the --config and --set of that run")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--folds", type=int, nargs="+", required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--out", required=True, help="output folder (runs/ and cv_summary.*)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="overrides for every run (may be repeated)")
    args = p.parse_args(argv)
    out = Path(args.out)
    runs = []
    for fold in args.folds:
        for seed in args.seeds:
            run_dir = out / "runs" / f"fold{fold}_seed{seed}"
            result = run_dir / "test_metrics.json"
            wall_file = run_dir / "wall_s.txt"
            if not result.is_file():
                start = time.time()
                sets = [*args.set, f"data.fold={fold}", f"seed={seed}", f"run_dir={run_dir}"]
                last = run_dir / "checkpoints" / "last.pt"  # a fold that stopped: continued; one without an epoch: anew
                if last.is_file():
                    try:
                        check_same_config(run_dir, load_config(args.config, sets).to_dict())
                    except ConfigError as err:
                        print(f"error: {err}", file=sys.stderr)
                        return 2
                code = train.main(["--resume", str(last)] if last.is_file() else
                                  ["--config", args.config, "--set", *sets, "--overwrite"])
                if code != 0:
                    return code
                write_text_atomic(wall_file, f"{time.time() - start:.1f}\n")
            test = json.loads(result.read_text())
            wall = float(wall_file.read_text()) if wall_file.is_file() else None
            runs.append({"fold": fold, "seed": seed, "run_dir": str(run_dir), "wall_s": wall,
                         "best_epoch": test["best_epoch"], **run_metrics(test)})
    summary = {"config": args.config, "overrides": args.set, "runs": runs,
               "mean": aggregate(runs, statistics.mean), "std": aggregate(runs, statistics.stdev)}
    write_text_atomic(out / "cv_summary.json", json.dumps(summary, indent=2) + "\n")
    write_text_atomic(out / "cv_summary.md", markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
