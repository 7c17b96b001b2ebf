"""The configuration: every key with its default (DEFAULTS), the rules each value must follow (type, range,
choices), YAML files and `--set KEY=VALUE` overrides merged over the defaults, unknown keys named with the
nearest valid one; what the configuration asks of the machine (resources.py) and of the file system
(check_paths). Every error is one line naming the key and where it was set (the file or the `--set`)."""
from __future__ import annotations

import copy
import difflib
import math
import os
import re
from pathlib import Path

import bounded
import resources
from bounded import MAX_DEPTH, MAX_FILE_BYTES, SHOWN, shown

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
        "num_workers": "auto",
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
        "packed": True,
        "chunk_tokens": "auto",
        "chunk_max_padding": "auto",
        "fused_attention": True,
        "cache_frozen": False,
        "cache_dtype": "float32",
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
        "compile": False,
        "checkpointing": "auto",
        "gradient_cache": "auto",
        "parallel": "ddp",
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
    "calibration": {"coverages": [0.8, 0.9, 0.95]},
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
    "train.parallel": ("ddp", "fsdp"),
    "train.checkpointing": ("auto", "none", "all"),
    "train.gradient_cache": ("auto", "always", "never"),
}
# Keys of earlier versions, read as their replacements (stored configs of older checkpoints hold them):
# encoder.activation_checkpointing: true is train.checkpointing: all; false is the default.
RENAMED = {"encoder.activation_checkpointing": ("train.checkpointing", {True: "all", False: None})}
FLOAT_OR_AUTO = {"encoder.chunk_max_padding"}  # a number, or "auto" (chosen by the device at run time)
INT_OR_AUTO = {"encoder.chunk_tokens", "data.num_workers"}  # an integer, or "auto" (chosen at run time)
MAX_SEED = 2 ** 32 - 1  # NumPy's seeds
BIG = 10 ** 9  # upper bound of counts that have no natural one (a value above it is a typo, and would hang or overflow)
# Allowed range of every number, (low, high) inclusive; None: unbounded on that side. Every float must be finite.
RANGES = {
    "seed": (0, MAX_SEED), "data.fold": (0, 4), "data.max_len": (1, 1022), "data.overlap": (0, 511),
    "data.num_workers": (0, 256), "data.synthetic.n_proteins": (50, 10 ** 7), "data.synthetic.seed": (0, MAX_SEED),
    "encoder.scratch.num_layers": (1, 1000), "encoder.scratch.embed_dim": (2, 65536),
    "encoder.scratch.attention_heads": (1, 4096), "encoder.trainable_layers": (0, 1000),
    "encoder.lora.rank": (1, 65536), "encoder.lora.alpha": (0.0, None), "encoder.lora.dropout": (0.0, 1.0),
    "encoder.adapter.dim": (1, 65536), "encoder.chunk_tokens": (0, BIG), "encoder.chunk_max_padding": (0.0, 1.0),
    "decoder.hidden_dim": (0, 4096), "decoder.dropout": (0.0, 1.0), "decoder.class_dropout": (0.0, 1.0),
    "train.epochs": (1, 10 ** 6), "train.batch_size": (1, BIG), "train.eval_batch_size": (1, BIG),
    "train.lr": (0.0, 10.0), "train.backbone_lr": (0.0, 10.0), "train.weight_decay": (0.0, 10.0),
    "train.warmup_epochs": (0.0, 10.0 ** 6), "train.min_lr_ratio": (0.0, 1.0), "train.grad_clip": (0.0, None),
    "train.accumulate": (1, BIG), "train.patience": (1, 10 ** 6), "train.motif_weight": (0.0, 1000.0),
    "train.max_pos_weight": (1.0, None), "train.augment.pos_rate": (0.0, 1.0), "train.augment.neg_rate": (0.0, 1.0),
    "train.augment.max_copies": (1, 1000), "train.augment.views": (1, 1000),
    "supcon.jaccard_threshold": (0.0, 1.0), "supcon.reg_lambda": (0.0, None), "supcon.n_clusters": (2, 65536),
    "supcon.cluster_tau": (0.0, None), "supcon.tcr_eps": (0.0, None), "supcon.sim_weight": (0.0, None),
    "supcon.remine_every": (0, 10 ** 6), "supcon.queue_size": (0, BIG), "supcon.n_pos": (1, 10 ** 5),
    "supcon.n_neg": (1, 10 ** 5), "supcon.temperature": (0.0, None), "supcon.weight": (0.0, None),
    "supcon.warm_start": (0, 10 ** 6), "supcon.hidden_dim": (1, 65536), "supcon.out_dim": (1, 65536),
    "supcon.drop_out": (0.0, 1.0),
}
# ... and the ends of those ranges that are excluded: a rate of 0 would divide by zero, a dropout of 1 keeps nothing.
OPEN_LOW = {"encoder.lora.alpha", "train.lr", "train.backbone_lr", "supcon.jaccard_threshold", "supcon.cluster_tau",
            "supcon.tcr_eps", "supcon.temperature"}
