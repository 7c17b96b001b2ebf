"""Config validation (resolve_config): every key's type and range checked whether or not its section is
switched on, before anything is written; unknown keys named with the nearest valid one."""
import math
import random

import pytest
import yaml
from conftest import tiny_config

import model
import train
from config import (
    CHOICES,
    DEFAULTS,
    FLOAT_OR_AUTO,
    INT_OR_AUTO,
    NON_EMPTY,
    NULLABLE,
    OPEN_HIGH,
    OPEN_LOW,
    RANGES,
    SCRATCH_DEFAULTS,
    ConfigError,
    load_config,
    resolve_config,
)

SCRATCH = {f"encoder.scratch.{k}": v for k, v in SCRATCH_DEFAULTS.items()}


def leaves(tree=DEFAULTS, prefix=""):
    """(dotted key, default) of every leaf of DEFAULTS, encoder.scratch's keys included."""
    out = []
    for key, value in tree.items():
        full = prefix + key
        if isinstance(value, dict):
            out += leaves(value, full + ".")
        elif full == "encoder.scratch":
            out += list(SCRATCH.items())
        else:
            out.append((full, value))
    return out


def inside(key, value) -> bool:
    low, high = RANGES[key]
    above_low = low is None or (value > low if key in OPEN_LOW else value >= low)
    below_high = high is None or (value < high if key in OPEN_HIGH else value <= high)
    return above_low and below_high


def numeric_outside(key, rng):
    """Values of the right type at, just outside and far outside the ends of the key's range."""
    low, high = RANGES[key]
    integer = isinstance(low, int)
    step = 1 if integer else 1e-3
    candidates = [-(10 ** 30) if integer else -1e30, 10 ** 30 if integer else 1e30, rng.choice([-1, -7, -123456])]
    for end in (low, high):
        if end is not None:
            candidates += [end - step, end, end + step]
    return [v if integer else float(v) for v in candidates if not inside(key, v)]


def wrong_values(key, default, rng):
    """Values of the wrong type, outside the range, empty or not among the choices for this key."""
    kind = NULLABLE.get(key, type(default))
    garbage = ["".join(rng.choice("abcxyz_!?%") for _ in range(rng.randint(1, 8))), [rng.random()], {"k": 1}]
    if key in FLOAT_OR_AUTO:
        kind = float
    if key in INT_OR_AUTO:
        kind = int
    if kind is bool:
        return garbage + [1, 0.5, "yes please", None]
    if kind in (int, float):
        values = garbage + [True, None] + ([2.5] if kind is int else [math.nan, math.inf, -math.inf])
        return values + (numeric_outside(key, rng) if key in RANGES else [])
    if kind is list:
        return [t for t in garbage if not isinstance(t, list)] + [[], ["query"], [1, 2], ["q", "q"], "q"]
    if kind is dict:
        return ["big", [1, 2], 3]
    values = [3, 2.5, True, [key], {"k": "v"}]  # strings
    if key in CHOICES:
        values += ["not-a-choice", CHOICES[key][0].upper() + "x"]
    if key in NON_EMPTY:
        values += ["", "   "]
    if key == "device":
        values += ["gpu", "cuda:x"]
    if key not in NULLABLE:
        values.append(None)
    return values


def set_key(tree, key, value):
    node = tree
    *parents, leaf = key.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[leaf] = value


def misspelled(key, rng):
    """The key with one letter doubled, dropped or swapped, or in capitals: never a valid key."""
    block, _, leaf = key.rpartition(".")
    i = rng.randrange(len(leaf))
    options = [leaf[:i] + leaf[i] * 2 + leaf[i + 1:], leaf[:i] + leaf[i + 1:] or leaf + "s", leaf.upper() + "X",
               leaf[:i] + leaf[i + 1:i + 2] + leaf[i:i + 1] + leaf[i + 2:]]
    return f"{block}.{rng.choice([o for o in options if o != leaf])}".lstrip(".")


