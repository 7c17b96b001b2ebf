"""Trained models as prediction reads them: from train.py checkpoints, or from a release folder.

A release folder (scripts/export_model.py CKPT... OUT/, read by predict.py --model OUT/) is what a lab
publishes: a trained model or a fold ensemble in files that cannot run code.
    OUT/model.json          format, classes, and per member: the checkpoint it was exported from (run folder /
                            checkpoints / file, no local path), its weights file and that file's SHA-256,
                            the training config (local paths cut to their last part), the backbone architecture,
                            the tuning mode, the validation-tuned thresholds and the class centres (with
                            their confidence mixtures, null distances and p-value cut: confidence.py),
                            the calibration (temperatures, sorted conformal scores: calibration.py; null
                            when uncalibrated, absent in folders written before it existed), the training's
                            provenance (code version, package versions, device, the initial weights' SHA-256:
                            provenance.public) and the final test's figures (evaluate.test_summary); both null
                            for checkpoints written before they were stored
    OUT/member<i>.safetensors   the member's weights (the train.py checkpoint's 'model' tensors, unchanged)
Numbers that JSON cannot hold (infinite distance thresholds, the centre of a class without training
proteins) are written as the strings "inf", "-inf" and "nan". The null distances (up to 8 x 5,000 a
space) go as {"shape": [8, K], "float32_base64": the little-endian float32 bytes}, exact and a fifth of
the size of a JSON list. Predictions from a release equal those from the checkpoints it was exported
from, byte for byte.
"""
from __future__ import annotations

import base64
import copy
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

import calibration
import confidence
from provenance import sha256_of
from space import from_stored
from utils import CheckpointError, WriteError, give_umask_mode, load_checkpoint, read_json, write_folder_atomic
from vocab import CLASSES, TOKENS
from weights import safetensors_ready

FORMAT, FORMAT_VERSION = "mutarget-model", 1
MODEL_JSON = "model.json"
MODEL_JSON_BYTES = 16 << 20  # a 5-fold ensemble of ESM-2 15B: centres (8 x 5120 a member) and null distances, ~8 MB
CENTROID_KEYS = ("centres", "counts", "thresholds")


class ReleaseError(CheckpointError):
    """A release folder (or export) that cannot be read or written as asked; the message names the file."""


@dataclass
class Trained:
    """One trained model as prediction needs it: `name` (the file it came from, for messages), the model's
    tensors `state`, the stored training `config` (a tree for config.resolve_config), the backbone `arch`,
    the `classes`, the validation-tuned `thresholds` {class: t} (None for a checkpoint without them) and
    the class `centroids` {space: {'centres' [8, d], 'counts' [8], 'thresholds' [8], and optionally
    confidence.FIELDS}} (NumPy; None if not stored)."""

    name: str
    state: dict
    config: dict
    arch: dict
    classes: list
    thresholds: dict | None
    centroids: dict | None
    checkpoint: str | None = None  # the train.py checkpoint it was read from (None: a release folder)
    calibration: dict | None = None  # temperatures and conformal scores (calibration.py); None: uncalibrated
    provenance: dict | None = None  # how it was trained, without local paths (provenance.public); None: not stored
    test: dict | None = None  # the final test's figures (evaluate.test_summary); None: not stored


# --------------------------------------------------------------------------- checks of a stored model
ARCH_KEYS = ("num_layers", "embed_dim", "attention_heads", "token_dropout")
ARCH_LIMITS = {"num_layers": 1000, "embed_dim": 65536, "attention_heads": 4096}  # as encoder.scratch allows
MAX_PARAMETERS = 20e9  # ESM-2's largest, esm2_t48_15B_UR50D (48 layers x 5120), has 15 billion