OPEN_HIGH = {"encoder.lora.dropout", "decoder.dropout", "decoder.class_dropout", "supcon.drop_out"}
NON_EMPTY = {"run_dir", "device", "data.root", "encoder.model_name", "encoder.revision", "encoder.checkpoint",
             "encoder.cache_dir", "supcon.distance_map"}  # strings that must not be empty
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


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

    def blame(self, *keys: str) -> str:
        """Where the last of these keys (or keys under them) was set: a `--set` over the file; the file (or stored
        config) when none was set. Filled in by resolve_config."""
        sources = self.__dict__.get("_sources", {})
        found = [sources[k] for k in sources if any(k == key or k.startswith(key + ".") for key in keys)]
        return max(found)[1] if found else self.__dict__.get("_where", "config")


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
    """Error naming the nearest valid key: the same name in other letter case, a known alias, else the
    closest name in the same block, else the closest full key (letter case ignored throughout)."""
    valid = _all_keys(DEFAULTS) + ["encoder.scratch." + k for k in SCRATCH_DEFAULTS]
    key = str(key)
    if len(key) > SHOWN or not key.isprintable():  # quote its start on one line; spare difflib the comparison
        return ConfigError(f"{where}: unknown config key {shown(key)}")
    block, _, leaf = key.rpartition(".")
    siblings = {v.rpartition(".")[2].lower(): v for v in valid if v.rpartition(".")[0].lower() == block.lower()}
    alias = ALIASES.get(leaf.lower())
    close = difflib.get_close_matches(leaf.lower(), list(siblings), n=1, cutoff=0.6)
    if leaf.lower() in siblings:
        hint = siblings[leaf.lower()]
    elif alias in siblings:
        hint = siblings[alias]
    elif close:
        hint = siblings[close[0]]
    else:
        full = {v.lower(): v for v in valid}
        match = difflib.get_close_matches(key.lower(), list(full), n=1, cutoff=0.5)
        hint = full[match[0]] if match else None
    return ConfigError(f"{where}: unknown config key '{key}'" + (f"; did you mean '{hint}'?" if hint else ""))


def _type_name(t) -> str:
    return {"str": "str", "int": "int", "float": "float", "bool": "bool", "dict": "mapping", "list": "list"}.get(
        t.__name__, t.__name__)


def _range_text(key: str) -> str:
    low, high = RANGES[key]
    lo = "" if low is None else f"{'>' if key in OPEN_LOW else '>='} {low}"
    hi = "" if high is None else f"{'<' if key in OPEN_HIGH else '<='} {high}"
    return f"{lo}{' and ' if lo and hi else ''}{hi}"


