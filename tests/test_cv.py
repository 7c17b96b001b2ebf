"""scripts/cv.py on the demo config (two folds), the plots, and the results tables of docs/RESULTS.md."""
import json
import statistics
import sys

import pytest
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
    for key in ("macro_f1", "macro_mcc", "tuned_macro_f1", "tuned_macro_mcc", "macro_roc_auc", "macro_average_precision",
                "macro_site_accuracy", "macro_iou", "per_class_f1", "per_class_mcc", "tuned_per_class_mcc",
                "per_class_average_precision", "site_accuracy", "iou", "wall_s"):
        assert key in summary["mean"] and key in summary["std"]
    tests = [json.loads((out / "runs" / f"fold{f}_seed0" / "test_metrics.json").read_text()) for f in (0, 1)]
    f1s = [t["macro_f1"] for t in tests]
    assert summary["mean"]["macro_f1"] == statistics.mean(f1s) and summary["std"]["macro_f1"] == statistics.stdev(f1s)
    tuned = [t["tuned"]["macro_mcc"] for t in tests]
    assert summary["mean"]["tuned_macro_mcc"] == statistics.mean(tuned)
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
    # a fold stopped before its final test is resumed (train.py --resume): the same figures; with another config,
    # refused
    (out / "runs" / "fold1_seed0" / "test_metrics.json").unlink()
    assert cv.main(["--config", str(ROOT / "configs" / "demo.yaml"), "--folds", "1", "--out", str(out),
                    "--set", *small, "train.lr=0.001"]) == 2
    assert cv.main(["--config", str(ROOT / "configs" / "demo.yaml"), "--folds", "0", "1", "--out", str(out),
                    "--set", *small]) == 0
    assert json.loads((out / "cv_summary.json").read_text())["runs"][1]["macro_f1"] == tests[1]["macro_f1"]


