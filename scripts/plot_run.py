"""Learning curves of a run: every training loss and the validation metrics per epoch, to PNG.

python scripts/plot_run.py RUN_DIR [--out PNG]      (default: RUN_DIR/learning_curves.png)
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
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = sorted({k for r in records for k in r if k.startswith("train_") and k.endswith("_loss")})
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ["train_loss"] + [k for k in losses if k != "train_loss"]:
        points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
        if points:
            left.plot(*zip(*points), marker="o", ms=3, label=key[6:])
    left.set(xlabel="epoch", ylabel="training loss", title="losses")
    left.legend(fontsize=8)
    for key in VALIDATION:
        points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if not (Path(args.run_dir) / "metrics.jsonl").is_file():
        print(f"error: {args.run_dir}: no metrics.jsonl (not a run directory?)", file=sys.stderr)
        return 2
    print(plot_run(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