def _check_value(key: str, value, default, where: str):
    """Validate one leaf value against its default's type and its RANGES / CHOICES / NON_EMPTY rule;
    returns the (coerced) value."""
    expected = NULLABLE.get(key, float if key in FLOAT_OR_AUTO else int if key in INT_OR_AUTO else type(default))
    if value is None and (key in NULLABLE):
        return None
    if key in FLOAT_OR_AUTO | INT_OR_AUTO and value == "auto":
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 10 ** 300:  # beyond float's range (about 1.8e308): float() would raise OverflowError
            return _fail(f"{where}: {key} must be {_range_text(key) if key in RANGES else 'a finite number'}, got "
                         f"{shown(value)}")
        value = float(value)
    ok = isinstance(value, expected) and not (expected in (int, float) and isinstance(value, bool))
    if not ok:
        return _fail(f"{where}: '{key}' must be {_type_name(expected)}, got {type(value).__name__} "
                     f"({shown(value)})")
    if expected is float and not math.isfinite(value):
        return _fail(f"{where}: '{key}' must be a finite number, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        return _fail(f"{where}: '{key}' must be one of {', '.join(CHOICES[key])}, got {shown(value)}")
    if key in NON_EMPTY and not value.strip():
        return _fail(f"{where}: '{key}' must not be empty")
    if key == "device" and not DEVICE_RE.match(value):
        return _fail(f"{where}: 'device' must be auto, cpu, cuda or cuda:N, got {shown(value)}")
    if key in RANGES:
        low, high = RANGES[key]
        below = low is not None and (value <= low if key in OPEN_LOW else value < low)
        above = high is not None and (value >= high if key in OPEN_HIGH else value > high)
        if below or above:
            return _fail(f"{where}: {key} must be {_range_text(key)}, got {shown(value)}")
    return value


def _fail(message: str):
    raise ConfigError(message)


def _merge(base: dict, override: dict, defaults: dict, prefix: str, where: str, sources: dict) -> None:
    """override's values into base (validated); sources[key] = (rank, where) for every key set, the latest
    highest."""
    for key, value in override.items():
        full = prefix + (key if isinstance(key, str) else shown(key))
        if key not in defaults:
            while isinstance(value, dict) and len(value) == 1:  # a --set path: name the whole key, not its block
                (inner, value), = value.items()
                full += f".{inner if isinstance(inner, str) else shown(inner)}"
            raise _unknown_key(full, where)
        default = defaults[key]
        sources[full] = (max((i for i, _ in sources.values()), default=-1) + 1, where)  # the latest ranks highest
        if full == "encoder.scratch" and value is not None:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: 'encoder.scratch' must be a mapping with keys "
                                  f"{', '.join(SCRATCH_DEFAULTS)}, got {shown(value)}")
            base[key] = dict(base[key] or SCRATCH_DEFAULTS)
            _merge(base[key], value, SCRATCH_DEFAULTS, full + ".", where, sources)
        elif isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: '{full}' is a block of keys, got {shown(value)}")
            _merge(base[key], value, default, full + ".", where, sources)
        else:
            base[key] = _check_value(full, value, default, where)


def _bounded(where: str, check, value):
    """check(value) (bounded.read_yaml, bounded.check_size), its Refused as a ConfigError naming `where`."""
    try:
        return check(value)
    except bounded.Refused as err:
        raise ConfigError(f"{where}: {err}") from None


def set_text(text: str) -> str:
    """'--set KEY=VALUE' as error messages name it: on one line (control characters escaped), cut to SHOWN."""
    text = re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], text[:4 * SHOWN])
    return "--set " + (text if len(text) <= SHOWN else text[:SHOWN - 3] + "...")


def parse_override(text: str) -> dict:
    """'train.lr=1e-4' -> {'train': {'lr': 0.0001}} (value parsed as YAML, by bounded.read_yaml's rules)."""
    if "=" not in text:
        raise ConfigError(f"{set_text(text)}: expected KEY=VALUE")
    key, raw = text.split("=", 1)
    value = _bounded(set_text(text), bounded.read_yaml, raw) if raw.strip() else None
    if isinstance(value, str):  # YAML reads 1e-4 as a string; accept it as a number
        try:
            value = float(value) if any(c in value.lower() for c in ".e") else value
        except ValueError:
            pass
    tree: dict = {}
    node = tree
    parts = key.strip().split(".")
    if len(parts) > MAX_DEPTH:
        raise _unknown_key(key.strip(), set_text(text))
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return tree


