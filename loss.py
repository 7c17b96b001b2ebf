"""Losses: protein-level class loss and per-residue motif loss (computed in fp32)."""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
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


# --------------------------------------------------------------------------- the contrastive loss family
def positive_mask(labels: torch.Tensor, others: torch.Tensor | None = None, multilabel: str = "any",
                  jaccard_threshold: float = 0.5) -> torch.Tensor:
    """Positive mask [A, B] (1 = same class) between labels [A] / multi-hot [A, C] and `others`
    (default: the labels themselves). A multi-hot row without any class counts as the class
    "Other". any: at least one shared class; jaccard: |a & b| / |a | b| >= jaccard_threshold."""
    others = labels if others is None else others
    if labels.dim() == 1:
        return (labels[:, None] == others[None, :]).float()

    def with_other(y):  # add the "Other" column
        y = y.float()
        return torch.cat([y, (y.sum(1, keepdim=True) == 0).float()], dim=1)
    a, b = with_other(labels), with_other(others)
    shared = a @ b.T
    if multilabel == "any":
        return (shared > 0).float()
    if multilabel == "jaccard":
        union = a.sum(1, keepdim=True) + b.sum(1)[None, :] - shared
        return (shared / union >= jaccard_threshold).float()
    raise ValueError(f"multilabel must be any, jaccard or per_label, got {multilabel!r}")


