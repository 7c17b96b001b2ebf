"""Losses: protein-level class loss and per-residue motif loss (computed in fp32)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def class_weights(class_counts, scheme: str = "inverse_count") -> torch.Tensor:
    """Per-class weights [C] of the class loss.

    'inverse_count': proportional to 1 / (proteins of the class in the training split), as
    upstream's min_count / count, rescaled to average 1 over the classes present, so the loss
    scale does not depend on the rarest class. Classes absent from training get weight 1.
    'none': all ones.
    """
    counts = np.asarray(class_counts, dtype=np.float64)
    weights = np.ones_like(counts)
    present = counts > 0
    if scheme == "inverse_count" and present.any():
        inv = 1.0 / counts[present]
        weights[present] = inv / inv.mean()
    return torch.tensor(weights, dtype=torch.float32)


def motif_pos_weights(pos_residues, neg_residues, max_weight: float = 100.0) -> torch.Tensor:
    """Per-class positive weights [C] of the motif loss: negative / positive residues of the
    training split (counted over residues, not windows), capped at `max_weight`."""
    pos, neg = np.asarray(pos_residues, np.float64), np.asarray(neg_residues, np.float64)
    ratio = np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)
    return torch.tensor(np.clip(ratio, 1.0, max_weight), dtype=torch.float32)


class ClassLoss(nn.Module):
    """Class-weighted binary cross-entropy over the 8 classes (multi-label).

    logits, labels [B, C] -> scalar: mean over B and C of w_c * BCE(logit, label).
    A protein with no class (Other) is all negatives.
    """

    def __init__(self, weights: torch.Tensor):
        super().__init__()
        self.register_buffer("weights", weights.float())

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
        return (bce * self.weights).mean()


class MotifLoss(nn.Module):
    """Per-residue binary cross-entropy of each class track, masked to scored residues.

    logits, targets, mask [B, C, L] -> scalar: sum over mask of BCE (positives weighted by
    pos_weight[c]) divided by the number of scored (class, residue) pairs. Padding, BOS / EOS
    and unknown tracks (mask False) contribute nothing. Every protein's track of every class is
    scored: a class the protein lacks has an all-zero target, which teaches the track to stay low.
    """

    def __init__(self, pos_weight: torch.Tensor):
        super().__init__()
        self.register_buffer("pos_weight", pos_weight.float())

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                denominator: torch.Tensor | None = None) -> torch.Tensor:
        """denominator: the number of scored pairs to divide by (default: this batch's)."""
        bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none",
                                                 pos_weight=self.pos_weight[None, :, None])
        mask = mask.to(bce.dtype)
        return (bce * mask).sum() / (mask.sum() if denominator is None else denominator).clamp(min=1)


def SupConHardLoss(model_emb: torch.Tensor, temp: float, n_pos: int) -> torch.Tensor:
    """CLEAN's supervised contrastive loss with hard negatives.

    model_emb [B, 1 + P + N, d]: slot 0 the anchor, then P = n_pos positives, then N negatives.
    With u = normalize(z) and s_j = <u_0, u_j> / temp (j = 1..P+N, the anchor's self-similarity
    excluded, positives in the denominator):
        loss = -mean_B (1/P) sum_p [ s_p - log sum_j exp(s_j) ]
    computed in fp32 with a stable log-sum-exp. About log(P + N) for uninformative embeddings,
    tending to log(P) for perfectly separated ones.
    """
    z = F.normalize(model_emb.float(), dim=-1)
    sims = torch.einsum("bd,bkd->bk", z[:, 0], z[:, 1:]) / temp  # [B, P + N]
    log_prob = sims - torch.logsumexp(sims, dim=1, keepdim=True)
    return -log_prob[:, :n_pos].mean()
