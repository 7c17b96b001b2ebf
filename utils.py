"""Config loading and validation, seeding, logging, atomic checkpoint save / load."""
from __future__ import annotations

import copy
import difflib
import logging
import os
import random
import secrets
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

# Every valid key with its default. A key whose default is None takes the type in NULLABLE.
DEFAULTS = {
    "seed": 0,
    "run_dir": "runs/default",
    "device": "auto",
    "data": {
        "root": "../shared/data/mutarget",
        "fold": 0,
        "max_len": 1022,
        "overlap": 200,
        "num_workers": 0,
        "synthetic": {"generate": False, "n_proteins": 800, "seed": 0},
    },
    "encoder": {
        "model_name": None,
        "revision": None,
        "checkpoint": None,
        "scratch": None,
        "tune": "last_k",
        "trainable_layers": 2,
        "lora": {"rank": 8, "alpha": 8.0, "dropout": 0.1, "targets": ["q", "k", "v", "out"]},
        "adapter": {"dim": 64},
        "activation_checkpointing": False,
        "chunk_tokens": 16384,
        "chunk_max_padding": "auto",
        "fused_attention": True,
        "cache_frozen": False,
        "cache_dtype": "float16",
        "cache_on_disk": False,
        "cache_dir": None,
    },
    "decoder": {"hidden_dim": 64, "dropout": 0.1, "class_dropout": 0.1},
    "train": {
        "epochs": 20,
        "batch_size": 16,
        "eval_batch_size": 32,
        "length_buckets": False,
        "lr": 5.0e-4,
        "backbone_lr": 5.0e-5,
        "weight_decay": 0.01,
        "warmup_epochs": 1.0,
        "min_lr_ratio": 0.0,
        "grad_clip": 1.0,
        "accumulate": 1,
        "amp": "auto",
        "patience": 5,
        "class_weighting": "inverse_count",
        "motif_weight": 1.0,
        "max_pos_weight": 100.0,
        "augment": {"apply": False, "pos_rate": 0.1, "neg_rate": 0.3, "max_copies": 3, "views": 2},
    },
    "supcon": {
        "loss": "hard",
        "multilabel": "any",
        "jaccard_threshold": 0.5,
        "reg_lambda": 1.0,
        "unsup_method": "all",
        "n_clusters": 10,
        "cluster_tau": 1.0,
        "tcr_eps": 0.01,
        "sim_weight": 200.0,
        "remine_every": 0,
        "queue_size": 0,
        "apply": False,
        "n_pos": 2,
        "n_neg": 4,
        "temperature": 0.1,
        "hard_neg": False,
        "weight": 1.0,
        "warm_start": 0,
        "apply_supcon_loss": True,
        "distance_map": None,
        "hidden_dim": 512,
        "out_dim": 128,
        "drop_out": 0.1,
    },
    "log": {"tensorboard": False},
}
LORA_TARGETS = ("q", "k", "v", "out", "fc1", "fc2")  # query, key, value, attention output, feed-forward in / out
SCRATCH_DEFAULTS = {"num_layers": 2, "embed_dim": 64, "attention_heads": 4}
NULLABLE = {"encoder.model_name": str, "encoder.revision": str, "encoder.checkpoint": str, "encoder.scratch": dict,
            "encoder.cache_dir": str, "supcon.distance_map": str}
CHOICES = {
    "encoder.tune": ("frozen", "last_k", "lora", "adapter", "full"),
    "encoder.cache_dtype": ("float16", "float32"),
    "supcon.loss": ("hard", "supcon", "mixed", "instance", "cluster", "tcr"),
    "supcon.multilabel": ("any", "jaccard", "per_label"),
    "supcon.unsup_method": ("all", "only"),
    "train.amp": ("auto", "bf16", "fp16", "none"),
    "train.class_weighting": ("inverse_count", "none"),
}
FLOAT_OR_AUTO = {"encoder.chunk_max_padding"}  # a number, or "auto" (chosen by the device at run time)
POSITIVE = {"data.max_len", "train.epochs", "train.batch_size", "train.eval_batch_size", "train.accumulate",
            "supcon.n_pos", "supcon.n_neg", "supcon.hidden_dim", "supcon.out_dim", "supcon.n_clusters",
            "train.augment.max_copies", "train.augment.views"}


class ConfigError(ValueError):
    """Invalid configuration: unknown key, wrong type or value."""


