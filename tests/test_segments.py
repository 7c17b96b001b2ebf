"""Pooling and stitching on the backbone's token stream (model.pool_stream, stitch_anchors, anchor_tracks; the
Collate's packed_share / anchor_* fields): the pooled embeddings, the anchors' residue representations, the
motif logits and every gradient equal those of the dense per-protein layout ([M, L, d] stitched, overlaps
averaged, then masked means), computed here by plain loops over proteins and windows. Overlapping windows of
mixed lengths (up to three windows on a residue), SupCon-extended batches (M > B) and views batches."""
import numpy as np
import pytest
import torch

import batching
import data
import loss
import model
import vocab
from config import resolve_config

LENGTHS = [30, 1500, 7, 2500, 100, 1, 101, 64, 250, 45]


def dataset(lengths=LENGTHS, seed=0):
    rng = np.random.default_rng(seed)
    proteins = [data.make_protein(f"P{i}", "".join(rng.choice(list(vocab.STANDARD_RESIDUES), size=n)), "", "t")
                for i, n in enumerate(lengths)]
    return data.LocalizationDataset(proteins)


def collated(kind, max_len, overlap, lengths=LENGTHS):
    """A plain, SupCon-extended (4 anchors sampling the others, one of them another anchor, some shared) or
    views (2 anchors, 2 views each) batch of proteins of these lengths."""
    ds = dataset(lengths)
    items = [ds[i] for i in range(len(ds))]
    if kind == "extended":
        samples = {0: ([3, 4], [5, 9]), 1: ([2, 3], [6, 7]), 2: ([0, 8], [1, 3]), 3: ([9, 1], [6, 5])}
        items = items[:4]
        for it, (pos, neg) in zip(items, samples.values()):
            it["pos_neg"] = {"pos": pos, "neg": neg, "fallback_pos": 0,
                             "tokens": {i: ds.tokens[i] for i in pos + neg},
                             "entries": {i: ds.proteins[i].entry for i in pos + neg}}
    elif kind == "views":
        items = [items[3], items[2]]
        for it in items:
            it["views"] = [it["tokens"][::-1].copy(), it["tokens"].copy()]
    return batching.Collate(max_len, overlap)(items)


def dense_residues(stream, batch):
    """Today's dense layout, by loops: every protein's residues [L, d] (overlaps averaged, 0 past its length),
    stacked [M, L, d]; torch (gradients flow)."""
    M, L = batch["residue_mask"].shape
    offsets = np.cumsum([0] + batch["window_widths"])
    rows = []
    for p in range(M):
        total = stream.new_zeros(L, stream.shape[-1])
        count = stream.new_zeros(L, 1)
        for w in range(len(batch["window_widths"])):
            if int(batch["window_protein"][w]) != p:
                continue
            s, n = int(batch["window_start"][w]), int(batch["window_len"][w])
            total[s:s + n] = total[s:s + n] + stream[offsets[w] + 1:offsets[w] + 1 + n]  # BOS / EOS skipped
            count[s:s + n] += 1
        rows.append(total / count.clamp(min=1))
    return torch.stack(rows)


def dense_pooled(residues, batch):
    lengths = batch["lengths"].to(residues.dtype)
    return residues.sum(1) / lengths.clamp(min=1)[:, None]


@pytest.mark.parametrize("kind", ["plain", "extended", "views"])
@pytest.mark.parametrize("max_len,overlap", [(100, 30), (20, 12)])  # (20, 12): three windows on most residues
def test_pooled_and_anchor_residues_equal_dense_stitching(kind, max_len, overlap):
    """Any stream of token outputs: the segment sums give the dense layout's masked means of every protein
    and the dense residues of every anchor (flat, anchor after anchor) to 1e-6; BOS / EOS outputs are
    ignored."""
    batch = collated(kind, max_len, overlap)
    M, B = batch["lengths"].shape[0], batch["labels"].shape[0]
    assert (kind == "plain") == (M == B)
    assert (batch["window_len"] < max_len).any() and batch["window_protein"].bincount().max() > 2
    stream = torch.randn(len(batch["packed_tokens"]), 16, generator=torch.Generator().manual_seed(0))
    residues = dense_residues(stream.double(), batch)
    pooled = model.pool_stream(stream, batch)
    assert pooled.shape == (M, 16) and pooled.dtype == torch.float32
    assert (pooled.double() - dense_pooled(residues, batch)).abs().max() < 1e-6
    flat = model.stitch_anchors(stream, batch)
    lengths = batch["lengths"][:B].tolist()
    assert flat.shape == (sum(lengths), 16)
    expected = torch.cat([residues[b, :n] for b, n in enumerate(lengths)])
    assert (flat.double() - expected).abs().max() < 1e-6
    special = batch["packed_tokens"].eq(vocab.BOS_IDX) | batch["packed_tokens"].eq(vocab.EOS_IDX)
    stream[special] = 1e6  # BOS / EOS outputs never enter
    assert (model.pool_stream(stream, batch).double() - dense_pooled(residues, batch)).abs().max() < 1e-6
    assert (model.stitch_anchors(stream, batch).double() - expected).abs().max() < 1e-6
    shares = torch.zeros(M, dtype=torch.float64).index_add_(0, batch["packed_protein"], batch["packed_share"].double())
    assert (shares - batch["lengths"]).abs().max() < 1e-4  # a protein's shares sum to its length


