"""The contrastive loss family against references computed another way (plain loops, identities)."""
import math

import pytest
import torch
import torch.nn.functional as F

import loss
import model


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def reference_supcon(features, is_positive, tau, base_tau, mode="all"):
    """Khosla's L_i by loops over rows; rows without positives skipped. is_positive(i, j) on samples."""
    B, V, _ = features.shape
    rows = [(v, i) for v in range(V) for i in range(B)]
    anchors = rows if mode == "all" else rows[:B]
    vec = {r: features[r[1], r[0]].tolist() for r in rows}
    dot = lambda a, b: sum(x * y for x, y in zip(vec[a], vec[b])) / tau  # noqa: E731
    losses = []
    for a in anchors:
        others = [r for r in rows if r != a]
        positives = [r for r in others if is_positive(a[1], r[1])]
        if not positives:
            continue
        log_denominator = math.log(sum(math.exp(dot(a, r)) for r in others))
        losses.append(-(tau / base_tau) * sum(dot(a, p) - log_denominator for p in positives) / len(positives))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("V,mode", [(2, "all"), (3, "all"), (2, "one"), (3, "one")])
def test_supcon_single_label(V, mode):
    feats, labels = unit(6, V, 5), torch.tensor([0, 1, 0, 2, 1, 0])
    got = loss.SupConLoss(0.1, mode, 0.07)(feats, labels)
    expected = reference_supcon(feats, lambda i, j: labels[i] == labels[j], 0.1, 0.07, mode)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_supcon_without_labels_is_simclr_and_equals_instance_loss():
    feats = unit(5, 3, 4, seed=1)
    simclr = loss.SupConLoss(0.5, "all", 0.5)(feats)
    assert float(simclr) == pytest.approx(reference_supcon(feats, lambda i, j: i == j, 0.5, 0.5), rel=1e-5)
    view_major = feats.transpose(0, 1).reshape(15, 4)
    assert float(loss.InstanceLoss(0.5, 3)(view_major)) == pytest.approx(float(simclr), rel=1e-5)


MULTI = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0], [0, 0, 0], [1, 1, 0]])


def labels_of(i):
    s = {c for c in range(3) if MULTI[i, c]}
    return s or {"Other"}


@pytest.mark.parametrize("V", [2, 3])
def test_supcon_multilabel_any_and_jaccard(V):
    feats = unit(7, V, 6, seed=2)
    got = loss.SupConLoss(0.2, "all", 0.2, multilabel="any")(feats, MULTI)
    expected = reference_supcon(feats, lambda i, j: bool(labels_of(i) & labels_of(j)), 0.2, 0.2)
    assert float(got) == pytest.approx(expected, rel=1e-5)
    jac = lambda i, j: len(labels_of(i) & labels_of(j)) / len(labels_of(i) | labels_of(j))  # noqa: E731
    got = loss.SupConLoss(0.2, "all", 0.2, multilabel="jaccard", jaccard_threshold=0.5)(feats, MULTI)
    assert float(got) == pytest.approx(reference_supcon(feats, lambda i, j: jac(i, j) >= 0.5, 0.2, 0.2), rel=1e-5)


@pytest.mark.parametrize("V", [2, 3])
def test_supcon_per_label_mulsupcon(V):
    feats, tau = unit(7, V, 6, seed=3), 0.3
    got = loss.SupConLoss(tau, "all", tau, multilabel="per_label")(feats, MULTI)
    rows = [(v, i) for v in range(V) for i in range(7)]
    dot = lambda a, b: float(feats[a[1], a[0]] @ feats[b[1], b[0]]) / tau  # noqa: E731
    terms = []
    for a in rows:
        others = [r for r in rows if r != a]
        log_den = math.log(sum(math.exp(dot(a, r)) for r in others))
        for c in range(3):  # each class of the anchor is an anchor of its own
            positives = [r for r in others if MULTI[r[1], c]]
            if MULTI[a[1], c] and positives:
                terms.append(-sum(dot(a, p) - log_den for p in positives) / len(positives))
    assert float(got) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_rows_without_positives_are_left_out_never_nan():
    feats = unit(4, 1, 3, seed=4).requires_grad_()
    labels = torch.tensor([0, 1, 1, 2])  # V = 1: rows 0 and 3 have no positive
    got = loss.SupConLoss(0.1, "all", 0.1)(feats, labels)
    expected = reference_supcon(feats.detach(), lambda i, j: labels[i] == labels[j], 0.1, 0.1)
    assert float(got.detach()) == pytest.approx(expected, rel=1e-5)
    got.backward()
    assert torch.isfinite(feats.grad).all()
    none = loss.SupConLoss(0.1)(feats, torch.tensor([0, 1, 2, 3]))  # nobody has a positive
    assert float(none.detach()) == 0.0 and not torch.isnan(none.detach())


