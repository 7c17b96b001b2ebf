"""End-to-end training: run directory contents, model selection, exact resume, losses, bad input."""
import json
import math
import os
import stat

import numpy as np
import pytest
import torch
from conftest import ROOT, write_config
from helpers import read_metrics

import predict
import runtime
import train
import utils
import vocab
from config import ConfigError, load_config, resolve_config


def test_tiny_run_writes_everything(tiny_run):
    records = read_metrics(tiny_run)
    assert [r["epoch"] for r in records] == [0, 1]
    for r in records:
        assert r["phase"] == "supervised"
        for key in ("train_loss", "train_class_loss", "train_motif_loss", "val_macro_f1", "val_macro_mcc", "lr"):
            assert math.isfinite(r[key]), key
        assert r["train_loss"] == pytest.approx(r["train_class_loss"] + r["train_motif_loss"], rel=1e-5)
    config = load_config(tiny_run / "config.yaml")  # the resolved config is itself a valid config
    assert config.train.epochs == 2 and config.train.lr == 3e-3
    test = json.loads((tiny_run / "test_metrics.json").read_text())
    assert set(test["per_class"]) == set(train.CLASSES)
    for key in ("macro_f1", "macro_mcc", "residue", "thresholds", "tuned", "best_epoch"):
        assert key in test
    ckpt = utils.load_checkpoint(tiny_run / "checkpoints" / "last.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "rng", "best_metric", "config", "arch"):
        assert key in ckpt
    assert ckpt["epoch"] == 2
    best = utils.load_checkpoint(tiny_run / "checkpoints" / "best.pt")
    mccs = [r["val_macro_mcc"] for r in records]
    assert best["best_epoch"] == int(np.argmax(mccs)) and best["best_metric"] == max(mccs)  # selected on val MCC
    assert set(best["thresholds"]) == set(train.CLASSES)
    assert best["calibration"]["scope"] == "member" and set(best["calibration"]["temperatures"]) == set(train.CLASSES)
    assert best["calibration"]["n_proteins"] == 27  # fitted on the validation partition
    cal = test["calibration"]  # ECE / Brier on test, before and after; the sets' realised recall at each coverage
    assert cal["uncalibrated"]["macro_ece"] >= 0 and cal["calibrated"]["macro_brier"] >= 0
    assert list(test["sets"]) == ["0.8", "0.9", "0.95"] and "Other" in test["sets"]["0.9"]["per_class"]
    assert not list((tiny_run / "checkpoints").glob("*.tmp"))


def test_resume_reproduces_uninterrupted_run(tmp_path):
    full = write_config(tmp_path / "a", **{"train.epochs": 3, "decoder.dropout": 0.2})
    part = write_config(tmp_path / "b", **{"train.epochs": 3, "decoder.dropout": 0.2})
    assert train.main(["--config", str(full)]) == 0
    assert train.main(["--config", str(part), "--stop-after", "1"]) == 0
    run_b = tmp_path / "b" / "run"
    assert [r["epoch"] for r in read_metrics(run_b)] == [0] and not (run_b / "test_metrics.json").exists()
    assert train.main(["--resume", str(run_b / "checkpoints" / "last.pt")]) == 0
    timing = {"time_s", "anchors_per_s", "tokens_per_s", "padded_tokens_per_s", "model_tflops_per_s",
              "hardware_tflops_per_s"}
    strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]  # noqa: E731
    assert strip(read_metrics(run_b)) == strip(read_metrics(tmp_path / "a" / "run"))
    a = json.loads((tmp_path / "a" / "run" / "test_metrics.json").read_text())
    b = json.loads((run_b / "test_metrics.json").read_text())
    a.pop("checkpoint"), b.pop("checkpoint")
    assert a == b


def test_scheduler_warmup_then_cosine():
    cfg = resolve_config({"encoder": {"scratch": {}}, "train": {"epochs": 4, "warmup_epochs": 1.0,
                                                                      "lr": 1.0, "min_lr_ratio": 0.1}})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = train.make_scheduler(opt, cfg.train, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    expected = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 10) / 30)) for s in range(10, 40)]
    assert lrs[10:] == pytest.approx(expected)