def segment_config(packed, supcon=True):
    tree = {"encoder": {"scratch": {"num_layers": 2, "embed_dim": 32, "attention_heads": 4}, "tune": "full",
                        "packed": packed},
            "decoder": {"hidden_dim": 8, "dropout": 0.0, "class_dropout": 0.0},
            "supcon": {"apply": supcon, "hidden_dim": 16, "out_dim": 8, "drop_out": 0.0, "n_pos": 2, "n_neg": 2}}
    return resolve_config(tree)


def dense_forward(m, batch):
    """Today's forward, through the dense layout (loops): pooled [M, d], motif logits [B, 8, L] of the decoders
    on the anchors' rows [B, L, d], class logits, projections."""
    residues = dense_residues(m.embed(batch), batch)
    pooled = dense_pooled(residues, batch)
    B = batch["labels"].shape[0]
    return {"pooled": pooled, "motif_logits": m.decoders(residues[:B]),
            "class_logits": m.classifier(pooled[:B]), "projection": m.projection(pooled)[batch["group_index"]]}


@pytest.mark.parametrize("packed,dtype", [(True, torch.float32), (False, torch.float32), (True, torch.float64),
                                          (False, torch.float64)])
def test_forward_and_gradients_equal_dense_layout(packed, dtype):
    """A small model on a SupCon-extended batch: pooled embeddings, class logits, projections and the motif
    logits at every real residue of every anchor equal the dense layout's to 1e-6 (0 past each anchor's length,
    where only target_mask's False reads them), and so do the losses (class, motif, hard SupCon). Every
    parameter's gradient: to 1e-6 in float64 (the same arithmetic), to 1e-5 of its largest value in float32 (the
    sums run in another order: 1-6e-6 seen, as between the packed and padded layouts)."""
    torch.manual_seed(0)
    m = model.Encoder(segment_config(packed)).eval().to(dtype)  # no dropout; gradients flow
    batch = collated("extended", 100, 30, lengths=[30, 400, 7, 250, 100, 1, 101, 64, 180, 45])
    B = batch["labels"].shape[0]
    batch["targets"][:, :, ::7] = 1.0  # some positives
    criteria = (loss.ClassLoss(torch.ones(8)), loss.MotifLoss(torch.full((8,), 3.0)))

    def run(forward):
        m.zero_grad()
        out = forward()
        total = (criteria[0](out["class_logits"], batch["labels"])
                 + criteria[1](out["motif_logits"], batch["targets"], batch["target_mask"])
                 + loss.SupConHardLoss(out["projection"], 0.1, 2) + out["pooled"].square().mean())
        total.backward()
        return out, float(total.detach()), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    new, new_total, new_grads = run(lambda: m(batch, heads=True, contrastive=True))
    old, old_total, old_grads = run(lambda: dense_forward(m, batch))
    for key in ("pooled", "class_logits", "projection"):
        assert new[key].dtype == dtype and (new[key] - old[key]).abs().max() < 1e-6, key
    real = batch["residue_mask"][:B]
    assert new["motif_logits"].shape == old["motif_logits"].shape == (B, 8, real.shape[1])
    assert (new["motif_logits"] - old["motif_logits"]).abs().amax(1)[real].max() < 1e-6
    assert (new["motif_logits"].permute(0, 2, 1)[~real] == 0).all()
    assert abs(new_total - old_total) < 1e-6
    assert new_grads.keys() == old_grads.keys() and len(new_grads) > 20
    tol = 1e-6 if dtype == torch.float64 else 1e-5
    for name in new_grads:
        scale = old_grads[name].abs().max().clamp(min=1)
        assert (new_grads[name] - old_grads[name]).abs().max() <= tol * scale, name


def test_padded_tokens_wider_than_collated():
    """The padded layout with tokens padded past the batch's widest window (scripts/bench.py's naive mode pads
    to 1024): the stream read back from the padded outputs is the same."""
    torch.manual_seed(0)
    m = model.Encoder(segment_config(False, supcon=False)).eval()
    batch = collated("plain", 100, 30, lengths=[30, 250, 7])
    with torch.no_grad():
        narrow = m(batch)
        batch["tokens"] = torch.nn.functional.pad(batch["tokens"], (0, 40), value=vocab.PAD_IDX)
        wide = m(batch)
    for key in ("pooled", "motif_logits", "class_logits"):
        assert (narrow[key] - wide[key]).abs().max() < 1e-5, key
