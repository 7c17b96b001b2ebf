"""Evaluation of a model on a dataset: inference over every protein (probabilities, residue tracks, pooled
embeddings and projections), protein- and residue-level scores, the final test of a run (0.5 and
validation-tuned thresholds, the embedding-space metrics) and the class centres of centroid prediction."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import calibration
import space
from batching import Collate, length_sorted_batches
from checkpoints import best_for_test
from data import LocalizationDataset
from metrics import format_table, score, tune_thresholds
from runtime import amp_dtype, autocast, load_model_full_state, to_device
from utils import save_checkpoint, write_text_atomic
from vocab import CLASSES


@torch.no_grad()
def run_inference(model, dataset, batch_size: int, device, amp: str = "none", max_len=1022, overlap=200) -> dict:
    """Probabilities for every protein of `dataset`, in dataset order: probs [N, 8] (and their logits [N, 8]),
    motif_probs (list of [8, L_i]), pooled embeddings [N, d] and their projections [N, k] (None
    without a projection head), plus the truth: labels [N, 8], targets, target_masks."""
    model.eval()
    loader = DataLoader(dataset, batch_sampler=length_sorted_batches(dataset.lengths, batch_size),
                        collate_fn=Collate(max_len, overlap), pin_memory=device.type == "cuda")
    n = len(dataset)
    probs = np.zeros((n, len(CLASSES)), dtype=np.float32)
    logits = np.zeros((n, len(CLASSES)), dtype=np.float32)
    pooled = np.zeros((n, model.backbone.embed_dim), dtype=np.float32)
    projection = None if model.projection is None else np.zeros((n, model.projection.net[-1].out_features), np.float32)
    motif_probs, masks = [None] * n, [None] * n
    for batch in tqdm(loader, desc=f"eval {dataset.name}", leave=False, disable=None):
        batch = to_device(batch, device)
        with autocast(device, amp_dtype(amp, device)):
            out = model(batch, project=projection is not None)
        z = out["class_logits"].float()
        p, z = torch.sigmoid(z).cpu().numpy(), z.cpu().numpy()
        mp = torch.sigmoid(out["motif_logits"].float()).cpu().numpy()
        tm = batch["target_mask"].cpu().numpy()
        rows = batch["indices"].cpu().numpy()
        pooled[rows] = out["pooled"].float().cpu().numpy()
        if projection is not None:
            projection[rows] = out["pooled_projection"].float().cpu().numpy()
        for row, (i, length) in enumerate(zip(batch["indices"].tolist(), batch["lengths"].tolist())):
            probs[i], logits[i] = p[row], z[row]
            motif_probs[i] = mp[row, :, :length]
            masks[i] = tm[row, :, :length]
    return {"probs": probs, "logits": logits, "motif_probs": motif_probs, "pooled": pooled, "projection": projection,
            "labels": dataset.labels.astype(np.int64),
            "targets": [p.targets for p in dataset.proteins], "target_masks": masks}


def evaluate(model, dataset, config, device) -> dict:
    """run_inference with the run's settings: train.eval_batch_size, train.amp, data.max_len / overlap."""
    return run_inference(model, dataset, config.train.eval_batch_size, device, config.train.amp,
                         config.data.max_len, config.data.overlap)