@pytest.mark.parametrize("m", [2, 3])
def test_instance_loss_loop(m):
    B, tau = 4, 0.5
    z = torch.randn(m * B, 5, generator=torch.Generator().manual_seed(5))
    u = F.normalize(z, dim=1).tolist()
    s = lambda i, j: sum(x * y for x, y in zip(u[i], u[j])) / tau  # noqa: E731
    total = 0.0
    for i in range(m * B):
        log_den = math.log(sum(math.exp(s(i, a)) for a in range(m * B) if a != i))
        positives = [j for j in range(m * B) if j != i and j % B == i % B]
        total += -sum(s(i, p) - log_den for p in positives) / len(positives)
    assert float(loss.InstanceLoss(tau, m)(z)) == pytest.approx(total / (m * B), rel=1e-5)


@pytest.mark.parametrize("m", [2, 3])
def test_cluster_loss(m):
    B, K, tau = 6, 3, 1.0
    c = torch.softmax(torch.randn(m * B, K, generator=torch.Generator().manual_seed(6)), dim=1)
    views = c.chunk(m)
    columns = torch.cat([v.T for v in views])  # [m*K, B], column k of view v at row v*K + k
    contrast = float(loss.InstanceLoss(tau, m)(columns))
    entropy = 0.0
    for v in views:
        p = (v.sum(0) / v.sum()).tolist()
        entropy += math.log(K) + sum(x * math.log(x) for x in p)
    assert float(loss.ClusterLoss(tau, m)(c)) == pytest.approx(contrast + entropy, rel=1e-5)
    even = torch.full((m * B, K), 1.0 / K)  # even spread: entropy 0; identical columns: log(m*K - 1)
    assert float(loss.ClusterLoss(tau, m)(even)) == pytest.approx(math.log(m * K - 1), rel=1e-5)


def test_total_coding_rate_two_ways():
    X = torch.randn(10, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    b, d, eps = 10, 4, 0.01
    eigen = torch.linalg.eigvalsh(X.T @ X)  # -1/2 sum log(1 + d/(b eps) lambda)
    expected = -0.5 * sum(math.log(1 + d / (b * eps) * float(lam)) for lam in eigen)
    assert float(loss.TotalCodingRate(eps)(X)) == pytest.approx(expected, rel=1e-4)
    gram = torch.eye(b, dtype=torch.float64) + d / (b * eps) * X @ X.T  # Sylvester: same determinant
    assert float(loss.TotalCodingRate(eps)(X)) == pytest.approx(-0.5 * float(torch.logdet(gram)), rel=1e-4)
    assert loss.TotalCodingRate(eps)(X.half()).dtype == torch.float32


def test_emp_ssl_loop():
    z = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(8))
    u = F.normalize(z, dim=-1)
    sims = []
    for i in range(3):
        centre = F.normalize(u[i].mean(0), dim=0)
        sims += [float(u[i, v] @ centre) for v in range(4)]
    tcr = sum(float(loss.TotalCodingRate(0.01)(u[:, v])) for v in range(4)) / 4
    expected = -200 * sum(sims) / len(sims) + tcr
    assert float(loss.EMPSSLLoss(0.01, 200)(z)) == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("method", ["all", "only"])
def test_mixed_loss(method):
    feats = unit(7, 2, 6, seed=9)
    got = loss.MixedSupConLoss(0.2, reg_lambda=0.5, unsup_method=method)(feats, MULTI)
    rows = list(range(7)) if method == "all" else [4, 5]  # 'only': proteins without a class
    unsup = reference_supcon(feats[rows], lambda i, j: i == j, 0.2, 0.2)
    sup = reference_supcon(feats, lambda i, j: bool(labels_of(i) & labels_of(j)), 0.2, 0.2)
    assert float(got) == pytest.approx(unsup + 0.5 * sup, rel=1e-5)


@pytest.mark.parametrize("name", ["hard", "supcon", "mixed", "instance", "cluster", "tcr"])
def test_every_loss_trains_end_to_end(tmp_path, name):
    import json

    from conftest import write_config

    import train
    config = write_config(tmp_path, **{"train.epochs": 2, "supcon.apply": True, "supcon.loss": name,
                                       "supcon.warm_start": 1, "supcon.hidden_dim": 16, "supcon.out_dim": 8,
                                       "supcon.n_clusters": 4, "train.augment.views": 3,
                                       "train.augment.apply": name in ("hard", "supcon")})  # mutated anchors too
    assert train.main(["--config", str(config)]) == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["warm_start", "joint"]
    assert all(math.isfinite(r["train_supcon_loss"]) for r in records)
    assert all(math.isfinite(r["train_class_loss"]) for r in records[1:])


