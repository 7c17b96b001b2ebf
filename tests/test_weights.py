"""ESM-2 weights as users hold them: Hugging Face folders and cache (offline), fair-esm files, conversion.

The reference is transformers' own ESM-2 implementation (a pinned test dependency): tiny random
models saved by it must give, through this project's fair-esm backbone, the same last-layer
representations as transformers gives on the same unpadded sequences.
"""
import hashlib
import json
import logging
import os
import subprocess
import sys

import esm
import pytest
import torch
from conftest import ROOT, write_config

import model
import train
import weights
from config import resolve_config

transformers = pytest.importorskip("transformers")
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQ", "MLSRAVCGTSRQLAPVLGYLGSRQKHSLPD", "ACDEFGHIKLMNPQRSTVWYXBUZO"]


def hf_esm(cls=None, seed=0, layers=2, hidden=32, heads=4, token_dropout=True):
    """A tiny random transformers ESM-2 whose every tensor (layer norms and rotary frequencies
    included) is random, so that any mix-up in the name mapping changes the outputs."""
    cfg = transformers.EsmConfig(vocab_size=33, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=heads, intermediate_size=4 * hidden, pad_token_id=1,
                                 mask_token_id=32, position_embedding_type="rotary", token_dropout=token_dropout,
                                 emb_layer_norm_before=False, max_position_embeddings=1026, layer_norm_eps=1e-5,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    m = (cls or transformers.EsmForMaskedLM)(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
        for name, buf in m.named_buffers():
            if name.endswith("inv_freq"):  # not the formula's values: they must come from the file
                buf.mul_(torch.linspace(0.7, 1.3, len(buf))).copy_(buf.half().float())
    return m


def tokens_of(sequence):
    return torch.tensor([[0, *(4 + "LAGVSERTIDPKQNFYMHWCXBUZO".index(a) for a in sequence), 2]])


def hf_reference(hf_model, sequence):
    base = hf_model.esm if hasattr(hf_model, "esm") else hf_model
    with torch.no_grad():
        return base(input_ids=tokens_of(sequence)).last_hidden_state[0]


def ours(config_tree):
    m = model.Encoder(resolve_config(config_tree)).eval()
    with torch.no_grad():
        return [m.backbone_forward(tokens_of(s))[0] for s in SEQUENCES]


def tree(**encoder):
    return {"encoder": {"tune": "frozen", **encoder}}


def assert_matches(hf_model, config_tree):
    for seq, got in zip(SEQUENCES, ours(config_tree)):
        expected = hf_reference(hf_model, seq)
        assert (got - expected).abs().max() <= 1e-5, seq


def legacy_bin(hf_model, folder):
    """pytorch_model.bin as older hub revisions hold it: per-layer inv_freq, torch.save'd state dict."""
    folder.mkdir(parents=True)
    state = {k: v for k, v in hf_model.state_dict().items() if "inv_freq" not in k}
    inv_freq = hf_model.esm.rotary_embeddings.inv_freq
    for i in range(hf_model.config.num_hidden_layers):
        state[f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = inv_freq.clone()
    torch.save(state, folder / "pytorch_model.bin")
    hf_model.config.to_json_file(folder / "config.json")
    return folder


def hub_cache(root, repo, snapshots: dict, refs: dict):
    """The Hugging Face cache layout: blobs by content hash, snapshots/<commit>/<file> symlinks,
    refs/<name> holding a commit."""
    base = root / ("models--" + repo.replace("/", "--"))
    for commit, folder in snapshots.items():
        for file in folder.iterdir():
            blob = base / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(file.read_bytes())
            link = base / "snapshots" / commit / file.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    for ref, commit in refs.items():
        (base / "refs").mkdir(parents=True, exist_ok=True)
        (base / "refs" / ref).write_text(commit)
    return root


# ---------------------------------------------------------------- Hugging Face folders
@pytest.mark.parametrize("layout", ["masked_lm_safetensors", "esm_model_with_pooler", "legacy_bin", "sharded"])
def test_hf_folder_gives_transformers_outputs(tmp_path, layout):
    folder = tmp_path / "hf"
    if layout == "esm_model_with_pooler":
        hf = hf_esm(transformers.EsmModel)  # keys without the "esm." prefix, plus a random pooler
        hf.save_pretrained(folder)
    elif layout == "legacy_bin":
        hf = hf_esm()
        legacy_bin(hf, folder)
    else:
        hf = hf_esm()
        hf.save_pretrained(folder, max_shard_size="20KB" if layout == "sharded" else "50GB")
    if layout == "sharded":
        assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("*.safetensors"))) > 2
    assert_matches(hf, tree(checkpoint=str(folder)))


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_unused_heads_are_dropped_and_logged(tmp_path):
    folder = tmp_path / "hf"
    hf_esm(transformers.EsmModel).save_pretrained(folder)
    log, records = logging.getLogger("mutarget"), Records()
    log.addHandler(records)
    level = log.level
    log.setLevel(logging.INFO)
    try:
        arch, state, _ = weights.read_hf_folder(folder)
    finally:
        log.removeHandler(records)
        log.setLevel(level)
    assert arch == {"num_layers": 2, "embed_dim": 32, "attention_heads": 4, "token_dropout": True}
    assert not any(k.startswith(("lm_head", "contact_head", "pooler")) for k in state)
    text = "\n".join(records.lines)
    assert "dropped" in text and "pooler" in text and "contact_head" in text


def test_hub_cache_offline_with_revisions(tmp_path, monkeypatch):
    main_model, other_model = hf_esm(seed=1), hf_esm(seed=2)
    main_model.save_pretrained(tmp_path / "a")
    legacy_bin(other_model, tmp_path / "b")  # an older revision holding only pytorch_model.bin
    commit_a, commit_b = "a" * 40, "b" * 40
    cache = hub_cache(tmp_path / "cache", "testorg/esm2_tiny", {commit_a: tmp_path / "a", commit_b: tmp_path / "b"},
                      {"main": commit_a, "v1": commit_b})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert_matches(main_model, tree(model_name="testorg/esm2_tiny"))
    assert_matches(other_model, tree(model_name="testorg/esm2_tiny", revision="v1"))
    assert_matches(other_model, tree(model_name="testorg/esm2_tiny", revision=commit_b))
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))  # HF_HOME/hub is the next place looked at
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "hub").symlink_to(cache)
    assert_matches(main_model, tree(model_name="testorg/esm2_tiny"))


