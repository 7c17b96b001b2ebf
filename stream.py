"""Proteome-scale prediction: the input streamed in chunks through the whole ensemble.

predict(args) (args: predict.py's options):
  1. inputs.scan checks the whole input once (bad records, duplicate ids) before any work;
  2. every checkpoint is loaded and checked once (inference.load_ensemble);
  3. each chunk of --chunk-size proteins goes through every checkpoint (inference.predict_chunk:
     identical sequences once, length-sorted token-budget batches) and its records are written
     before the next chunk is read;
  4. the output files are renamed into place at the end (outputs.Staging); on any error none is left.
Under torchrun every process reads the input and runs its share of each chunk's batches; rank 0
gathers the results and alone writes, so the files equal those of one process. Memory is bounded
by the chunk size; only --metrics (labelled CSV) keeps every protein's tracks, as its residue-level
metrics need them.
"""
from __future__ import annotations

import ctypes
import errno
import json
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import calibration
import inputs
import outputs
from config import Config
from data import DataError
from inference import (
    PredictError,
    Settings,
    autocast_dtype,
    build_ensemble,
    centroid_p_value,
    centroid_thresholds,
    chunk_cost,
    embedding_dims,
    ensemble_thresholds,
    predict_chunk,
    use_centroids,
)
from metrics import score
from packing import fused_varlen_supported
from release import read_models
from runtime import init_distributed
from utils import WriteError
from space import centroid_metrics
from vocab import CLASSES

SHOWN_SKIPPED = 20  # skipped records listed on stderr (all of them go to the report file)
MMAP_THRESHOLD = 1 << 20  # bytes: larger allocations get pages of their own, returned when freed