def test_bad_data_exits_nonzero_without_run_dir(tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    (root / "X_uniprot.csv").write_text("Entry,MOTIF,LOCATION,Sequence\nP1,1-5:SIGNAL,x,MKTAYIAKQR\n"
                                        "P2,1-5:SIGNAL,x,MKTA#IAKQR\n")
    (root / "partition.csv").write_text("entry,type,group,partition\nP1,SIGNAL,0,0\nP2,SIGNAL,1,1\n")
    config = write_config(tmp_path, **{"data.synthetic.generate": False})
    assert train.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "X_uniprot.csv: line 3, entry 'P2': invalid residue" in err
    assert not (tmp_path / "run").exists()


def test_bad_config_and_missing_weights_exit_nonzero(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path, **{"train.epohcs": 2})
    assert train.main(["--config", str(config)]) == 2
    assert "unknown config key 'train.epohcs'; did you mean 'train.epochs'?" in capsys.readouterr().err
    config = write_config(tmp_path)
    assert train.main(["--config", str(config), "--set", "train.batch_size=big"]) == 2
    assert "'train.batch_size' must be int" in capsys.readouterr().err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    assert train.main(["--config", str(config), "--set", "encoder.scratch=null",
                       "encoder.model_name=esm2_t6_8M_UR50D"]) == 2
    assert "esm2_t6_8M_UR50D.pt" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_frozen_cache_run_and_refusal(tmp_path, capsys):
    config = write_config(tmp_path, **{"encoder.scratch.num_layers": 2, "encoder.tune": "last_k",
                                       "encoder.trainable_layers": 1, "encoder.cache_frozen": True,
                                       "encoder.cache_on_disk": True})
    assert train.main(["--config", str(config)]) == 0
    assert (tmp_path / "run" / "frozen_cache.npy").is_file()
    assert all(math.isfinite(r["train_loss"]) for r in read_metrics(tmp_path / "run"))
    bad = write_config(tmp_path / "b", **{"encoder.tune": "full", "encoder.cache_frozen": True})
    assert train.main(["--config", str(bad)]) == 2
    assert "encoder.cache_frozen needs frozen leading layers" in capsys.readouterr().err
    assert not (tmp_path / "b" / "run").exists()


def test_compile_refusals_before_anything_is_written(tmp_path, capsys, monkeypatch):
    """train.compile needs the packed layout, and a platform where torch.compile works: exit 2, no run_dir."""
    config = write_config(tmp_path, **{"train.compile": True, "encoder.packed": False})
    assert train.main(["--config", str(config)]) == 2
    assert "train.compile compiles the packed layout's layers: set encoder.packed: true" in capsys.readouterr().err

    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
    monkeypatch.setattr(torch, "compile", no_compiler)
    config = write_config(tmp_path, **{"train.compile": True})
    assert train.main(["--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "train.compile: true, but torch.compile does not work on this platform" in err
    assert "No working C++ compiler found" in err and "set train.compile: false" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_compiled_run_trains_like_the_eager_one(tmp_path):
    """train.compile: true end to end with the real backend (inductor): the first epoch's losses are the eager
    run's to float rounding, and a resumed compiled run finishes."""
    runtime.check_compiler(torch.device("cpu"))
    eager = write_config(tmp_path / "eager", **{"train.epochs": 1})
    compiled = write_config(tmp_path / "compiled", **{"train.epochs": 2, "train.compile": True})
    assert train.main(["--config", str(eager)]) == 0
    assert train.main(["--config", str(compiled), "--stop-after", "1"]) == 0
    first_eager, first_compiled = read_metrics(tmp_path / "eager" / "run")[0], read_metrics(tmp_path / "compiled" / "run")[0]
    for key in ("train_loss", "train_class_loss", "train_motif_loss"):
        assert first_compiled[key] == pytest.approx(first_eager[key], rel=1e-3), key
    assert train.main(["--resume", str(tmp_path / "compiled" / "run" / "checkpoints" / "last.pt")]) == 0
    assert [r["epoch"] for r in read_metrics(tmp_path / "compiled" / "run")] == [0, 1]


def test_frozen_cache_refused_with_augmentation(tmp_path, capsys):
    config = write_config(tmp_path, **{"encoder.scratch.num_layers": 2, "encoder.tune": "last_k",
                                       "encoder.trainable_layers": 1, "encoder.cache_frozen": True,
                                       "train.augment.apply": True})
    assert train.main(["--config", str(config)]) == 2
    assert "cache_frozen would be wrong with mutated sequences" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cpu_bf16_autocast_close_to_fp32(tmp_path):
    """train.amp: bf16 runs CPU autocast in training, validation and the final test: losses within 1%
    (relative) and test ROC-AUC within 0.02 of the fp32 run; bf16 really ran (the numbers differ)."""
    runs = {}
    for amp in ("none", "bf16"):
        config = write_config(tmp_path / amp, **{"train.amp": amp, "encoder.scratch.num_layers": 2})
        assert train.main(["--config", str(config)]) == 0
        runs[amp] = (read_metrics(tmp_path / amp / "run"), json.loads((tmp_path / amp / "run" / "test_metrics.json").read_text()))
    (fp32, test32), (bf16, test16) = runs["none"], runs["bf16"]
    for a, b in zip(fp32, bf16):
        for key in ("train_loss", "train_class_loss", "train_motif_loss"):
            assert math.isfinite(b[key]) and b[key] == pytest.approx(a[key], rel=1e-2), key
    assert fp32[-1]["train_loss"] != bf16[-1]["train_loss"]
    assert test16["macro_roc_auc"] == pytest.approx(test32["macro_roc_auc"], abs=0.02)
    assert runtime.amp_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert runtime.amp_dtype("auto", torch.device("cpu")) is None
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        runtime.amp_dtype("fp16", torch.device("cpu"))


def umask_file_mode() -> int:
    """The mode open() gives a new file under the current umask (0666 & ~umask)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def test_run_files_get_the_umask_mode_not_0600(tiny_run):
    for name in ("config.yaml", "metrics.jsonl", "test_metrics.json", "checkpoints/last.pt", "checkpoints/best.pt"):
        assert stat.S_IMODE((tiny_run / name).stat().st_mode) == umask_file_mode(), name


def snapshot(folder):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_resume_from_truncated_or_foreign_checkpoint_exits_2(tmp_path, tiny_run, capsys):
    whole = (tiny_run / "checkpoints" / "last.pt").read_bytes()
    truncated, empty, foreign = tmp_path / "last.pt", tmp_path / "empty.pt", tmp_path / "weights.pt"
    truncated.write_bytes(whole[: len(whole) // 2])
    empty.write_bytes(b"")
    torch.save({"model": {}, "config": {}}, foreign)  # loads, but is no resumable train.py checkpoint
    before, run_before = snapshot(tmp_path), snapshot(tiny_run)  # the stored config's run_dir is tiny_run
    for path in (truncated, empty):
        assert train.main(["--resume", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"error: {path}: not a readable checkpoint, truncated or corrupt?" in err and "Traceback" not in err
    assert train.main(["--resume", str(foreign)]) == 2
    assert f"error: {foreign}: not a train.py checkpoint (missing optimizer, scheduler" in capsys.readouterr().err
    assert snapshot(tmp_path) == before and snapshot(tiny_run) == run_before  # nothing written




def test_checkpoint_written_before_the_layout_change_resumes_and_predicts(tmp_path, capsys):
    """tests/fixtures/best_510a3f0.pt: best.pt of a 2-epoch tiny run (16-dim, 1 layer, synthetic data of 60
    proteins, seed 3) written by commit 510a3f0, the last before the modules were reorganised. It still
    predicts, and resumes for a third epoch on the same (regenerated) data."""
    fixture = ROOT / "tests" / "fixtures" / "best_510a3f0.pt"
    fasta = tmp_path / "in.fa"
    fasta.write_text(">A\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWSTPSELGHAGLNGDILVWNPVLEDAFELSSMGIRVDADTLKHQLALTGDEDRLELEWHQALLRGEMPQTIGGGIGQSRLTMLLLQLPHIGQVQAGVWPAACRPEGVEEGPVA\n")
    out = tmp_path / "out.json"
    assert predict.main(["--checkpoint", str(fixture), "--fasta", str(fasta), "--out", str(out), "--method", "both",
                         "--tuned-thresholds", "--device", "cpu"]) == 0, capsys.readouterr().err
    record = json.loads(out.read_text())[0]
    assert record["id"] == "A" and set(record["probabilities"]) == set(vocab.CLASSES) and "centroid" in record
    run_dir = tmp_path / "resumed"
    assert train.main(["--resume", str(fixture), "--set", "train.epochs=3", f"run_dir={run_dir}",
                       f"data.root={tmp_path / 'data'}"]) == 0, capsys.readouterr().err
    assert [r["epoch"] for r in read_metrics(run_dir)] == [2]
    assert "resumed from" in (run_dir / "train.log").read_text()
