"""Checkpoints as a transaction: the order in which an epoch's files are written, so that metrics.jsonl,
last.pt and best.pt agree after a kill or a failed write at any instant, and the checks of a checkpoint to
resume from, all made before a run writes anything.

An epoch writes, each file to a temporary file renamed into place:
 1. last.pt: the whole state, with `history`, the rows of metrics.jsonl so far (this epoch's included);
 2. best.pt when the epoch improved: a copy of last.pt;
 3. metrics.jsonl, from that history.
The final test writes best.pt with thresholds and class centres, then test_metrics.json.
On resume, metrics.jsonl is rewritten from the checkpoint's history (a row lost to a kill comes back, a
damaged line does not matter), and best.pt must hold the best epoch the checkpoint names: if it does not
(a kill between 1 and 2), the checkpoint is that epoch's state and best.pt is re-created from it; any other
disagreement is refused, naming both files.
"""
from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from utils import CheckpointError, load_checkpoint, save_checkpoint, torch_load_safe, write_atomic, write_text_atomic

ADAM_TENSORS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
SCALER_KEYS = {"scale": float, "growth_factor": float, "backoff_factor": float, "growth_interval": int,
               "_growth_tracker": int}


# --------------------------------------------------------------------------- writing
def metrics_text(history: list) -> str:
    """metrics.jsonl's text: one JSON line per record of `history`."""
    return "".join(json.dumps(r) + "\n" for r in history)


def write_metrics(run_dir, history: list) -> None:
    write_text_atomic(Path(run_dir) / "metrics.jsonl", metrics_text(history))


def commit_epoch(run_dir, checkpoint: dict, improved: bool) -> None:
    """An epoch's files, in the order that keeps them consistent: last.pt (holding checkpoint['history']), best.pt
    (a copy of last.pt, when improved), metrics.jsonl (from the history)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    save_checkpoint(checkpoint, ckpt_dir / "last.pt")
    if improved:
        copy_checkpoint(ckpt_dir / "last.pt", ckpt_dir / "best.pt")
    write_metrics(run_dir, checkpoint["history"])


def copy_checkpoint(source, target) -> None:
    write_atomic(target, lambda tmp: shutil.copyfile(source, tmp))


# --------------------------------------------------------------------------- resume: the plan
@dataclass
class ResumePlan:
    """What resuming does once files may be written: re-create best.pt from `best_source` (when set), rewrite
    metrics.jsonl from `history`, log `notes`."""

    history: list
    best_source: Path | None = None
    notes: list = field(default_factory=list)

    def changes(self, run_dir) -> bool:
        """Whether carrying it out changes a file of run_dir (or logs a note)."""
        metrics = Path(run_dir) / "metrics.jsonl"
        try:
            same = metrics.read_text() == metrics_text(self.history)
        except (OSError, UnicodeDecodeError):
            same = False
        return self.best_source is not None or bool(self.notes) or not same


def apply_resume(plan: ResumePlan, run_dir, log) -> None:
    """Carry out a ResumePlan (main process, after the run directory is set up)."""
    best = Path(run_dir) / "checkpoints" / "best.pt"
    if plan.best_source is not None:
        copy_checkpoint(plan.best_source, best)
        log.info("re-created %s from %s (a run stopped before writing it)", best, plan.best_source)
    write_metrics(run_dir, plan.history)
    for note in plan.notes:
        log.warning(note)


def check_resume(ckpt: dict, path, config, model, optimizer, scaler_enabled: bool) -> ResumePlan:
    """Check every training-state field of a checkpoint to resume from, and that best.pt of the run holds the
    best epoch it names; nothing is written. model / optimizer: the run's, built but not loaded (the optimiser
    gives the parameter groups); scaler_enabled: whether fp16 loss scaling runs. A bad field or a best.pt that
    cannot be reconciled: CheckpointError naming the file and the field. Returns what to do once files may be
    written."""
    path = Path(path)
    epoch = _check_progress(ckpt, path, config.train.epochs)
    history, notes = _check_history(ckpt, path, Path(config.run_dir), epoch)
    _check_rng(ckpt["rng"], path)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    _check_scheduler(ckpt["scheduler"], path, len(groups))
    _check_scaler(ckpt["scaler"], path, scaler_enabled)
    _check_optimizer(ckpt["optimizer"], path, groups, {n: tuple(p.shape) for n, p in model.named_parameters()})
    return ResumePlan(history, _best_source(ckpt, path, Path(config.run_dir) / "checkpoints" / "best.pt"), notes)


def _bad(path, name: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: field '{name}' {problem}; not a consistent train.py checkpoint")


def _show(value) -> str:
    """A value for a one-line message: its repr on one line, at most 60 characters."""
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_progress(ckpt: dict, path, epochs: int) -> int:
    epoch, best, best_epoch, bad = (ckpt[k] for k in ("epoch", "best_metric", "best_epoch", "bad_epochs"))
    if not _is_int(epoch) or not 0 <= epoch <= epochs:
        raise _bad(path, "epoch", f"is {_show(epoch)}, not an epoch count from 0 to train.epochs ({epochs}; raise it "
                                  f"with --set train.epochs=N to train on)")
    if not (_is_number(best) and (best == -math.inf or -1 <= best <= 1)):
        raise _bad(path, "best_metric", f"is {_show(best)}, not a macro-MCC (-1 to 1) or -inf")
    if best_epoch is not None and not (_is_int(best_epoch) and 0 <= best_epoch < epoch):
        raise _bad(path, "best_epoch", f"is {_show(best_epoch)}, not None or an epoch before 'epoch' ({epoch})")
    if (best_epoch is None) != (best == -math.inf):
        raise _bad(path, "best_epoch", f"is {_show(best_epoch)} while 'best_metric' is {_show(best)}: both are set "
                                       f"or neither")
    limit = epoch if best_epoch is None else epoch - 1 - best_epoch
    if not _is_int(bad) or not 0 <= bad <= limit:
        raise _bad(path, "bad_epochs", f"is {_show(bad)}, not a count from 0 to {limit} (epochs since the best)")
    return epoch


def _check_history(ckpt: dict, path, run_dir: Path, epoch: int) -> tuple[list, list]:
    """The checkpoint's metrics rows (checked), or, from checkpoints of earlier versions that held none, the
    rows of the run's metrics.jsonl before `epoch` (lines that are not such rows skipped, with a note)."""
    if "history" not in ckpt:
        return _read_metrics(run_dir / "metrics.jsonl", epoch)
    history = ckpt["history"]
    if not isinstance(history, list) or len(history) != epoch:
        raise _bad(path, "history", f"is not a list of {epoch} metrics rows (one per epoch trained)")
    for i, row in enumerate(history):
        if not isinstance(row, dict) or row.get("epoch") != i:
            raise _bad(path, "history", f"row {i} is not the metrics row of epoch {i}")
    try:
        json.dumps(history)
    except (TypeError, ValueError) as err:
        raise _bad(path, "history", f"holds a value that is no JSON ({err})") from None
    best_epoch = ckpt["best_epoch"]
    if best_epoch is not None and history[best_epoch].get("val_macro_mcc") != ckpt["best_metric"]:
        raise _bad(path, "best_metric", f"is {_show(ckpt['best_metric'])}, but its history gives epoch {best_epoch} "
                                        f"val_macro_mcc {_show(history[best_epoch].get('val_macro_mcc'))}")
    return history, []