def _renamed(tree: dict) -> dict:
    """tree with the RENAMED keys of earlier versions moved to their replacements (a copy where any is present)."""
    for old, (new, values) in RENAMED.items():
        section, key = old.split(".")
        if not (isinstance(tree.get(section), dict) and key in tree[section]):
            continue
        tree = copy.deepcopy(tree)
        value = tree[section].pop(key)
        if value not in values:
            raise ConfigError(f"'{old}' (now '{new}') must be true or false, got {shown(value)}")
        if values[value] is not None:
            new_section, new_key = new.split(".")
            tree.setdefault(new_section, {}).setdefault(new_key, values[value])
    return tree


WEIGHT_SOURCES = ("model_name", "checkpoint", "scratch")  # encoder keys naming the weights: exactly one is set


def resolve_config(tree: dict, overrides=None, where: str = "config") -> Config:
    """Defaults <- tree <- overrides, validated: each value, then across keys, then what the configuration asks
    of the machine (resources.problems). An error names where the key at fault was set: the `--set` that set it
    last, else `where` (the file, the stored config)."""
    config = copy.deepcopy(DEFAULTS)
    _bounded(where, bounded.check_size, tree)  # before anything walks, copies or prints it
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys at top level")
    sources: dict = {}
    _merge(config, _renamed(tree), DEFAULTS, "", where, sources)
    for text in overrides or []:
        override = _renamed(parse_override(text))
        chosen = override.get("encoder") if isinstance(override.get("encoder"), dict) else {}
        if any(chosen.get(k) is not None for k in WEIGHT_SOURCES):  # a later --set of one replaces the others
            for key in WEIGHT_SOURCES:
                if key not in chosen:
                    config["encoder"][key] = None
        _merge(config, override, DEFAULTS, "", set_text(text), sources)
    result = Config(config)
    result.__dict__.update(_sources=sources, _where=where)
    blame = result.blame
    enc = config["encoder"]
    given = [k for k in ("model_name", "checkpoint", "scratch") if enc[k] is not None]
    if len(given) != 1:
        raise ConfigError(f"{blame('encoder.model_name', 'encoder.checkpoint', 'encoder.scratch')}: set exactly one "
                          f"of encoder.model_name, encoder.checkpoint, encoder.scratch "
                          f"(got {', '.join(given) or 'none'}); on the command line one --set of them replaces the "
                          f"others, e.g. --set encoder.checkpoint=PATH")
    unknown = [t for t in enc["lora"]["targets"] if t not in LORA_TARGETS]
    if unknown or not enc["lora"]["targets"] or len(set(enc["lora"]["targets"])) < len(enc["lora"]["targets"]):
        raise ConfigError(f"{blame('encoder.lora.targets')}: encoder.lora.targets: unknown target(s) "
                          f"{shown(unknown) if unknown else '(none given or repeated)'}; "
                          f"choose from {', '.join(LORA_TARGETS)}")
    coverages = config["calibration"]["coverages"]
    if (not coverages or not all(type(c) in (int, float) and 0 < c < 1 for c in coverages)
            or len(set(coverages)) < len(coverages)):
        raise ConfigError(f"{blame('calibration.coverages')}: calibration.coverages: a list of numbers between 0 and 1 "
                          f"(exclusive), none twice, got {shown(coverages)}")
    scratch = enc["scratch"]
    if scratch is not None:
        if scratch["embed_dim"] % scratch["attention_heads"]:
            raise ConfigError(f"{blame('encoder.scratch')}: encoder.scratch.embed_dim ({scratch['embed_dim']}) must "
                              f"be divisible by attention_heads ({scratch['attention_heads']})")
        if (scratch["embed_dim"] // scratch["attention_heads"]) % 2:
            raise ConfigError(f"{blame('encoder.scratch')}: encoder.scratch.embed_dim / attention_heads must be even "
                              f"(rotary embeddings rotate pairs of dimensions), got {scratch['embed_dim']} / "
                              f"{scratch['attention_heads']}")
    max_len, overlap = config["data"]["max_len"], config["data"]["overlap"]
    if overlap > max_len // 2:
        raise ConfigError(f"{blame('data.overlap', 'data.max_len')}: data.overlap must be in [0, data.max_len / 2] "
                          f"= [0, {max_len // 2}] (consecutive windows advance by at least half a window), got "
                          f"{overlap} with data.max_len {max_len}")
    budget, window = enc["chunk_tokens"], max_len + 2
    if budget != "auto" and 0 < budget < window:
        raise ConfigError(f"{blame('encoder.chunk_tokens', 'data.max_len')}: encoder.chunk_tokens ({budget}) is "
                          f"smaller than a window (data.max_len + BOS + EOS = {window} tokens): every backbone call "
                          f"must hold at least one window; use >= {window}, 0 (no limit) or auto")
    train = config["train"]
    top_lr = max(train["lr"], train["backbone_lr"])
    if top_lr * train["weight_decay"] >= 1:
        raise ConfigError(f"{blame('train.weight_decay', 'train.lr', 'train.backbone_lr')}: train.weight_decay "
                          f"({train['weight_decay']}) x the larger learning rate ({top_lr}) "
                          f"must be below 1: AdamW multiplies the weights by 1 - lr x weight_decay every step")
    if train["parallel"] == "fsdp" and (enc["cache_frozen"] or enc["cache_dir"] is not None):
        raise ConfigError(f"{blame('train.parallel', 'encoder.cache_frozen', 'encoder.cache_dir')}: train.parallel: "
                          f"fsdp cannot use the frozen-layer cache (encoder.cache_frozen, encoder.cache_dir): each "
                          f"process's cache misses would run the sharded frozen layers a different number of times; "
                          f"turn the cache off or use train.parallel: ddp")
    if train["compile"] and not (enc["packed"] and enc["fused_attention"]):
        raise ConfigError(f"{blame('train.compile', 'encoder.packed', 'encoder.fused_attention')}: train.compile "
                          f"compiles the packed layout's layers: set encoder.packed: true and encoder.fused_attention: "
                          f"true, or train.compile: false")
    for keys, message in resources.problems(config):
        raise ConfigError(f"{blame(*keys)}: {message}")
    return result


def load_config(path, overrides=None) -> Config:
    """Read a YAML config (bounded.read_yaml's rules, at most MAX_FILE_BYTES) and apply `--set` style overrides
    ('a.b=value'); validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size} bytes: not a configuration (at most {MAX_FILE_BYTES})")
    try:
        text = path.read_text()
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file ({err.reason} at byte {err.start})") from None
    return resolve_config(_bounded(str(path), bounded.read_yaml, text) or {}, overrides, str(path))


def relative_text(path) -> str:
    """For a relative path, 'relative to the current directory: ABSOLUTE', the path it stands for, which error
    messages add; '' for an absolute path."""
    path = Path(path)
    return "" if path.is_absolute() else f"relative to the current directory: {Path(os.path.abspath(path))}"


def relative_note(path) -> str:
    """relative_text in parentheses after a space, or ''."""
    text = relative_text(path)
    return f" ({text})" if text else ""


def _existing_part(path: Path) -> Path:
    """path itself if it exists, else its nearest existing parent folder (or what stands there)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_paths(config: Config) -> None:
    """run_dir and data.root against the file system, before anything is written: a ConfigError naming the key
    and where it was set when run_dir is (or lies inside) a file or cannot be created, or data.root is a file."""
    for key in ("run_dir", "data.root"):
        path = Path(config.run_dir if key == "run_dir" else config.data.root)
        relative = relative_note(path)
        try:
            found = _existing_part(path)
        except OSError as err:  # a name too long, a folder that cannot be read
            raise ConfigError(f"{config.blame(key)}: {key}: {shown(str(path))} cannot be used: "
                              f"{err.strerror or err}") from None
        if found.exists() and not found.is_dir():
            what = "a file, not a folder" if found.is_file() else "not a folder"
            problem = f"{path} is {what}" if found == path else f"{path} cannot be created: {found} is {what}"
            raise ConfigError(f"{config.blame(key)}: {key}: {problem}{relative}")
        if key == "run_dir" and found != path and not os.access(found, os.W_OK | os.X_OK):
            raise ConfigError(f"{config.blame(key)}: run_dir: {path} cannot be created: {found} is not writable"
                              f"{relative}")
