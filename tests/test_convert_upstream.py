"""scripts/convert_upstream_config.py on configs shaped like upstream MUTarget's (main branch
configs/config_new_0wt2.yaml, dev-adapter's config_650last2lr_*.yaml) and its SupCon branch's
(configs/config_supcon_hardtrue.yaml): key-by-key translation against hand-written expectations,
the report of untranslated keys, errors, and train.py starting on the output."""
import json
import sys

import pytest
import yaml
from conftest import ROOT

import train
import utils
from config import load_config, resolve_config

sys.path.insert(0, str(ROOT / "scripts"))
import convert_upstream_config as cuc  # noqa: E402

# upstream main's shipped config, key for key (values as upstream wrote them: YAML reads 1e-5 as a string)
MAIN = """
fix_seed: 0
checkpoints_every: 16
result_path: ./results_supcon
config_path: ./config.yaml
resume:
  resume: False
  resume_path: path/to/checkpoints.pth
  restart_optimizer: True
  frozen_esm: False
encoder:
  composition: esm_v2
  model_type: esm_v2
  model_name:  facebook/esm2_t33_650M_UR50D
  max_len: 1024
  num_classes: 9
  prm4prmpro: ppi
  frag_overlap: 200
  cnn_filter_num: 10
  cnn_filter_size: 5
  adapter_lr_num: 5
PEFT: PFT
decoder:
  combine: True
  apply_DNN: False
  type: "multiscalecnn-linear"
  cnn_channel: 32
  cnn_kernel: [7]
  droprate: 0.15
  inner_linear_dim: 128
  linear_num_layers: 2
  output_act: tanh
train_settings:
  patience: 30
  other_weight: 0.001
  dataloader: "batchsample"
  num_epochs: 200
  shuffle: True
  device: cuda:0
  batch_size: 16
  grad_accumulation: 1
  additional_pos_weights: False
  loss_pos_weight_nucleus: 35
  loss_pos_weight_nucleus_export: 35
  dataset: v2
  fine_tune_lr: -2
  log_every: 30
  clip_grad_norm: 1
  data_aug:
    enable: True
    binomial: True
    per_times: 5
    add_original: False
    add_original_but_not_export: False
    neg_mutation_rate: 0.3
    pos_mutation_rate: 0.1
    warmup: 0
    cooldown: 0
  train_9_classes:
       enable: True
  weighted_loss_sum_start_epoch: 10000
  loss_sum_weights: [1, 1]
  predict_max: True
  add_sample_weight_to_position_loss: True
  add_sample_weight_to_class_loss_when_data_aug: True
  only_use_position_loss: False
  position_loss_T: 0.01
  class_loss_T: 5
  ignore_ori: False
valid_settings:
  do_every: 1
  batch_size: 16
  device: cuda:0
predict_settings:
  batch_size: 16
  device: cuda:0
  cutoffs: [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
optimizer:
  name: adam
  lr: 1e-5
  weight_decouple: True
  weight_decay: 1e-3
  eps: 1e-16
  beta_1: 0.9
  beta_2: 0.999
  use_8bit_adam: False
  grad_clip_norm: 1
  decay:
    warmup: 1024
    min_lr: 1e-6
    gamma: 0.2
    num_restarts: 1
    first_cycle_steps: 40500
  mode: cosine
supcon:
  apply: False
  drop_out: 0.1
  n_pos: 2
  n_neg: 2
  temperature: 0.1
  hard_neg: False
  weight: 1
  warm_start: 0
  apply_supcon_loss: False
"""

