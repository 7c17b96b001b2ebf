"""Config validation (resolve_config): every key's type and range checked whether or not its section is
switched on, before anything is written; unknown keys named with the nearest valid one."""
import math
import random
import time

import pytest
import yaml
from conftest import tiny_config, write_config

import model
import resources
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
    shown,
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


# --------------------------------------------------------------------------- issue 24: values that crashed late or hung
def main_exit(tmp_path, capsys, text=None, sets=()):
    """train.main on a config file (the tiny config, or `text`) with --set values -> (exit code, stderr, path)."""
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path)) if text is None else text)
    code = train.main(["--config", str(path)] + (["--set", *sets] if sets else []))
    return code, capsys.readouterr().err, path


def assert_clean_error(code, err, *needles):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(  # billion laughs: 9 levels of 9 aliases
    f"{level}: &{level} [{', '.join([f'*{prev}'] * 9)}]\n" for prev, level in zip("abcdefgh", "bcdefghi"))
YAML_FILES = {
    "unclosed bracket": "train: [unclosed\n", "unclosed brace": "train: {lr: 1\n",
    "unclosed double quote": 'run_dir: "runs/x\n', "unclosed single quote": "run_dir: 'runs/x\n",
    "bad indentation": "train:\n    lr: 1\n  epochs: 2\n", "tab indentation": "train:\n\tlr: 1\n",
    "duplicate anchors": "seed: &x 1\nrun_dir: &x runs/x\n", "undefined alias": "seed: *missing\n",
    "value after value": "seed: 1: 2\n", "sequence then mapping": "- a\nseed: 1\n",
    "two documents": "seed: 1\n---\nseed: 2\n", "unsafe tag": "seed: !!python/object/apply:os.system [echo]\n",
    "YAML 2.0": "%YAML 2.0\n---\nseed: 1\n", "duplicate key": "seed: 1\nseed: 2\n",
    "control character": "seed: 1\x07\n", "alias bomb": BOMB,
    "long list": "seed: [" + "1, " * 20000 + "1]\n", "deep nesting": "seed: " + "[" * 200 + "]" * 200 + "\n",
    "huge integer": "seed: " + "9" * 5000 + "\n",
}
YAML_SETS = ["train.lr=[1", "train.lr={a: 1", "run_dir='runs/x", 'run_dir="runs/x', "seed=a: b: c", "seed=*a",
             "seed=&a 1", "seed=\t1", "seed=[1, 2]]", "seed=!!python/name:os.system", "seed=1\n---\n2",
             "seed=- 1\n b: 2", "train.lr=" + BOMB.replace("\n", "\n  "), "seed=" + "9" * 5000]


@pytest.mark.parametrize("name", YAML_FILES)
def test_yaml_errors_in_the_file_are_one_line_naming_it(tmp_path, capsys, name):
    """Syntax errors, anchors and aliases (the alias bomb among them), too many or too deeply nested values, keys
    given twice: one line naming the file, the problem and its line; exit 2; nothing written. Before: a traceback
    (exit 1), or a hang (the alias bomb)."""
    start = time.time()
    code, err, path = main_exit(tmp_path, capsys, YAML_FILES[name])
    assert_clean_error(code, err, f"error: {path}: invalid YAML")
    assert "line" in err or name in ("control character", "huge integer"), err
    assert time.time() - start < 1 and not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("text", YAML_SETS, ids=range(len(YAML_SETS)))
def test_yaml_errors_in_set_are_one_line_naming_it(tmp_path, capsys, text):
    start = time.time()
    code, err, _ = main_exit(tmp_path, capsys, sets=[text])
    assert_clean_error(code, err, "error: --set " + text.split("\n")[0][:40].replace("\t", "\\t"), "invalid YAML")
    assert time.time() - start < 1 and not (tmp_path / "run").exists()


def test_bombs_are_refused_before_they_are_walked_or_printed():
    """An alias bomb, a cyclic list, a huge integer in a tree that did not come from YAML (a stored config):
    refused, or printed cut, in bounded time."""
    bomb = ["lol"] * 9
    for _ in range(8):
        bomb = [bomb] * 9  # 9^9 leaves, 80 objects
    cycle = []
    cycle.append(cycle)
    start = time.time()
    for value, problem in ((bomb, "more than 10000 values"), ({"k": bomb}, "more than 10000 values"),
                           (cycle, "values nested more than 50 deep")):
        with pytest.raises(ConfigError, match=rf"^x.pt \(stored config\): {problem}"):
            resolve_config({"encoder": {"scratch": {}}, "train": {"lr": value}}, where="x.pt (stored config)")
    with pytest.raises(ConfigError, match="nested more than 50 deep"):
        deep = []
        for _ in range(60):
            deep = [deep]
        resolve_config({"encoder": {"scratch": {}}, "train": {"lr": deep}})
    for value in (bomb[0][0][0], {"k": bomb[0][0][0][0]}, 10 ** 20000, "x" * 10 ** 6, cycle):
        with pytest.raises(ConfigError) as info:
            resolve_config({"encoder": {"scratch": {}}, "train": {"lr": value}})
        assert len(str(info.value)) < 200 and "\n" not in str(info.value)
    assert len(shown(bomb)) == 80 and shown(10 ** 20000) == "<integer of 20001 digits>"
    assert time.time() - start < 2