class SupConLoss(nn.Module):
    """Supervised contrastive loss (Khosla et al. 2020). forward(features [B, V, d] (L2-normalised),
    labels [B] or multi-hot [B, C], or mask [B, B]) -> scalar. Features are expected L2-normalised
    (the formula's s = <u_i, u_j> / tau assumes it), but the loss stays finite for any scale.

    For anchor i with positives P(i) (same label, other rows) and A(i) (all rows but i):
        L_i = -(tau / base_tau) * (1 / |P(i)|) * sum_{p in P(i)} log( exp(s_ip) / sum_{a in A(i)} exp(s_ia) )
    Rows are all B * V views ('all') or view 0 only ('one'). No labels and no mask: SimCLR (the
    other views of the same sample are the positives). Multi-hot labels: positives by `multilabel`
    (any | jaccard | per_label, the last MulSupCon's: each class of an anchor is an anchor of its own,
    positives = the rows having that class). Anchors without any positive are left out of the mean.
    """

    def __init__(self, temperature: float = 0.07, contrast_mode: str = "all", base_temperature: float = 0.07,
                 multilabel: str = "any", jaccard_threshold: float = 0.5):
        super().__init__()
        if contrast_mode not in ("all", "one"):
            raise ValueError(f"contrast_mode must be 'all' or 'one', got {contrast_mode!r}")
        self.temperature, self.contrast_mode, self.base_temperature = temperature, contrast_mode, base_temperature
        self.multilabel, self.jaccard_threshold = multilabel, jaccard_threshold

    def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, memory: torch.Tensor | None = None,
                memory_labels: torch.Tensor | None = None) -> torch.Tensor:
        """memory [Q, d] / memory_labels: extra contrast rows (a queue of past embeddings): in
        every denominator, positives by label, never anchors."""
        B, V = features.shape[:2]
        if labels is not None and mask is not None:
            raise ValueError("give labels or mask, not both")
        contrast = features.float().transpose(0, 1).reshape(V * B, -1)  # view-major rows
        n_anchor_views = V if self.contrast_mode == "all" else 1
        anchors = contrast[:n_anchor_views * B]
        Q = 0 if memory is None else len(memory)
        if Q:
            contrast = torch.cat([contrast, memory.float()])
        logits = anchors @ contrast.T / self.temperature
        not_self = torch.ones_like(logits)
        not_self[torch.arange(len(anchors)), torch.arange(len(anchors))] = 0
        # log-sum-exp over the non-self entries only: finite at any feature scale (a row maximum
        # taken over the self-similarity made every other term underflow for norms >= 3 at tau 0.07)
        log_norm = torch.logsumexp(logits.masked_fill(not_self == 0, float("-inf")), dim=1, keepdim=True)
        log_prob = logits - log_norm
        scale = -self.temperature / self.base_temperature
        if labels is not None and labels.dim() == 2 and self.multilabel == "per_label":
            y_rows = labels.float().repeat(V, 1)  # class membership of every contrast row
            if Q:
                y_rows = torch.cat([y_rows, memory_labels.float()])
            counts = not_self @ y_rows  # positives per (anchor row, class)
            sums = (log_prob * not_self) @ y_rows
            valid = (y_rows[:len(anchors)] > 0) & (counts > 0)  # anchor has the class and a positive exists
            return scale * masked_mean(sums / counts.clamp(min=1), valid)
        if mask is None:
            mask = torch.eye(B, device=features.device) if labels is None else positive_mask(
                labels, None, self.multilabel, self.jaccard_threshold)
        positives = mask.float().to(features.device).repeat(n_anchor_views, V)
        if Q:  # queue rows: positives by label (none without labels)
            cross = (positive_mask(labels, memory_labels, self.multilabel, self.jaccard_threshold)
                     if labels is not None else torch.zeros(B, Q, device=features.device))
            positives = torch.cat([positives, cross.repeat(n_anchor_views, 1)], dim=1)
        positives = positives * not_self
        count = positives.sum(1)
        keep = count > 0  # anchors without positives are left out (never NaN)
        return scale * masked_mean((positives * log_prob).sum(1) / count.clamp(min=1), keep)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values where mask is True, 0 where it is nowhere: computed without reading the mask on the host."""
    return torch.where(mask, values, 0).sum() / mask.sum().clamp(min=1)


class MixedSupConLoss(nn.Module):
    """L_unsup + reg_lambda * L_sup (fastai self_supervised's SupCon). forward(features [B, V, d],
    labels [B, C]) -> scalar. L_unsup: SimCLR over all samples (unsup_method 'all') or over the
    proteins without any class ('only'); L_sup: SupConLoss with the labels."""

    def __init__(self, temperature: float = 0.07, reg_lambda: float = 1.0, unsup_method: str = "all",
                 multilabel: str = "any"):
        super().__init__()
        if unsup_method not in ("all", "only"):
            raise ValueError(f"unsup_method must be 'all' or 'only', got {unsup_method!r}")
        self.unsup = SupConLoss(temperature, "all", temperature)
        self.sup = SupConLoss(temperature, "all", temperature, multilabel)
        self.reg_lambda, self.unsup_method = reg_lambda, unsup_method

    def forward(self, features: torch.Tensor, labels: torch.Tensor, memory=None, memory_labels=None) -> torch.Tensor:
        if self.unsup_method == "all":
            unsup = self.unsup(features)
        else:  # the proteins without any class (a data-dependent count: one wait for the device)
            rows = labels.sum(1) == 0
            unsup = self.unsup(features[rows]) if rows.any() else features.sum() * 0
        return unsup + self.reg_lambda * self.sup(features, labels, memory=memory, memory_labels=memory_labels)


class InstanceLoss(nn.Module):
    """NT-Xent over `multiplier` views (Twin Contrastive Learning's InstanceLoss).

    forward(z [multiplier * B, d], views stacked view-major) -> scalar. Rows are L2-normalised;
    s_ij = <z_i, z_j> / tau; the positives of row i are the other views of the same protein:
        loss = -mean_i mean_{p in P(i)} log( exp(s_ip) / sum_{a != i} exp(s_ia) )
    """

    def __init__(self, tau: float = 0.5, multiplier: int = 2):
        super().__init__()
        self.tau, self.multiplier = tau, multiplier

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        n = z.shape[0]
        if n % self.multiplier:
            raise ValueError(f"{n} rows are not {self.multiplier} views of the same batch")
        z = F.normalize(z.float(), dim=1)
        sims = (z @ z.T / self.tau).fill_diagonal_(float("-inf"))
        log_prob = sims - torch.logsumexp(sims, dim=1, keepdim=True)
        sample = torch.arange(n, device=z.device) % (n // self.multiplier)
        positives = (sample[:, None] == sample[None, :]) & ~torch.eye(n, dtype=torch.bool, device=z.device)
        return -(log_prob.masked_fill(~positives, 0).sum(1) / positives.sum(1)).mean()


class ClusterLoss(nn.Module):
    """Twin Contrastive Learning's ClusterLoss, correct in one process.

    forward(c [multiplier * B, K]) with softmax cluster assignments, views stacked view-major ->
    scalar: InstanceLoss over the K columns of each view (cluster k of one view is the positive of
    cluster k of the other views), plus the entropy term sum over views of log K + sum_k p_k log p_k,
    where p is the view's batch-mean assignment (0 when the batch spreads evenly over clusters).
    """

    def __init__(self, tau: float = 1.0, multiplier: int = 2):
        super().__init__()
        self.multiplier = multiplier
        self.columns = InstanceLoss(tau, multiplier)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        views = c.float().chunk(self.multiplier, dim=0)  # each [B, K]
        K = c.shape[1]
        entropy = sum(math.log(K) + (p * torch.log(p.clamp_min(1e-12))).sum()
                      for p in (v.sum(0) / v.sum() for v in views))
        return self.columns(torch.cat([v.T for v in views], dim=0)) + entropy


class TotalCodingRate(nn.Module):
    """Total coding rate (EMP-SSL): forward(X [b, d]) = -1/2 logdet(I_d + d / (b * eps) X^T X),
    in fp32. Minimising it spreads the embeddings out."""

    def __init__(self, eps: float = 0.01):
        super().__init__()
        self.eps = eps

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        X = X.float()
        b, d = X.shape
        identity = torch.eye(d, device=X.device)
        return -0.5 * torch.logdet(identity + d / (b * self.eps) * X.T @ X)


class EMPSSLLoss(nn.Module):
    """EMP-SSL: sim_weight * (-mean cos(z_view, mean of the views)) + mean over views of
    TotalCodingRate(z_view). forward(z [B, V, d]) -> scalar (z L2-normalised inside)."""

    def __init__(self, eps: float = 0.01, sim_weight: float = 200.0):
        super().__init__()
        self.tcr, self.sim_weight = TotalCodingRate(eps), sim_weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = F.normalize(z.float(), dim=-1)
        centre = F.normalize(z.mean(1, keepdim=True), dim=-1)
        similarity = (z * centre).sum(-1).mean()
        return -self.sim_weight * similarity + torch.stack([self.tcr(z[:, v]) for v in range(z.shape[1])]).mean()


def gather_batch(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Per-process batches concatenated over all processes (dim 0, rank order), unchanged without
    torch.distributed. Tensors that require grad are gathered with a gather that carries gradients
    back to their process; batch sizes may differ between ranks."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(tensors)
    world = dist.get_world_size()
    size = torch.tensor([tensors[0].shape[0]], device=tensors[0].device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    out = []
    for t in tensors:
        padded = torch.cat([t, t.new_zeros(max(sizes) - t.shape[0], *t.shape[1:])])
        if t.requires_grad:
            parts = dist_nn.all_gather(padded)
        else:
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded)
        out.append(torch.cat([p[:n] for p, n in zip(parts, sizes)]))
    return out


def contrastive_loss(config, out: dict, labels: torch.Tensor, queue=None) -> torch.Tensor:
    """The configured contrastive term (supcon.loss) of a model output: 'hard' on the
    [B, 1 + P + N, d] anchor/positive/negative projections; the others on [B, V, d] views of the
    whole batch, gathered over processes under torchrun (each process computes the global loss;
    with DistributedDataParallel's averaging the gradients equal one process's on that batch)."""
    sc, z = config["supcon"], out["projection"]
    name, tau = sc["loss"], sc["temperature"]
    if name == "hard":
        return SupConHardLoss(z, tau, sc["n_pos"])
    if name == "cluster":
        z, labels, clusters = gather_batch(z, labels, out["clusters"])
        out = {**out, "clusters": clusters}
    else:
        z, labels = gather_batch(z, labels)
    views = F.normalize(z.float(), dim=-1)
    V = views.shape[1]
    if name in ("supcon", "mixed"):  # label-aware: may contrast against a queue of past embeddings
        memory, memory_labels = queue.contents() if queue is not None else (None, None)
        if name == "supcon":
            value = SupConLoss(tau, "all", tau, sc["multilabel"], sc["jaccard_threshold"])(
                views, labels, memory=memory, memory_labels=memory_labels)
        else:
            value = MixedSupConLoss(tau, sc["reg_lambda"], sc["unsup_method"], sc["multilabel"])(
                views, labels, memory, memory_labels)
        if queue is not None:
            queue.enqueue(views.reshape(-1, views.shape[-1]), labels.repeat_interleave(views.shape[1], dim=0))
        return value
    if name in ("instance", "cluster"):
        def view_major(t):  # [B, V, k] -> [V * B, k], the layout of InstanceLoss / ClusterLoss
            return t.transpose(0, 1).reshape(-1, t.shape[-1])
        value = InstanceLoss(tau, V)(view_major(views))
        if name == "cluster":
            value = value + ClusterLoss(sc["cluster_tau"], V)(view_major(out["clusters"]))
        return value
    if name == "tcr":
        return EMPSSLLoss(sc["tcr_eps"], sc["sim_weight"])(views)
    raise ValueError(f"unknown supcon.loss {name!r}")