# the SupCon branch's hard-negative config (no clip_grad_norm, SGD, skip_esm, supcon block on)
SUPCON = """
fix_seed: 3
checkpoints_every: 16
result_path: ./results_supcon_hardtrue
config_path: ./config.yaml
resume:
  resume: True
  resume_path: /data/run/checkpoints/best_model.pth
  restart_optimizer: True
encoder:
  composition: esm_v2
  model_type: esm_v2
  model_name:  facebook/esm2_t33_650M_UR50D
  max_len: 1024
  num_classes: 8
  prm4prmpro: ppi
  frag_overlap: 200
PEFT: PFT
train_settings:
  dataloader: "batchsample"
  num_epochs: 8000
  shuffle: True
  device: cuda
  batch_size: 8
  grad_accumulation: 1
  loss_pos_weight: 35
  dataset: v2
  fine_tune_lr: -2
valid_settings:
  do_every: 400
  batch_size: 10
  device: cuda
predict_settings:
  batch_size: 10
  device: cuda
  cutoffs: [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
optimizer:
  name: sgd
  lr: 1e-4
  weight_decouple: True
  weight_decay: 0.0005
  eps: 1e-16
  beta_1: 0.9
  beta_2: 0.999
  use_8bit_adam: False
  grad_clip_norm: 1
  decay:
    warmup: 10
    min_lr: 0
    gamma: 1
    num_restarts: 1
    first_cycle_steps: 500
  mode: cosine
supcon:
  apply: True
  drop_out: 0.1
  n_pos: 3
  n_neg: 9
  temperature: 0.1
  hard_neg: True
  weight: 1
  warm_start: 2
  apply_supcon_loss: True
  skip_esm: True
"""

MAIN_EXPECTED = {
    "seed": 0, "run_dir": "./results_supcon",
    "data.max_len": 1022, "data.overlap": 200,  # 1024 tokens = 1022 residues + BOS + EOS
    "encoder.model_name": "facebook/esm2_t33_650M_UR50D", "encoder.tune": "last_k", "encoder.trainable_layers": 2,
    "decoder.dropout": 0.15,
    "train.epochs": 200, "train.batch_size": 16, "train.eval_batch_size": 16,
    "train.patience": 30, "train.grad_clip": 1.0,
    "train.lr": 1e-5, "train.backbone_lr": 1e-5, "train.weight_decay": 1e-3,
    "train.warmup_epochs": 1024 / 199,  # 1024 steps / (3174 proteins / batch 16 = 199 steps per epoch)
    "train.min_lr_ratio": 0.1,  # 1e-6 / 1e-5
    "train.augment.apply": True, "train.augment.pos_rate": 0.1, "train.augment.neg_rate": 0.3,
    "train.augment.max_copies": 5,
    "supcon.apply": False, "supcon.n_pos": 2, "supcon.n_neg": 2, "supcon.temperature": 0.1, "supcon.hard_neg": False,
    "supcon.weight": 1.0, "supcon.warm_start": 0, "supcon.apply_supcon_loss": False, "supcon.drop_out": 0.1,
    "supcon.hidden_dim": 512, "supcon.out_dim": 256,
    "log.tensorboard": True,
}
MAIN_TRANSLATED = {"fix_seed", "result_path", "encoder.model_name", "encoder.max_len", "encoder.frag_overlap", "PEFT",
                   "train_settings.fine_tune_lr", "decoder.droprate", "train_settings.num_epochs",
                   "train_settings.batch_size", "train_settings.patience",
                   "train_settings.clip_grad_norm", "valid_settings.batch_size", "optimizer.lr", "optimizer.weight_decay",
                   "optimizer.decay.warmup", "optimizer.decay.min_lr", "train_settings.data_aug.enable",
                   "train_settings.data_aug.pos_mutation_rate", "train_settings.data_aug.neg_mutation_rate",
                   "train_settings.data_aug.per_times"} | {f"supcon.{k}" for k in (
                       "apply", "drop_out", "n_pos", "n_neg", "temperature", "hard_neg", "weight", "warm_start",
                       "apply_supcon_loss")}