def final_test(trainer, best_epoch, best_metric) -> dict:
    """Evaluate the best checkpoint on test at 0.5 and at MCC-optimal thresholds tuned on valid (both on the
    uncalibrated probabilities); fit the calibration on valid (calibration.py: temperatures, conformal scores) and
    report its ECE / Brier and the prediction sets at calibration.coverages on test; store the thresholds, class
    centres and calibration in best.pt, then write test_metrics.json (the run's last file). best.pt must hold
    best_epoch with val macro-MCC best_metric (checkpoints.best_for_test); last.pt without a best epoch.
    trainer: train.Trainer (sharded, every process runs this; the main process alone writes)."""
    model, datasets, config, device, log = trainer.model, trainer.datasets, trainer.config, trainer.device, trainer.log
    best_path, best = best_for_test(Path(config.run_dir) / "checkpoints", best_epoch, best_metric)
    if best is not None:
        load_model_full_state(model, best["model"], best_path)
    else:
        log.warning("no checkpoint was written (0 epochs?): evaluating the current model")
    valid = evaluate(model, datasets["valid"], config, device)
    thresholds = tune_thresholds(valid["labels"], valid["probs"])
    valid_scores = score(valid)
    test = evaluate(model, datasets["test"], config, device)
    result = score(test)
    tuned = score(test, thresholds)
    centroids, train_out = fit_centroids(model, datasets["train"].proteins, valid, config, device)
    if not trainer.main_process:
        return result
    calib, test_cal = fit_calibration(valid, test, config, log)
    result.update({"best_epoch": best_epoch, "checkpoint": str(best_path) if best else None,
                   "fold": config.data.fold, "n_test": len(datasets["test"]),
                   "thresholds": dict(zip(CLASSES, map(float, thresholds))),
                   "tuned": {k: tuned[k] for k in ("macro_f1", "macro_mcc", "per_class", "subset_accuracy", "jaccard")},
                   "valid": {k: valid_scores[k] for k in ("macro_f1", "macro_mcc")},
                   "space": {name: space.space_metrics(*[(out[name], out["labels"]) for out in (train_out, valid, test)],
                                                       fitted=fitted) for name, fitted in centroids.items()},
                   "calibration": calibration.calibration_report(test["labels"], test["probs"], test_cal, calib),
                   "sets": None if calib is None else calibration.set_report(
                       test["labels"], test_cal, calib["scores"], config.calibration.coverages)})
    if best is not None:
        best["thresholds"], best["centroids"] = result["thresholds"], space.to_stored(centroids)
        best["calibration"] = calib
        best["test"] = test_summary(result)  # a model folder's test figures (release.py)
        save_checkpoint(best, best_path)
    write_text_atomic(Path(config.run_dir) / "test_metrics.json", json.dumps(result, indent=2))
    log.info("test (best epoch %s; threshold 0.5 on the uncalibrated probabilities):\n%s", best_epoch,
             format_table(result))
    log_calibration(result, log)
    for name, m in result["space"].items():
        log.info("%s space: centroid macro-MCC %.4f (max-separation) %.4f (thresholds), macro AP %.4f, %d-NN macro-MCC "
                 "%.4f, macro silhouette %s", name, m["maxsep"]["macro_mcc"], m["threshold"]["macro_mcc"],
                 m["macro_average_precision"], m["knn"]["k"], m["knn"]["macro_mcc"],
                 "-" if m["macro_silhouette"] is None else f"{m['macro_silhouette']:.4f}")
    return result


def test_summary(result: dict) -> dict:
    """The final test's headline figures, as best.pt and model folders keep them: the fold, the number of test
    proteins, macro-F1 / macro-MCC and per-class F1 / MCC at threshold 0.5 and at the valid-tuned thresholds."""
    def figures(m):
        return {"macro_f1": m["macro_f1"], "macro_mcc": m["macro_mcc"],
                "per_class": {c: {k: v[k] for k in ("f1", "mcc")} for c, v in m["per_class"].items()}}
    return {"fold": result["fold"], "best_epoch": result["best_epoch"], "n_test": result["n_test"],
            "threshold_0.5": figures(result), "tuned": figures(result["tuned"])}


def fit_calibration(valid: dict, test: dict, config, log) -> tuple[dict | None, np.ndarray | None]:
    """(the stored calibration fitted on validation: per-class temperatures and conformal scores, the test
    split's calibrated probabilities); (None, None) when the validation scores cannot be used (NaN), logged."""
    try:
        calib = calibration.fit(valid["logits"], valid["labels"], f"validation partition (fold {config.data.fold})")
    except calibration.CalibrationError as err:
        log.warning("no calibration stored: %s", err)
        return None, None
    for line in calibration.fit_notes(calib):
        log.info("calibration: %s", line)
    return calib, calibration.calibrated_probs(test["logits"], calibration.temperatures_of(calib))


def log_calibration(result: dict, log) -> None:
    """One line of calibration error and one per coverage of the prediction sets' realised recall."""
    cal = result["calibration"]
    after = cal["calibrated"] and f"; calibrated: ECE {cal['calibrated']['macro_ece']:.4f}, Brier " \
                                  f"{cal['calibrated']['macro_brier']:.4f}"
    log.info("test calibration (macro): uncalibrated ECE %.4f, Brier %.4f%s", cal["uncalibrated"]["macro_ece"],
             cal["uncalibrated"]["macro_brier"], after or " (no calibration fitted)")
    for level, sets in (result["sets"] or {}).items():
        recall = [f"{n} {m['recall']:.2f}" for n, m in sets["per_class"].items() if m["recall"] is not None]
        log.info("prediction sets at coverage %s: mean size %.2f; recall %s", level, sets["mean_size"],
                 ", ".join(recall))


def fit_centroids(model, train_proteins, valid_out: dict, config, device) -> tuple[dict, dict]:
    """Class centres of the training split (every protein once, unmutated) and distance thresholds
    tuned on validation, per embedding space ('pooled', and 'projection' with a projection head), with CLEAN's
    confidence mixtures, null distances and p-value cut (space.fit, confidence.py):
    ({space: {'centres' [8, d], 'counts' [8], 'thresholds' [8], ...}}, run_inference outputs of the training split)."""
    plain = LocalizationDataset(train_proteins, "train")
    train_out = evaluate(model, plain, config, device)
    spaces = ["pooled"] + (["projection"] if model.projection is not None else [])
    return {name: space.fit(train_out[name], train_out["labels"], valid_out[name], valid_out["labels"])
            for name in spaces}, train_out
