"""Refit the calibration of trained models (per-class temperatures, conformal scores; calibration.py) on a
labelled set you trust; nothing else in the models changes (their weights stay byte for byte the same).

python scripts/calibrate.py CKPT [CKPT ...] (--csv LABELLED.csv | --config CONFIG [--split valid|test]) --out OUT/
python scripts/calibrate.py --model FOLDER (--csv LABELLED.csv | --config CONFIG [--split valid|test]) --out OUT/

--csv: a labelled CSV in the MUTarget / TargetP format (Entry, MOTIF, Sequence), as predict.py --csv reads it.
--config: that split (default valid) of the config's data (data.root, data.fold; data.build_datasets), so that a
cross-validation fold can be calibrated after training. With checkpoints, OUT/ is a new folder holding one new
checkpoint per input (the input's file name; member<i>_NAME when two inputs share a name); with --model, OUT/ is a
new model folder. Several checkpoints, or a folder of several members, are calibrated as one ensemble: each
member's temperatures from its own logits, the conformal scores from the ensemble's calibrated probabilities, so
that predict.py's prediction sets of exactly this ensemble keep their guarantee. OUT appears whole or not at all.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import calibration  # noqa: E402
from config import ConfigError, load_config  # noqa: E402
from data import DataError, build_datasets, read_csv_file  # noqa: E402
from inference import PredictError, Settings, build_ensemble, calibrated_probs, predict_chunk  # noqa: E402
from release import MODEL_JSON, MODEL_JSON_BYTES, ReleaseError, read_models  # noqa: E402
from runtime import resolve_device  # noqa: E402
from utils import give_umask_mode, load_checkpoint, read_json, save_checkpoint, write_folder_atomic  # noqa: E402

CHUNK = 1000  # proteins predicted at a time


def labelled_set(args) -> tuple[list, str]:
    """(proteins, a description naming the file) of --csv or --config's --split."""
    if args.csv:
        proteins = read_csv_file(Path(args.csv))
        where = str(args.csv)
    else:
        config = load_config(args.config)
        proteins = build_datasets(config)[args.split].proteins
        where = f"{args.config} ({args.split} split of fold {config.data.fold}, {config.data.root})"
    if not proteins:
        raise DataError(f"{where}: no labelled protein to calibrate on")
    return proteins, where


def collect(members, proteins, settings) -> list[np.ndarray]:
    """Each member's class logits [N, 8] on the proteins (predict.py's batching, CHUNK proteins at a time)."""
    logits = [[] for _ in members]
    for start in range(0, len(proteins), CHUNK):
        part = proteins[start:start + CHUNK]
        for j, member in enumerate(members):
            logits[j].append(np.stack([r.logits for r in predict_chunk([member], part, settings)]))
    return [np.concatenate(z) for z in logits]


def as_predicted(logits: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """One member's calibrated probabilities computed as predict.py computes them (float32, per protein), so
    that the stored scores are those prediction would give these proteins."""
    return calibrated_probs(logits.astype(np.float32), temperatures.astype(np.float32))


def output_names(paths) -> list[str]:
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else [f"member{i}_{n}" for i, n in enumerate(names)]


def write_checkpoints(paths, blocks, out: Path) -> list[Path]:
    """One checkpoint per input in `out`, each its input with 'calibration' replaced."""
    names = output_names(paths)

    def write(tmp):
        for path, name, block in zip(paths, names, blocks):
            ckpt = load_checkpoint(path)
            ckpt["calibration"] = block
            save_checkpoint(ckpt, tmp / name)
    write_folder_atomic(out, write)
    return [out / n for n in names]


def write_folder(folder: Path, blocks, out: Path) -> None:
    """A copy of model folder `folder` in `out` (weights files copied byte for byte) whose model.json holds the new
    calibrations."""
    tree = read_json(folder / MODEL_JSON, f"a readable {MODEL_JSON}", ReleaseError, max_bytes=MODEL_JSON_BYTES)

    def write(tmp):
        for member, block in zip(tree["members"], blocks):
            name = Path(member["weights"]).name
            shutil.copyfile(folder / name, tmp / name)
            give_umask_mode(tmp / name)
            member["calibration"] = block
        (tmp / MODEL_JSON).write_text(json.dumps(tree, indent=1) + "\n")
        give_umask_mode(tmp / MODEL_JSON)
    write_folder_atomic(out, write)


def report(blocks, logits, labels) -> list[str]:
    """Lines for stdout: the temperatures, what the calibration cannot promise, ECE on the set before and after."""
    lines = []
    for i, block in enumerate(blocks):
        temps = ", ".join(f"{c} {t:.3g}" for c, t in block["temperatures"].items())
        lines.append(f"member {i}: temperatures {temps}" if len(blocks) > 1 else f"temperatures: {temps}")
    lines += [f"note: {line}" for line in calibration.fit_notes(blocks[0])]
    raw = np.mean([calibration.sigmoid(z) for z in logits], axis=0)
    cal = np.mean([calibration.calibrated_probs(z, calibration.temperatures_of(b)) for z, b in zip(logits, blocks)], 0)
    rep = calibration.calibration_report(labels, raw, cal)
    lines.append(f"macro ECE on this set: {rep['uncalibrated']['macro_ece']:.4f} uncalibrated, "
                 f"{rep['calibrated']['macro_ece']:.4f} calibrated (fitted on it: optimistic)")
    return lines


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="*", type=Path, metavar="CKPT")
    p.add_argument("--model", type=Path, metavar="FOLDER", help="a model folder (scripts/export_model.py) instead")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--csv", type=Path, help="labelled CSV (Entry, MOTIF, Sequence)")
    source.add_argument("--config", type=Path, help="a training config: calibrate on its data's --split")
    p.add_argument("--split", choices=("valid", "test"), default=None, help="with --config: which split (valid)")
    p.add_argument("--out", type=Path, required=True, help="a new folder: the checkpoints, or the model folder")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-tokens", type=int, default=16384, help="padded tokens per batch")
    args = p.parse_args(argv)
    if bool(args.checkpoints) == bool(args.model):
        p.error("give checkpoints or --model FOLDER (one of them)")
    if args.split and not args.config:
        p.error("--split needs --config")
    args.split = args.split or "valid"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):  # before any loading
            raise PredictError(f"{args.out}: already exists; choose a new folder")
        device = resolve_device(args.device)
        members = build_ensemble(read_models(args.checkpoints or None, args.model), device)
        proteins, where = labelled_set(args)
        logits = collect(members, proteins, Settings(device, max_tokens=args.max_tokens))
        labels = np.stack([p.labels for p in proteins]).astype(np.int64)
        blocks = calibration.fit_ensemble(logits, labels, where, as_predicted)
        if args.model:
            write_folder(args.model, blocks, args.out)
            written = f"model folder {args.out}"
        else:
            written = ", ".join(map(str, write_checkpoints(args.checkpoints, blocks, args.out)))
    except (PredictError, ConfigError, DataError, calibration.CalibrationError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"calibrated {len(members)} model(s) on {len(proteins)} proteins of {where}")
    print("\n".join(report(blocks, logits, labels)))
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