@pytest.mark.parametrize("multilabel", ["any", "per_label"])
def test_supcon_with_queue_memory(multilabel):
    feats, tau = unit(7, 2, 6, seed=10), 0.2
    memory = unit(5, 6, seed=11)
    memory_labels = torch.tensor([[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0], [1, 1, 0]])
    got = loss.SupConLoss(tau, "all", tau, multilabel)(feats, MULTI, memory=memory, memory_labels=memory_labels)
    rows = [("f", v, i) for v in range(2) for i in range(7)] + [("m", 0, q) for q in range(5)]
    vec = lambda r: feats[r[2], r[1]] if r[0] == "f" else memory[r[2]]  # noqa: E731
    labs = lambda r: labels_of(r[2]) if r[0] == "f" else ({c for c in range(3) if memory_labels[r[2], c]} or {"Other"})  # noqa: E731
    terms = []
    for a in rows[:14]:  # memory rows are never anchors
        others = [r for r in rows if r != a]
        log_den = math.log(sum(math.exp(float(vec(a) @ vec(r)) / tau) for r in others))
        groups = [{c} for c in labs(a) if c != "Other"] if multilabel == "per_label" else [labs(a)]
        for group in groups:
            positives = [r for r in others if labs(r) & group]
            if positives:
                terms.append(-sum(float(vec(a) @ vec(p)) / tau - log_den for p in positives) / len(positives))
    assert float(got) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_embedding_queue_is_fifo_and_detached():
    queue = model.EmbeddingQueue(4, 2, 3)
    first = torch.arange(6.0).view(3, 2).requires_grad_()
    queue.enqueue(first, torch.eye(3))
    emb, lab = queue.contents()
    assert emb.tolist() == first.tolist() and lab.tolist() == torch.eye(3).tolist() and not emb.requires_grad
    queue.enqueue(torch.full((2, 2), 9.0), torch.zeros(2, 3))  # 5 rows into 4 slots: the oldest goes
    emb, _ = queue.contents()
    assert len(emb) == 4 and sorted(map(tuple, emb.tolist())) == sorted([(2.0, 3.0), (4.0, 5.0), (9.0, 9.0), (9.0, 9.0)])


def test_queue_trains_and_is_checkpointed(tmp_path):
    from conftest import write_config

    import train
    import utils
    config = write_config(tmp_path, **{"train.epochs": 1, "supcon.apply": True, "supcon.loss": "supcon",
                                       "supcon.queue_size": 32, "supcon.hidden_dim": 16, "supcon.out_dim": 8})
    assert train.main(["--config", str(config)]) == 0
    state = utils.load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["model"]
    assert int(state["queue.filled"]) == 32 and state["queue.embeddings"].abs().sum() > 0


def stable_reference_supcon(features, labels, tau, base_tau):
    """Khosla's L_i in float64 plain Python with a log-sum-exp shifted by the maximum over the
    non-self rows only (finite for any feature scale); all V views are anchors."""
    B, V, _ = features.shape
    rows = [(v, i) for v in range(V) for i in range(B)]
    vec = {r: [float(x) for x in features[r[1], r[0]].double().tolist()] for r in rows}
    losses = []
    for a in rows:
        others = [r for r in rows if r != a]
        positives = [r for r in others if labels[a[1]] == labels[r[1]]]
        if not positives:
            continue
        s = {r: sum(x * y for x, y in zip(vec[a], vec[r])) / tau for r in others}
        top = max(s.values())
        log_denominator = top + math.log(sum(math.exp(s[r] - top) for r in others))
        losses.append(-(tau / base_tau) * sum(s[p] - log_denominator for p in positives) / len(positives))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("norm", [1.0, 3.0, 10.0, 40.0])