def test_fair_esm_name_found_in_hub_cache(tmp_path, monkeypatch):
    """A bare fair-esm name (esm2_...) is also looked up as facebook/<name> in the Hugging Face cache."""
    hf = hf_esm()
    hf.save_pretrained(tmp_path / "snap")
    cache = hub_cache(tmp_path / "cache", "facebook/esm2_t6_8M_UR50D", {"c" * 40: tmp_path / "snap"}, {"main": "c" * 40})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert_matches(hf, tree(model_name="esm2_t6_8M_UR50D"))


def test_torch_hub_file_only_for_meta_names_without_revision(tmp_path, monkeypatch):
    """A fair-esm file in the torch hub cache is Meta's model: it must not stand in for another
    organisation's model of the same short name, nor for a requested revision."""
    hf = hf_esm(seed=3)
    hf.save_pretrained(tmp_path / "snap")
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints" / "esm2_t6_8M_UR50D.pt").write_bytes(b"not Meta's weights")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch" ))
    cache = hub_cache(tmp_path / "cache", "myorg/esm2_t6_8M_UR50D", {"d" * 40: tmp_path / "snap"}, {"main": "d" * 40})
    hub_cache(cache, "facebook/esm2_t6_8M_UR50D", {"e" * 40: tmp_path / "snap"}, {"v2": "e" * 40})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert weights.locate({"checkpoint": None, "model_name": "myorg/esm2_t6_8M_UR50D", "revision": None})[0] == "hf"
    assert weights.locate({"checkpoint": None, "model_name": "esm2_t6_8M_UR50D", "revision": "v2"})[0] == "hf"
    assert weights.locate({"checkpoint": None, "model_name": "esm2_t6_8M_UR50D", "revision": None})[0] == "fair-esm"
    assert_matches(hf, tree(model_name="myorg/esm2_t6_8M_UR50D"))


def test_config_without_token_dropout_follows_transformers_default(tmp_path):
    hf = hf_esm(token_dropout=False)
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    del cfg["token_dropout"]  # transformers' EsmConfig then means False
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    assert weights.hf_arch(tmp_path / "hf" / "config.json")["token_dropout"] is False
    assert_matches(hf, tree(checkpoint=str(tmp_path / "hf")))


def test_incomplete_shards_beside_a_complete_bin_and_legacy_non_zip_bin(tmp_path):
    """A snapshot may list safetensors shards it never fetched beside a complete pytorch_model.bin:
    the complete format is read. A legacy (non-zip) .bin cannot be memory-mapped: it is read anyway."""
    hf = hf_esm(seed=4)
    folder = tmp_path / "hf"
    hf.save_pretrained(folder, max_shard_size="20KB")
    sorted(folder.glob("model-*.safetensors"))[0].unlink()
    state = {k: v for k, v in hf.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert_matches(hf, tree(checkpoint=str(folder)))
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(weights.WeightsError, match="weight shard listed in .* is missing"):
        weights.read_hf_tensors(folder)


# ---------------------------------------------------------------- fair-esm files and conversion
def fair_esm_file(path, seed=0):
    torch.manual_seed(seed)
    source = esm.model.esm2.ESM2(2, 32, 4, alphabet="ESM-1b")
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.2)
    arch = {"num_layers": 2, "embed_dim": 32, "attention_heads": 4, "token_dropout": True}
    state = {k: v for k, v in source.state_dict().items() if not k.startswith("contact_head")}
    weights.write_fair_esm(arch, state, path)
    return source.eval()


