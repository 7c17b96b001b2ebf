"""Damaged, crafted and legacy models: checkpoints and model folders are checked before anything is built from
them (the architecture, the tensors against it, their dtypes and values, thresholds and class centres, files
inside the folder only), each refusal one line naming the file and the field; checkpoints of earlier versions
are converted under a NumPy allowlist, never by a full unpickling; raw pickles and tar files are refused."""
import json
import os
import pickle
import shutil
import sys
import tarfile
import time

import esm
import numpy as np
import pytest
import torch
from conftest import ROOT

import predict
import release
import utils
import weights
from backbone import backbone_arch
from config import ConfigError, resolve_config
from model import Encoder
from space import to_stored
from vocab import CLASSES

sys.path.insert(0, str(ROOT / "scripts"))
import add_centroids  # noqa: E402
import convert_weights  # noqa: E402
import export_model  # noqa: E402
import upgrade_checkpoint  # noqa: E402

D = 32  # the test model's width


class Payload:
    """Unpickled in full, this runs a shell command (touch MARKER)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """{'ckpt': an untrained 1-layer checkpoint as train.py writes best.pt, 'folder': its model folder,
    'fasta': a few proteins}: made once, copied by each case."""
    tmp = tmp_path_factory.mktemp("made")
    torch.manual_seed(0)
    config = resolve_config({"encoder": {"scratch": {"num_layers": 1, "embed_dim": D, "attention_heads": 4},
                                         "tune": "full"}, "decoder": {"hidden_dim": 8},
                             "data": {"max_len": 64, "overlap": 16}})
    model = Encoder(config)
    fitted = {"pooled": {"centres": np.random.default_rng(0).normal(size=(8, D)).astype(np.float32),
                         "counts": np.arange(1, 9), "thresholds": np.full(8, 3.0)}}
    state = {"model": model.state_dict(), "config": config.to_dict(), "arch": backbone_arch(model.backbone),
             "classes": list(CLASSES), "thresholds": dict.fromkeys(CLASSES, 0.5), "centroids": to_stored(fitted)}
    torch.save(state, tmp / "best.pt")
    assert export_model.main([str(tmp / "best.pt"), str(tmp / "model")]) == 0
    (tmp / "in.fa").write_text(">P1\nMKTAYIAKQRQISFVKSHFSRQ\n>P2\nMSDNELLAAKLDGSSRLLQ\n")
    return {"ckpt": tmp / "best.pt", "folder": tmp / "model", "fasta": tmp / "in.fa"}


@pytest.fixture
def no_build(monkeypatch):
    """Fails the test if a backbone is built (a refusal must come before)."""
    def boom(*args, **kwargs):
        raise AssertionError("a backbone was built")
    monkeypatch.setattr(esm.model.esm2, "ESM2", boom)


def run_predict(made, tmp_path, *source):
    out = tmp_path / "out.json"
    code = predict.main([*source, "--fasta", str(made["fasta"]), "--out", str(out), "--method", "both",
                         "--device", "cpu"])
    return code, out


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- model folders
def edit_json(folder, change):
    path = folder / "model.json"
    tree = json.loads(path.read_text())
    change(tree["members"][0])
    path.write_text(json.dumps(tree))


def in_json(change):
    """An edit of the copied folder: change(member 0's entry of model.json)."""
    return lambda folder: edit_json(folder, change)


def set_arch(**values):
    def change(member):
        member["arch"] = values["whole"] if "whole" in values else {**member["arch"], **values}
    return in_json(change)


def rewrite_weights(edit):
    """Rewrite member0.safetensors with edit(state) applied, and its SHA-256 in model.json (as a publisher
    would): only the checks of the tensors stand in the way."""
    from safetensors.torch import load_file, save_file

    def change_folder(folder):
        path = folder / "member0.safetensors"
        state = load_file(path)
        edit(state)
        save_file(state, str(path))
        edit_json(folder, lambda member: member.update(sha256=release.sha256_of(path)))
    return change_folder


def nan_weights(state):
    state["classifier.weight"][0, 0] = float("nan")


def int_weights(state):
    state["classifier.weight"] = state["classifier.weight"].round().to(torch.int64)


def centres(rows, cols):
    def change(member):
        member["centroids"]["pooled"]["centres"] = [[0.5] * cols for _ in range(rows)]
    return in_json(change)


def link_out(folder):
    outside = folder.parent / "elsewhere.safetensors"
    shutil.move(folder / "member0.safetensors", outside)
    (folder / "member0.safetensors").symlink_to(outside)


BIG = {"num_layers": 48, "embed_dim": 5120, "attention_heads": 40, "token_dropout": True}
FOLDER_CASES = {  # name: (edit of the copied folder, file refused, what the message names)
    "extra_key": (set_arch(extra=1), "model.json", "member 0: arch: unknown key 'extra'"),
    "zero_heads": (set_arch(attention_heads=0), "model.json", "arch.attention_heads: must be an integer"),
    "three_heads": (set_arch(attention_heads=3), "model.json", "arch.embed_dim: 32 is not divisible by "
                                                               "arch.attention_heads (3)"),
    "string_layers": (set_arch(num_layers="1"), "model.json", "arch.num_layers: must be an integer from 1 to 1000, "
                                                              "got '1'"),
    "list_width": (set_arch(embed_dim=[32]), "model.json", "arch.embed_dim: must be an integer"),
    "bool_dropout": (set_arch(token_dropout="yes"), "model.json", "arch.token_dropout: must be true or false"),
    "huge": (set_arch(num_layers=400, embed_dim=5120), "model.json", "about 126 billion parameters"),
    "15B_arch_small_tensors": (set_arch(**BIG), "member0.safetensors",
                               "tensor 'backbone.embed_tokens.weight' has shape (33, 32), but arch (num_layers 48, "
                               "embed_dim 5120, attention_heads 40) needs (33, 5120)"),
    "arch_null": (set_arch(whole=None), "model.json", "member 0: arch: null"),
    "nan_weights": (rewrite_weights(nan_weights), "member0.safetensors", "tensor 'classifier.weight' holds NaN"),
    "int_weights": (rewrite_weights(int_weights), "member0.safetensors",
                    "tensor 'classifier.weight' holds int64 values"),
    "more_layers": (set_arch(num_layers=2), "member0.safetensors", "is missing, which arch (num_layers 2, "),
    "centres_width": (centres(8, 5), "model.json", "centroids.pooled.centres: shape (8, 5), expected (8, 32)"),
    "centres_rows": (centres(3, D), "model.json", "centroids.pooled.centres: shape (3, 32), expected (8, 32)"),
    "thresholds": (in_json(lambda member: member["thresholds"].pop("ER")), "model.json",
                   "thresholds: not one number for each"),
    "symlink_out": (link_out, "member0.safetensors", "is a link to"),
}


@pytest.mark.parametrize("case", FOLDER_CASES)
def test_damaged_model_folder_refused(case, made, tmp_path, capsys, monkeypatch, no_build):
    edit, file, named = FOLDER_CASES[case]
    folder = tmp_path / "model"
    shutil.copytree(made["folder"], folder)
    edit(folder)
    if case == "symlink_out":  # refused before the file it points to is read at all
        monkeypatch.setattr(release, "sha256_of", lambda path: pytest.fail(f"{path} was hashed"))
    start = time.perf_counter()
    code, out = run_predict(made, tmp_path, "--model", str(folder))
    line = one_error_line(capsys)
    assert code == 2 and not out.exists()
    assert line.startswith(f"error: {folder / file}: ") and named in line, line
    assert time.perf_counter() - start < 5


def test_intact_model_folder_predicts(made, tmp_path, capsys):
    """The cases above are refusals of what is damaged, not of the folder: the untouched copy predicts, and
    every record is valid JSON (no NaN)."""
    folder = tmp_path / "model"
    shutil.copytree(made["folder"], folder)
    code, out = run_predict(made, tmp_path, "--model", str(folder))
    assert code == 0, capsys.readouterr().err
    assert len(json.loads(out.read_text(), parse_constant=lambda name: pytest.fail(name))) == 2


# --------------------------------------------------------------------------- checkpoints
def edit_checkpoint(made, path, edit):
    state = torch.load(made["ckpt"], weights_only=True)
    edit(state)
    torch.save(state, path)
    return path


CHECKPOINT_CASES = {  # name: (edit of the checkpoint dict, what the message names)
    "extra_key": (lambda s: s["arch"].update(extra=1), "arch: unknown key 'extra'"),
    "zero_heads": (lambda s: s["arch"].update(attention_heads=0), "arch.attention_heads"),
    "list_layers": (lambda s: s["arch"].update(num_layers=[1]), "arch.num_layers"),
    "15B_arch": (lambda s: s["arch"].update(BIG), "tensor 'backbone.embed_tokens.weight' has shape (33, 32)"),
    "arch_null": (lambda s: s.update(arch=None), "arch: null"),
    "nan_weights": (lambda s: s["model"]["backbone.layers.0.fc1.weight"].__setitem__((0, 0), float("inf")),
                    "tensor 'backbone.layers.0.fc1.weight' holds NaN or infinite values"),
    "int_weights": (lambda s: s["model"].update({"decoders.w2": s["model"]["decoders.w2"].to(torch.int32)}),
                    "tensor 'decoders.w2' holds int32 values"),
    "centres": (lambda s: s["centroids"]["pooled"].update(centres=torch.zeros(8, 7)),
                "centroids.pooled.centres: shape (8, 7), expected (8, 32)"),
    "distance_thresholds": (lambda s: s["centroids"]["pooled"].update(thresholds=torch.zeros(9)),
                            "centroids.pooled.thresholds: shape (9,), expected (8,)"),
    "projection_centres": (lambda s: s["centroids"].update(projection=s["centroids"]["pooled"]),
                           "centroids.'projection': no such embedding space"),
    "model_not_tensors": (lambda s: s.update(model=[1, 2]), "model: not a mapping of tensor names to tensors"),
}


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_damaged_checkpoint_refused(case, made, tmp_path, capsys, no_build):
    edit, named = CHECKPOINT_CASES[case]
    path = edit_checkpoint(made, tmp_path / "damaged.pt", edit)
    code, out = run_predict(made, tmp_path, "--checkpoint", str(path))
    line = one_error_line(capsys)
    assert code == 2 and not out.exists()
    assert line.startswith(f"error: {path}: ") and named in line, line


@pytest.mark.parametrize("script", ["add_centroids", "export_model"])
def test_other_scripts_check_the_checkpoint(script, made, tmp_path, capsys, no_build):
    path = edit_checkpoint(made, tmp_path / "damaged.pt", lambda s: s["arch"].update(attention_heads=3))
    if script == "add_centroids":
        code = add_centroids.main([str(path), "--device", "cpu"])
    else:
        code = export_model.main([str(path), str(tmp_path / "exported")])
    assert code == 2 and "arch.embed_dim: 32 is not divisible" in one_error_line(capsys)
    assert not (tmp_path / "exported").exists()


def test_backbone_never_built_from_a_bad_arch():
    """Wherever an arch becomes a backbone (scripts that build Encoder themselves too): refused before."""
    config = resolve_config({"encoder": {"scratch": {"num_layers": 1, "embed_dim": D, "attention_heads": 4}}})
    with pytest.raises(ConfigError, match=r"the checkpoint's arch: unknown key 'x'"):
        Encoder(config, arch={"num_layers": 1, "embed_dim": D, "attention_heads": 4, "token_dropout": True, "x": 0})
    with pytest.raises(ConfigError, match=r"arch.attention_heads: must be an integer"):
        Encoder(config, arch={"num_layers": 1, "embed_dim": D, "attention_heads": 0, "token_dropout": True})


def test_esm2_shapes_match_fair_esm():
    """release.esm2_shapes, which checks tensors before anything is built, is fair-esm's ESM2 layout."""
    for arch in ({"num_layers": 2, "embed_dim": 32, "attention_heads": 4, "token_dropout": True},
                 {"num_layers": 3, "embed_dim": 40, "attention_heads": 2, "token_dropout": False}):
        with torch.device("meta"):
            built = esm.model.esm2.ESM2(alphabet="ESM-1b", **arch)
        expected = {k: tuple(v.shape) for k, v in built.state_dict().items() if not k.startswith(weights.HEADS)}
        assert release.esm2_shapes(arch) == expected


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/elsewhere/model.safetensors"])
def test_weight_map_outside_the_folder_refused(name, tmp_path, capsys):
    """A Hugging Face index may name only files of its folder: an absolute or ../ path is refused unread."""
    folder = tmp_path / "hf"
    folder.mkdir()
    arch = {"num_layers": 1, "embed_dim": 16, "attention_heads": 2, "token_dropout": True}
    (folder / "config.json").write_text(json.dumps(weights.hf_config(arch)))
    (tmp_path / "outside.safetensors").write_bytes(b"not read")
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"esm.embeddings.word_embeddings.weight": name}}))
    assert convert_weights.main([str(folder), str(tmp_path / "out.pt"), "--to", "fair-esm"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {index}: weight_map names '{name}', not a file of this folder"), line


# --------------------------------------------------------------------------- legacy checkpoints and pickles
def legacy(made, path, extra=None):
    """The checkpoint as earlier versions wrote it: NumPy's RNG state as NumPy's tuple, centres as arrays."""
    state = torch.load(made["ckpt"], weights_only=True)
    np.random.seed(7)
    state["rng"] = {"numpy": np.random.get_state()}
    state["centroids"] = {space: {k: v.numpy() for k, v in fitted.items()}
                          for space, fitted in state["centroids"].items()}
    state.update(extra or {})
    torch.save(state, path)
    return path


def test_legacy_checkpoint_upgraded_under_the_allowlist(made, tmp_path, capsys, monkeypatch):
    old = legacy(made, tmp_path / "old.pt")
    code, _ = run_predict(made, tmp_path, "--checkpoint", str(old))
    line = one_error_line(capsys)
    assert code == 2 and f"{old}: written by an earlier version" in line
    assert f"python scripts/upgrade_checkpoint.py {old} NEW.pt" in line
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    new = tmp_path / "new.pt"
    assert upgrade_checkpoint.main([str(old), str(new)]) == 0
    assert loads and all(flag is True for flag in loads)  # never a full unpickling
    upgraded = utils.load_checkpoint(new, ("model", "config", "arch"))
    np.random.seed(7)
    assert upgraded["rng"]["numpy"]["key"].tolist() == np.random.get_state()[1].tolist()
    assert torch.equal(upgraded["centroids"]["pooled"]["centres"],
                       torch.load(made["ckpt"], weights_only=True)["centroids"]["pooled"]["centres"])
    assert run_predict(made, tmp_path, "--checkpoint", str(new))[0] == 0


def test_crafted_numpy_file_refused_and_never_run(made, tmp_path, capsys):
    """NumPy arrays in front of a payload: not a checkpoint of an earlier version (no upgrade advised), and the
    upgrade refuses it too, naming the payload's function: the payload never runs."""
    marker = tmp_path / "PAYLOAD_RAN"
    old = legacy(made, tmp_path / "crafted.pt", {"trap": Payload(marker)})
    code, _ = run_predict(made, tmp_path, "--checkpoint", str(old))
    line = one_error_line(capsys)
    assert code == 2 and f"{old}: refused" in line and "posix.system" in line
    assert "earlier version" not in line and "upgrade_checkpoint" not in line
    new = tmp_path / "new.pt"
    assert upgrade_checkpoint.main([str(old), str(new)]) == 2
    line = one_error_line(capsys)
    assert f"{old}: refused" in line and "posix.system" in line and "not converted" in line
    assert not marker.exists() and not new.exists()


def test_raw_pickles_and_tar_files_refused_in_one_line(made, tmp_path, capsys):
    marker = tmp_path / "PAYLOAD_RAN"
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"model": {}, "trap": Payload(marker)}))
    plain = tmp_path / "plain.pt"
    plain.write_bytes(pickle.dumps({"model": {}, "config": {}}, protocol=2))
    archive = tmp_path / "old.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(plain, arcname="pickle")
    for path, kind in ((raw, "a raw Python pickle"), (plain, "a raw Python pickle"), (archive, "a tar archive")):
        code, _ = run_predict(made, tmp_path, "--checkpoint", str(path))
        line = one_error_line(capsys)
        assert code == 2 and line.startswith(f"error: {path}: refused: not a safe tensor file: {kind}"), line
        assert "weights_only" not in line
    assert not marker.exists()
    legacy_format = tmp_path / "legacy_format.pt"  # torch.save's pre-zip format is still read
    torch.save({"x": torch.ones(2)}, legacy_format, _use_new_zipfile_serialization=False)
    assert torch.equal(utils.torch_load_safe(legacy_format)["x"], torch.ones(2))


def test_no_full_unpickling_anywhere():
    """No module or script of the project turns torch's weights-only reader off or calls pickle.load."""
    sources = [*ROOT.glob("*.py"), *(ROOT / "scripts").glob("*.py")]
    found = [p.name for p in sources if "weights_only=False" in p.read_text() or "pickle.load" in p.read_text()]
    assert not found