def test_supcon_finite_and_correct_for_large_feature_norms(norm):
    """Non-unit features at the default temperature 0.07: the row maximum must not include the
    self-similarity (it made every other term underflow: log(0), NaN, from norm 3 on)."""
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    feats = (unit(6, 2, 8, seed=3) * norm).requires_grad_()
    got = loss.SupConLoss(0.07, "all", 0.07)(feats, labels)
    assert math.isfinite(got.item())
    expected = stable_reference_supcon(feats.detach(), labels.tolist(), 0.07, 0.07)
    assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-3)
    got.backward()
    assert torch.isfinite(feats.grad).all()
    # MulSupCon (per_label) shares the denominator: finite and equal to a stable float64 loop too
    feats7 = unit(7, 2, 8, seed=4).double() * norm
    got = loss.SupConLoss(0.07, "all", 0.07, multilabel="per_label")(feats7.float(), MULTI)
    rows = [(v, i) for v in range(2) for i in range(7)]
    terms = []
    for a in rows:
        others = [r for r in rows if r != a]
        s = {r: float(feats7[a[1], a[0]] @ feats7[r[1], r[0]]) / 0.07 for r in others}
        top = max(s.values())
        log_den = top + math.log(sum(math.exp(v - top) for v in s.values()))
        for c in range(3):
            positives = [r for r in others if MULTI[r[1], c]]
            if MULTI[a[1], c] and positives:
                terms.append(-sum(s[p] - log_den for p in positives) / len(positives))
    assert math.isfinite(float(got))
    assert float(got) == pytest.approx(sum(terms) / len(terms), rel=1e-4, abs=1e-3)


def test_supcon_hard_loss_hand_worked_and_loop():
    z = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # anchor, 1 positive, 1 negative
    # s_p = 1/0.5 = 2, s_n = 0: loss = -(2 - log(e^2 + e^0)) = log(1 + e^-2)
    assert float(loss.SupConHardLoss(z, 0.5, 1)) == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)

    torch.manual_seed(0)
    emb, tau, P = torch.randn(5, 1 + 3 + 4, 16), 0.1, 3
    total = 0.0
    for b in range(5):
        u = [[x / math.sqrt(sum(y * y for y in v)) for x in v] for v in emb[b].tolist()]
        s = [sum(a * c for a, c in zip(u[0], u[j])) / tau for j in range(1, 8)]
        denom = sum(math.exp(x) for x in s)
        total += sum(-(s[p] - math.log(denom)) for p in range(P)) / P
    assert float(loss.SupConHardLoss(emb, tau, P)) == pytest.approx(total / 5, rel=1e-5)


def test_supcon_hard_loss_limits_and_gradients():
    P, N = 3, 5
    anchor = torch.randn(4, 1, 8)
    same = anchor.expand(4, 1 + P + N, 8).clone()
    assert float(loss.SupConHardLoss(same, 0.1, P)) == pytest.approx(math.log(P + N), rel=1e-5)  # uninformative
    separated = torch.cat([anchor.expand(4, 1 + P, 8), -anchor.expand(4, N, 8)], dim=1)
    assert float(loss.SupConHardLoss(separated, 0.05, P)) == pytest.approx(math.log(P), abs=1e-6)
    for scale in (1e-3, 1.0, 1e3):
        z = (torch.randn(4, 1 + P + N, 8) * scale).requires_grad_()
        loss.SupConHardLoss(z, 0.05, P).backward()
        assert torch.isfinite(z.grad).all()
    z16 = torch.randn(4, 1 + P + N, 8).half()
    assert torch.isfinite(loss.SupConHardLoss(z16, 0.01, P))


def test_class_loss_hand_worked():
    weights = loss.class_weights([10, 40, 0], "inverse_count")
    # 1/10 and 1/40, rescaled to mean 1 over present classes: 1.6 and 0.4; absent class 1
    assert weights.tolist() == pytest.approx([1.6, 0.4, 1.0])
    logits, labels = torch.tensor([[0.0, 2.0, -1.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    bce = [math.log(2), math.log(1 + math.exp(2)), math.log(1 + math.exp(-1))]
    expected = (1.6 * bce[0] + 0.4 * bce[1] + 1.0 * bce[2]) / 3
    assert float(loss.ClassLoss(weights)(logits, labels)) == pytest.approx(expected, rel=1e-6)


def test_motif_loss_hand_worked():
    pos_weight = loss.motif_pos_weights([1, 0], [9, 10], max_weight=5.0)
    assert pos_weight.tolist() == [5.0, 1.0]  # 9/1 capped at 5; a class without positives: 1
    logits = torch.tensor([[[0.0, 1.0, 3.0], [0.0, 0.0, 0.0]]])  # [B=1, C=2, L=3]
    targets = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    mask = torch.tensor([[[True, True, False], [True, True, True]]])  # last residue of track 0 unscored
    sp = lambda x: math.log(1 + math.exp(x))  # noqa: E731  BCE(z, 1) = sp(-z), BCE(z, 0) = sp(z)
    expected = (5.0 * sp(0.0) + sp(1.0) + 3 * sp(0.0)) / 5
    assert float(loss.MotifLoss(pos_weight)(logits, targets, mask)) == pytest.approx(expected, rel=1e-6)