RESOURCE_SETS = {
    "train.lr=1e30": "train.lr must be > 0.0 and <= 10.0",
    "train.backbone_lr=100": "train.backbone_lr must be > 0.0 and <= 10.0",
    "train.weight_decay=50": "train.weight_decay must be >= 0.0 and <= 10.0",
    "train.motif_weight=1e6": "train.motif_weight must be >= 0.0 and <= 1000.0",
    "decoder.hidden_dim=65536": "decoder.hidden_dim must be >= 0 and <= 4096",
    "data.overlap=1021": "data.overlap must be >= 0 and <= 511",
    "data.overlap=40": "data.overlap must be in [0, data.max_len / 2] = [0, 32]",
    "supcon.queue_size=1000000000": "supcon.queue_size 1000000000 needs 544 GB for the embedding queue",
    "encoder.scratch={num_layers: 1000, embed_dim: 4096, attention_heads: 4}":
        "makes a model of 201.4 billion parameters (806 GB of float32 weights",
    "encoder.lora.rank=65536": "encoder.lora.rank 65536 (on 2 layers) makes a model of 23.6 billion parameters",
}
LORA_BASE = ["encoder.scratch.num_layers=2", "encoder.scratch.embed_dim=16384"]  # 6.4 billion parameters: in bounds


@pytest.mark.parametrize("text", RESOURCE_SETS)
def test_values_that_crashed_after_run_dir_was_written(tmp_path, capsys, text):
    """In range before, each crashed (NaN metrics, an allocation of hundreds of GB) after run_dir was written, or
    made a protein L - 1021 windows: now exit 2 at load time, blamed on the --set, nothing written."""
    start = time.time()
    code, err, _ = main_exit(tmp_path, capsys, sets=[text] + (LORA_BASE if "lora" in text else []))
    assert_clean_error(code, err, f"error: --set {text[:60]}", RESOURCE_SETS[text])
    assert time.time() - start < 1 and not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_resource_estimate_counts_what_the_model_builds():
    """resources.parameter_parts: the parameters of the model the configuration builds, to the last one."""
    tree = {"encoder": {"scratch": {"num_layers": 3, "embed_dim": 48, "attention_heads": 4}, "tune": "lora",
                        "trainable_layers": 2, "lora": {"targets": ["q", "v", "fc1", "fc2"]}},
            "decoder": {"hidden_dim": 16}, "supcon": {"apply": True, "loss": "cluster", "hidden_dim": 24,
                                                      "out_dim": 8, "n_clusters": 5}}
    for sets in ([], ["decoder.hidden_dim=0"], ["encoder.tune=adapter"], ["encoder.tune=adapter",
                                                                          "encoder.trainable_layers=0"]):
        config = resolve_config(tree, sets)
        built = sum(p.numel() for p in model.Encoder(config).parameters())
        assert sum(n for n, _ in resources.parameter_parts(config).values()) == built, sets
    assert resources.backbone_shape({"model_name": "facebook/esm2_t48_15B_UR50D", "scratch": None}) == (48, 5120, 40)
    assert resources.backbone_parameters(48, 5120) == 15_102_868_480  # ESM-2 15B (without its LM head) fits
    resolve_config({"encoder": {"model_name": "esm2_t48_15B_UR50D"}})