def _read_metrics(path: Path, epoch: int) -> tuple[list, list]:
    rows, skipped = [], 0
    try:
        lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    except OSError as err:
        return [], [f"{path}: unreadable ({err.strerror or err}): the rows before epoch {epoch} are lost (the "
                    f"checkpoint, of an earlier version, holds no history to rebuild them from)"]
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and _is_int(row.get("epoch")):
            if row["epoch"] < epoch:
                rows.append(row)
        else:
            skipped += 1
    notes = [f"{path}: {skipped} line(s) that are not metrics rows dropped (the checkpoint, of an earlier version, "
             f"holds no history to rebuild them from)"] if skipped else []
    return rows, notes


def _check_rng(rng, path) -> None:
    """Python, NumPy and torch (and CUDA) generator states as utils.rng_state stores them, each tried on a
    throwaway generator."""
    if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng):
        raise _bad(path, "rng", "lacks the 'python', 'numpy' and 'torch' generator states")
    try:
        random.Random().setstate(rng["python"])
    except (TypeError, ValueError, OverflowError) as err:
        raise _bad(path, "rng.python", f"is not a Python random state ({err})") from None
    state = rng["numpy"]
    key = state.get("key") if isinstance(state, dict) else None
    if not (torch.is_tensor(key) and key.dtype == torch.int64 and tuple(key.shape) == (624,)
            and _is_int(state.get("pos")) and _is_int(state.get("has_gauss")) and _is_number(state.get("gauss"))):
        raise _bad(path, "rng.numpy", "is not a NumPy MT19937 state (key: int64 tensor [624], pos, has_gauss, gauss)")
    if int(key.min()) < 0 or int(key.max()) >= 2 ** 32:
        raise _bad(path, "rng.numpy", "holds a key outside 32 bits")
    try:
        np.random.RandomState().set_state(("MT19937", key.numpy().astype(np.uint32), state["pos"],
                                           state["has_gauss"], state["gauss"]))
    except (TypeError, ValueError) as err:
        raise _bad(path, "rng.numpy", f"is not a NumPy MT19937 state ({err})") from None
    ok = torch.is_tensor(rng["torch"]) and rng["torch"].dtype == torch.uint8
    if ok:
        try:
            torch.Generator().set_state(rng["torch"])
        except RuntimeError:  # not the size of a CPU generator's state
            ok = False
    if not ok:
        raise _bad(path, "rng.torch", "is not a torch generator state (a uint8 tensor)")
    cuda = rng.get("cuda", [])
    if not isinstance(cuda, (list, tuple)) or not all(torch.is_tensor(t) and t.dtype == torch.uint8 for t in cuda):
        raise _bad(path, "rng.cuda", "is not a list of CUDA generator states (uint8 tensors)")


