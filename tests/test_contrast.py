"""SupCon: positive / negative sampling, extended batches, SupConHardLoss, warm start, distance map."""
import json
import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REAL_DATA, ROOT, write_config

import batching
import contrast
import data
import loss
import model
import synthetic
import train
import utils
import vocab
from config import load_config

NAMES = vocab.CLASSES + ["Other"]


def membership(labels):
    labels = labels.astype(bool)
    return np.concatenate([labels, ~labels.any(1, keepdims=True)], axis=1)


@pytest.fixture(scope="module")
def real_train():
    if not REAL_DATA.is_dir():
        pytest.skip("shared MUTarget data not present")
    proteins, partitions = data.load_proteins(REAL_DATA)
    split = data.fold_indices(partitions, 0)
    return data.LocalizationDataset([proteins[i] for i in split["train"]], "train")


def test_sampling_invariants_on_real_data(real_train):
    ds, n_pos, n_neg = real_train, 3, 7
    contrast.enable_supcon(ds, n_pos, n_neg, seed=5)
    member = membership(ds.labels)
    for anchor in range(len(ds)):
        s = ds.sampler.sample(anchor)
        assert len(s["pos"]) == n_pos and len(s["neg"]) == n_neg
        assert all((member[p] & member[anchor]).any() for p in s["pos"])
        assert not any((member[n] & member[anchor]).any() for n in s["neg"])
        if not s["fallback_pos"]:
            assert anchor not in s["pos"]
    assert ds.get_pos_samples(10) == ds.sampler.sample(10)["pos"]  # same (seed, epoch, anchor) -> same draw
    assert ds.get_neg_samples(10) == ds.sampler.sample(10)["neg"]
    ds.sampler = None


def test_samples_change_with_epoch_and_cover_candidates(real_train):
    ds = real_train
    contrast.enable_supcon(ds, 2, 4, seed=0)
    first = [ds.sampler.sample(i)["neg"] for i in range(50)]
    ds.set_epoch(1, contrastive=True)
    assert first != [ds.sampler.sample(i)["neg"] for i in range(50)]
    # distinct when enough candidates: no repeated positive among the 2 for a SIGNAL anchor
    signal = next(i for i in range(len(ds)) if ds.labels[i].tolist() == [int(c == "SIGNAL") for c in vocab.CLASSES])
    assert len(set(ds.sampler.sample(signal)["pos"])) == 2
    ds.sampler = None


def test_hard_negatives_come_from_template_classes(real_train):
    ds = real_train
    rng = np.random.default_rng(0)
    centre = rng.normal(size=(9, 8)) * 5  # class centres; embeddings near the centres of their classes
    emb = membership(ds.labels).astype(float) @ centre + rng.normal(size=(len(ds), 8))
    dmap = contrast.class_distance_map(emb, ds.labels)
    contrast.enable_supcon(ds, 2, 5, hard_neg=True, distance_map=dmap, seed=1)
    member = membership(ds.labels)
    D = contrast.distance_matrix(dmap)
    n_hard = 0
    for anchor in range(0, len(ds), 3):
        s = ds.sampler.sample(anchor)
        own = set(np.flatnonzero(member[anchor]).tolist())
        # template by hand: nearest other class of each own class, own classes removed
        template = {int(np.argmin(np.where(np.arange(9) == c, np.inf, D[c]))) for c in own} - own
        assert not any((member[n] & member[anchor]).any() for n in s["neg"])
        if s["fallback_hard"]:
            eligible = [i for i in range(len(ds)) if member[i, list(template)].any() and not (member[i] & member[anchor]).any()] \
                if template else []
            assert eligible == []
        else:
            n_hard += 1
            assert all(member[n, list(template)].any() for n in s["neg"])
    assert n_hard > 100
    ds.sampler = None