def convert(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_weights.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def test_fair_esm_to_hf_to_fair_esm_round_trip_is_exact(tmp_path):
    fair = fair_esm_file(tmp_path / "esm2_tiny.pt")
    for args in ((tmp_path / "esm2_tiny.pt", tmp_path / "hf", "--to", "hf"),
                 (tmp_path / "hf", tmp_path / "back.pt", "--to", "fair-esm")):
        done = convert(*args)
        assert done.returncode == 0, done.stderr
    arch_a, a = weights.read_fair_esm(tmp_path / "esm2_tiny.pt")
    arch_b, b = weights.read_fair_esm(tmp_path / "back.pt")
    assert arch_a == arch_b and sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    umask = os.umask(0o022)
    os.umask(umask)  # the folder gets the umask's mode for a new folder (not mkdtemp's private 0700)
    assert (tmp_path / "hf").stat().st_mode & 0o777 == 0o777 & ~umask
    # the converted folder is a real Hugging Face model: transformers reads it and agrees with fair-esm
    hf = transformers.EsmForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    for seq in SEQUENCES:
        with torch.no_grad():
            expected = fair(tokens_of(seq), repr_layers=[2])["representations"][2][0]
            logits = fair(tokens_of(seq))["logits"][0]
            got = hf(input_ids=tokens_of(seq))
        assert (got.hidden_states is None) and (hf_reference(hf, seq) - expected).abs().max() <= 1e-5
        assert (got.logits[0] - logits).abs().max() <= 1e-4  # the LM head travels too
    assert_matches(hf, tree(checkpoint=str(tmp_path / "esm2_tiny.pt")))  # the fair-esm file read directly


# ---------------------------------------------------------------- bad input: exit 2, named file, nothing written
def bad_run(tmp_path, capsys, monkeypatch, *sets):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    config = write_config(tmp_path)
    code = train.main(["--config", str(config), "--set", "encoder.scratch=null", "encoder.tune=frozen", *sets])
    err = capsys.readouterr().err
    assert code == 2, err
    assert not (tmp_path / "run").exists()
    return err


def test_bad_hf_folders(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "hf"
    hf_esm().save_pretrained(folder)
    (folder / "model.safetensors").rename(tmp_path / "weights.safetensors")
    err = bad_run(tmp_path, capsys, monkeypatch, f"encoder.checkpoint={folder}")
    assert f"{folder}: no weights" in err
    (tmp_path / "weights.safetensors").rename(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").unlink()
    assert f"{folder}: no config.json" in bad_run(tmp_path, capsys, monkeypatch, f"encoder.checkpoint={folder}")
    for change, needle in (({"model_type": "bert"}, "model_type is 'bert'"),
                           ({"emb_layer_norm_before": True}, "ESM-1b"),
                           ({"position_embedding_type": "absolute"}, "ESM-1b")):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        err = bad_run(tmp_path, capsys, monkeypatch, f"encoder.checkpoint={folder}")
        assert str(folder / "config.json") in err and needle in err


@pytest.mark.parametrize("damage,needle", [
    ("unexpected", "unexpected tensor 'esm.encoder.layer.0.attention.self.gate.weight'"),
    ("missing", "tensor 'layers.1.fc2.weight' is missing"),
    ("shape", "tensor 'layers.0.fc1.weight' has shape (128, 16)")])
def test_bad_tensors_are_named_with_their_file(tmp_path, capsys, monkeypatch, damage, needle):
    folder = tmp_path / "hf"
    folder.mkdir()
    hf = hf_esm()
    hf.config.to_json_file(folder / "config.json")
    state = dict(hf.state_dict())
    if damage == "unexpected":
        state["esm.encoder.layer.0.attention.self.gate.weight"] = torch.zeros(2)
    elif damage == "missing":
        del state["esm.encoder.layer.1.output.dense.weight"]
    else:
        state["esm.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(128, 16)
    torch.save(state, folder / "pytorch_model.bin")
    err = bad_run(tmp_path, capsys, monkeypatch, f"encoder.checkpoint={folder}")
    assert needle in err and str(folder / "pytorch_model.bin") in err


def test_hub_name_absent_lists_places_and_three_ways(tmp_path, capsys, monkeypatch):
    err = bad_run(tmp_path, capsys, monkeypatch, "encoder.model_name=facebook/esm2_t33_650M_UR50D")
    assert "facebook/esm2_t33_650M_UR50D (encoder.model_name)" in err
    assert str(tmp_path / "empty_cache" / "models--facebook--esm2_t33_650M_UR50D") in err
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "esm2_t33_650M_UR50D.pt") in err
    for way in ("1. fair-esm file", "2. Hugging Face cache", "3. Hugging Face folder", "HF_HUB_CACHE", "TORCH_HOME"):
        assert way in err


def test_esm1b_fair_esm_file_refused(tmp_path, capsys, monkeypatch):
    path = tmp_path / "esm1b.pt"
    torch.save({"cfg": {"model": {"arch": "roberta_large", "layers": 2}},
                "model": {"encoder.sentence_encoder.emb_layer_norm_before.weight": torch.ones(4)}}, path)
    err = bad_run(tmp_path, capsys, monkeypatch, f"encoder.checkpoint={path}")
    assert f"{path}: an ESM-1" in err