def test_cross_key_errors_blame_the_set_that_caused_them(tmp_path, capsys):
    """Before: every error across keys named the YAML file, also when a --set caused it."""
    code, err, _ = main_exit(tmp_path, capsys, sets=["train.epochs=1", "encoder.scratch=null"])
    assert_clean_error(code, err, "error: --set encoder.scratch=null: set exactly one of")
    code, err, _ = main_exit(tmp_path, capsys, sets=["data.max_len=20", "train.epochs=1"])
    assert_clean_error(code, err, "error: --set data.max_len=20: data.overlap must be in [0, data.max_len / 2]")
    code, err, _ = main_exit(tmp_path, capsys, sets=["train.lr=5", "train.weight_decay=0.5"])
    assert_clean_error(code, err, "error: --set train.weight_decay=0.5: train.weight_decay (0.5) x the larger")
    code, err, path = main_exit(tmp_path, capsys, yaml.safe_dump(tiny_config(tmp_path, **{"data.overlap": 60})),
                                sets=["train.epochs=1"])
    assert_clean_error(code, err, f"error: {path}: data.overlap must be in")  # the file's own fault: the file
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key", ["run_dir", "data.root"])
def test_run_dir_and_data_root_at_files_name_the_key(tmp_path, capsys, monkeypatch, key):
    """Before: an OS error naming neither key (run_dir: after the data was generated)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    for where, value in (("file", blocker), ("set", blocker), ("file", blocker / "sub")):
        text = yaml.safe_dump(tiny_config(tmp_path, **({key: str(value)} if where == "file" else {})))
        code, err, path = main_exit(tmp_path, capsys, text, sets=[f"{key}={value}"] if where == "set" else [])
        source = path if where == "file" else f"--set {key}={value}"
        what = "is a file" if value == blocker else "cannot be created"
        assert_clean_error(code, err, f"error: {source}: {key}: {value}", what)
        assert blocker.read_text() == "keep me" and not (tmp_path / "run").exists()
        assert not (tmp_path / "data").exists()
    monkeypatch.chdir(tmp_path)  # a relative path: the message says so, and which absolute path it stands for
    code, err, _ = main_exit(tmp_path, capsys, sets=[f"{key}=blocker"])
    assert_clean_error(code, err, f"error: --set {key}=blocker: {key}: blocker is a file",
                       f"(relative to the current directory: {tmp_path / 'blocker'})")


def test_data_root_at_a_file_is_named_by_the_data_reader(tmp_path):
    """build_datasets (also outside train.py) names data.root before generating synthetic data into a file."""
    import data

    blocker = tmp_path / "blocker"
    blocker.write_text("keep me")
    config = resolve_config(tiny_config(tmp_path, **{"data.root": str(blocker)}))
    with pytest.raises(data.DataError, match=r"^data.root: .*blocker is not a folder \(a file\)$"):
        data.build_datasets(config)
    assert blocker.read_text() == "keep me"


def test_progress_line_before_the_first_step(tmp_path, monkeypatch, caplog):
    """data.num_workers: many workers make the first batch slow; the 30-second progress line then came at step 0
    and divided the loss sum by 0 (ZeroDivisionError). Now the line at step 0 has no loss."""
    import itertools
    import logging
    from types import SimpleNamespace

    import torch

    import tblog

    clock = itertools.count(0.0, 100.0)  # 100 s pass between two readings of the clock
    monkeypatch.setattr(train, "time", SimpleNamespace(time=lambda: next(clock)))
    monkeypatch.setattr(train, "tqdm", lambda items, **_: Bar(items))
    monkeypatch.setattr(train, "forward_backward", lambda *a: (torch.tensor(2.0), {}, {}))
    steps = []  # stand-ins for the optimiser and scheduler (torch.optim's first use imports for seconds)
    optimizer = SimpleNamespace(zero_grad=lambda set_to_none: None, step=lambda: steps.append(1))
    trainer = SimpleNamespace(
        config=resolve_config(tiny_config(tmp_path)), device=torch.device("cpu"), net=torch.nn.Linear(1, 1),
        model=SimpleNamespace(token_counts={"tokens": 0}, cache=None), loader=[{"labels": torch.zeros(2, 8)}] * 3,
        optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False), tb=tblog.OFF,
        log=logging.getLogger("test_progress"), scheduler=SimpleNamespace(step=lambda: None, get_last_lr=lambda: [0.1]))
    with caplog.at_level(logging.INFO, logger="test_progress"):
        stats = train.train_epoch(trainer, 0)
    assert [r.getMessage() for r in caplog.records] == [  # the clock is read twice a batch
        "epoch 0 (1 of 2): 0/3 batches, 3m20s",
        "epoch 0 (1 of 2): 1/3 batches, 6m40s, about 13m20s left in it, loss 2.0000",  # 400 s a batch, 2 to go
        "epoch 0 (1 of 2): 2/3 batches, 10m00s, about 5m00s left in it, loss 2.0000"]
    assert stats.losses["loss"] == 2.0 and len(steps) == 3


class Bar:
    """A progress bar that is off (not a terminal), as tqdm is under a scheduler."""

    disable = True

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_repeated_set_applies_every_one_in_order(tmp_path, capsys):
    """--set may be repeated: every KEY=VALUE is applied, later ones last (a misspelt key in the first --set is an
    error, as it is with one --set; before, argparse kept only the last --set)."""
    args = train.parse_args(["--config", "c.yaml", "--set", "train.epochs=3", "--set", "seed=4", "train.epochs=5"])
    assert args.set == ["train.epochs=3", "seed=4", "train.epochs=5"]
    cfg = write_config(tmp_path)
    assert train.main(["--config", str(cfg), "--set", "train.EPOCHS=3", "--set", f"run_dir={tmp_path / 'r'}"]) == 2
    assert "train.EPOCHS" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_a_later_set_of_one_weight_key_replaces_the_others():
    """encoder.model_name / checkpoint / scratch: a --set of one replaces the file's choice (the advice "set
    encoder.checkpoint: PATH" works as written); two in one file remain an error that shows the command."""
    tree = {"encoder": {"model_name": "facebook/esm2_t33_650M_UR50D"}}
    cfg = resolve_config(tree, ["encoder.checkpoint=/weights/esm2.pt"])
    assert cfg.encoder.checkpoint == "/weights/esm2.pt" and cfg.encoder.model_name is None
    cfg = resolve_config(tree, ["encoder.scratch.num_layers=3"])
    assert cfg.encoder.scratch["num_layers"] == 3 and cfg.encoder.model_name is None
    with pytest.raises(ConfigError, match="one --set of them replaces the others, e.g. --set encoder.checkpoint=PATH"):
        resolve_config({"encoder": {"model_name": "m", "checkpoint": "c.pt"}})