def run_config(tmp_path, tree, capsys):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(tree))
    code = train.main(["--config", str(path)])
    return code, capsys.readouterr().err


def test_fuzz_every_key(tmp_path, capsys):
    """Wrong types and out-of-range values for every key, and misspelled keys: each a clean exit-2 error (one
    'error:' line naming the key, no traceback), and nothing written into run_dir or data.root."""
    rng = random.Random(0)
    valid = set(k for k, _ in leaves())
    cases = 0
    for key, default in leaves():
        for value in wrong_values(key, default, rng):
            tree = tiny_config(tmp_path)
            set_key(tree, key, value)
            code, err = run_config(tmp_path, tree, capsys)
            lines = err.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (key, value, err)
            assert key.rpartition(".")[2] in lines[0] or key == "encoder.lora.targets", (key, value, err)
            cases += 1
        wrong = misspelled(key, rng)
        assert wrong not in valid
        tree = tiny_config(tmp_path)
        set_key(tree, wrong, default)
        code, err = run_config(tmp_path, tree, capsys)
        assert code == 2 and f"unknown config key '{wrong}'" in err, (wrong, err)
        cases += 1
        assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists(), (key, value)
    assert cases > 500


@pytest.mark.parametrize("override,message", [
    ("train.lr=-0.001", "train.lr must be > 0.0"), ("train.backbone_lr=-1e-5", "train.backbone_lr must be > 0.0"),
    ("train.weight_decay=-0.01", "train.weight_decay must be >= 0.0"),
    ("train.warmup_epochs=-1", "train.warmup_epochs must be >= 0.0"), ("train.patience=-2", "train.patience must be >= 1"),
    ("train.max_pos_weight=-5", "train.max_pos_weight must be >= 1.0"), ("train.grad_clip=-1", "train.grad_clip must be"),
    ("supcon.weight=-1", "supcon.weight must be >= 0.0"), ("data.max_len=1000000000000000000000000000000",
                                                          "data.max_len must be >= 1 and <= 1022"),
    ("encoder.scratch.num_layers=0", "encoder.scratch.num_layers must be >= 1"),
    ("run_dir=''", "'run_dir' must not be empty"), ("data.root=''", "'data.root' must not be empty"),
    ("decoder.dropout=1.5", "decoder.dropout must be >= 0.0 and < 1.0"),
    ("decoder.class_dropout=-0.1", "decoder.class_dropout must be >= 0.0 and < 1.0"),
    ("data.num_workers=-1", "data.num_workers must be >= 0 and <= 256"),
    ("data.num_workers=1000000000000000000000000000000", "data.num_workers must be >= 0 and <= 256"),
    ("supcon.drop_out=-1", "supcon.drop_out must be >= 0.0 and < 1.0"),
])
def test_values_the_issue_found_accepted(override, message):
    """Each was accepted (or crashed late) before; now a ConfigError at load time."""
    with pytest.raises(ConfigError, match=message):
        resolve_config({"encoder": {"scratch": {}}}, [override])


def test_every_section_is_checked_when_switched_off():
    base = {"encoder": {"scratch": {}}}
    for override, message in (("supcon.drop_out=-1", "supcon.drop_out must be >= 0.0 and < 1.0"),
                              ("supcon.temperature=0", "supcon.temperature must be > 0.0"),
                              ("train.augment.pos_rate=1.5", "train.augment.pos_rate must be >= 0.0 and <= 1.0"),
                              ("encoder.lora.rank=0", "encoder.lora.rank must be >= 1"),
                              ("train.lr=-0.001", "train.lr must be > 0.0"),
                              ("data.max_len=1023", "data.max_len must be >= 1 and <= 1022"),
                              ("data.num_workers=-1", "data.num_workers must be >= 0 and <= 256")):
        assert resolve_config(base)["supcon"]["apply"] is False
        with pytest.raises(ConfigError, match=message):
            resolve_config(base, [override])


