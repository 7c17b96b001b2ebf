"""Trained models as prediction reads them: from train.py checkpoints, or from a release folder.

A release folder (scripts/export_model.py CKPT... OUT/, read by predict.py --model OUT/) is what a lab
publishes: a trained model or a fold ensemble in files that cannot run code.
    OUT/model.json          format, classes, and per member: the file it was exported from, its weights
                            file and that file's SHA-256, the training config, the backbone architecture,
                            the tuning mode, the validation-tuned thresholds and the class centres
    OUT/member<i>.safetensors   the member's weights (the train.py checkpoint's 'model' tensors, unchanged)
Numbers that JSON cannot hold (infinite distance thresholds, the centre of a class without training
proteins) are written as the strings "inf", "-inf" and "nan". Predictions from a release equal those
from the checkpoints it was exported from, byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from space import from_stored
from utils import CheckpointError, WriteError, give_umask_mode, load_checkpoint, new_temp_dir, remove_stale_temps
from vocab import CLASSES
from weights import safetensors_ready

FORMAT, FORMAT_VERSION = "mutarget-model", 1
MODEL_JSON = "model.json"


class ReleaseError(CheckpointError):
    """A release folder (or export) that cannot be read or written as asked; the message names the file."""


@dataclass
class Trained:
    """One trained model as prediction needs it: `name` (the file it came from, for messages), the model's
    tensors `state`, the stored training `config` (a tree for config.resolve_config), the backbone `arch`,
    the `classes`, the validation-tuned `thresholds` {class: t} (None for a checkpoint without them) and
    the class `centroids` {space: {'centres' [8, d], 'counts' [8], 'thresholds' [8]}} (NumPy; None if
    not stored)."""

    name: str
    state: dict
    config: dict
    arch: dict
    classes: list
    thresholds: dict | None
    centroids: dict | None
    checkpoint: str | None = None  # the train.py checkpoint it was read from (None: a release folder)


def from_checkpoint(path) -> Trained:
    """A train.py checkpoint (read with weights_only=True: no code in it can run)."""
    ckpt = load_checkpoint(path, ("model", "config", "arch", "classes"))
    return Trained(str(path), ckpt["model"], ckpt["config"], ckpt["arch"], list(ckpt["classes"]),
                   ckpt.get("thresholds"), from_stored(ckpt.get("centroids")), str(path))


# --------------------------------------------------------------------------- JSON numbers
def _to_json(value):
    """NumPy arrays and numbers -> lists and floats; non-finite floats -> 'inf', '-inf', 'nan'."""
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return _to_json(value.tolist())
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _number(value) -> float:
    if isinstance(value, str) and value in ("inf", "-inf", "nan"):
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"not a number: {value!r}")


def _centroids_from_json(tree: dict) -> dict:
    dtypes = {"centres": np.float32, "counts": np.int64, "thresholds": np.float64}
    out = {}
    for space, fitted in tree.items():
        out[space] = {}
        for key, dtype in dtypes.items():
            values = fitted[key]
            numbers = ([[_number(v) for v in row] for row in values] if key == "centres"
                       else [_number(v) for v in values])
            out[space][key] = np.array(numbers, dtype=np.float64).astype(dtype)
    return out


# --------------------------------------------------------------------------- writing
def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def write_release(models: Iterable[Trained], out) -> int:
    """The release folder `out` (see the module docstring) for these models, written one at a time into a
    temporary folder beside `out`, then renamed (never half-written); returns the number of members.
    `out` must not exist or be an empty folder. A failed write is a WriteError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReleaseError(f"{out}: already exists; choose a new folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out.parent)
        tmp = Path(new_temp_dir(out.parent, out.name))
    except OSError as err:
        raise WriteError(f"{out}: cannot write: {err.strerror or err}") from None
    try:
        members = []
        for i, model in enumerate(models):
            weights = f"member{i}.safetensors"
            try:
                save_file(safetensors_ready(model.state), str(tmp / weights),
                          metadata={"format": "pt", "source": model.name})
                give_umask_mode(tmp / weights)
            except (OSError, SafetensorError) as err:
                raise WriteError(f"{out / weights}: cannot write: {err}") from None
            members.append({"source": model.name, "weights": weights, "sha256": sha256_of(tmp / weights),
                            "tune": model.config["encoder"]["tune"], "arch": model.arch, "config": model.config,
                            "thresholds": _to_json(model.thresholds), "centroids": _to_json(model.centroids)})
            del model
        tree = {"format": FORMAT, "format_version": FORMAT_VERSION, "classes": CLASSES, "members": members}
        try:
            (tmp / MODEL_JSON).write_text(json.dumps(tree, indent=1) + "\n")
            if out.exists():
                out.rmdir()  # only an empty folder is replaced
            os.replace(tmp, out)
        except OSError as err:
            raise WriteError(f"{out}: cannot write: {err.strerror or err}") from None
        return len(members)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- reading
def read_release(folder) -> Iterator[Trained]:
    """The members of a release folder, one at a time (so an ensemble never holds two copies of its
    weights), checked: the format, each weights file against its SHA-256 (a damaged or swapped download
    is an error naming the file), the numbers of thresholds and centres."""
    folder = Path(folder)
    index = folder / MODEL_JSON
    members, classes = _read_index(folder, index)
    for i, member in enumerate(members):
        yield _read_member(folder, index, i, member, classes)


def _read_index(folder: Path, index: Path) -> tuple[list, list]:
    """(members, classes) of model.json, its format checked."""
    if not index.is_file():
        raise ReleaseError(f"{folder}: not a model folder ({MODEL_JSON} not found); make one with "
                           f"scripts/export_model.py CKPT... {folder}")
    try:
        tree = json.loads(index.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReleaseError(f"{index}: not a readable {MODEL_JSON} ({err})") from None
    if not isinstance(tree, dict) or tree.get("format") != FORMAT:
        found = tree.get("format") if isinstance(tree, dict) else type(tree).__name__
        raise ReleaseError(f"{index}: not a {FORMAT} description (format {found!r})")
    if tree.get("format_version") != FORMAT_VERSION:
        raise ReleaseError(f"{index}: format version {tree.get('format_version')!r}; this code reads version "
                           f"{FORMAT_VERSION}")
    members, classes = tree.get("members"), tree.get("classes")
    if not isinstance(members, list) or not members or not isinstance(classes, list):
        raise ReleaseError(f"{index}: no members or no classes listed")
    return members, classes


def _read_member(folder: Path, index: Path, i: int, member, classes: list) -> Trained:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    where = f"{index}: member {i}"
    try:
        weights = folder / Path(member["weights"]).name  # a name inside the folder, never a path elsewhere
        config, arch, expected_hash = member["config"], member["arch"], member["sha256"]
        thresholds = member["thresholds"]
        if thresholds is not None:
            thresholds = {c: _number(thresholds[c]) for c in thresholds}
        centroids = None if member["centroids"] is None else _centroids_from_json(member["centroids"])
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ReleaseError(f"{where}: malformed entry ({type(err).__name__}: {err})") from None
    if not weights.is_file():
        raise ReleaseError(f"{weights}: weights file of {where} not found")
    if sha256_of(weights) != expected_hash:
        raise ReleaseError(f"{weights}: SHA-256 differs from the one in {MODEL_JSON}: the file is damaged or not "
                           f"this model's")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ReleaseError(f"{weights}: not a readable safetensors file ({err})") from None
    return Trained(f"{folder} member {i} ({member.get('source', '?')})", state, config, arch, list(classes),
                   thresholds, centroids)


def read_models(checkpoints=None, model_dir=None) -> Iterator[Trained]:
    """predict.py's --checkpoint files or --model folder, read one at a time."""
    if model_dir is not None:
        return read_release(model_dir)
    return (from_checkpoint(path) for path in checkpoints)