def test_plot_run_and_embeddings(tmp_path, tiny_run, capsys):
    import plot_embeddings
    import plot_run
    from conftest import write_config

    import train
    png = tmp_path / "curves.png"
    assert plot_run.main([str(tiny_run), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert plot_run.main([str(tmp_path)]) == 2 and "no metrics.jsonl" in capsys.readouterr().err
    both = tmp_path / "compare.png"
    assert plot_run.main([str(tiny_run), str(tiny_run), "--labels", "a", "b", "--out", str(both)]) == 0
    assert both.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and both.stat().st_size > 10_000
    assert plot_run.main([str(tiny_run), str(tiny_run), "--labels", "a", "--out", str(both)]) == 2
    supcon = write_config(tmp_path / "s", **{"supcon.apply": True, "supcon.hidden_dim": 16, "supcon.out_dim": 8})
    assert train.main(["--config", str(supcon)]) == 0
    out = tmp_path / "emb.png"
    assert plot_embeddings.main(["--checkpoint", str(tiny_run / "checkpoints" / "best.pt"),
                                 str(tmp_path / "s" / "run" / "checkpoints" / "best.pt"), "--config", str(supcon),
                                 "--out", str(out), "--labels", "baseline", "SupCon"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    capsys.readouterr()
    # errors are one line and exit 2 (a missing or foreign checkpoint; labels that do not match), nothing written
    bad = tmp_path / "bad.png"
    assert plot_embeddings.main(["--checkpoint", str(tmp_path / "nowhere.pt"), "--config", str(supcon),
                                 "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nowhere.pt" in err and err.count("\n") == 1 and not bad.exists()
    (tmp_path / "foreign.pt").write_bytes(b"not a checkpoint")
    assert plot_embeddings.main(["--checkpoint", str(tmp_path / "foreign.pt"), "--config", str(supcon),
                                 "--out", str(bad)]) == 2
    assert "foreign.pt" in capsys.readouterr().err and not bad.exists()


def _summary(f1s, mccs):
    """A cv_summary with the given per-run macro-F1 / MCC; every other metric 0.5 (std 0.0)."""
    from vocab import CLASSES, SEGMENT_CLASSES, SITE_CLASSES
    runs = [{"fold": i, "seed": 0, "run_dir": f"r{i}", "wall_s": 10.0 * (i + 1), "best_epoch": 1,
             "macro_f1": f, "macro_mcc": m, "tuned_macro_f1": 0.5, "tuned_macro_mcc": 0.5, "macro_roc_auc": 0.5,
             "macro_average_precision": 0.5, "macro_site_accuracy": 0.5, "macro_iou": 0.5,
             "per_class_f1": {c: 0.5 for c in CLASSES}, "per_class_mcc": {c: 0.5 for c in CLASSES},
             "tuned_per_class_mcc": {c: 0.5 for c in CLASSES}, "per_class_average_precision": {c: 0.5 for c in CLASSES},
             "site_accuracy": {c: 0.5 for c in SITE_CLASSES}, "iou": {c: 0.5 for c in SEGMENT_CLASSES},
             **cv.space_metrics({"pooled": _space(0.1 * (i + 1))})}
            for i, (f, m) in enumerate(zip(f1s, mccs))]
    return {"config": "c.yaml", "overrides": [], "runs": runs,
            "mean": cv.aggregate(runs, statistics.mean), "std": cv.aggregate(runs, statistics.stdev)}


def _space(value):
    """A test_metrics.json 'space' entry whose every figure is `value`."""
    from vocab import CLASSES
    macro = {"macro_f1": value, "macro_mcc": value}
    return {"maxsep": macro, "threshold": macro, "knn": {"k": 5, **macro}, "macro_average_precision": value,
            "macro_silhouette": value, "silhouette": {c: value for c in CLASSES}}


def test_space_summary_and_table_hand_worked():
    import results_table
    a = _summary([0.2, 0.4, 0.6], [0.1, 0.2, 0.3])  # pooled figures 0.1, 0.2, 0.3 over the runs
    assert a["mean"]["pooled_threshold_macro_mcc"] == pytest.approx(0.2)
    assert a["std"]["pooled_silhouette"]["ER"] == pytest.approx(0.1)
    assert a["mean"]["projection_macro_silhouette"] is None  # no projection head: no figure, no row
    text = results_table.space_tables({"base": a})
    assert "| base | 0.500 ± 0.000 | 0.500 ± 0.000 |" + " 0.200 ± 0.100 |" * 5 in text
    assert "Projection-head outputs" not in text
    assert "| base | 0.100 / 0.100 / 0.500 | 0.200 / 0.200 / 0.500 | 0.300 / 0.300 / 0.500 |" in text
    assert "| Thylakoid | 0.200 ± 0.100 |" in text
    old = {**a, "mean": {k: v for k, v in a["mean"].items() if not k.startswith(("pooled", "projection"))}}
    assert results_table.space_tables({"base": a, "old": old}) == text  # a summary without space figures: left out


def test_results_table_hand_worked(tmp_path):
    import results_table
    a, b = _summary([0.2, 0.4, 0.6], [0.1, 0.2, 0.3]), _summary([0.5, 0.5, 0.5], [0.4, 0.2, 0.0])
    text = results_table.tables({"base": a, "con": b})
    # F1 0.2 0.4 0.6: mean 0.4, sample std sqrt((0.04 + 0 + 0.04) / 2) = 0.2; MCC 0.1 0.2 0.3: 0.2 ± 0.1
    assert "| base | 0.400 ± 0.200 | 0.200 ± 0.100 |" + " 0.500 ± 0.000 |" * 5 + " 20 ± 10 |" in text
    assert "| con | 0.500 ± 0.000 | 0.200 ± 0.200 |" in text
    assert "| base | 0.200 / 0.100 / 0.500 / 0.500 | 0.400 / 0.200 / 0.500 / 0.500 | 0.600 / 0.300 / 0.500 / 0.500 |" in text
    assert "| Nucleus | 0.500 ± 0.000 | 0.500 ± 0.000 |" in text
    b["runs"][2]["fold"] = 3
    with pytest.raises(ValueError, match="con: runs"):
        results_table.tables({"base": a, "con": b})
    doc = tmp_path / "R.md"
    doc.write_text(f"intro\n{results_table.BEGIN}\nold\n{results_table.END}\noutro\n")
    results_table.update(doc, "new\n")
    assert doc.read_text() == f"intro\n{results_table.BEGIN}\nnew\n{results_table.END}\noutro\n"


def test_results_md_tables_match_committed_summaries():
    """docs/RESULTS.md's tables are exactly what results_table.py makes of docs/results/cv_cpu_*.json."""
    import re

    import results_table
    doc = (ROOT / "docs" / "RESULTS.md").read_text()
    block = doc.split(results_table.BEGIN + "\n", 1)[1].split(results_table.END, 1)[0]
    header = next(line for line in block.splitlines() if line.startswith("| class |"))
    names = [n.strip() for n in header.strip("|").split("|")[1:]]
    assert len(names) >= 3
    summaries = {n: json.loads((ROOT / "docs" / "results" / f"cv_cpu_{n}.json").read_text()) for n in names}
    assert all(len(s["runs"]) >= 3 for s in summaries.values())
    assert block == results_table.tables(summaries)
    space_block = doc.split(results_table.SPACE_BEGIN + "\n", 1)[1].split(results_table.SPACE_END, 1)[0]
    assert space_block == results_table.space_tables(summaries)
    # every image RESULTS.md shows is committed
    for image in re.findall(r"\]\((img/[^)]+\.png)\)", doc):
        assert (ROOT / "docs" / image).is_file(), image