class Config(dict):
    """A dict with attribute access (config.train.lr == config['train']['lr'])."""

    def __getattr__(self, name):
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return Config(value) if isinstance(value, dict) and not isinstance(value, Config) else value

    def to_dict(self) -> dict:
        return copy.deepcopy(dict(self))


def _all_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in tree.items():
        keys.append(prefix + k)
        if isinstance(v, dict):
            keys.extend(_all_keys(v, prefix + k + "."))
    return keys


ALIASES = {"learning_rate": "lr", "n_epochs": "epochs", "layers": "num_layers", "n_layers": "num_layers",
           "hidden_size": "hidden_dim", "heads": "attention_heads", "clip": "grad_clip", "lr_backbone": "backbone_lr"}


def _unknown_key(key: str, where: str) -> ConfigError:
    """Error naming the nearest valid key: a known alias, else the closest name in the same
    block, else the closest full key."""
    valid = _all_keys(DEFAULTS) + ["encoder.scratch." + k for k in SCRATCH_DEFAULTS]
    block, _, leaf = key.rpartition(".")
    siblings = [v for v in valid if v.rpartition(".")[0] == block]
    alias = f"{block}.{ALIASES[leaf]}".lstrip(".") if leaf in ALIASES else None
    close = ([alias] if alias in valid else
             [f"{block}.{m}".lstrip(".") for m in difflib.get_close_matches(
                 leaf, [s.rpartition(".")[2] for s in siblings], n=1, cutoff=0.6)]
             or difflib.get_close_matches(key, valid, n=1, cutoff=0.5))
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"{where}: unknown config key '{key}'{hint}")


def _check_value(key: str, value, default, where: str):
    """Validate one leaf value against its default's type; returns the (coerced) value."""
    expected = NULLABLE.get(key, float if key in FLOAT_OR_AUTO else type(default))
    if value is None and (key in NULLABLE):
        return None
    if key in FLOAT_OR_AUTO and value == "auto":
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where}: '{key}' must be {expected.__name__}, got {type(value).__name__} ({value!r})")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{where}: '{key}' must be one of {', '.join(CHOICES[key])}, got {value!r}")
    if key in POSITIVE and value < 1:
        raise ConfigError(f"{where}: '{key}' must be >= 1, got {value!r}")
    return value


def _merge(base: dict, override: dict, defaults: dict, prefix: str, where: str) -> None:
    for key, value in override.items():
        full = prefix + str(key)
        if key not in defaults:
            raise _unknown_key(full, where)
        default = defaults[key]
        if full == "encoder.scratch" and value is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: 'encoder.scratch' must be a mapping with keys "
                                  f"{', '.join(SCRATCH_DEFAULTS)}, got {value!r}")
            base[key] = dict(base[key] or SCRATCH_DEFAULTS)
            _merge(base[key], value, SCRATCH_DEFAULTS, full + ".", where)
        elif isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{full}' is a block of keys, got {value!r}")
            _merge(base[key], value, default, full + ".", where)
        else:
            base[key] = _check_value(full, value, default, where)