SUPCON_EXPECTED = {
    "seed": 3, "run_dir": "./results_supcon_hardtrue", "data.max_len": 1022, "data.overlap": 200,
    "encoder.model_name": "facebook/esm2_t33_650M_UR50D", "encoder.tune": "last_k", "encoder.trainable_layers": 2,
    "train.epochs": 8000, "train.batch_size": 8, "train.eval_batch_size": 10,
    "train.grad_clip": 1.0,  # optimizer.grad_clip_norm: never read upstream, taken as the intent
    "train.lr": 1e-4, "train.backbone_lr": 1e-4, "train.weight_decay": 5e-4,
    "train.warmup_epochs": 10 / 397,  # 3174 / 8 -> 397 steps per epoch
    "train.min_lr_ratio": 0.0,
    "supcon.apply": True, "supcon.n_pos": 3, "supcon.n_neg": 9, "supcon.temperature": 0.1, "supcon.hard_neg": True,
    "supcon.weight": 1.0, "supcon.warm_start": 2, "supcon.apply_supcon_loss": True, "supcon.drop_out": 0.1,
    "supcon.hidden_dim": 512, "supcon.out_dim": 256,
    "log.tensorboard": True,
}


def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, prefix + key + "."))
        else:
            out[prefix + key] = value
    return out


def convert_text(text, where="upstream.yaml"):
    return cuc.convert(yaml.safe_load(text), where)


def assert_translated(got: dict, expected: dict):
    """Same keys; floats within 1e-3 (relative) and still floats; every other value equal, of the same type.
    (pytest.approx takes numbers only: a dict holding strings is a TypeError from pytest 9.2 on.)"""
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, rel=1e-3), key
            assert type(got[key]) is float, key
        else:
            assert got[key] == value and type(got[key]) is type(value), key


@pytest.mark.parametrize("text,expected", [(MAIN, MAIN_EXPECTED), (SUPCON, SUPCON_EXPECTED)], ids=["main", "supcon"])
def test_translation_key_by_key(text, expected):
    assert_translated(flat(convert_text(text).tree), expected)
    resolve_config(convert_text(text).tree)  # a valid config


def test_grad_accumulation_is_not_gradient_accumulation():
    """Upstream steps every batch; grad_accumulation only shortened its cosine cycle: the batch, the
    warm-up in epochs and train.accumulate do not depend on it."""
    four = flat(convert_text(MAIN.replace("grad_accumulation: 1", "grad_accumulation: 4")).tree)
    assert "train.accumulate" not in four
    assert four["train.warmup_epochs"] == pytest.approx(1024 / 199, rel=1e-3) and four["train.batch_size"] == 16


def test_every_upstream_key_is_translated_or_reported():
    c = convert_text(MAIN)
    upstream_keys = set(flat(yaml.safe_load(MAIN)))
    assert {source for source, *_ in c.translated} - {"(implied)"} == MAIN_TRANSLATED
    assert set(c.dropped) == upstream_keys - MAIN_TRANSLATED  # every other key, each with a reason
    reasons = c.dropped
    assert "no equivalent" in reasons["decoder.type"] and "no equivalent" in reasons["decoder.cnn_kernel"]
    assert "--resume" in reasons["resume.resume_path"]
    assert "only with PEFT Adapter" in reasons["encoder.adapter_lr_num"]
    assert "never read" in reasons["optimizer.grad_clip_norm"]
    assert "40500 steps" in reasons["optimizer.decay.first_cycle_steps"]
    assert reasons["optimizer.name"].startswith("same")
    assert reasons["optimizer.decay.num_restarts"].startswith("same")  # 1 restart = one cycle
    assert "never accumulated" in reasons["train_settings.grad_accumulation"]
    s = convert_text(SUPCON).dropped
    assert "'sgd' is not available" in s["optimizer.name"]
    assert "precomputed protein embeddings" in s["supcon.skip_esm"]
    assert "/data/run/checkpoints/best_model.pth" in s["resume.resume"]  # asked to resume: said where and how