def _check_scheduler(state, path, n_groups: int) -> None:
    """LambdaLR's state for `n_groups` parameter groups."""
    if not isinstance(state, dict):
        raise _bad(path, "scheduler", "is not a scheduler state (a dict)")
    lrs = state.get("base_lrs")
    if not (isinstance(lrs, list) and len(lrs) == n_groups
            and all(_is_number(x) and math.isfinite(x) and x >= 0 for x in lrs)):
        raise _bad(path, "scheduler.base_lrs", f"is {_show(lrs)}, not {n_groups} learning rates (one per parameter "
                                               f"group)")
    if not _is_int(state.get("last_epoch")) or state["last_epoch"] < -1:
        raise _bad(path, "scheduler.last_epoch", f"is {_show(state.get('last_epoch'))}, not a step count")
    if "_step_count" in state and not (_is_int(state["_step_count"]) and state["_step_count"] >= 0):
        raise _bad(path, "scheduler._step_count", f"is {_show(state['_step_count'])}, not a step count")
    last = state.get("_last_lr", [0.0] * n_groups)
    if not (isinstance(last, list) and len(last) == n_groups and all(_is_number(x) for x in last)):
        raise _bad(path, "scheduler._last_lr", f"is {_show(last)}, not {n_groups} learning rates")
    fns = state.get("lr_lambdas", [None] * n_groups)
    if not (isinstance(fns, list) and len(fns) == n_groups and all(f is None or isinstance(f, dict) for f in fns)):
        raise _bad(path, "scheduler.lr_lambdas", f"is {_show(fns)}, not {n_groups} entries (None or a dict)")


def _check_scaler(state, path, enabled: bool) -> None:
    """GradScaler's state: empty (written without fp16 loss scaling) or its five numbers."""
    if not isinstance(state, dict):
        raise _bad(path, "scaler", "is not a GradScaler state (a dict)")
    if not state:
        if enabled:
            raise _bad(path, "scaler", "is empty (written without fp16 loss scaling), but train.amp fp16 scales "
                                       "losses here: resume with the train.amp the run was written with")
        return
    for key, kind in SCALER_KEYS.items():
        value = state.get(key)
        ok = _is_int(value) if kind is int else _is_number(value) and math.isfinite(value)
        if not ok or value < (1 if key == "growth_interval" else 0) or (key == "scale" and value == 0):
            raise _bad(path, f"scaler.{key}", f"is {_show(value)}, not a valid GradScaler {key}")


def _check_optimizer(state, path, groups: list, shapes: dict) -> None:
    """AdamW's state, keyed by parameter name (or by position: earlier versions), for these parameter groups
    (lists of names) of parameters of these shapes."""
    if not (isinstance(state, dict) and isinstance(state.get("state"), dict)
            and isinstance(state.get("param_groups"), list)):
        raise _bad(path, "optimizer", "is not an optimiser state (a dict of 'state' and 'param_groups')")
    saved = state["param_groups"]
    if len(saved) != len(groups) or not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved):
        raise _bad(path, "optimizer.param_groups", f"is not {len(groups)} parameter groups, as this model's "
                                                   f"trainable parameters make")
    names = {}  # the state's keys -> parameter names
    for i, (group, expected) in enumerate(zip(saved, groups)):
        for key in ("lr", "weight_decay", "eps"):
            if key in group and not (_is_number(group[key]) and math.isfinite(group[key]) and group[key] >= 0):
                raise _bad(path, f"optimizer.param_groups[{i}].{key}", f"is {_show(group[key])}, not a number >= 0")
        betas = group.get("betas", (0.9, 0.999))
        if not (isinstance(betas, (list, tuple)) and len(betas) == 2
                and all(_is_number(b) and 0 <= b < 1 for b in betas)):
            raise _bad(path, f"optimizer.param_groups[{i}].betas", f"is {_show(betas)}, not two numbers in [0, 1)")
        params = group["params"]
        if all(_is_int(p) for p in params) and len(params) == len(expected):
            names.update(zip(params, expected))
        elif sorted(map(str, params)) == sorted(expected):
            names.update(zip(params, params))
        else:
            raise _bad(path, f"optimizer.param_groups[{i}].params", "are not this model's trainable parameters of "
                                                                  "that group")
    for key, entry in state["state"].items():
        if key not in names or not isinstance(entry, dict):
            raise _bad(path, "optimizer.state", f"holds {_show(key)}, no trainable parameter of this model")
        step = entry.get("step", 0)
        if not (_is_number(step) or torch.is_tensor(step) and step.numel() == 1) or float(step) < 0:
            raise _bad(path, f"optimizer.state[{key!r}].step", f"is {_show(step)}, not a step count")
        for name in ADAM_TENSORS:
            value = entry.get(name)
            if name in entry and not (torch.is_tensor(value) and tuple(value.shape) == shapes[names[key]]):
                raise _bad(path, f"optimizer.state[{key!r}].{name}",
                           f"is not a tensor of the parameter's shape {list(shapes[names[key]])}")