def test_singleton_class_and_no_negative_anchors():
    labels = np.zeros((4, 8), np.uint8)
    labels[0, vocab.CLASS_INDEX["Thylakoid"]] = 1  # the only Thylakoid protein
    labels[:, vocab.CLASS_INDEX["SIGNAL"]] = 1     # everyone shares SIGNAL: no negative exists
    sampler = contrast.ContrastSampler(labels, n_pos=3, n_neg=2)
    s = sampler.sample(0)  # positives: proteins sharing SIGNAL exist
    assert s["fallback_pos"] == 0 and sorted(set(s["pos"])) <= [1, 2, 3] and len(s["pos"]) == 3
    assert s["neg"] == [0, 0] and s["fallback_neg"] == 1  # no negative: the anchor fills the slots
    only = np.zeros((3, 8), np.uint8)
    only[0, vocab.CLASS_INDEX["ER"]] = 1
    only[1:, vocab.CLASS_INDEX["Nucleus"]] = 1
    s = contrast.ContrastSampler(only, n_pos=2, n_neg=3).sample(0)
    assert s["pos"] == [0, 0] and s["fallback_pos"] == 1
    assert len(s["neg"]) == 3 and set(s["neg"]) <= {1, 2} and s["fallback_neg"] == 0


def test_extended_batch_layout(tmp_path):
    synthetic.make_synthetic_dataset(tmp_path, 150, 3)
    proteins, partitions = data.load_proteins(tmp_path)
    ds = data.LocalizationDataset([proteins[i] for i in data.fold_indices(partitions, 0)["train"]], "train")
    contrast.enable_supcon(ds, 2, 3, seed=2)
    items = [ds[i] for i in (5, 1, 7, 30)]
    batch = batching.Collate(max_len=40, overlap=10)(items)
    rows = batch["indices"].tolist()
    assert len(rows) == len(set(rows)) and rows[:4] == [5, 1, 7, 30]  # anchors first, each protein once
    assert batch["group_index"].shape == (4, 6) and batch["labels"].shape[0] == 4
    for b, it in enumerate(items):
        slots = [rows[r] for r in batch["group_index"][b].tolist()]
        sample = ds.sampler.sample(it["index"])
        assert slots == [it["index"]] + sample["pos"] + sample["neg"]  # this row's own samples, in order
    for r, idx in enumerate(rows):  # every row's tokens are that protein's residues
        windows = (batch["window_protein"] == r).nonzero().flatten().tolist()
        first = batch["tokens"][windows[0], 1:1 + batch["window_len"][windows[0]]]
        assert first.tolist() == ds.tokens[idx][:40].tolist()


def test_warm_start_gives_heads_no_gradient(tmp_path):
    config = load_config(write_config(tmp_path, **{"supcon.apply": True, "supcon.warm_start": 1,
                                                         "supcon.hidden_dim": 16, "supcon.out_dim": 8}))
    datasets = data.build_datasets(config)
    torch.manual_seed(0)
    m = model.Encoder(config)
    train_set = datasets["train"]
    contrast.enable_supcon(train_set, config.supcon.n_pos, config.supcon.n_neg, seed=0)
    train_set.set_epoch(0, contrastive=True)
    batch = batching.Collate(64, 16)([train_set[i] for i in range(6)])
    assert train.phase_of(config, 0) == "warm_start" and train.phase_of(config, 1) == "joint"
    out = m(batch, heads=False, contrastive=True)
    assert set(out) == {"pooled", "projection"} and out["projection"].shape == (6, 1 + 2 + 4, 8)
    loss.SupConHardLoss(out["projection"], 0.1, 2).backward()
    for name, p in m.named_parameters():
        if name.startswith(("decoders.", "classifier.")):
            assert p.grad is None, name
    assert m.projection.net[0].weight.grad.abs().sum() > 0
    assert m.backbone.layers[0].fc1.weight.grad.abs().sum() > 0  # the contrastive term reaches the backbone