def test_command_line_report_and_output_file(tmp_path, capsys):
    up = tmp_path / "config_new_0wt2.yaml"
    up.write_text(MAIN + "mystery:\n  knob: 3\n")
    out = tmp_path / "converted.yaml"
    assert cuc.main([str(up), str(out)]) == 0
    printed = capsys.readouterr().out
    section = printed.split("not translated (")[1]
    for key in set(flat(yaml.safe_load(MAIN))) - MAIN_TRANSLATED:
        assert f"\n  {key} = " in section, key  # every untranslated key printed, with its value and reason
    assert "\n  mystery.knob = 3: not a key of any upstream MUTarget config this converter knows" in section
    assert "encoder.max_len -> data.max_len: 1022" in printed
    text = out.read_text()
    assert "max_len: 1022" in text and "# upstream encoder.max_len" in text
    assert "#   decoder.apply_DNN, decoder.type, decoder.cnn_channel" in text  # untranslated keys in the header
    config = load_config(out)
    assert_translated(flat(yaml.safe_load(text)), MAIN_EXPECTED)
    assert config.encoder.model_name == "facebook/esm2_t33_650M_UR50D" and config.train.augment.max_copies == 5


@pytest.mark.parametrize("peft,extra,expected,lost", [
    ("FT", {}, {"tune": "full"}, None),
    ("frozen", {}, {"tune": "frozen"}, None),
    ("PFT", {"train_settings": {"fine_tune_lr": -1}}, {"tune": "last_k", "trainable_layers": 1}, None),
    ("PFT", {"train_settings": {"fine_tune_lr": 2}}, {"tune": "last_k", "trainable_layers": 4}, None),  # layers[2:] of 6
    ("PFT", {"train_settings": {"fine_tune_lr": 0}}, {"tune": "last_k", "trainable_layers": 6}, None),
    ("lora", {"encoder": {"lora_lr_num": 4}},
     {"tune": "lora", "trainable_layers": 4, "lora": {"rank": 8, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "k", "v"]}},
     None),
    ("Adapter", {"encoder": {"adapter_lr_num": 5, "composition": "official_esm_v2"}},
     {"tune": "adapter", "trainable_layers": 5, "adapter": {"dim": 160}}, None),  # 8M model: width 320, half of it
    ("lora_PFT", {"train_settings": {"fine_tune_lr": -3}}, {"tune": "last_k", "trainable_layers": 3}, "LoRA"),
    ("Adapter_PFT", {"train_settings": {"fine_tune_lr": -2}, "encoder": {"adapter_lr_num": 4}},
     {"tune": "last_k", "trainable_layers": 2}, "adapters"),
    ("PrefixPrompt", {"encoder": {"prompt_len": 10, "prompt_layer_indices": [0, 5]}}, {"tune": "frozen"}, "prefix prompts"),
    ("projector", {}, {"tune": "frozen"}, "CNN + transformer"),
])
def test_peft_modes(peft, extra, expected, lost):
    tree = {"encoder": {"model_name": "esm2_t6_8M_UR50D", "max_len": 602, "frag_overlap": 100}, "PEFT": peft}
    for block, values in extra.items():
        tree.setdefault(block, {}).update(values)
    c = cuc.convert(tree, "peft.yaml")
    assert c.tree["encoder"] == {"model_name": "esm2_t6_8M_UR50D", **expected}
    assert c.tree["data"] == {"max_len": 600, "overlap": 100}
    if lost:
        assert lost in c.dropped["PEFT"]  # translated to the nearest mode, and what was lost reported
    else:
        assert "PEFT" not in c.dropped
    for key in ("encoder.prompt_len", "encoder.prompt_layer_indices"):
        if key in flat(tree):
            assert "not supported" in c.dropped[key]
    resolve_config(c.tree)


def test_older_augmentation_and_constant_schedule():
    tree = {"encoder": {"model_name": "facebook/esm2_t12_35M_UR50D"},
            "train_settings": {"data_aug": {"enable": True, "mutation_rate": 0.2, "per_times": 3, "add_original": True}},
            "optimizer": {"lr": "5e-4", "mode": "skip", "decay": {"warmup": 256, "min_lr": "1e-7"}}}
    c = cuc.convert(tree, "old.yaml")
    assert c.tree["train"] == {"augment": {"apply": True, "neg_rate": 0.2, "pos_rate": 0.0, "max_copies": 3},
                               "lr": 5e-4, "backbone_lr": 5e-4, "warmup_epochs": 0.0, "min_lr_ratio": 1.0}
    assert "unmutated original is not added" in c.dropped["train_settings.data_aug.add_original"]
    assert "no schedule" in c.dropped["optimizer.decay.warmup"]
    assert c.tree["encoder"]["tune"] == "last_k"  # no PEFT key: upstream's default PFT, last 2 layers


