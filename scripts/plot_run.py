"""Learning curves of a run: every training loss and the validation metrics per epoch, to PNG.

python scripts/plot_run.py RUN_DIR [--out PNG]      (default: RUN_DIR/learning_curves.png)
python scripts/plot_run.py RUN_DIR RUN_DIR ... --labels A B ... --out PNG
    several runs in one figure: class loss, motif loss and validation macro-MCC per epoch, a line
    per run; runs with the same label share a colour (e.g. the folds of one configuration).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VALIDATION = ("val_macro_f1", "val_macro_mcc", "val_macro_site_accuracy", "val_macro_iou")


def plot_run(run_dir, out=None) -> Path:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    losses = sorted({k for r in records for k in r if k.startswith("train_") and k.endswith("_loss")})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ["train_loss"] + [k for k in losses if k != "train_loss"]:
        points = curve(records, key)
        if points:
            left.plot(*zip(*points), marker="o", ms=3, label=key[6:])
    left.set(xlabel="epoch", ylabel="training loss", title="losses")
    left.legend(fontsize=8)
    for key in VALIDATION:
        points = curve(records, key)
        if points:
            right.plot(*zip(*points), marker="o", ms=3, label=key[4:])
    best = [r["epoch"] for r in records if r.get("best")]
    if best:
        right.axvline(best[-1], color="grey", ls="--", lw=1, label=f"best epoch {best[-1]}")
    warm = [r["epoch"] for r in records if r.get("phase") == "warm_start"]
    for ax in (left, right):
        if warm:
            ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="orange", alpha=0.12, lw=0)
    right.set(xlabel="epoch", ylabel="validation", title="validation metrics", ylim=(-0.05, 1.05))
    right.legend(fontsize=8)
    fig.suptitle(f"{run_dir}" + ("  (shaded: SupCon warm start)" if warm else ""), fontsize=9)
    fig.tight_layout()
    out = Path(out) if out else run_dir / "learning_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def curve(records: list[dict], key: str) -> list[tuple]:
    """(epoch, value) of every epoch record that holds `key`."""
    return [(r["epoch"], r[key]) for r in records if r.get(key) is not None]


def plot_compare(run_dirs, labels, out) -> Path:
    """Class loss, motif loss and validation macro-MCC per epoch of several runs, side by side."""
    keys = ("train_class_loss", "train_motif_loss", "val_macro_mcc")
    fig, axes = plt.subplots(1, len(keys), figsize=(14, 4))
    colours = {name: plt.get_cmap("tab10")(i) for i, name in enumerate(dict.fromkeys(labels))}
    for run_dir, label in zip(run_dirs, labels):
        records = read_metrics(run_dir)
        for ax, key in zip(axes, keys):
            points = curve(records, key)
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, lw=1.2, color=colours[label], alpha=0.8)
    for ax, key in zip(axes, keys):
        ax.set(xlabel="epoch", title=key.replace("_", " "))
    handles = [plt.Line2D([], [], color=c, marker="o", ms=3, label=n) for n, c in colours.items()]
    axes[-1].legend(handles=handles, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="+")
    p.add_argument("--out")
    p.add_argument("--labels", nargs="*", help="one per run directory (several runs: the legend)")
    args = p.parse_args(argv)
    for run_dir in args.run_dir:
        if not (Path(run_dir) / "metrics.jsonl").is_file():
            print(f"error: {run_dir}: no metrics.jsonl (not a run directory?)", file=sys.stderr)
            return 2
    if len(args.run_dir) == 1:
        print(plot_run(args.run_dir[0], args.out))
        return 0
    labels = args.labels or args.run_dir
    if len(labels) != len(args.run_dir) or not args.out:
        print("error: several runs need --out and one --labels entry per run", file=sys.stderr)
        return 2
    print(plot_compare(args.run_dir, labels, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