def test_supcon_run_phases(tmp_path):
    config = write_config(tmp_path, **{"train.epochs": 3, "supcon.apply": True, "supcon.warm_start": 2,
                                       "supcon.hard_neg": True, "supcon.hidden_dim": 16, "supcon.out_dim": 8})
    assert train.main(["--config", str(config)]) == 0
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["warm_start", "warm_start", "joint"]
    for r in records[:2]:
        assert "train_supcon_loss" in r and "train_class_loss" not in r and "train_motif_loss" not in r
        assert not r["best"]  # model selection starts after warm start
    assert {"train_supcon_loss", "train_class_loss", "train_motif_loss", "train_cos_anchor_pos",
            "train_cos_anchor_neg", "supcon_fallback_pos", "supcon_fallback_hard", "supcon_fallback_neg"} <= set(records[2])
    assert records[2]["best"]
    dmap = json.loads((tmp_path / "run" / "distance_map.json").read_text())
    assert set(dmap) <= set(NAMES) and len(dmap) >= 8


def test_frozen_backbone_warns(tmp_path, caplog):
    config = write_config(tmp_path, **{"train.epochs": 1, "supcon.apply": True, "encoder.tune": "frozen",
                                       "supcon.hidden_dim": 16, "supcon.out_dim": 8})
    assert train.main(["--config", str(config)]) == 0
    assert "backbone is frozen" in (tmp_path / "run" / "train.log").read_text()


def test_distance_map_script(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_distance_map
    config = write_config(tmp_path)
    out = tmp_path / "dm.json"
    assert build_distance_map.main(["--config", str(config), "--out", str(out)]) == 0
    dmap = json.loads(out.read_text())
    assert set(dmap) == set(NAMES)  # the synthetic data has every class and unlabelled proteins
    for a in dmap:
        assert dmap[a][a] == 0.0
        for b in dmap:
            assert dmap[a][b] == pytest.approx(dmap[b][a]) and dmap[a][b] >= 0
    cfg = load_config(config)
    assert build_distance_map.build_map(cfg) == dmap  # seeded: the same initial model, the same map


def test_class_distance_map_hand_worked():
    emb = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [3.0, 4.0]])
    labels = np.zeros((4, 8), np.uint8)
    labels[0, vocab.CLASS_INDEX["SIGNAL"]] = labels[1, vocab.CLASS_INDEX["SIGNAL"]] = 1  # centroid (1, 0)
    labels[1, vocab.CLASS_INDEX["ER"]] = labels[2, vocab.CLASS_INDEX["ER"]] = 1          # centroid (1, 2)
    dmap = contrast.class_distance_map(emb, labels)                                       # Other: (3, 4)
    assert set(dmap) == {"SIGNAL", "ER", "Other"}
    assert dmap["SIGNAL"]["ER"] == pytest.approx(2.0)
    assert dmap["SIGNAL"]["Other"] == pytest.approx(math.hypot(2, 4))
    assert dmap["ER"]["Other"] == pytest.approx(math.hypot(2, 2))


def test_deduplicated_batch_equals_plain_batch(tmp_path):
    """Each distinct protein through the backbone once: same losses and gradients as one row per slot."""
    config = load_config(write_config(tmp_path, **{
        "supcon.apply": True, "supcon.n_pos": 3, "supcon.n_neg": 5, "supcon.hidden_dim": 16, "supcon.out_dim": 8,
        "supcon.drop_out": 0.0, "decoder.dropout": 0.0, "decoder.class_dropout": 0.0}))
    train_set = data.build_datasets(config)["train"]
    contrast.enable_supcon(train_set, 3, 5, seed=0)
    items = [train_set[i] for i in range(10)]
    torch.manual_seed(0)
    m = model.Encoder(config)
    pos_weight = loss.motif_pos_weights(*train_set.residue_counts())
    criteria = (loss.ClassLoss(loss.class_weights(train_set.class_counts())), loss.MotifLoss(pos_weight))
    results = []
    for dedup in (True, False):
        batch = batching.Collate(64, 16, dedup=dedup)(items)
        m.zero_grad()
        out = m(batch, heads=True, contrastive=True)
        total = (criteria[0](out["class_logits"], batch["labels"])
                 + criteria[1](out["motif_logits"], batch["targets"], batch["target_mask"])
                 + loss.SupConHardLoss(out["projection"], 0.1, 3))
        total.backward()
        results.append((len(batch["indices"]), float(total.detach()), {n: p.grad.clone() for n, p in m.named_parameters()}))
    (rows_dedup, loss_dedup, grads_dedup), (rows_plain, loss_plain, grads_plain) = results
    assert rows_plain == 10 * (1 + 3 + 5) and rows_dedup < rows_plain  # duplicates existed and were removed
    assert loss_dedup == pytest.approx(loss_plain, rel=1e-6)
    for name, g in grads_dedup.items():
        assert (g - grads_plain[name]).norm() <= 1e-4 * grads_plain[name].norm(), name  # fp32 summation order only