def return_freed_memory() -> None:
    """Have glibc serve allocations of MMAP_THRESHOLD bytes and more with mmap, so that freed tensors
    go back to the system. By default glibc raises that threshold whenever such a block is freed
    (up to 32 MiB), after which the batches' tensors of ever different sizes fragment the heap and
    memory grows chunk after chunk (demo model: peak RSS 526 MB at 1000 proteins, 817 MB at 3000).
    A no-op where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, MMAP_THRESHOLD)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class Progress:
    """A tqdm bar when the stream is a terminal; otherwise a log line at most every `interval` seconds and a
    summary at the end. Both show proteins done / total; the share done and the time left are of the work, in
    tokens (inference.token_cost), not of the proteins: each chunk runs its proteins shortest first, so proteins
    per second fall as a chunk goes on and an estimate from proteins runs low (it said 138 s left at 19% of a
    run that took 368 s). The work of chunks not read yet: the proteins left times the mean work per protein
    read so far (add_work)."""

    def __init__(self, total: int, stream=None, interval: float = 30.0, enabled: bool = True, clock=time.monotonic):
        if total < 1:
            raise ValueError(f"Progress: total must be >= 1 protein, got {total}")
        self.total, self.stream, self.interval = total, stream or sys.stderr, interval
        self.enabled, self.clock = enabled, clock
        self.done = self.done_tokens = self.read = self.read_tokens = 0
        self.start = self.last = clock()
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = None  # the tqdm bar, from the first chunk on (its total: total_tokens)

    def add_work(self, proteins: int, tokens: int) -> None:
        """A chunk of `proteins` costing `tokens` was read."""
        self.read += proteins
        self.read_tokens += tokens
        if self.tty and self.bar is None:
            self.bar = tqdm(total=max(self.total_tokens(), 1), unit="token", unit_scale=True, desc="predict",
                            file=self.stream, dynamic_ncols=True, initial=self.done_tokens,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} tokens{postfix} [{elapsed}<{remaining}]")
        elif self.bar is not None:
            self.bar.total = max(self.total_tokens(), 1)
            self.bar.refresh()

    def total_tokens(self) -> float:
        """The work of the whole input, in tokens: that of the chunks read, plus their mean per protein for the rest."""
        if self.read == 0:
            return 0.0
        return self.read_tokens + max(self.total - self.read, 0) * self.read_tokens / self.read

    def fraction(self) -> float:
        """The share of the work done (of the proteins, before any chunk was read)."""
        total = self.total_tokens()
        return min(self.done_tokens / total, 1.0) if total > 0 else self.done / self.total

    def seconds_left(self, now) -> float:
        share, spent = self.fraction(), now - self.start
        return spent * (1 - share) / share if share > 0 else float("inf")

    def _rate(self, now) -> float:
        return self.done / max(now - self.start, 1e-9)

    def update(self, n: int, tokens: int = 0) -> None:
        """n more proteins done, costing `tokens`."""
        self.done += n
        self.done_tokens += tokens
        if not self.enabled or n == 0:
            return
        if self.tty:
            if self.bar is not None:
                self.bar.set_postfix_str(f"{self.done}/{self.total} proteins", refresh=False)
                self.bar.update(tokens)
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            print(f"predict: {self.done}/{self.total} proteins, {100 * self.fraction():.0f}% of the work (tokens), "
                  f"{self._rate(now):.1f} proteins/s, about {self.seconds_left(now):.0f} s left", file=self.stream,
                  flush=True)

    def close(self, summary: bool = True) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and summary and not self.tty:
            now = self.clock()
            print(f"predict: {self.done} proteins in {now - self.start:.1f} s ({self._rate(now):.1f} proteins/s)",
                  file=self.stream, flush=True)


class LabelledOutputs:
    """With --metrics: what train.score needs, kept for every protein (labelled inputs only)."""

    def __init__(self):
        self.probs, self.motif, self.labels, self.targets, self.masks, self.distances = [], [], [], [], [], []
        self.p_values, self.calibrated = [], []

    def add(self, protein, result) -> None:
        self.probs.append(result.probs)
        self.distances.append(result.distances)
        self.p_values.append(result.p_values)
        self.calibrated.append(result.calibrated)
        self.motif.append(result.motif)
        self.labels.append(protein.labels)
        self.targets.append(protein.targets)
        mask = np.ones(protein.targets.shape, dtype=bool)
        mask[list(protein.masked)] = False
        self.masks.append(mask)

    def as_outputs(self) -> dict:
        return {"probs": np.stack(self.probs), "motif_probs": self.motif,
                "labels": np.stack(self.labels).astype(np.int64), "targets": self.targets, "target_masks": self.masks}


class Writers:
    """The writers of the requested files over one Staging; listed() says what was written where."""

    def __init__(self, args, members, thresholds, scan):
        self.staging = outputs.Staging()
        self.writers, self.files, self.plots = [], [], None  # files: (path, what it is)
        try:
            if args.skip_invalid:
                outputs.write_skipped(self.staging, args.skipped, scan.skipped)
                self.files.append((args.skipped, f"skipped records, {len(scan.skipped)} (TSV)"))
            if args.out:
                self.writers.append(outputs.JsonWriter(self.staging, args.out))
                lines = self.writers[-1].lines
                self.files.append((args.out, f"per-protein records ({'JSON Lines' if lines else 'JSON'})"))
            if args.tsv:
                self.writers.append(outputs.TsvWriter(self.staging, args.tsv, args.method, args.coverage is not None))
                self.files.append((args.tsv, "one line per protein (TSV)"))
            if args.gff3:
                self.writers.append(outputs.Gff3Writer(self.staging, args.gff3))
                self.files.append((args.gff3, "signal features (GFF3)"))
            if args.embeddings:
                dim, projection_dim, note = embedding_dims(members)
                if note:
                    print(f"warning: {note}", file=sys.stderr)
                self.writers.append(outputs.EmbeddingWriter(self.staging, args.embeddings, dim, projection_dim,
                                                            distances=args.method != "head"))
                self.files.append((args.embeddings, "embeddings (NumPy .npz)"))
            if args.plot_dir:
                self.plots = outputs.PlotWriter(self.staging, args.plot_dir, thresholds, args.plot_ids,
                                                args.plot_limit)
                self.writers.append(self.plots)
        except BaseException:
            self.staging.abort()
            raise

    def add(self, record: dict, result) -> None:
        for writer in self.writers:
            writer.add(record, result)

    def write_text(self, path, text: str, what: str) -> None:
        self.staging.open(path).write(text)
        self.files.append((path, what))

    def listed(self) -> list[str]:
        """One line per output written: its absolute path and what it is (plots: their folder and number)."""
        files = self.files + ([(self.plots.folder, f"{self.plots.written} plot(s) (PNG)")]
                              if self.plots is not None and self.plots.written else [])
        return [f"wrote {Path(path).absolute()}: {what}" for path, what in files]

    def commit(self) -> None:
        for writer in self.writers:
            writer.finish()
        self.staging.commit()

    def targets(self) -> list:
        """The output files being written."""
        return sorted({str(target) for _, target in self.staging.pending})

    def abort(self) -> None:
        self.staging.abort()


def report_skipped(scan, path) -> None:
    if not scan.skipped:
        return
    print(f"skipped {len(scan.skipped)} invalid or empty record(s), listed in {path}:", file=sys.stderr)
    for s in scan.skipped[:SHOWN_SKIPPED]:
        print(f"  line {s.line}, {s.entry!r}: {s.reason}", file=sys.stderr)
    if len(scan.skipped) > SHOWN_SKIPPED:
        print(f"  ... and {len(scan.skipped) - SHOWN_SKIPPED} more", file=sys.stderr)


def terminated(signum, frame):
    """SIGTERM (a batch system's time limit, torchrun stopping the other ranks) as an exception, so the
    temporary output files are removed as on any error."""
    raise SystemExit(128 + signum)


FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write failed for want of room


def predict(args) -> None:
    """Run predict.py's options `args`; raises DataError / PredictError / ConfigError / OSError."""
    return_freed_memory()
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminated) if main_thread else None
    rank, world, device = init_distributed(Config({"device": args.device}))
    try:
        run(args, rank, world, device)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def add_calibration(metrics: dict, labelled: LabelledOutputs, sets, notes: list) -> None:
    """--metrics of a labelled set: whether the probabilities are calibrated, their ECE / Brier (calibrated and
    not), and with --coverage the sets' realised recall and mean size (calibration.py)."""
    calibrated = None if labelled.calibrated[0] is None else np.stack(labelled.calibrated)
    labels, probs = np.stack(labelled.labels), np.stack(labelled.probs)
    metrics.update(calibrated=calibrated is not None, calibration_notes=notes,
                   calibration=calibration.calibration_report(labels, probs, calibrated))
    if sets is not None:
        metrics["sets"] = calibration.set_report(labels, calibrated, sets.stored, [sets.coverage])


