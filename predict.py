"""Predict targeting signals with train.py checkpoints; several checkpoints form an ensemble.

python predict.py (--checkpoint CKPT [CKPT ...] | --model DIR) (--fasta IN.fa | --csv LABELLED.csv)
                  [--out OUT.json | OUT.jsonl] [--tsv OUT.tsv] [--gff3 OUT.gff3] [--embeddings OUT.npz]
                  [--plot-dir DIR [--plot-limit N | --plot-ids ID ...]] [--metrics METRICS.json]
                  [--skip-invalid [--skipped FILE]] [--chunk-size 1000] [--max-tokens 16384]
                  [--precision auto] [--layout auto] [--device auto] [--batch-size N] [--tuned-thresholds]
                  [--coverage LEVEL]
                  [--method head|centroid|both [--space auto|pooled|projection]
                   [--centroid-rule threshold|maxsep|pvalue] [--p-value P]]
torchrun --nproc_per_node=K predict.py ...   (K processes share the work; same files as one process)

The input is read and written in chunks (stream.py); the run ends with one line on stderr per file written (its
path and what it is). Outputs, their fields and the rules that place each signal: docs/prediction.md.
"""
from __future__ import annotations

import argparse
import os
import sys

OUTPUTS = ("out", "tsv", "gff3", "embeddings", "metrics")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", nargs="+", metavar="CKPT",
                       help="train.py checkpoint(s) (best.pt / last.pt); several are averaged")
    model.add_argument("--model", metavar="DIR",
                       help="a model folder written by scripts/export_model.py (one model or an ensemble)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--fasta", help="sequences to predict")
    source.add_argument("--csv", help="labelled MUTarget / TargetP CSV (Entry, MOTIF, Sequence)")
    out = p.add_argument_group("outputs (any combination, at least one)")
    out.add_argument("--out", help="per-protein records: JSON array, one record per line (.jsonl: JSON Lines)")
    out.add_argument("--tsv", help="one tab-separated line per protein")
    out.add_argument("--gff3", help="one GFF3 feature per predicted signal")
    out.add_argument("--embeddings", metavar="FILE.npz", help="ids, pooled and projection-head embeddings")
    out.add_argument("--plot-dir", metavar="DIR", help="one PNG per protein (see --plot-limit, --plot-ids)")
    out.add_argument("--plot-limit", type=int, default=100, metavar="N",
                     help="plot the first N proteins (default 100; 0: none)")
    out.add_argument("--plot-ids", nargs="+", metavar="ID", help="plot exactly these proteins instead")
    out.add_argument("--metrics", help="with --csv: write the metrics of the predictions (JSON)")
    method = p.add_argument_group("prediction method")
    method.add_argument("--method", choices=("head", "centroid", "both"), default="head",
                        help="head: the classifier (default); centroid: distances to the training split's class "
                             "centres (CLEAN's inference, stored in best.pt); both: each in fields of its own")
    method.add_argument("--space", choices=("auto", "pooled", "projection"), default="auto",
                        help="embedding space of centroid prediction (auto: projection when every checkpoint has a "
                             "projection head, else pooled)")
    method.add_argument("--centroid-rule", choices=("threshold", "maxsep", "pvalue"), default="threshold",
                        help="which centroid rule gives the centroid's predicted classes (TSV, GFF3, plots): "
                             "validation-tuned distance thresholds (can say 'no signal'), CLEAN's max-separation, or "
                             "CLEAN's p-value rule (classes with p-value <= --p-value; can say 'no signal'); the JSON "
                             "holds all three")
    method.add_argument("--p-value", type=float, default=None, metavar="P",
                        help="p-value cut of the p-value rule, between 0 and 1 (default: the one chosen on validation "
                             "and stored in best.pt; the mean over an ensemble)")
    bad = p.add_argument_group("bad records")
    bad.add_argument("--skip-invalid", action="store_true",
                     help="skip records with invalid residues or no sequence (listed on stderr and in --skipped) "
                          "instead of stopping")
    bad.add_argument("--skipped", metavar="FILE", help="report of skipped records (default: FIRST_OUTPUT.skipped.tsv)")
    run = p.add_argument_group("running")
    run.add_argument("--chunk-size", type=positive_int, default=1000, metavar="N",
                     help="proteins read, predicted and written at a time (memory grows with it)")
    run.add_argument("--max-tokens", type=positive_int, default=16384, metavar="N",
                     help="padded tokens per backbone batch")
    run.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                     help="at most N proteins per batch (default: --max-tokens alone decides)")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                     help="auto: bf16 autocast on CUDA, fp32 on the CPU")
    run.add_argument("--layout", choices=("auto", "packed", "padded"), default="auto",
                     help="packed: each batch's windows as one token stream without padding (the GPU's default); "
                          "padded: windows padded to canonical widths, whose results do not depend on the batching "
                          "bit for bit (the CPU's default); auto: packed where the fused variable-length kernel runs "
                          "(CUDA, compute capability >= 8.0, bf16 / fp16), padded elsewhere")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    out.add_argument("--coverage", type=float, default=None, metavar="LEVEL",
                     help="add each protein's conformal prediction set at this coverage, between 0 and 1 (0.9: a "
                          "class the protein has is in its set with probability >= 0.9), its size and each class's "
                          "conformal p-value; needs a calibrated model (scripts/calibrate.py)")
    run.add_argument("--tuned-thresholds", action="store_true",
                     help="use the mean of the checkpoints' valid-tuned thresholds instead of 0.5")
    args = p.parse_args(argv)
    if args.metrics and not args.csv:
        p.error("--metrics needs --csv (labelled input)")
    if not args.plot_dir and args.plot_ids:
        p.error("--plot-ids needs --plot-dir")
    if args.p_value is not None and args.method == "head":
        p.error("--p-value needs --method centroid or both")
    if args.coverage is not None and args.method == "centroid":
        p.error("--coverage needs the heads: --method head or both")
    if args.plot_limit < 0:
        p.error("--plot-limit must be >= 0")
    named = [getattr(args, k) for k in OUTPUTS if getattr(args, k)]
    if not named and not args.plot_dir:
        p.error("no output requested: give --out, --tsv, --gff3, --embeddings, --plot-dir or --metrics")
    if args.skipped and not args.skip_invalid:
        p.error("--skipped needs --skip-invalid")
    if args.skip_invalid and not args.skipped:
        args.skipped = f"{named[0] if named else args.plot_dir.rstrip('/' + os.sep)}.skipped.tsv"
    files = named + ([args.skipped] if args.skipped else [])
    resolved = [os.path.abspath(f) for f in files]
    if len(set(resolved)) < len(resolved):
        p.error("two outputs name the same file")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)  # --help and usage errors answer before torch and the project load (several seconds)
    from calibration import CalibrationError
    from config import ConfigError
    from data import DataError
    from inference import PredictError
    from stream import predict
    try:
        predict(args)
    except (DataError, PredictError, ConfigError, CalibrationError, OSError) as err:  # model.WeightsError is an OSError
        rank = int(os.environ.get("RANK", "0"))
        input_error = isinstance(err, (DataError, PredictError, CalibrationError))  # said once, by rank 0
        if rank == 0 or not input_error:
            print(f"error: {err}" if rank == 0 else f"error (rank {rank}): {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
