"""Reliability diagrams of the class head: per class, the fraction of proteins that have the class against their
mean predicted probability in 15 equal-width bins (calibration.py), uncalibrated and calibrated, with each
curve's ECE; the diagonal is perfect calibration.

python scripts/plot_reliability.py RUN_DIR [--out PNG]       the test partition of a finished run (its
                                                             test_metrics.json; default RUN_DIR/reliability.png)
python scripts/plot_reliability.py METRICS.json [--out PNG]  the labelled set of predict.py --csv ... --metrics
python scripts/plot_reliability.py CKPT [--split test] [--data-root DIR] [--out PNG]
    a checkpoint with the calibration it holds now (say one scripts/calibrate.py wrote), on a split of the data of
    its stored config (default: test)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import calibration  # noqa: E402
from vocab import CLASSES  # noqa: E402


def report_of_checkpoint(path: Path, split: str, data_root: str | None) -> tuple[dict, str]:
    """(calibration_report, a title) of a checkpoint on a split of its stored config's data."""
    from calibrate import collect
    from config import resolve_config
    from data import build_datasets
    from inference import Settings, build_ensemble
    from release import from_checkpoint
    from runtime import resolve_device
    trained = from_checkpoint(path)
    config = resolve_config(trained.config, [f"data.root={data_root}"] if data_root else [],
                            where=f"{path} (stored config)")
    device = resolve_device("auto")
    proteins = build_datasets(config)[split].proteins
    logits = collect(build_ensemble([trained], device), proteins, Settings(device))[0]
    labels = np.stack([p.labels for p in proteins])
    block = trained.calibration
    calibrated = None if block is None else calibration.calibrated_probs(logits, calibration.temperatures_of(block))
    return (calibration.calibration_report(labels, calibration.sigmoid(logits), calibrated, block),
            f"{path}: {split} split of fold {config.data.fold} ({len(proteins)} proteins)")


def load_report(source: Path, split: str, data_root: str | None) -> tuple[dict, str]:
    if source.is_dir() or source.suffix == ".json":
        path = source / "test_metrics.json" if source.is_dir() else source
        metrics = json.loads(path.read_text())
        if not isinstance(metrics, dict) or not isinstance(metrics.get("calibration"), dict):
            raise ValueError(f"{path} holds no calibration figures (written before they existed?); plot a "
                             f"checkpoint instead: scripts/plot_reliability.py CKPT")
        return metrics["calibration"], f"{source}" + (": test partition" if source.is_dir() else "")
    return report_of_checkpoint(source, split, data_root)


def plot(report: dict, title: str, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4, figsize=(13, 6.8), sharex=True, sharey=True)
    for ax, name in zip(axes.flat, CLASSES):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for key, color in (("uncalibrated", "#d62728"), ("calibrated", "#1f77b4")):
            if report.get(key) is None:
                continue
            m = report[key]["per_class"][name]
            points = [(c, a) for c, a in zip(m["bins"]["confidence"], m["bins"]["positive_rate"]) if c is not None]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, color=color, label=f"{key} (ECE {m['ece']:.3f})")
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="upper left")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    for ax in axes[1]:
        ax.set_xlabel("mean predicted probability (bin)", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("fraction with the class", fontsize=8)
    macro = ", ".join(f"{k} macro ECE {report[k]['macro_ece']:.3f}" for k in ("uncalibrated", "calibrated")
                      if report.get(k) is not None and report[k]["macro_ece"] is not None)
    fig.suptitle(f"{title}\n{macro}; 15 equal-width bins", fontsize=9)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.88, wspace=0.08, hspace=0.22)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="a run folder, a predict.py --metrics JSON or a checkpoint")
    p.add_argument("--out", type=Path, help="PNG (default: SOURCE's folder / reliability.png)")
    p.add_argument("--split", choices=("valid", "test"), default="test", help="with a checkpoint: which split")
    p.add_argument("--data-root", help="with a checkpoint: its data folder, if it moved since training")
    args = p.parse_args(argv)
    try:
        report, title = load_report(args.source, args.split, args.data_root)
    except (OSError, ValueError, KeyError) as err:  # ConfigError, DataError, CheckpointError are among them
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or (args.source if args.source.is_dir() else args.source.parent) / "reliability.png"
    plot(report, title, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
