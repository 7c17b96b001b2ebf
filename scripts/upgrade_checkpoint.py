"""Convert a checkpoint written by an earlier version of this project into today's format.

python scripts/upgrade_checkpoint.py OLD.pt NEW.pt

Earlier versions stored NumPy objects in their checkpoints (NumPy's RNG state, the class centres of
centroid prediction). Reading those needs Python's pickle in full, which can run any code a file holds,
so train.py, predict.py and the other scripts refuse such files. This script is the one place in the
project that reads a pickle with weights_only=False: run it only on a file you trust (one you or a
colleague trained). It rewrites the NumPy parts as tensors and numbers, checks that the result loads
with weights_only=True, and writes NEW.pt atomically; OLD.pt is left as it is.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from space import to_stored  # noqa: E402
from utils import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402


def upgraded(old: dict) -> dict:
    """The checkpoint dict with its NumPy objects as tensors, numbers and dicts."""
    new = dict(old)
    rng = dict(old.get("rng") or {})
    numpy_state = rng.get("numpy")
    if isinstance(numpy_state, tuple):  # np.random.get_state(): ('MT19937', key [624], pos, has_gauss, gauss)
        _, key, pos, has_gauss, gauss = numpy_state
        rng["numpy"] = {"key": torch.from_numpy(np.asarray(key).astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "gauss": float(gauss)}
        new["rng"] = rng
    if old.get("centroids"):
        new["centroids"] = to_stored({space: {k: np.asarray(v) for k, v in fitted.items()}
                                      for space, fitted in old["centroids"].items()})
    return new


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", type=Path, help="a checkpoint of an earlier version (trusted: it is unpickled in full)")
    p.add_argument("new", type=Path, help="where to write the converted checkpoint")
    args = p.parse_args(argv)
    try:
        if not args.old.is_file():
            raise CheckpointError(f"{args.old}: checkpoint not found")
        if args.new.exists():
            raise CheckpointError(f"{args.new}: already exists; choose a new name")
        try:  # the one full unpickling in the project, of a file the user vouches for
            old = torch.load(args.old, map_location="cpu", weights_only=False)
        except Exception as err:
            raise CheckpointError(f"{args.old}: not a readable checkpoint ({type(err).__name__}: {err})") from None
        if not isinstance(old, dict) or not {"model", "config", "arch"} <= set(old):
            raise CheckpointError(f"{args.old}: not a train.py checkpoint (needs model, config and arch)")
        save_checkpoint(upgraded(old), args.new)
        try:
            load_checkpoint(args.new)  # reads back with weights_only=True, or says what is still unsafe
        except CheckpointError:
            args.new.unlink()
            raise
    except OSError as err:  # CheckpointError, WriteError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.new}: loads with weights_only=True (no code can run from it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
