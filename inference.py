"""Ensemble inference of predict.py: checkpoints loaded and checked once, each chunk of proteins
deduplicated, length-sorted, batched by a token budget and run through every checkpoint.

A protein's result does not depend on the batch it ran in, so outputs are byte-identical whatever
the chunk size or the number of processes (on the CPU; GPU kernels give no such guarantee). CPU
kernels pick their code path, and so their rounding, by the shapes and by where an element sits:
  - every window is padded to a canonical width (its token count rounded up to WIDTH_STEP) and one
    backbone call holds windows of one width only;
  - windows are stitched, and pooled, per protein;
  - the heads run on the rows of the whole batch, padded to at least MIN_ROWS rows (products of a
    few rows take other kernels, and which ones depends on the thread count);
  - each protein's residue rows start at a multiple of ROW_ALIGN rows (zero rows in between):
    matrix-vector kernels treat a row by its position modulo a small block;
  - sigmoids are taken per protein (vectorised exp rounds differently in a tensor's tail).
tests/test_stream.py checks results bit for bit across batchings (each of the last three measures
is needed there) and the files of one against two processes (one thread each under torchrun).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import confidence
import vocab
from config import resolve_config
from model import Encoder, load_model_state
from release import Trained, from_checkpoint
from runtime import autocast
from space import centre_distances
from vocab import CLASSES

WIDTH_STEP = 32  # window widths (tokens, BOS and EOS included) are rounded up to a multiple of this
MIN_ROWS = 256  # head inputs are padded to at least this many rows
ROW_ALIGN = 16  # each protein's residue rows start at a multiple of this row in the heads' input


class PredictError(ValueError):
    """A checkpoint or option that cannot be used; the message names it."""


# --------------------------------------------------------------------------- checkpoints
def checked_config(trained: Trained, need_thresholds: bool):
    """(stored config, thresholds [8] or None) of a trained model, checked against this code."""
    if trained.classes != CLASSES:
        raise PredictError(f"{trained.name}: classes {trained.classes} differ from {CLASSES}")
    thresholds = None
    if need_thresholds:
        stored = trained.thresholds or {}
        if set(stored) != set(CLASSES):
            raise PredictError(f"{trained.name}: no tuned thresholds stored (only best.pt of a finished run has "
                               f"them); drop --tuned-thresholds")
        thresholds = np.array([stored[c] for c in CLASSES], dtype=np.float64)
    return resolve_config(trained.config, where=f"{trained.name} (stored config)"), thresholds


def load_model(trained: Trained, config, device) -> Encoder:
    model = Encoder(config, arch=trained.arch)
    load_model_state(model, trained.state, trained.name)  # weights that do not fit: ConfigError naming the file
    return model.to(device).eval()


@dataclass
class Member:
    """One checkpoint of the ensemble: its model (eval mode, on the device), windowing, thresholds."""

    path: str
    model: Encoder
    max_len: int
    overlap: int
    thresholds: np.ndarray | None
    centroids: dict | None = None  # train.py's class centres per embedding space (best.pt), if stored
    space: str | None = None  # the space of centroid prediction, set by use_centroids
    checkpoint: str | None = None  # the train.py checkpoint it came from (None: a release folder)
    calibration: dict | None = None  # temperatures and conformal scores (calibration.py), if stored
    temperatures: np.ndarray | None = None  # [8] float32, from calibration


def load_ensemble(paths, device, tuned: bool = False) -> list[Member]:
    """build_ensemble of train.py checkpoints."""
    return build_ensemble((from_checkpoint(path) for path in paths), device, tuned)


def build_ensemble(models, device, tuned: bool = False) -> list[Member]:
    """Every trained model (release.Trained, from checkpoints or a release folder; read one at a time)
    loaded once. All must agree on the classes (checked against this code's) and on the windowing
    (data.max_len, data.overlap: the windows are built once per batch for all of them); errors name the
    file."""
    members = []
    for trained in models:
        config, thresholds = checked_config(trained, tuned)
        window = (config.data.max_len, config.data.overlap)
        if members and window != (members[0].max_len, members[0].overlap):
            first = members[0]
            raise PredictError(f"{trained.name}: windowing data.max_len={window[0]}, data.overlap={window[1]} differs "
                               f"from {first.path} (data.max_len={first.max_len}, data.overlap={first.overlap}); "
                               f"the checkpoints of an ensemble must share it")
        temperatures = None if trained.calibration is None else np.array(
            [trained.calibration["temperatures"][c] for c in CLASSES], dtype=np.float32)
        members.append(Member(trained.name, load_model(trained, config, device), *window, thresholds,
                              trained.centroids, checkpoint=trained.checkpoint, calibration=trained.calibration,
                              temperatures=temperatures))
        del trained
    return members


def use_centroids(members: list[Member], space: str) -> str:
    """Prepare centroid prediction in `space` (pooled | projection | auto: projection when every
    checkpoint has a projection head, else pooled); returns the space used. A checkpoint without the
    space's centres is a PredictError naming it and the remedy."""
    if space == "auto":
        space = "projection" if all(m.model.projection is not None for m in members) else "pooled"
    for m in members:
        if space == "projection" and m.model.projection is None:
            raise PredictError(f"{m.path}: --space projection, but this model has no projection head (it was "
                               f"trained without SupCon); use --space pooled")
        if not m.centroids or space not in m.centroids:
            fix = (f"add them with: python scripts/add_centroids.py {m.checkpoint}" if m.checkpoint else
                   "add them to its checkpoint with scripts/add_centroids.py and export the model again")
            raise PredictError(f"{m.path}: no class centres of the {space} space stored (checkpoints written before "
                               f"train.py stored them, or last.pt); {fix}")
        m.space = space
    return space


def centroid_thresholds(members: list[Member]) -> np.ndarray:
    """Mean of the checkpoints' validation-tuned distance thresholds [8] in their centroid space."""
    return np.mean([m.centroids[m.space]["thresholds"] for m in members], axis=0)


def centroid_p_value(members: list[Member], rule: str, given: float | None) -> tuple[float | None, list]:
    """(p-value cut, members without confidence fields). The cut: `given` (--p-value), else the mean of the
    checkpoints' validation-chosen ones; None when a checkpoint lacks the confidence mixtures and null distances
    (confidence.FIELDS), which --centroid-rule pvalue needs (PredictError naming the file and the remedy)."""
    missing = [m for m in members if not confidence.calibrated(m.centroids[m.space])]
    if missing and rule == "pvalue":
        m = missing[0]
        fix = (f"add them with: python scripts/add_centroids.py {m.checkpoint}" if m.checkpoint else
               "add them to its checkpoint with scripts/add_centroids.py and export the model again")
        raise PredictError(f"{m.path}: --centroid-rule pvalue needs the centroid confidence mixtures and null "
                           f"distances of the {m.space} space, which this model does not store (written before "
                           f"train.py stored them); {fix}, or retrain")
    if missing:
        return None, missing
    return (given if given is not None else float(np.mean([m.centroids[m.space]["p_value"] for m in members]))), []


def ensemble_thresholds(members: list[Member], tuned: bool) -> np.ndarray:
    """Mean of the checkpoints' tuned thresholds [8], or 0.5 for every class."""
    if tuned:
        return np.mean([m.thresholds for m in members], axis=0)
    return np.full(len(CLASSES), 0.5)


def embedding_dims(members: list[Member]) -> tuple[int, int | None, str]:
    """(pooled size, projection size or None, note). Pooled embeddings of different sizes cannot be
    averaged (PredictError naming the file); the projection is averaged only when every checkpoint has
    a projection head of one size, else left out and the note says why."""
    dim = members[0].model.backbone.embed_dim
    for m in members[1:]:
        if m.model.backbone.embed_dim != dim:
            raise PredictError(f"{m.path}: pooled embeddings of size {m.model.backbone.embed_dim} differ from "
                               f"{members[0].path} ({dim}); --embeddings needs checkpoints of one backbone size")
    heads = [None if m.model.projection is None else m.model.projection.net[-1].out_features for m in members]
    if all(h is None for h in heads):
        return dim, None, ""
    if None in heads or len(set(heads)) > 1:
        return dim, None, ("projection embeddings left out: the checkpoints' projection heads differ "
                           f"({', '.join(f'{m.path}: {h}' for m, h in zip(members, heads))})")
    return dim, heads[0], ""


def autocast_dtype(precision: str, device: torch.device):
    """fp32 -> None; bf16 -> bfloat16 (CUDA or CPU); auto -> bfloat16 on CUDA when supported, else None."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None


# --------------------------------------------------------------------------- batches
def window_width(length: int, max_len: int) -> int:
    """Padded token width of a protein's windows: min(length, max_len) + BOS + EOS, rounded up to WIDTH_STEP."""
    return -(-(min(length, max_len) + 2) // WIDTH_STEP) * WIDTH_STEP


def token_cost(length: int, max_len: int, overlap: int) -> int:
    """Padded tokens of a protein's windows (windows x window_width): what predicting it costs, near enough (the
    progress estimate; the token budget of plan_batches)."""
    return len(vocab.window_starts(length, max_len, overlap)) * window_width(length, max_len)


def chunk_cost(members: list[Member], proteins) -> int:
    """token_cost summed over the distinct sequences of `proteins` (identical ones are predicted once)."""
    m = members[0]
    return sum(token_cost(len(s), m.max_len, m.overlap) for s in {p.sequence for p in proteins})


def plan_batches(lengths, max_len: int, overlap: int, max_tokens: int,
                 max_proteins: int | None = None) -> list[list[int]]:
    """Indices of `lengths` in batches: length-sorted, one window width per batch, at most
    max_tokens padded tokens (windows x width; a protein longer than that runs alone) and at most
    max_proteins proteins."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    batches, current, width, tokens = [], [], None, 0
    for i in order.tolist():
        w, n = window_width(lengths[i], max_len), token_cost(lengths[i], max_len, overlap)
        if current and (w != width or tokens + n > max_tokens or (max_proteins and len(current) >= max_proteins)):
            batches.append(current)
            current, tokens = [], 0
        current.append(i)
        width, tokens = w, tokens + n
    if current:
        batches.append(current)
    return batches


class Batch:
    """Windows of a few proteins for the backbone, padded or packed.

    Padded (the CPU's default: results independent of the batching, see the module docstring): tokens [W, T]
    (BOS, residues, EOS, padding; T a multiple of WIDTH_STEP), per protein its windows as (row, start,
    residues), and `full`, the window count of a batch that fills the token budget at this width.
    Packed (packed=True; the GPU's default): tokens [N], the windows' tokens one after the other, longest first,
    `widths` their token counts (padded too: each row's), and per protein its windows as (first token, start,
    residues).
    """

    def __init__(self, sequences: list[str], max_len: int, overlap: int, device, max_tokens: int = 16384,
                 packed: bool = False):
        self.lengths, self.packed = [len(s) for s in sequences], packed
        width = window_width(max(self.lengths), max_len)
        self.full = max(1, max_tokens // width)
        self.spans, pieces = [], []
        for seq in sequences:
            toks = vocab.tokenize(seq)
            spans = []
            for s in vocab.window_starts(len(seq), max_len, overlap):
                piece = toks[s:s + max_len]
                spans.append((len(pieces), s, len(piece)))
                pieces.append(piece)
            self.spans.append(spans)
        framed = [np.concatenate([[vocab.BOS_IDX], piece, [vocab.EOS_IDX]]) for piece in pieces]
        if packed:
            order = sorted(range(len(framed)), key=lambda w: -len(framed[w]))  # longest first
            offsets, start = {}, 0
            for w in order:
                offsets[w] = start
                start += len(framed[w])
            self.spans = [[(offsets[row], s, n) for row, s, n in spans] for spans in self.spans]
            self.widths = [len(framed[w]) for w in order]
            self.tokens = torch.from_numpy(np.concatenate([framed[w] for w in order])).to(device)
            return
        self.widths = [len(piece) for piece in framed]
        tokens = torch.full((len(pieces), width), vocab.PAD_IDX, dtype=torch.long)
        for row, piece in enumerate(framed):
            tokens[row, :len(piece)] = torch.from_numpy(piece)
        self.tokens = tokens.to(device)


def call_sizes(windows: int, full: int) -> list[int]:
    """Window counts of the backbone calls for a batch of `windows` windows: calls of `full` windows
    (the token budget), then the rest in powers of two, largest first; no call exceeds the budget (one
    long protein may have more windows than fit in it). oneDNN (GELU on the CPU) compiles and keeps a
    kernel for every tensor shape it meets, about 90 kB each and never freed: shapes from this small
    set keep memory flat however many batches run."""
    rest = windows % full
    return [full] * (windows // full) + [1 << b for b in reversed(range(rest.bit_length())) if rest >> b & 1]


def run_backbone(model: Encoder, batch: Batch) -> torch.Tensor:
    """The batch's windows through the backbone: packed, in one call ([N, d]; the batch holds at most
    --max-tokens tokens); padded, in calls of call_sizes ([W, T, d])."""
    if batch.packed:
        return model.packed_forward(batch.tokens, batch.widths, budget=0)
    parts, start = [], 0
    for size in call_sizes(batch.tokens.shape[0], batch.full):
        parts.append(model.backbone_forward(batch.tokens[start:start + size], batch.widths[start:start + size],
                                            packed=False, split=False))
        start += size
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def window_residues(reps: torch.Tensor, place: int, n: int) -> torch.Tensor:
    """A window's residue outputs [n, d]: from padded reps [W, T, d] (place = row) or a packed stream's [N, d]
    (place = the window's first token)."""
    return reps[place, 1:n + 1] if reps.dim() == 3 else reps[place + 1:place + 1 + n]


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x [n, d] with zero rows appended up to `rows` rows (unchanged if n >= rows)."""
    return x if x.shape[0] >= rows else torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])])


def stitch(reps: torch.Tensor, spans, length: int) -> torch.Tensor:
    """Residue representations of one protein [length, d] from its windows' outputs (padded [W, T, d] or
    packed [N, d]; overlaps averaged)."""
    if len(spans) == 1:
        place, _, n = spans[0]
        return window_residues(reps, place, n)
    total = reps.new_zeros(length, reps.shape[-1])
    count = reps.new_zeros(length, 1)
    for place, s, n in spans:
        total[s:s + n] += window_residues(reps, place, n)
        count[s:s + n] += 1
    return total / count


def sigmoid_each(logits: torch.Tensor, begins, ends) -> list[np.ndarray]:
    """Probabilities of column slices [:, a:b] of logits [C, N], each slice on its own: vectorised
    transcendental functions round differently in a tensor's body and in its tail, so a protein's
    probabilities must not depend on where its columns sit in the batch."""
    logits = logits.float().cpu()
    return [torch.sigmoid(logits[:, a:b].contiguous()).numpy() for a, b in zip(begins, ends)]


@torch.inference_mode()
def run_member(model: Encoder, batch: Batch, dtype=None) -> dict:
    """One checkpoint on one batch of B proteins (what Encoder.forward computes in eval mode).
    Returns float32 numpy arrays: probs [B, 8], motif (list of [8, L_i]), pooled [B, d],
    projection [B, k] (None without a projection head), logits [B, 8]. Probabilities are sigmoids of fp32 logits."""
    B = len(batch.lengths)
    with autocast(batch.tokens.device, dtype):
        reps = run_backbone(model, batch).float()  # [W, T, d] padded, [N, d] packed
        residues = [stitch(reps, spans, n) for spans, n in zip(batch.spans, batch.lengths)]
        pooled = torch.stack([r.mean(0) for r in residues])  # [B, d]
        starts = np.cumsum([0] + [-(-n // ROW_ALIGN) * ROW_ALIGN for n in batch.lengths])
        flat = reps.new_zeros(max(int(starts[-1]), MIN_ROWS), reps.shape[-1])
        for r, a in zip(residues, starts):
            flat[a:a + len(r)] = r
        motif_logits = model.decoders(flat[None])[0]  # [8, rows]
        heads_in = pad_rows(pooled, MIN_ROWS)
        class_logits = model.classifier(model.class_dropout(heads_in))[:B]  # [B, 8]
        projection = None if model.projection is None else model.projection(heads_in)[:B].float().cpu().numpy()
    return {"probs": np.concatenate(sigmoid_each(class_logits.T, range(B), range(1, B + 1)), axis=1).T,
            "motif": sigmoid_each(motif_logits, starts[:-1], starts[:-1] + np.array(batch.lengths)),
            "pooled": pooled.cpu().numpy(), "projection": projection, "logits": class_logits.float().cpu().numpy()}


def calibrated_probs(logits: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """Calibrated probabilities [B, 8] = sigmoid(z / T_c) of one checkpoint's logits [B, 8] (float32) and its
    temperatures [8] (float32), per protein as run_member's (sigmoid_each; division rounds the same anywhere)."""
    z = (torch.from_numpy(logits) / torch.from_numpy(temperatures)).T
    return np.concatenate(sigmoid_each(z, range(len(logits)), range(1, len(logits) + 1)), axis=1).T


@dataclass
class Result:
    """The ensemble's output for one sequence: probs [8] and motif [8, L] (float64 means of the
    checkpoints' probabilities), pooled [d] and projection [k] (float32 means; pooled None when the
    backbones differ in size, projection None unless every checkpoint has a projection head of one
    size), distances [8] (mean over the
    checkpoints of the Euclidean distances to each one's class centres; None without use_centroids; NaN for
    an embedding holding NaN), confidence and p_values [8] (means over the checkpoints of each one's mixture
    confidence and p-values, confidence.member_scores; None unless every checkpoint stores their fields),
    calibrated [8] (the mean of the checkpoints' calibrated class probabilities, calibration.py; None unless every
    checkpoint has a calibration) and logits [8] (the mean of their class logits)."""

    probs: np.ndarray
    motif: np.ndarray
    pooled: np.ndarray | None
    projection: np.ndarray | None
    distances: np.ndarray | None = None
    confidence: np.ndarray | None = None
    p_values: np.ndarray | None = None
    calibrated: np.ndarray | None = None
    logits: np.ndarray | None = None


@dataclass
class Settings:
    """How predict.py runs the models: device, autocast dtype (None: fp32), token budget of a batch, at most
    max_proteins proteins a batch (None: no limit), packed or padded layout (Batch)."""

    device: torch.device
    dtype: torch.dtype | None = None
    max_tokens: int = 16384
    max_proteins: int | None = None
    packed: bool = False


def run_ensemble(members: list[Member], sequences: list[str], settings: Settings) -> list[Result]:
    """Every checkpoint on one batch of sequences; means over the checkpoints, in checkpoint order."""
    batch = Batch(sequences, members[0].max_len, members[0].overlap, settings.device, settings.max_tokens,
                  settings.packed)
    outs = [run_member(m.model, batch, settings.dtype) for m in members]
    n = len(outs)
    keep_projection = all(o["projection"] is not None for o in outs) and len({o["projection"].shape for o in outs}) == 1
    keep_pooled = len({o["pooled"].shape for o in outs}) == 1  # backbones of different sizes: no mean embedding

    scored = members[0].space is not None and all(confidence.calibrated(m.centroids[m.space]) for m in members)
    calibrate = all(m.temperatures is not None for m in members)
    for m, o in zip(members, outs):
        if calibrate:
            o["calibrated"] = calibrated_probs(o["logits"], m.temperatures)
        if m.space is not None:  # distances of each protein to this checkpoint's own class centres
            o["distances"] = centre_distances(o[m.space], m.centroids[m.space]["centres"])
            o["distances"][~np.isfinite(o[m.space]).all(1)] = np.nan  # not inf: stream.py refuses the protein
        if scored:
            o["confidence"], o["p_values"] = confidence.member_scores(o["distances"], m.centroids[m.space])

    def mean(key, i):
        return sum(o[key][i].astype(np.float64) for o in outs) / n

    return [Result(mean("probs", i), mean("motif", i), mean("pooled", i).astype(np.float32) if keep_pooled else None,
                   mean("projection", i).astype(np.float32) if keep_projection else None,
                   mean("distances", i) if members[0].space is not None else None,
                   mean("confidence", i) if scored else None, mean("p_values", i) if scored else None,
                   calibrated=mean("calibrated", i) if calibrate else None, logits=mean("logits", i))
            for i in range(len(sequences))]


def predict_chunk(members: list[Member], proteins, settings: Settings, rank: int = 0, world: int = 1,
                  on_batch=None):
    """Results for `proteins` (list of data.Protein), in their order, on rank 0 (None on other ranks).

    Identical sequences are predicted once. The distinct sequences are length-sorted and batched
    (plan_batches); with world > 1 processes, rank r runs batches r, r + world, ... and rank 0
    gathers the results. on_batch(n, tokens) is called after each of this rank's batches with the number
    of proteins (duplicates included) it covered and their token_cost (each distinct sequence once)."""
    unique, of_protein = {}, []
    for p in proteins:
        of_protein.append(unique.setdefault(p.sequence, len(unique)))
    sequences = list(unique)
    copies = np.bincount(of_protein, minlength=len(sequences))
    batches = plan_batches([len(s) for s in sequences], members[0].max_len, members[0].overlap,
                           settings.max_tokens, settings.max_proteins)
    results = {}
    for batch in batches[rank::world]:
        results.update(zip(batch, run_ensemble(members, [sequences[i] for i in batch], settings)))
        if on_batch is not None:
            on_batch(int(copies[batch].sum()),
                     sum(token_cost(len(sequences[i]), members[0].max_len, members[0].overlap) for i in batch))
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object(results, gathered, dst=0)
        if rank != 0:
            return None
        for part in gathered:
            results.update(part)
    return [results[u] for u in of_protein]