def test_nearest_key_ignores_letter_case():
    for given, nearest in (("train.EPOCHS=3", "train.epochs"), ("Train.LR=1", "train.lr"),
                           ("supcon.N_POS=2", "supcon.n_pos"), ("encoder.Tune=full", "encoder.tune")):
        with pytest.raises(ConfigError, match=f"did you mean '{nearest}'"):
            resolve_config({"encoder": {"scratch": {}}}, [given])


def test_config_unknown_key_suggests_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'train.learning_rate'.*did you mean 'train.lr'"):
        resolve_config({"encoder": {"scratch": {}}, "train": {"learning_rate": 1}})
    with pytest.raises(ConfigError, match=r"--set trian.epochs=3: unknown config key 'trian.epochs'; did you mean "
                                          r"'train.epochs'"):
        resolve_config({"encoder": {"scratch": {}}}, ["trian.epochs=3"])
    with pytest.raises(ConfigError, match=r"'train.batchsize'; did you mean 'train.batch_size'"):
        resolve_config({"encoder": {"scratch": {}}}, ["train.batchsize=8"])
    with pytest.raises(ConfigError, match=r"'encoder.scratch.layers'.*did you mean 'encoder.scratch.num_layers'"):
        resolve_config({"encoder": {"scratch": {"layers": 2}}})


def test_config_types_and_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.epochs' must be int, got str"):
        resolve_config({"encoder": {"scratch": {}}, "train": {"epochs": "ten"}})
    with pytest.raises(ConfigError, match=r"'train.amp' must be one of auto, bf16, fp16, none"):
        resolve_config({"encoder": {"scratch": {}}}, ["train.amp=fp8"])
    with pytest.raises(ConfigError, match="embed_dim .30. must be divisible by attention_heads .4."):
        model.Encoder(resolve_config({"encoder": {"scratch": {"embed_dim": 30, "attention_heads": 4}}}))
    with pytest.raises(ConfigError, match="must be an ESM-2 model"):
        model.Encoder(resolve_config({"encoder": {"model_name": "esm1b_t33_650M_UR50S"}}))
    with pytest.raises(ConfigError, match="set exactly one of encoder.model_name"):
        resolve_config({"encoder": {"scratch": {}, "model_name": "esm2_t6_8M_UR50D"}})
    cfg = resolve_config({"encoder": {"scratch": {"num_layers": 3}}}, ["train.lr=1e-4", "train.epochs=3"])
    assert cfg.train.lr == 1e-4 and cfg.train.epochs == 3 and cfg.encoder.scratch == {
        "num_layers": 3, "embed_dim": 64, "attention_heads": 4}
    assert isinstance(resolve_config({"encoder": {"scratch": {}}}, ["train.lr=1"]).train.lr, float)
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: invalid YAML"):
        load_config(path)


@pytest.mark.parametrize("overrides,message", [
    (["train.parallel=fsdp", "encoder.tune=last_k", "encoder.cache_frozen=true"],
     "train.parallel: fsdp cannot use the frozen-layer cache"),
    (["train.parallel=fsdp", "encoder.cache_dir=/tmp/x"], "train.parallel: fsdp cannot use the frozen-layer cache"),
    (["train.compile=true", "encoder.packed=false"], "train.compile compiles the packed layout's layers"),
    (["train.compile=true", "encoder.fused_attention=false"], "train.compile compiles the packed layout's layers"),
])
def test_combinations_that_cannot_work(overrides, message):
    """Keys that are each valid but not together: refused at load time, naming both keys."""
    with pytest.raises(ConfigError, match=message):
        resolve_config({"encoder": {"scratch": {}}}, overrides)
    resolve_config({"encoder": {"scratch": {}}}, overrides[1:])  # each alone is fine
    resolve_config({"encoder": {"scratch": {}}}, overrides[:1])