def test_remining_changes_the_map_and_the_sampler_uses_it(tmp_path):
    common = {"supcon.apply": True, "supcon.hard_neg": True, "supcon.hidden_dim": 16, "supcon.out_dim": 8}
    once = write_config(tmp_path / "a", **common, **{"train.epochs": 1})
    remined = write_config(tmp_path / "b", **common, **{"train.epochs": 2, "supcon.remine_every": 1})
    assert train.main(["--config", str(once)]) == 0 and train.main(["--config", str(remined)]) == 0
    initial = json.loads((tmp_path / "a" / "run" / "distance_map.json").read_text())
    final = json.loads((tmp_path / "b" / "run" / "distance_map.json").read_text())
    assert initial.keys() == final.keys() and initial != final  # same seed: only re-mining changed it
    assert "re-mined the class distance map" in (tmp_path / "b" / "run" / "train.log").read_text()
    assert utils.load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "last.pt")["distance_map"] == final

    labels = np.zeros((30, 8), np.uint8)
    for i in range(30):
        labels[i, i % 3] = 1  # classes 0, 1, 2 (ER, Peroxisome, Mitochondrion), 10 proteins each
    names = vocab.CLASSES
    near = lambda a, b: {names[0]: {names[0]: 0, names[1]: a, names[2]: b}}  # noqa: E731
    sampler = contrast.ContrastSampler(labels, 2, 4, hard_neg=True, distance_map=near(1.0, 5.0))
    assert all(labels[n, 1] for n in sampler.sample(0)["neg"])  # nearest to ER: Peroxisome
    sampler.set_distance_map(near(5.0, 1.0))
    assert all(labels[n, 2] for n in sampler.sample(0)["neg"])  # now Mitochondrion


def test_mutated_anchors_are_never_shared_with_samples(tmp_path):
    synthetic.make_synthetic_dataset(tmp_path, 150, 3)
    proteins, partitions = data.load_proteins(tmp_path)
    ds = data.LocalizationDataset([proteins[i] for i in data.fold_indices(partitions, 0)["train"]], "train")
    contrast.enable_supcon(ds, 3, 5, seed=2)
    contrast.enable_augmentation(ds, SimpleNamespace(apply=True, pos_rate=0.5, neg_rate=0.5, max_copies=1))
    items = [ds[i] for i in range(12)]
    batch = batching.Collate(max_len=400, overlap=10)(items)
    rows = batch["indices"].tolist()
    shared = 0
    for b, it in enumerate(items):
        group = batch["group_index"][b].tolist()
        assert group[0] == b  # the anchor's own (mutated) row
        for r in group[1:]:
            window = (batch["window_protein"] == r).nonzero().flatten()[0]
            length = int(batch["window_len"][window])
            assert batch["tokens"][window, 1:1 + length].tolist() == ds.tokens[rows[r]].tolist()  # unmutated
            shared += rows[r] in rows[:12]
    assert shared > 0  # some samples were anchors of this batch too, and got rows of their own


