"""Model folders (release.py, scripts/export_model.py, predict.py --model): safetensors + model.json, predictions
byte-identical to the checkpoints', damaged or foreign folders refused."""
import json
import stat
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

import predict
import release

sys.path.insert(0, str(ROOT / "scripts"))
import export_model  # noqa: E402

AA = list("ACDEFGHIKLMNPQRSTVWY")


@pytest.fixture(scope="module")
def two_checkpoints(tiny_run, tmp_path_factory):
    """best.pt of the tiny run and a copy with shifted head biases: a 2-member ensemble whose members differ."""
    tmp = tmp_path_factory.mktemp("two")
    state = torch.load(tiny_run / "checkpoints" / "best.pt", weights_only=True)
    state["model"]["classifier.bias"] += 1.0
    state["model"]["decoders.b2"] -= 1.0
    torch.save(state, tmp / "shifted.pt")
    return [tiny_run / "checkpoints" / "best.pt", tmp / "shifted.pt"]


def write_fasta(path, n=25, seed=4):
    rng = np.random.default_rng(seed)
    path.write_text("".join(f">p{i}\n{''.join(rng.choice(AA, size=int(k)))}\n"
                            for i, k in enumerate(rng.integers(3, 200, size=n))))
    return path


def predict_files(tmp_path, tag, *source):
    """predict.py with every per-protein output, both methods (the centroid's p-value rule) and tuned thresholds ->
    {suffix: path}."""
    out = {k: tmp_path / f"{tag}.{k}" for k in ("json", "tsv", "gff3", "npz")}
    code = predict.main([*source, "--fasta", str(write_fasta(tmp_path / "in.fa")), "--out", str(out["json"]),
                         "--tsv", str(out["tsv"]), "--gff3", str(out["gff3"]), "--embeddings", str(out["npz"]),
                         "--method", "both", "--centroid-rule", "pvalue", "--tuned-thresholds", "--coverage", "0.9", "--device", "cpu"])  # and the heads' prediction sets
    assert code == 0
    return out