def run(args, rank: int, world: int, device) -> None:
    if args.coverage is not None and not 0 < args.coverage < 1:
        raise PredictError(f"--coverage: must be between 0 and 1 (exclusive), got {args.coverage}")
    if args.p_value is not None and not 0 < args.p_value < 1:
        raise PredictError(f"--p-value: must be between 0 and 1 (exclusive), got {args.p_value}")
    source = inputs.Source(Path(args.fasta or args.csv), "fasta" if args.fasta else "csv", args.skip_invalid)
    scan = inputs.scan(source, args.plot_ids or ())
    if args.plot_ids:
        missing = [i for i in args.plot_ids if i not in scan.found]
        if missing:
            raise PredictError(f"--plot-ids: {', '.join(map(repr, missing[:5]))} not among the records to predict "
                               f"in {source.path}")
    if scan.n_valid == 0:
        raise DataError(f"{source.path}: no record left to predict ({len(scan.skipped)} skipped)")
    if args.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PredictError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16")
    members = build_ensemble(read_models(args.checkpoint, args.model), device, args.tuned_thresholds)
    thresholds = ensemble_thresholds(members, args.tuned_thresholds)
    sets, notes = calibration.for_prediction([m.calibration for m in members], [m.path for m in members],
                                             args.coverage)
    for line in notes if rank == 0 else ():
        print(f"note: {line}", file=sys.stderr)
    centroid = None
    if args.method != "head":
        space = use_centroids(members, args.space)
        p_value, unscored = centroid_p_value(members, args.centroid_rule, args.p_value)
        if unscored and rank == 0:
            more = f" and {len(unscored) - 1} more" if len(unscored) > 1 else ""
            print(f"note: {unscored[0].path}{more}: no centroid confidence mixtures or null distances stored "
                  f"(written before train.py stored them): the centroid confidence and p-value fields are left empty",
                  file=sys.stderr)
        centroid = outputs.Centroid(space, centroid_thresholds(members), args.centroid_rule, p_value)
    dtype = autocast_dtype(args.precision, device)
    settings = Settings(device, dtype, args.max_tokens, args.batch_size,  # auto: packed where the fused kernel runs
                        packed=args.layout == "packed" or (args.layout == "auto" and fused_varlen_supported(device, dtype)))
    writers = labelled = None
    if rank == 0:
        report_skipped(scan, args.skipped)
        writers = Writers(args, members, thresholds, scan)
        labelled = LabelledOutputs() if args.metrics else None
    progress = Progress(scan.n_valid, enabled=rank == 0)
    try:
        for chunk in inputs.chunks(source, args.chunk_size):
            counted, work = [0, 0], chunk_cost(members, chunk)
            progress.add_work(len(chunk), work)

            def on_batch(n, tokens):
                counted[0] += n
                counted[1] += tokens
                progress.update(n, tokens)

            results = predict_chunk(members, chunk, settings, rank, world, on_batch if rank == 0 else None)
            if rank != 0:
                continue
            progress.update(len(chunk) - counted[0], work - counted[1])  # the other processes' share
            for protein, result in zip(chunk, results):
                if centroid is not None and np.isnan(result.distances).any():
                    raise PredictError(f"{protein.entry}: NaN distances to the class centres: its {centroid.space} "
                                       f"embedding holds NaN or infinite values (numbers out of range; try "
                                       f"--precision fp32)")
                writers.add(outputs.make_record(protein.entry, result, args.method, thresholds, centroid, sets), result)
                if labelled is not None:
                    labelled.add(protein, result)
        if rank == 0:
            if labelled is not None:
                metrics = score(labelled.as_outputs(), thresholds if args.tuned_thresholds else None)
                metrics.update(n_proteins=len(labelled.probs), checkpoints=[m.path for m in members],
                               thresholds=dict(zip(CLASSES, map(float, thresholds))))
                add_calibration(metrics, labelled, sets, notes)
                if centroid is not None:  # centroid prediction scored too (space.py)
                    metrics["centroid"] = {"space": centroid.space, **centroid_metrics(
                        np.stack(labelled.labels), np.stack(labelled.distances), centroid.thresholds,
                        *((np.stack(labelled.p_values), centroid.p_value) if centroid.p_value is not None else ()))}
                writers.write_text(args.metrics, json.dumps(metrics, indent=2) + "\n", "metrics (JSON)")
            writers.commit()
        progress.close()
        for line in writers.listed() if rank == 0 else ():  # the last lines: where every output is
            print(line, file=sys.stderr)
    except BaseException as err:
        progress.close(summary=False)
        if writers is not None:
            targets = writers.targets()
            writers.abort()
            if isinstance(err, OSError) and not isinstance(err, WriteError) and err.errno in FULL:
                raise WriteError(f"{', '.join(map(str, targets))}: cannot write the outputs: {err.strerror} "
                                 f"(nothing was written; the previous files, if any, are as they were)") from None
        raise