# --------------------------------------------------------------------------- best.pt
def _peek(path: Path):
    """(epoch, best_epoch, best_metric) of a checkpoint file, read memory-mapped (tensors not loaded); None when
    missing or unreadable."""
    try:
        ckpt = torch_load_safe(path, mmap=True, what="checkpoint")
        return ckpt["epoch"], ckpt["best_epoch"], ckpt["best_metric"]
    except Exception:  # missing, damaged, foreign: not the best epoch's state, whatever it is
        return None


def _describe(state) -> str:
    if state is None:
        return "is missing or unreadable"
    epoch, best_epoch, best = state
    return (f"holds the state after epoch {epoch - 1} with best epoch {best_epoch} (val macro-MCC {best:.4f})"
            if _is_int(epoch) and _is_number(best) else f"holds epoch {_show(epoch)}, best epoch {_show(best_epoch)}")


def _best_source(ckpt: dict, path: Path, best: Path) -> Path | None:
    """Where best.pt comes from on resume: None if it holds the best epoch the checkpoint names (or none is named
    and there is no readable best.pt); when best.pt is missing or older, the checkpoint itself if it is that
    epoch's state, else a best.pt beside the checkpoint (a run copied elsewhere) that holds it. Otherwise (the
    best model is lost, or best.pt is of a later state of the run) CheckpointError naming both files."""
    epoch, best_epoch, metric = ckpt["epoch"], ckpt["best_epoch"], ckpt["best_metric"]
    named = (best_epoch + 1, best_epoch, metric) if best_epoch is not None else None
    found = _peek(best)
    if found == named:
        return None
    later = found is not None and (named is None or not _is_int(found[1]) or found[1] >= best_epoch)
    if not later:
        if epoch == best_epoch + 1:
            return path  # the checkpoint is the best epoch's state: best.pt is its copy
        beside = path.parent / "best.pt"
        if beside.resolve() != best.resolve() and _peek(beside) == named:
            return beside
    names = f"best epoch {best_epoch} (val macro-MCC {metric:.4f})" if named else "no best epoch yet"
    why = ("it is not the state this checkpoint continues (move it away to resume from this checkpoint, or resume "
           "from the run's latest last.pt)" if later else
           "the checkpoint is not that epoch's state, and no best.pt holding it is beside it: the best model is lost")
    raise CheckpointError(f"{best} {_describe(found)}, but {path} names {names}: {why}")


def best_for_test(ckpt_dir, best_epoch, best_metric) -> tuple[Path | None, dict | None]:
    """(path, checkpoint) of the model the final test evaluates: best.pt, checked to hold the best epoch the run
    names (CheckpointError otherwise); last.pt when no epoch was selectable; (None, None) without checkpoints."""
    ckpt_dir = Path(ckpt_dir)
    if best_epoch is None:
        last = ckpt_dir / "last.pt"
        return (last, load_checkpoint(last)) if last.is_file() else (None, None)
    path = ckpt_dir / "best.pt"
    best = load_checkpoint(path)
    held = tuple(best.get(k) for k in ("epoch", "best_epoch", "best_metric"))
    if held != (best_epoch + 1, best_epoch, best_metric):
        raise CheckpointError(f"{path} {_describe(held)}, but the run's best epoch is {best_epoch} (val macro-MCC "
                              f"{best_metric:.4f}, as {ckpt_dir / 'last.pt'} records): not testing another model")
    return path, best