def test_exported_ensemble_predicts_byte_for_byte_as_its_checkpoints(two_checkpoints, tmp_path, capsys):
    folder = tmp_path / "model"
    assert export_model.main([*map(str, two_checkpoints), str(folder)]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["member0.safetensors", "member1.safetensors", "model.json"]
    plain = (tmp_path / "plain").touch() or stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert all(stat.S_IMODE(p.stat().st_mode) == plain for p in folder.iterdir())  # the umask's mode
    description = json.loads((folder / "model.json").read_text())
    first = description["members"][0]
    assert description["format"] == "mutarget-model" and description["classes"][3] == "SIGNAL"
    assert first["tune"] == "full" and first["arch"]["num_layers"] == 1 and set(first["thresholds"]) == set(
        description["classes"]) and set(first["centroids"]) == {"pooled"}
    null = first["centroids"]["pooled"]["null_distances"]  # the confidence fields travel too; the null as base64
    assert set(null) == {"shape", "float32_base64"} and null["shape"][0] == 8 and len(first["centroids"]["pooled"][
        "mixture_means"][0]) == 2 and 0 < first["centroids"]["pooled"]["p_value"] < 1
    text = (folder / "model.json").read_text()  # provenance and test figures, no local path of the exporter
    assert str(two_checkpoints[0].parents[2]) not in text and str(tmp_path) not in text
    test_metrics = json.loads((two_checkpoints[0].parents[1] / "test_metrics.json").read_text())
    assert first["source"] == "run/checkpoints/best.pt" and first["config"]["run_dir"] == "run"
    assert first["test"]["threshold_0.5"]["macro_f1"] == test_metrics["macro_f1"]
    assert first["test"]["tuned"]["macro_mcc"] == test_metrics["tuned"]["macro_mcc"]
    run = json.loads((two_checkpoints[0].parents[1] / "run.json").read_text())
    assert first["provenance"]["code"] == run["code"] and first["provenance"]["versions"] == run["versions"]
    from safetensors.torch import load_file
    exported, trained = load_file(folder / "member1.safetensors"), torch.load(two_checkpoints[1], weights_only=True)
    assert exported.keys() == trained["model"].keys()
    assert all(torch.equal(exported[k], trained["model"][k]) for k in exported)  # the weights, unchanged
    from_checkpoints = predict_files(tmp_path, "ckpt", "--checkpoint", *map(str, two_checkpoints))
    from_folder = predict_files(tmp_path, "model", "--model", str(folder))
    for kind in from_checkpoints:
        assert from_checkpoints[kind].read_bytes() == from_folder[kind].read_bytes(), kind


def test_export_and_read_refusals(two_checkpoints, tmp_path, capsys):
    folder = tmp_path / "model"
    assert export_model.main([str(two_checkpoints[0]), str(folder)]) == 0
    assert export_model.main([str(two_checkpoints[0]), str(folder)]) == 2  # never over an existing folder
    assert f"{folder}: already exists" in capsys.readouterr().err
    fasta = write_fasta(tmp_path / "in.fa")
    out = tmp_path / "out.json"
    weights = folder / "member0.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the last weight
    weights.write_bytes(bytes(data))
    assert predict.main(["--model", str(folder), "--fasta", str(fasta), "--out", str(out)]) == 2
    assert f"{weights}: SHA-256 differs" in capsys.readouterr().err and not out.exists()
    description = folder / "model.json"
    description.write_text(json.dumps({"format": "something-else"}))
    assert predict.main(["--model", str(folder), "--fasta", str(fasta), "--out", str(out)]) == 2
    assert f"{description}: not a mutarget-model description" in capsys.readouterr().err
    assert predict.main(["--model", str(tmp_path), "--fasta", str(fasta), "--out", str(out)]) == 2
    assert f"{tmp_path}: not a model folder (model.json not found)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # one source of models, not both
        predict.parse_args(["--model", str(folder), "--checkpoint", str(two_checkpoints[0]), "--fasta", str(fasta),
                            "--out", str(out)])


def test_json_numbers_round_trip_exactly():
    """Distance thresholds may be infinite and a centre NaN: JSON gets strings, read back exactly."""
    centres = np.array([[0.1, np.float32(1 / 3)], [np.nan, np.nan]], dtype=np.float32)
    fitted = {"pooled": {"centres": centres, "counts": np.array([3, 0]), "thresholds": np.array([np.inf, -np.inf])}}
    text = json.dumps(release._to_json(fitted), allow_nan=False)
    back = release._centroids_from_json(json.loads(text))["pooled"]
    assert back["centres"].dtype == np.float32 and back["centres"].tobytes() == centres.tobytes()
    assert back["counts"].tolist() == [3, 0] and back["thresholds"].tolist() == [np.inf, -np.inf]


def test_calibrated_model_folder(two_checkpoints, tmp_path, capsys):
    """scripts/calibrate.py --model: a new folder whose weights files are byte for byte the old ones and whose members
    hold one ensemble calibration; its prediction sets carry the guarantee (no note of pooled scores), and the
    records show calibrated probabilities beside the uncalibrated ones."""
    import calibrate
    folder, out = tmp_path / "model", tmp_path / "calibrated"
    assert export_model.main([*map(str, two_checkpoints), str(folder)]) == 0
    csv = two_checkpoints[0].parents[2] / "data" / "SYNTHETIC_uniprot.csv"
    assert calibrate.main(["--model", str(folder), "--csv", str(csv), "--out", str(out), "--device", "cpu"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in folder.iterdir())
    weights = ("member0.safetensors", "member1.safetensors")
    assert all((out / n).read_bytes() == (folder / n).read_bytes() for n in weights)
    members = json.loads((out / "model.json").read_text())["members"]
    assert members[0]["calibration"]["ensemble"] == members[1]["calibration"]["ensemble"] != None  # noqa: E711
    assert members[0]["calibration"]["temperatures"] != members[1]["calibration"]["temperatures"]  # each its own
    capsys.readouterr()
    records = tmp_path / "out.json"
    assert predict.main(["--model", str(out), "--fasta", str(write_fasta(tmp_path / "in.fa", n=5)), "--out",
                         str(records), "--coverage", "0.9", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "pool" not in err and "uncalibrated" not in err, err
    record = json.loads(records.read_text())[0]
    assert record["probabilities"] != record["probabilities_uncalibrated"] and record["prediction_set"]["size"] >= 0
