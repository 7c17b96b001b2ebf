"""Add class centres (with validation-tuned distance thresholds, and the confidence mixtures, null distances
and p-value cut of confidence.py) to a finished run's checkpoint, so that checkpoints written before train.py
stored them can predict from the embedding space (predict.py --method centroid | both, --centroid-rule pvalue).

python scripts/add_centroids.py CKPT [CKPT ...] [--data-root DIR] [--device auto]

The checkpoint's own config decides the data (data.root, unless --data-root, and data.fold): centres are
the mean embeddings of the training split's proteins per class, thresholds are tuned on the validation
split, for the pooled embeddings and, when the model has a projection head, for its projections (the same
as train.py computes at the end of a run). The checkpoint is rewritten atomically; existing centres are
replaced.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import ConfigError, resolve_config  # noqa: E402
from data import DataError, build_datasets  # noqa: E402
from evaluate import evaluate, fit_centroids  # noqa: E402
from model import Encoder, load_model_state  # noqa: E402
from runtime import resolve_device  # noqa: E402
from space import to_stored  # noqa: E402
from utils import load_checkpoint, save_checkpoint  # noqa: E402


def add_centroids(path: Path, data_root: str | None, device) -> dict:
    ckpt = load_checkpoint(path, ("model", "config", "arch"))
    overrides = [f"data.root={data_root}"] if data_root else []
    config = resolve_config(ckpt["config"], overrides, where=f"{path} (stored config)")
    model = Encoder(config, arch=ckpt["arch"])
    load_model_state(model, ckpt["model"], path)
    model.to(device).eval()
    datasets = build_datasets(config)
    valid = evaluate(model, datasets["valid"], config, device)
    centroids, _ = fit_centroids(model, datasets["train"].proteins, valid, config, device)
    ckpt["centroids"] = to_stored(centroids)
    save_checkpoint(ckpt, path)
    return centroids


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--data-root", help="the data folder, if it moved since training (default: the stored data.root)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        device = resolve_device(args.device)
        for path in args.checkpoints:
            centroids = add_centroids(path, args.data_root, device)
            print(f"{path}: class centres of {', '.join(centroids)} space(s) added")
    except (ConfigError, DataError, OSError) as err:  # OSError: CheckpointError, WeightsError, WriteError
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
