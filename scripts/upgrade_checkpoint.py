"""Convert a checkpoint written by an earlier version of this project into today's format.

python scripts/upgrade_checkpoint.py OLD.pt NEW.pt

Earlier versions stored NumPy objects in their checkpoints (NumPy's RNG state, the class centres of
centroid prediction), which train.py, predict.py and the other scripts do not read. This script reads
OLD.pt with torch.load(weights_only=True) and an allowlist of NumPy's array classes and the functions that
rebuild arrays and scalars from their bytes (utils.legacy_globals): data only, never a full unpickling, so
no code in the file can run. A file that refers to anything else (a pickle payload) is refused like
everywhere else. The NumPy parts are rewritten as tensors and numbers, the result is checked to load without
the allowlist, and NEW.pt is written atomically; OLD.pt is left as it is.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from space import to_stored  # noqa: E402
from utils import (CheckpointError, UnsafeFileError, legacy_globals, load_checkpoint, save_checkpoint,  # noqa: E402
                   torch_load_safe)


def _numpy_rng(state) -> dict | None:
    """NumPy's legacy RNG state as rng_state() stores it, from np.random.get_state()'s tuple ('MT19937', key [624],
    pos, has_gauss, gauss) or its dict form; None when `state` is neither."""
    if isinstance(state, tuple) and len(state) == 5:
        _, key, pos, has_gauss, gauss = state
    elif isinstance(state, dict) and isinstance(state.get("state"), dict) and "key" in state["state"]:
        key, pos = state["state"]["key"], state["state"]["pos"]
        has_gauss, gauss = state.get("has_gauss", 0), state.get("gauss", 0.0)
    else:
        return None
    return {"key": torch.from_numpy(np.asarray(key).astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
            "gauss": float(gauss)}


def _plain(value):
    """A value with its NumPy arrays as tensors and its NumPy scalars as Python numbers (nested containers too)."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


def upgraded(old: dict) -> dict:
    """The checkpoint dict with its NumPy objects as tensors, numbers and dicts."""
    new = dict(old)
    rng = dict(old.get("rng") or {})
    numpy_state = _numpy_rng(rng.get("numpy"))
    if numpy_state is not None:
        rng["numpy"] = numpy_state
        new["rng"] = rng
    if old.get("centroids"):
        new["centroids"] = to_stored({space: {k: np.asarray(v) for k, v in fitted.items()}
                                      for space, fitted in old["centroids"].items()})
    return _plain(new)


def read_old(path: Path) -> dict:
    """OLD.pt read with weights_only=True and the NumPy allowlist; anything else in it is refused unread."""
    try:
        old = torch_load_safe(path, legacy_globals(), what="checkpoint")
    except UnsafeFileError as err:
        raise CheckpointError(f"{err}; not converted: checkpoints of earlier versions of this project hold "
                              f"only tensors, numbers, NumPy arrays and containers") from None
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt? "
                              f"({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})"
                              ) from None
    if not isinstance(old, dict) or not {"model", "config", "arch"} <= set(old):
        raise CheckpointError(f"{path}: not a train.py checkpoint (needs model, config and arch)")
    return old


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", type=Path, help="a checkpoint of an earlier version (read as data: no code can run)")
    p.add_argument("new", type=Path, help="where to write the converted checkpoint")
    args = p.parse_args(argv)
    try:
        if not args.old.is_file():
            raise CheckpointError(f"{args.old}: checkpoint not found")
        if args.new.exists():
            raise CheckpointError(f"{args.new}: already exists; choose a new name")
        save_checkpoint(upgraded(read_old(args.old)), args.new)
        try:
            load_checkpoint(args.new)  # reads back with weights_only=True, or says what is still unsafe
        except CheckpointError:
            args.new.unlink()
            raise
    except OSError as err:  # CheckpointError, WriteError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.new}: loads with weights_only=True and no allowlist")
    return 0


if __name__ == "__main__":
    sys.exit(main())