@pytest.mark.parametrize("text,needle", [
    ("encoder:\n  model_name: Rostlab/prot_t5_base_mt_uniref50\n", "is not an ESM-2 model"),
    ("encoder:\n  model_name: esm2_t6_8M_UR50D\noptimizer:\n  lr: fast\n", "'optimizer.lr' must be a number, got 'fast'"),
    ("encoder:\n  model_name: esm2_t6_8M_UR50D\n  max_len: 202\n  frag_overlap: 200\n", "data.overlap must be in"),
    ("encoder:\n  max_len: 1024\n", "key 'encoder.model_name' is missing"),
    ("encoder: [1, 2\n", "invalid YAML"),
    ("- a list\n", "expected a mapping"),
])
def test_bad_upstream_config_exits_2_writing_nothing(tmp_path, capsys, text, needle):
    up, out = tmp_path / "up.yaml", tmp_path / "out.yaml"
    up.write_text(text)
    assert cuc.main([str(up), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {up}") and needle in err
    assert not out.exists()
    assert cuc.main([str(tmp_path / "missing.yaml"), str(out)]) == 2
    assert "missing.yaml: file not found" in capsys.readouterr().err


@pytest.mark.parametrize("text", [MAIN, SUPCON], ids=["main", "supcon"])
def test_train_starts_on_the_converted_config(tmp_path, text):
    up, out = tmp_path / "upstream.yaml", tmp_path / "converted.yaml"
    up.write_text(text)
    assert cuc.main([str(up), str(out)]) == 0
    demo = ["data.root=" + str(tmp_path / "data"), "data.synthetic.generate=true", "data.synthetic.n_proteins=60",
            "encoder.model_name=null", "encoder.scratch={num_layers: 1, embed_dim: 32, attention_heads: 4}",
            "device=cpu", "train.epochs=1", "run_dir=" + str(tmp_path / "run"), "data.max_len=64", "data.overlap=16"]
    assert train.main(["--config", str(out), "--set", *demo]) == 0
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["phase"] in ("supervised", "joint", "warm_start")
    stored = load_config(run / "config.yaml")
    assert stored.train.batch_size == yaml.safe_load(text)["train_settings"]["batch_size"]
    assert stored.supcon.apply == yaml.safe_load(text)["supcon"]["apply"]
    assert (run / "tensorboard" / "step").is_dir()  # upstream logged to TensorBoard; the converted config does too


@pytest.mark.parametrize("peft,extra", [("lora", {"lora_lr_num": 1}), ("Adapter", {"adapter_lr_num": 1})])
def test_converted_lora_and_adapter_configs_train_with_their_mode(tmp_path, peft, extra):
    """Upstream's lora / Adapter modes become tune: lora / adapter, and train.py trains exactly the adapters."""
    up, out = tmp_path / "upstream.yaml", tmp_path / "converted.yaml"
    up.write_text(yaml.safe_dump({"encoder": {"model_name": "facebook/esm2_t6_8M_UR50D", **extra}, "PEFT": peft}))
    assert cuc.main([str(up), str(out)]) == 0
    demo = ["data.root=" + str(tmp_path / "data"), "data.synthetic.generate=true", "data.synthetic.n_proteins=60",
            "encoder.model_name=null", "encoder.scratch={num_layers: 2, embed_dim: 32, attention_heads: 4}",
            "encoder.adapter.dim=8", "device=cpu", "train.epochs=1", "run_dir=" + str(tmp_path / "run"),
            "data.max_len=64", "data.overlap=16"]
    assert train.main(["--config", str(out), "--set", *demo]) == 0
    ckpt = utils.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    adapted = [k for k in ckpt["model"] if ".lora_" in k or ".adapter." in k]
    assert adapted and all(k.startswith("backbone.layers.1.") for k in adapted)  # the last lora_lr_num = 1 layer
