"""Predict targeting signals with train.py checkpoints; several checkpoints form an ensemble.

python predict.py --checkpoint CKPT [CKPT ...] (--fasta IN.fa | --csv LABELLED.csv) --out OUT.json
                  [--tsv OUT.tsv] [--metrics METRICS.json] [--device auto] [--batch-size 16]
                  [--tuned-thresholds]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

import data
from data import CLASS_INDEX, CLASSES, SEGMENT_CLASSES, SITE_CLASSES, DataError
from model import Encoder
from train import resolve_device, run_inference, score
from utils import ConfigError, load_checkpoint, resolve_config, write_text_atomic


class PredictError(ValueError):
    """A checkpoint or option that cannot be used; the message names it."""


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", required=True, metavar="CKPT",
                   help="train.py checkpoint(s) (best.pt / last.pt); several are averaged")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--fasta", help="sequences to predict")
    source.add_argument("--csv", help="labelled MUTarget / TargetP CSV (Entry, MOTIF, Sequence)")
    p.add_argument("--out", required=True, help="per-protein predictions (JSON list)")
    p.add_argument("--tsv", help="also write a tab-separated table")
    p.add_argument("--metrics", help="with --csv: write the metrics of the predictions (JSON)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--tuned-thresholds", action="store_true",
                   help="use the mean of the checkpoints' valid-tuned thresholds instead of 0.5")
    args = p.parse_args(argv)
    if args.metrics and not args.csv:
        p.error("--metrics needs --csv (labelled input)")
    return args


def read_proteins(args) -> list[data.Protein]:
    if args.csv:
        proteins = data.read_csv_file(Path(args.csv))
        if not proteins:
            raise DataError(f"{args.csv}: no proteins")
        return proteins
    return [data.make_protein(ident, raw, "", f"{args.fasta}: record {ident!r}")
            for ident, _, raw in data.read_fasta(Path(args.fasta))]


def read_checkpoint(path, need_thresholds: bool):
    """(checkpoint dict, stored config, thresholds [8] or None), checked against this code."""
    try:
        ckpt = load_checkpoint(path)
    except OSError:  # not found, or utils.CheckpointError (unreadable): the message names the file
        raise
    except Exception as err:  # pickle / zip errors of a file that is no checkpoint
        raise PredictError(f"{path}: not a readable checkpoint ({err})") from None
    missing = [k for k in ("model", "config", "arch", "classes") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise PredictError(f"{path}: not a train.py checkpoint (missing {', '.join(missing)})")
    if list(ckpt["classes"]) != CLASSES:
        raise PredictError(f"{path}: checkpoint classes {list(ckpt['classes'])} differ from {CLASSES}")
    thresholds = None
    if need_thresholds:
        stored = ckpt.get("thresholds") or {}
        if set(stored) != set(CLASSES):
            raise PredictError(f"{path}: no tuned thresholds stored (only best.pt of a finished run has "
                               f"them); drop --tuned-thresholds")
        thresholds = np.array([stored[c] for c in CLASSES], dtype=np.float64)
    return ckpt, resolve_config(ckpt["config"], where=f"{path} (stored config)"), thresholds


def load_model(path, ckpt, config, device) -> Encoder:
    model = Encoder(config, arch=ckpt["arch"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise PredictError(f"{path}: weights do not match the stored architecture ({err})") from None
    return model.to(device).eval()


def ensemble(paths, dataset, device, batch_size: int, tuned: bool):
    """run_inference outputs averaged over checkpoints, and the thresholds [8]."""
    thresholds, total = [], None
    for path in paths:  # each checkpoint loaded once; outputs are written only after all succeeded
        ckpt, config, stored = read_checkpoint(path, tuned)
        thresholds.append(stored)
        model = load_model(path, ckpt, config, device)
        del ckpt
        out = run_inference(model, dataset, batch_size, device, "none", config.data.max_len, config.data.overlap)
        del model
        probs = out["probs"].astype(np.float64)
        motifs = [m.astype(np.float64) for m in out["motif_probs"]]
        if total is None:
            total = {**out, "probs": probs, "motif_probs": motifs}
        else:
            total["probs"] += probs
            total["motif_probs"] = [a + b for a, b in zip(total["motif_probs"], motifs)]
    n = len(paths)
    total["probs"] /= n
    total["motif_probs"] = [m / n for m in total["motif_probs"]]
    thr = np.mean(thresholds, axis=0) if tuned else np.full(len(CLASSES), 0.5)
    return total, thr


def segments(mask: np.ndarray) -> list[list[int]]:
    """Runs of True as 1-based inclusive [start, end] pairs."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [[int(s) + 1, int(e)] for s, e in zip(edges[::2], edges[1::2])]


def protein_record(protein, probs, motif, thresholds) -> dict:
    predicted = [c for i, c in enumerate(CLASSES) if probs[i] >= thresholds[i]]
    return {"id": protein.entry, "length": len(protein.sequence),
            "probabilities": {c: round(float(probs[i]), 4) for i, c in enumerate(CLASSES)},
            "predicted": predicted,
            "sites": {c: int(np.argmax(motif[CLASS_INDEX[c]])) + 1 for c in predicted if c in SITE_CLASSES},
            "segments": {c: segments(motif[CLASS_INDEX[c]] > 0.5) for c in predicted if c in SEGMENT_CLASSES}}


def tsv_table(records) -> str:
    head = ["id", "length", "predicted"] + [f"prob_{c}" for c in CLASSES] + [f"site_{c}" for c in SITE_CLASSES]
    rows = ["\t".join(head)]
    for r in records:
        rows.append("\t".join([r["id"], str(r["length"]), ",".join(r["predicted"])]
                              + [f"{r['probabilities'][c]:.4f}" for c in CLASSES]
                              + [str(r["sites"].get(c, "")) for c in SITE_CLASSES]))
    return "\n".join(rows) + "\n"


def predict(args) -> dict:
    """All output texts by path; nothing is written here."""
    device = resolve_device(args.device)
    proteins = read_proteins(args)
    dataset = data.LocalizationDataset(proteins, "predict")
    out, thresholds = ensemble(args.checkpoint, dataset, device, args.batch_size, args.tuned_thresholds)
    records = [protein_record(p, out["probs"][i], out["motif_probs"][i], thresholds) for i, p in enumerate(proteins)]
    texts = {args.out: json.dumps(records, indent=1) + "\n"}
    if args.tsv:
        texts[args.tsv] = tsv_table(records)
    if args.metrics:
        metrics = score(out, thresholds if args.tuned_thresholds else None)
        metrics.update(n_proteins=len(proteins), checkpoints=[str(p) for p in args.checkpoint],
                       thresholds=dict(zip(CLASSES, map(float, thresholds))))
        texts[args.metrics] = json.dumps(metrics, indent=2) + "\n"
    return texts


def write_all(texts: dict) -> None:
    """Write every file atomically; if one fails, remove those already written."""
    done = []
    try:
        for path, text in texts.items():
            write_text_atomic(path, text)
            done.append(path)
    except OSError:
        for path in done:
            os.unlink(path)
        raise


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        write_all(predict(args))
    except (DataError, PredictError, ConfigError, OSError) as err:  # model.WeightsError is an OSError
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