def arch_problem(arch) -> str | None:
    """What makes a stored ESM-2 architecture (a checkpoint's or model folder's `arch`) unusable, naming the
    field, or None. Checked before anything is built from it: exactly ARCH_KEYS; positive integers up to
    ARCH_LIMITS and a bool; heads of an even size (rotary embeddings rotate pairs); at most MAX_PARAMETERS
    parameters (about 12 d^2 a layer)."""
    if not isinstance(arch, dict):
        return (f"arch: {'null' if arch is None else type(arch).__name__}; a trained model must hold its "
                f"backbone's architecture, a mapping of {', '.join(ARCH_KEYS)}")
    unknown = sorted(repr(k)[:40] for k in arch if k not in ARCH_KEYS)
    missing = [k for k in ARCH_KEYS if k not in arch]
    if unknown or missing:
        return (f"arch: {'unknown key ' + ', '.join(unknown) if unknown else 'missing ' + ', '.join(missing)} "
                f"(an ESM-2 architecture has exactly {', '.join(ARCH_KEYS)})")
    for key, top in ARCH_LIMITS.items():
        value = arch[key]
        if type(value) is not int or not 1 <= value <= top:
            return f"arch.{key}: must be an integer from 1 to {top}, got {repr(value)[:40]}"
    if type(arch["token_dropout"]) is not bool:
        return f"arch.token_dropout: must be true or false, got {repr(arch['token_dropout'])[:40]}"
    layers, d, heads = arch["num_layers"], arch["embed_dim"], arch["attention_heads"]
    if d % heads or (d // heads) % 2:
        return (f"arch.embed_dim: {d} is not divisible by arch.attention_heads ({heads}) into heads of an even "
                f"size (rotary embeddings rotate pairs of dimensions)")
    if 12 * d * d * layers > MAX_PARAMETERS:
        return (f"arch: {layers} layers of width {d} are about {12 * d * d * layers / 1e9:.0f} billion parameters, "
                f"more than the {MAX_PARAMETERS / 1e9:.0f} billion of any ESM-2")
    return None


def esm2_shapes(arch: dict) -> dict:
    """The shape of every tensor of fair-esm's ESM2 (without lm_head and contact_head) of a valid `arch`, by
    name, computed without building it (the same as ESM2(**arch).state_dict(), tested)."""
    d, vec = arch["embed_dim"], (arch["embed_dim"],)
    layer = {"self_attn.rot_emb.inv_freq": (d // arch["attention_heads"] // 2,), "fc1.weight": (4 * d, d),
             "fc1.bias": (4 * d,), "fc2.weight": (d, 4 * d), "fc2.bias": vec}
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 "self_attn_layer_norm", "final_layer_norm"):
        layer.update({f"{part}.weight": (d, d) if part.endswith("proj") else vec, f"{part}.bias": vec})
    shapes = {"embed_tokens.weight": (len(TOKENS), d), "emb_layer_norm_after.weight": vec,
              "emb_layer_norm_after.bias": vec}
    shapes.update({f"layers.{i}.{k}": v for i in range(arch["num_layers"]) for k, v in layer.items()})
    return shapes


def _arch_text(arch: dict) -> str:
    return ", ".join(f"{k} {arch[k]}" for k in ARCH_KEYS[:3])


def tensors_problem(arch: dict, state) -> str | None:
    """What makes a model's tensors (`state`, Encoder names) unusable with its valid `arch`, naming the tensor,
    or None: the backbone's tensors of the shapes the arch implies (so nothing is built for an arch its tensors
    do not have), no layer beyond it, floating-point weights (0-d counters may be integers), finite values."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        return "model: not a mapping of tensor names to tensors"
    for name, shape in esm2_shapes(arch).items():
        tensor = state.get("backbone." + name)
        if tensor is None:
            return f"tensor 'backbone.{name}' is missing, which arch ({_arch_text(arch)}) needs"
        if tuple(tensor.shape) != shape:
            return (f"tensor 'backbone.{name}' has shape {tuple(tensor.shape)}, but arch ({_arch_text(arch)}) "
                    f"needs {shape}")
    for name, tensor in state.items():
        layer = re.match(r"backbone\.layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= arch["num_layers"]:
            return f"tensor {name!r} is beyond arch.num_layers ({arch['num_layers']})"
        if tensor.dim() and not tensor.is_floating_point():
            return f"tensor {name!r} holds {str(tensor.dtype).replace('torch.', '')} values; weights are floating point"
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"tensor {name!r} holds NaN or infinite values"
    return None


def _space_dims(arch: dict, state: dict) -> dict:
    """{'pooled': embed_dim, 'projection': the projection head's output size (None: no head)}."""
    heads = {int(m.group(1)): t for k, t in state.items() if (m := re.fullmatch(r"projection\.net\.(\d+)\.weight", k))}
    return {"pooled": arch["embed_dim"], "projection": heads[max(heads)].shape[0] if heads else None}


def stored_problem(thresholds, centroids, dims: dict) -> str | None:
    """What makes the tuned `thresholds` ({class: number}) or the class `centroids` ({space: {'centres' [C, d],
    'counts' [C], 'thresholds' [C]}}, d: the space's size in `dims`) unusable, naming the field, or None."""
    n = len(CLASSES)
    if thresholds is not None:
        if not isinstance(thresholds, dict) or set(thresholds) != set(CLASSES):
            return f"thresholds: not one number for each of the {n} classes {', '.join(CLASSES)}"
        bad = [c for c, v in thresholds.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v]
        if bad:
            return f"thresholds.{bad[0]}: not a number ({repr(thresholds[bad[0]])[:40]})"
    if centroids is None:
        return None
    if not isinstance(centroids, dict):
        return f"centroids: {type(centroids).__name__}, expected a mapping of embedding spaces"
    for space, fitted in centroids.items():
        if dims.get(space) is None:
            return (f"centroids.{repr(space)[:40]}: no such embedding space in this model (it has "
                    f"{', '.join(k for k, v in dims.items() if v)})")
        if (not isinstance(fitted, dict) or not set(CENTROID_KEYS) <= set(fitted)
                or set(fitted) - set(CENTROID_KEYS + confidence.FIELDS)):
            return (f"centroids.{space}: expected centres, counts and thresholds (and optionally "
                    f"{', '.join(confidence.FIELDS)})")
        for key, shape in (("centres", (n, dims[space])), ("counts", (n,)), ("thresholds", (n,))):
            found = tuple(np.shape(fitted[key]))
            if found != shape:
                return (f"centroids.{space}.{key}: shape {found}, expected {shape} ({n} classes"
                        f"{f' x the {space} size {dims[space]}' if key == 'centres' else ''})")
        problem = confidence.stored_problem(fitted, n)
        if problem:
            return f"centroids.{space}.{problem}"
    return None


def check_model(path, arch, state, thresholds=None, centroids=None) -> None:
    """A train.py checkpoint's model, checked before anything is built from it (arch_problem, tensors_problem,
    stored_problem): CheckpointError, one line naming the file and the field or tensor."""
    problem = arch_problem(arch) or tensors_problem(arch, state)
    problem = problem or stored_problem(thresholds, centroids, _space_dims(arch, state))
    if problem:
        raise CheckpointError(f"{path}: {problem}")


def from_checkpoint(path) -> Trained:
    """A train.py checkpoint (read with weights_only=True: no code in it can run), checked (check_model)."""
    ckpt = load_checkpoint(path, ("model", "config", "arch", "classes"))
    problem = calibration.problem(ckpt.get("calibration"))
    if problem:
        raise CheckpointError(f"{path}: {problem}")
    return Trained(str(path), ckpt["model"], ckpt["config"], ckpt["arch"], list(ckpt["classes"]),
                   ckpt.get("thresholds"), from_stored(ckpt.get("centroids")), str(path), ckpt.get("calibration"),
                   ckpt.get("provenance"), ckpt.get("test"))


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


def _centroids_to_json(centroids: dict | None):
    """Trained.centroids for model.json: _to_json, the null distances as base64 float32 (module docstring)."""
    if centroids is None:
        return None
    return {space: {k: {"shape": list(v.shape), "float32_base64": base64.b64encode(
        np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")} if k == "null_distances" else _to_json(v)
        for k, v in fitted.items()} for space, fitted in centroids.items()}


def _float32_array(value) -> np.ndarray:
    shape = value["shape"]
    if not isinstance(shape, list) or len(shape) != 2 or not all(type(k) is int and 0 <= k <= 1 << 24 for k in shape):
        raise ValueError(f"null_distances: shape {repr(shape)[:40]}, expected [classes, K]")
    raw = base64.b64decode(value["float32_base64"], validate=True)
    if len(raw) != 4 * shape[0] * shape[1]:
        raise ValueError(f"null_distances: {len(raw)} bytes, but shape {shape} needs {4 * shape[0] * shape[1]}")
    return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)


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
        for key in confidence.MIXTURE_FIELDS:  # the confidence fields, when stored (stored_problem: all or none)
            if key in fitted:
                out[space][key] = np.array([[_number(v) for v in row] for row in fitted[key]], dtype=np.float64)
        if "null_distances" in fitted:
            out[space]["null_distances"] = _float32_array(fitted["null_distances"])
        if "p_value" in fitted:
            out[space]["p_value"] = np.float64(_number(fitted["p_value"]))
    return out


# --------------------------------------------------------------------------- writing
PATH_KEYS = (("run_dir",), ("data", "root"), ("encoder", "checkpoint"), ("encoder", "cache_dir"),
             ("supcon", "distance_map"))  # config values that are local paths: a model folder keeps their last part


def public_config(config: dict) -> dict:
    """A stored config tree without local paths: each PATH_KEYS value cut to its last component."""
    tree = copy.deepcopy(config)
    for keys in PATH_KEYS:
        node = tree
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            node[keys[-1]] = Path(node[keys[-1]]).name
    return tree


def public_source(name: str) -> str:
    """The checkpoint a member came from, as a model folder names it, never with the exporter's folders:
    'RUN/checkpoints/FILE' for a checkpoint in a run folder, else the file name alone."""
    path = Path(name)
    return "/".join(path.parts[-3:]) if path.parent.name == "checkpoints" and len(path.parts) >= 3 else path.name


def write_release(models: Iterable[Trained], out) -> int:
    """The release folder `out` (see the module docstring) for these models, written one at a time into a
    temporary folder beside `out`, then renamed (never half-written); returns the number of members.
    `out` must not exist or be an empty folder. A failed write is a WriteError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReleaseError(f"{out}: already exists; choose a new folder")
    members = []

    def write(tmp: Path) -> None:
        for i, model in enumerate(models):
            weights = f"member{i}.safetensors"
            try:
                save_file(safetensors_ready(model.state), str(tmp / weights),
                          metadata={"format": "pt", "source": public_source(model.name)})
                give_umask_mode(tmp / weights)
            except (OSError, SafetensorError) as err:
                raise WriteError(f"{out / weights}: cannot write: {err}") from None
            members.append({"source": public_source(model.name), "weights": weights,
                            "sha256": sha256_of(tmp / weights), "tune": model.config["encoder"]["tune"],
                            "arch": model.arch, "config": public_config(model.config),
                            "thresholds": _to_json(model.thresholds), "centroids": _centroids_to_json(model.centroids),
                            "calibration": model.calibration, "provenance": model.provenance,
                            "test": _to_json(model.test)})
            del model
        tree = {"format": FORMAT, "format_version": FORMAT_VERSION, "classes": CLASSES, "members": members}
        (tmp / MODEL_JSON).write_text(json.dumps(tree, indent=1) + "\n")
    write_folder_atomic(out, write)
    return len(members)


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
    tree = read_json(index, f"a readable {MODEL_JSON}", ReleaseError, max_bytes=MODEL_JSON_BYTES)
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
    """One member, checked before its weights are hashed or anything is built: its entry (arch_problem,
    thresholds), its weights file (inside the folder, links resolved), the SHA-256, the tensors against the
    arch (tensors_problem), the class centres against the tensors (stored_problem)."""
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
    problem = arch_problem(arch) or stored_problem(thresholds, None, {}) or calibration.problem(
        member.get("calibration"))  # no calibration in folders written before it existed
    if problem:
        raise ReleaseError(f"{where}: {problem}")
    real = Path(os.path.realpath(weights))
    if real.parent != Path(os.path.realpath(folder)):
        raise ReleaseError(f"{weights}: weights file of {where} is a link to {real}, outside the model folder; "
                           f"a model folder's files are read from inside it only")
    if not weights.is_file():
        raise ReleaseError(f"{weights}: weights file of {where} not found")
    if sha256_of(weights) != expected_hash:
        raise ReleaseError(f"{weights}: SHA-256 differs from the one in {MODEL_JSON}: the file is damaged or not "
                           f"this model's")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as err:
        raise ReleaseError(f"{weights}: not a readable safetensors file ({err})") from None
    problem = tensors_problem(arch, state)
    if problem:
        raise ReleaseError(f"{weights}: {problem}")
    problem = stored_problem(None, centroids, _space_dims(arch, state))
    if problem:
        raise ReleaseError(f"{where}: {problem}")
    return Trained(f"{folder} member {i} ({member.get('source', '?')})", state, config, arch, list(classes),
                   thresholds, centroids, calibration=member.get("calibration"), provenance=member.get("provenance"),
                   test=member.get("test"))


def read_models(checkpoints=None, model_dir=None) -> Iterator[Trained]:
    """predict.py's --checkpoint files or --model folder, read one at a time."""
    if model_dir is not None:
        return read_release(model_dir)
    return (from_checkpoint(path) for path in checkpoints)