def test_initial_distance_map_ignores_augmentation(tmp_path):
    """hard_neg with train.augment.apply: the initial map is built from the unmutated proteins, each
    once, so it equals the map of the same run without augmentation (it used to crash: the augmented
    training set has more items than proteins)."""
    common = {"train.epochs": 1, "supcon.apply": True, "supcon.hard_neg": True, "supcon.hidden_dim": 16,
              "supcon.out_dim": 8}
    plain = write_config(tmp_path / "plain", **common)
    augmented = write_config(tmp_path / "aug", **common, **{"train.augment.apply": True})
    assert train.main(["--config", str(plain)]) == 0 and train.main(["--config", str(augmented)]) == 0
    maps = [json.loads((tmp_path / d / "run" / "distance_map.json").read_text()) for d in ("plain", "aug")]
    assert maps[0] == maps[1]


def test_sampling_before_setup_supcon_says_what_to_call(tmp_path):
    """build_datasets with supcon.apply leaves sampling off (the distance map may need the model):
    asking for positives then names the call to make, instead of an AttributeError on None."""
    config = load_config(write_config(tmp_path, **{"supcon.apply": True}))
    train_set = data.build_datasets(config)["train"]
    for ask in (train_set.get_pos_samples, train_set.get_neg_samples):
        with pytest.raises(RuntimeError, match=r"call contrast\.setup_supcon\(config, model, dataset"):
            ask(0)
    contrast.setup_supcon(config, None, train_set, torch.device("cpu"), None)
    positives, negatives = train_set.get_pos_samples(0), train_set.get_neg_samples(0)
    member = membership(train_set.labels)
    assert len(positives) == config.supcon.n_pos and len(negatives) == config.supcon.n_neg
    assert all((member[p] & member[0]).any() for p in positives)
    assert not any((member[n] & member[0]).any() for n in negatives)


def test_augmentation_rates_labels_and_epochs(tmp_path):
    synthetic.make_synthetic_dataset(tmp_path, 300, 4)
    proteins, _ = data.load_proteins(tmp_path)
    ds = data.LocalizationDataset(proteins)
    contrast.enable_augmentation(ds, SimpleNamespace(apply=True, pos_rate=0.1, neg_rate=0.3, max_copies=3), views=3)
    changed = {True: [0, 0], False: [0, 0]}  # inside / outside signals: [mutated, total]
    for i in range(len(ds)):
        item = ds[i]
        p = item["index"]
        assert item["labels"] is proteins[p].labels and item["targets"] is proteins[p].targets  # labels unchanged
        inside = contrast.signal_mask(proteins[p])
        for tokens in [item["tokens"]] + item["views"]:
            assert len(tokens) == len(proteins[p].sequence)
            diff = tokens != ds.tokens[p]
            for region in (True, False):
                changed[region][0] += int(diff[inside == region].sum())
                changed[region][1] += int((inside == region).sum())
            assert set(tokens[diff].tolist()) <= set(vocab.STANDARD.tolist())  # mutated to standard residues
    assert changed[True][0] / changed[True][1] == pytest.approx(0.1, abs=0.01)
    assert changed[False][0] / changed[False][1] == pytest.approx(0.3, abs=0.01)
    first = ds[0]["tokens"]
    ds.set_epoch(1, contrastive=True)
    assert (ds[0]["tokens"] != first).any()  # regenerated every epoch
    ds.set_epoch(0, contrastive=True)
    assert (ds[0]["tokens"] == first).all()  # and replayed for the same (seed, epoch, item)


def test_rarer_classes_get_more_copies():
    labels = np.zeros((6, 8), np.uint8)
    labels[:4, vocab.CLASS_INDEX["SIGNAL"]] = 1       # 4 SIGNAL proteins
    labels[4, vocab.CLASS_INDEX["Thylakoid"]] = 1     # 1 Thylakoid protein: ceil(4 / 1) = 4 copies, capped
    labels[3, vocab.CLASS_INDEX["ER"]] = 1            # SIGNAL + ER (2 ER proteins): ceil(4 / 2) = 2
    labels[5, vocab.CLASS_INDEX["ER"]] = 1
    assert contrast.Augmenter.copies(labels, max_copies=3).tolist() == [1, 1, 1, 2, 3, 2]
