"""Export trained models as a model folder to publish: safetensors weights plus a JSON description.

python scripts/export_model.py CKPT [CKPT ...] OUT/

CKPT: train.py checkpoints (best.pt of each fold of an ensemble, say); OUT: a new folder holding
model.json (format, classes, and per checkpoint its training config, backbone architecture, tuning
mode, validation-tuned thresholds and class centres) and member<i>.safetensors (its weights). Neither
file can run code when read. predict.py --model OUT/ predicts from it exactly as predict.py
--checkpoint CKPT... does (byte-identical outputs). The checkpoints must agree on the classes and on
the windowing (data.max_len, data.overlap), as an ensemble must; the optimiser state is not exported.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from config import ConfigError  # noqa: E402
from data import DataError  # noqa: E402
from inference import PredictError, checked_config  # noqa: E402
from release import from_checkpoint, write_release  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path, metavar="CKPT")
    p.add_argument("out", type=Path, metavar="OUT")
    args = p.parse_args(argv)
    try:
        if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):  # before any loading
            raise PredictError(f"{args.out}: already exists; choose a new folder")
        tuned = []
        n = write_release(checked(args.checkpoints, tuned), args.out)
    except (PredictError, ConfigError, DataError, OSError) as err:  # OSError: CheckpointError, WriteError
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {n} model(s), {sum(tuned)} with validation-tuned thresholds; predict with "
          f"python predict.py --model {args.out} ...")
    return 0


def checked(paths, tuned: list):
    """The checkpoints, read one at a time, checked as predict.py checks an ensemble (classes, config,
    one windowing); `tuned` collects whether each has tuned thresholds."""
    windows = set()
    for path in paths:
        trained = from_checkpoint(path)
        config, _ = checked_config(trained, need_thresholds=False)
        windows.add((config.data.max_len, config.data.overlap))
        if len(windows) > 1:
            raise PredictError(f"{path}: windowing (data.max_len, data.overlap) differs from the checkpoints "
                               f"before it; the members of an ensemble must share it")
        tuned.append(trained.thresholds is not None)
        yield trained

if __name__ == "__main__":
    sys.exit(main())
