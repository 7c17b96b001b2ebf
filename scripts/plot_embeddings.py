"""t-SNE of validation proteins' pooled embeddings (and projections), coloured by class.

python scripts/plot_embeddings.py --checkpoint CKPT [CKPT ...] --config CONFIG --out PNG [--labels A B ...]

One column per checkpoint (e.g. a baseline and a SupCon model side by side); the first row shows
the pooled ESM-2 embeddings, the second the projection-head outputs of models that have one.
Proteins are coloured by their class; multi-label proteins are drawn as black-edged crosses in the
colour of their rarest class, proteins without a class in light grey. Data: the validation split of the
config's data.root and data.fold.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import numpy as np
from sklearn.manifold import TSNE

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import ConfigError, load_config, resolve_config  # noqa: E402
from data import DataError, build_datasets  # noqa: E402
from evaluate import run_inference  # noqa: E402
from model import Encoder, load_model_state  # noqa: E402
from runtime import resolve_device  # noqa: E402
from utils import load_checkpoint, write_atomic  # noqa: E402
from vocab import CLASSES  # noqa: E402


def embeddings(checkpoint, dataset, config, device) -> dict:
    """{'pooled': [N, d], 'projection': [N, k] or absent} of one checkpoint's model."""
    ckpt = load_checkpoint(checkpoint, ("model", "config", "arch"))
    model = Encoder(resolve_config(ckpt["config"], where=f"{checkpoint} (stored config)"), arch=ckpt["arch"])
    load_model_state(model, ckpt["model"], checkpoint)
    model.to(device).eval()
    out = run_inference(model, dataset, config.train.eval_batch_size, device, "none",
                        config.data.max_len, config.data.overlap)
    return {k: out[k] for k in ("pooled", "projection") if out[k] is not None}


def scatter(ax, points: np.ndarray, labels: np.ndarray, title: str) -> None:
    """Colour by class; a multi-label protein takes the colour of its rarest class (so Thylakoid,
    always with chloroplast, stays visible) and is drawn as a black-edged cross."""
    palette = [plt.get_cmap("tab10")(i) for i in (0, 1, 2, 3, 4, 5, 6, 8)]  # no grey: that is "Other"
    n_classes = labels.sum(1)
    counts = labels.sum(0)
    key = np.where(labels > 0, counts[None, :], np.inf).argmin(1)  # rarest class of each protein
    ax.scatter(*points[n_classes == 0].T, s=6, c="lightgrey", label="Other")
    for c, name in enumerate(CLASSES):
        ax.scatter(*points[(n_classes == 1) & (key == c)].T, s=8, color=palette[c], label=name)
        ax.scatter(*points[(n_classes > 1) & (key == c)].T, s=30, color=palette[c], marker="X",
                   edgecolors="black", linewidths=0.6)
    ax.scatter([], [], s=30, color="white", marker="X", edgecolors="black", label="multi-label")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True)
    p.add_argument("--config", required=True, help="config whose validation split to embed")
    p.add_argument("--out", required=True)
    p.add_argument("--labels", nargs="*", help="column titles (default: checkpoint paths)")
    p.add_argument("--device", default="auto")
    p.add_argument("--perplexity", type=float, default=30.0)
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.checkpoint):
        p.error(f"--labels: {len(args.labels)} given for {len(args.checkpoint)} checkpoint(s)")
    try:
        plot(args)
    except (ConfigError, DataError, OSError) as err:  # OSError: CheckpointError, WriteError, ...
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


def plot(args) -> None:
    config = load_config(args.config)
    device = resolve_device(args.device)
    valid = build_datasets(config)["valid"]
    labels = valid.labels.astype(int)
    titles = args.labels or [str(c) for c in args.checkpoint]
    results = [embeddings(c, valid, config, device) for c in args.checkpoint]
    rows = 2 if any("projection" in r for r in results) else 1
    fig, axes = plt.subplots(rows, len(results), figsize=(5 * len(results), 4.6 * rows), squeeze=False)
    for col, (result, title) in enumerate(zip(results, titles)):
        for row, key in enumerate(["pooled", "projection"][:rows]):
            ax = axes[row, col]
            if key not in result:
                ax.axis("off")
                ax.text(0.5, 0.5, "no projection head", ha="center", va="center")
                continue
            tsne = TSNE(perplexity=min(args.perplexity, (len(labels) - 1) / 3), random_state=0, init="pca")
            scatter(ax, tsne.fit_transform(result[key]), labels, f"{title}\n{key} (t-SNE)")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=5, fontsize=8, markerscale=2)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    write_atomic(args.out, lambda tmp: fig.savefig(tmp, dpi=110, format=Path(args.out).suffix[1:] or "png"))
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
