"""scripts/cv.py on the demo config, two folds."""
import json
import statistics
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import cv  # noqa: E402


def test_cv_two_folds_on_demo(tmp_path):
    small = ["train.epochs=1", f"data.root={tmp_path / 'data'}", "data.synthetic.n_proteins=120",
             "encoder.scratch.num_layers=1", "encoder.scratch.embed_dim=32", "device=cpu"]
    out = tmp_path / "cv"
    assert cv.main(["--config", str(ROOT / "configs" / "demo.yaml"), "--folds", "0", "1", "--out", str(out),
                    "--set", *small]) == 0
    summary = json.loads((out / "cv_summary.json").read_text())
    assert [(r["fold"], r["seed"]) for r in summary["runs"]] == [(0, 0), (1, 0)]
    for key in ("macro_f1", "macro_mcc", "macro_site_accuracy", "macro_iou", "per_class_f1", "per_class_mcc",
                "site_accuracy", "iou", "wall_s"):
        assert key in summary["mean"] and key in summary["std"]
    tests = [json.loads((out / "runs" / f"fold{f}_seed0" / "test_metrics.json").read_text()) for f in (0, 1)]
    f1s = [t["macro_f1"] for t in tests]
    assert summary["mean"]["macro_f1"] == statistics.mean(f1s) and summary["std"]["macro_f1"] == statistics.stdev(f1s)
    mito = [t["per_class"]["Mitochondrion"]["mcc"] for t in tests]
    assert summary["mean"]["per_class_mcc"]["Mitochondrion"] == statistics.mean(mito)
    assert "| macro_f1 |" in (out / "cv_summary.md").read_text()
    # the two folds are different splits: valid fold 0 / test 1 and valid 1 / test 2
    assert tests[0]["valid"] != tests[1]["valid"]
    # a second call reuses finished runs (nothing retrained) and writes the same summary
    first = (out / "cv_summary.json").read_text()
    assert cv.main(["--config", str(ROOT / "configs" / "demo.yaml"), "--folds", "0", "1", "--out", str(out),
                    "--set", *small]) == 0
    assert (out / "cv_summary.json").read_text() == first


def test_plot_run_and_embeddings(tmp_path, tiny_run, capsys):
    import plot_embeddings
    import plot_run

    import train
    from conftest import write_config
    png = tmp_path / "curves.png"
    assert plot_run.main([str(tiny_run), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert plot_run.main([str(tmp_path)]) == 2 and "no metrics.jsonl" in capsys.readouterr().err
    supcon = write_config(tmp_path / "s", **{"supcon.apply": True, "supcon.hidden_dim": 16, "supcon.out_dim": 8})
    assert train.main(["--config", str(supcon)]) == 0
    out = tmp_path / "emb.png"
    assert plot_embeddings.main(["--checkpoint", str(tiny_run / "checkpoints" / "best.pt"),
                                 str(tmp_path / "s" / "run" / "checkpoints" / "best.pt"), "--config", str(supcon),
                                 "--out", str(out), "--labels", "baseline", "SupCon"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
