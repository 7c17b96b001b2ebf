"""Class distance map for SupCon hard negatives.

python scripts/build_distance_map.py --config CONFIG --out distance_map.json [--checkpoint CKPT] [--set KEY=VALUE ...]

Euclidean distances between class centroids ("Other" included when the split has such proteins)
of the training split's embeddings: the configured backbone's pooled embeddings, or, with
--checkpoint, a trained model's projection-head outputs (its pooled embeddings if it has no
projection head). Written as JSON {class: {class: distance}}, the format supcon.distance_map reads.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import ConfigError, load_config, resolve_config  # noqa: E402
from contrast import distance_map_of  # noqa: E402
from data import DataError, build_datasets  # noqa: E402
from model import Encoder  # noqa: E402
from runtime import resolve_device  # noqa: E402
from utils import load_checkpoint, seed_everything, write_text_atomic  # noqa: E402


def build_map(config, checkpoint=None, device="auto") -> dict:
    device = resolve_device(device)
    seed_everything(config.seed)  # a scratch backbone is initialised as train.py would
    if checkpoint is not None:
        ckpt = load_checkpoint(checkpoint)
        model = Encoder(resolve_config(ckpt["config"]), arch=ckpt["arch"])
        model.load_state_dict(ckpt["model"])
    else:
        model = Encoder(config)
    model.to(device).eval()
    key = "projection" if checkpoint is not None and model.projection is not None else "pooled"
    return distance_map_of(model, build_datasets(config)["train"].proteins, config, device, key)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="config whose data (training split of data.fold) to embed")
    p.add_argument("--out", required=True, help="output JSON")
    p.add_argument("--checkpoint", help="trained model (train.py checkpoint); default: the configured backbone")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        distances = build_map(config, args.checkpoint, args.device)
    except (ConfigError, DataError, OSError) as err:  # OSError: CheckpointError, WeightsError, WriteError
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_text_atomic(args.out, json.dumps(distances, indent=1) + "\n")
    nearest = {a: min((d, b) for b, d in row.items() if b != a)[1] for a, row in distances.items() if len(row) > 1}
    print(f"wrote {args.out}: {len(distances)} classes; nearest other class: "
          + ", ".join(f"{a}->{b}" for a, b in nearest.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