def parse_override(text: str) -> dict:
    """'train.lr=1e-4' -> {'train': {'lr': 0.0001}} (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str):  # YAML reads 1e-4 as a string; accept it as a number
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    tree: dict = {}
    node = tree
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def resolve_config(tree: dict, overrides=None, where: str = "config") -> Config:
    """Defaults <- tree <- overrides, validated."""
    config = copy.deepcopy(DEFAULTS)
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys at top level")
    _merge(config, tree, DEFAULTS, "", where)
    for text in overrides or []:
        _merge(config, parse_override(text), DEFAULTS, "", f"--set {text}")
    sources = [k for k in ("model_name", "checkpoint", "scratch") if config["encoder"][k] is not None]
    if len(sources) != 1:
        raise ConfigError(f"{where}: set exactly one of encoder.model_name, encoder.checkpoint, "
                          f"encoder.scratch (got {', '.join(sources) or 'none'})")
    lora, targets = config["encoder"]["lora"], LORA_TARGETS
    if lora["rank"] < 1:
        raise ConfigError(f"{where}: encoder.lora.rank must be >= 1, got {lora['rank']}")
    unknown = [t for t in lora["targets"] if t not in targets]
    if unknown or not lora["targets"]:
        raise ConfigError(f"{where}: encoder.lora.targets: unknown target(s) {unknown or '(none given)'}; "
                          f"choose from {', '.join(targets)}")
    if not 0 <= lora["dropout"] < 1:
        raise ConfigError(f"{where}: encoder.lora.dropout must be in [0, 1), got {lora['dropout']}")
    if config["encoder"]["adapter"]["dim"] < 1:
        raise ConfigError(f"{where}: encoder.adapter.dim must be >= 1, got {config['encoder']['adapter']['dim']}")
    if config["supcon"]["temperature"] <= 0:
        raise ConfigError(f"{where}: supcon.temperature must be > 0")
    if config["data"]["overlap"] >= config["data"]["max_len"] or config["data"]["overlap"] < 0:
        raise ConfigError(f"{where}: data.overlap must be in [0, data.max_len)")
    return Config(config)


def load_config(path, overrides=None) -> Config:
    """Read a YAML config and apply `--set` style overrides ('a.b=value'); validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({err})") from None
    return resolve_config(tree, overrides, str(path))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def setup_logging(run_dir=None, quiet: bool = False) -> logging.Logger:
    """The 'mutarget' logger: stderr, plus run_dir/train.log; quiet (non-main processes): warnings only."""
    log = logging.getLogger("mutarget")
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if run_dir is not None:
        file = logging.FileHandler(Path(run_dir) / "train.log")
        file.setFormatter(fmt)
        log.addHandler(file)
    log.propagate = False
    return log


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. under taskset or a batch scheduler)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def thread_oversubscription(processes: int, threads: int, cores: int) -> str | None:
    """A warning saying what to set when `processes` x `threads` (torch intra-op threads per
    process) exceed `cores`; None when they fit."""
    if processes * threads <= cores:
        return None
    per = max(cores // processes, 1)
    fix = f"set OMP_NUM_THREADS={per} (or torch.set_num_threads({per}))"
    if processes > cores:
        fix += f" and run at most {cores} processes"
    return (f"{processes} process(es) x {threads} torch threads = {processes * threads} threads on {cores} available "
            f"core(s): the cores are oversubscribed and training slows down several-fold; {fix}. torchrun sets "
            f"OMP_NUM_THREADS=1 only when it is not already in the environment")


def warn_thread_oversubscription(log: logging.Logger) -> None:
    """Log thread_oversubscription's warning for this machine's processes (LOCAL_WORLD_SIZE under torchrun)."""
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    warning = thread_oversubscription(processes, torch.get_num_threads(), available_cores())
    if warning:
        log.warning(warning)


def _new_temp(folder: Path, name: str, create) -> str:
    """create(path) on a unique `.name.<random>.tmp` path in folder (retried if it exists)."""
    while True:
        tmp = str(folder / f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            create(tmp)
            return tmp
        except FileExistsError:
            continue


def new_temp_file(folder: Path, name: str) -> str:
    """Create an empty, unique temporary file in `folder` with the mode the umask gives a new
    file (0666 & ~umask: what open() would give), unlike mkstemp's 0600; returns its path."""
    return _new_temp(folder, name, lambda tmp: os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))


def new_temp_dir(folder: Path, name: str) -> str:
    """Create a unique temporary folder in `folder` with the umask's mode (0777 & ~umask), unlike
    mkdtemp's 0700; returns its path."""
    return _new_temp(folder, name, lambda tmp: os.mkdir(tmp, 0o777))


def write_atomic(path, write) -> None:
    """write(tmp) to a temporary file in path's folder, then rename it over path (never
    half-written); the file gets the umask's ordinary mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_file(path.parent, path.name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state: dict, path) -> None:
    """torch.save to a temporary file in the same folder, then rename (never half-written)."""
    write_atomic(path, lambda tmp: torch.save(state, tmp))


class CheckpointError(OSError):
    """A checkpoint file that cannot be read or lacks what is needed; the message names the file."""


def load_checkpoint(path, required=()) -> dict:
    """Load a checkpoint written by save_checkpoint (it holds RNG states and the config).
    A truncated, corrupt or foreign file, or one missing a `required` key: CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # zip / pickle / EOF errors of a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt? "
                              f"({type(err).__name__}: {err})") from None
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a train.py checkpoint (missing {', '.join(missing)})")
    return ckpt


def write_text_atomic(path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as handle:
            handle.write(text)
    write_atomic(path, write)


def write_yaml(path, tree: dict) -> None:
    write_text_atomic(path, yaml.safe_dump(tree, sort_keys=False))
