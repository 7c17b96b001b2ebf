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
    """Probabilities for every protein of `dataset`, in dataset order: probs [N, 8],
    motif_probs (list of [8, L_i]), pooled embeddings [N, d] and their projections [N, k] (None
    without a projection head), plus the truth: labels [N, 8], targets, target_masks."""
    model.eval()
    loader = DataLoader(dataset, batch_sampler=length_sorted_batches(dataset.lengths, batch_size),
                        collate_fn=Collate(max_len, overlap), pin_memory=device.type == "cuda")
    n = len(dataset)
    probs = np.zeros((n, len(CLASSES)), dtype=np.float32)
    pooled = np.zeros((n, model.backbone.embed_dim), dtype=np.float32)
    projection = None if model.projection is None else np.zeros((n, model.projection.net[-1].out_features), np.float32)
    motif_probs, masks = [None] * n, [None] * n
    for batch in tqdm(loader, desc=f"eval {dataset.name}", leave=False, disable=None):
        batch = to_device(batch, device)
        with autocast(device, amp_dtype(amp, device)):
            out = model(batch, project=projection is not None)
        p = torch.sigmoid(out["class_logits"].float()).cpu().numpy()
        mp = torch.sigmoid(out["motif_logits"].float()).cpu().numpy()
        tm = batch["target_mask"].cpu().numpy()
        rows = batch["indices"].cpu().numpy()
        pooled[rows] = out["pooled"].float().cpu().numpy()
        if projection is not None:
            projection[rows] = out["pooled_projection"].float().cpu().numpy()
        for row, (i, length) in enumerate(zip(batch["indices"].tolist(), batch["lengths"].tolist())):
            probs[i] = p[row]
            motif_probs[i] = mp[row, :, :length]
            masks[i] = tm[row, :, :length]
    return {"probs": probs, "motif_probs": motif_probs, "pooled": pooled, "projection": projection,
            "labels": dataset.labels.astype(np.int64),
            "targets": [p.targets for p in dataset.proteins], "target_masks": masks}


def evaluate(model, dataset, config, device) -> dict:
    """run_inference with the run's settings: train.eval_batch_size, train.amp, data.max_len / overlap."""
    return run_inference(model, dataset, config.train.eval_batch_size, device, config.train.amp,
                         config.data.max_len, config.data.overlap)


def final_test(trainer, best_epoch, best_metric) -> dict:
    """Evaluate the best checkpoint on test at 0.5 and at MCC-optimal thresholds tuned on valid; store the
    thresholds and class centres in best.pt, then write test_metrics.json (the run's last file). best.pt must hold
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
    result.update({"best_epoch": best_epoch, "checkpoint": str(best_path) if best else None,
                   "thresholds": dict(zip(CLASSES, map(float, thresholds))),
                   "tuned": {k: tuned[k] for k in ("macro_f1", "macro_mcc", "per_class", "subset_accuracy", "jaccard")},
                   "valid": {k: valid_scores[k] for k in ("macro_f1", "macro_mcc")},
                   "space": {name: space.space_metrics(*[(out[name], out["labels"]) for out in (train_out, valid, test)],
                                                       fitted=fitted) for name, fitted in centroids.items()}})
    if best is not None:
        best["thresholds"], best["centroids"] = result["thresholds"], space.to_stored(centroids)
        save_checkpoint(best, best_path)
    write_text_atomic(Path(config.run_dir) / "test_metrics.json", json.dumps(result, indent=2))
    log.info("test (best epoch %s):\n%s", best_epoch, format_table(result))
    log.info("test with valid-tuned thresholds: macro-F1 %.4f macro-MCC %.4f", tuned["macro_f1"], tuned["macro_mcc"])
    for name, m in result["space"].items():
        log.info("%s space: centroid macro-MCC %.4f (max-separation) %.4f (thresholds), macro AP %.4f, %d-NN macro-MCC "
                 "%.4f, macro silhouette %s", name, m["maxsep"]["macro_mcc"], m["threshold"]["macro_mcc"],
                 m["macro_average_precision"], m["knn"]["k"], m["knn"]["macro_mcc"],
                 "-" if m["macro_silhouette"] is None else f"{m['macro_silhouette']:.4f}")
    return result


def fit_centroids(model, train_proteins, valid_out: dict, config, device) -> tuple[dict, dict]:
    """Class centres of the training split (every protein once, unmutated) and distance thresholds
    tuned on validation, per embedding space ('pooled', and 'projection' with a projection head):
    ({space: {'centres' [8, d], 'counts' [8], 'thresholds' [8]}}, run_inference outputs of the training split)."""
    plain = LocalizationDataset(train_proteins, "train")
    train_out = evaluate(model, plain, config, device)
    spaces = ["pooled"] + (["projection"] if model.projection is not None else [])
    return {name: space.fit(train_out[name], train_out["labels"], valid_out[name], valid_out["labels"])
            for name in spaces}, train_out
