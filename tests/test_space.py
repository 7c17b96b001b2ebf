"""Embedding-space inference (class centres, max-separation, distance thresholds) and space metrics."""
import itertools
import json

import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef, silhouette_samples
from sklearn.neighbors import KNeighborsClassifier

import batching
import confidence
import space
from config import load_config, resolve_config


def test_centres_are_class_means_with_multilabel_proteins():
    emb = np.array([[0.0, 0.0], [2.0, 0.0], [4.0, 2.0], [10.0, 10.0], [1.0, 1.0]], dtype=np.float32)
    labels = np.zeros((5, 8), dtype=np.uint8)
    labels[0, 0] = labels[1, 0] = 1  # class 0: proteins 0, 1, 2 (2 is multi-label)
    labels[2, [0, 3]] = 1
    labels[3, 3] = 1  # class 3: proteins 2, 3
    # protein 4 has no class; classes 1, 2, 4-7 have no protein
    centres = space.class_centres(emb, labels)
    np.testing.assert_allclose(centres[0], [2.0, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(centres[3], [7.0, 6.0], rtol=1e-6)
    assert np.isnan(centres[1]).all() and np.isnan(centres[7]).all()
    d = space.centre_distances(np.array([[2.0, 2 / 3]], np.float32), centres)
    assert d[0, 0] == pytest.approx(0.0, abs=1e-6) and d[0, 3] == pytest.approx(np.hypot(5, 16 / 3))
    assert np.isinf(d[0, 1])


# CLEAN's rule, worked by hand: gamma = d[1:] + 10 x d[-1]; s = |d - mean(gamma)|; gaps |s_i - s_(i+1)|;
# cut at the first gap above the mean gap; a cut at 0-based index >= 5 -> the nearest only.
@pytest.mark.parametrize("distances,expected", [
    # one clear gap after the 2nd nearest: mean(gamma) 55.6 / 17 = 3.2706, gaps .1 1.9 .1 .1 .0412 .1 .1
    # (mean .3487) -> the first large gap is index 1: two classes
    ([1.0, 1.1, 3.0, 3.1, 3.2, 3.3, 3.4, 3.5], [0, 1]),
    # no gap: evenly spaced; mean(gamma) 115 / 17 = 6.7647, gaps 1 1 1 1 1 .5294 1 (mean .9328): the
    # first gap is already above the mean -> the nearest only
    ([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], [0]),
    # identical distances: every gap 0, none above the mean -> the nearest only
    ([2.0] * 8, [0]),
    # the first large gap at index 5 (gaps .1 x5, 2.0706, .1; mean .3815) -> the nearest only
    ([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 6.5, 6.6], [0]),
    # the first large gap at index 4 -> 5 classes (the largest cut allowed); order scrambled
    ([1.4, 1.1, 9.0, 1.0, 9.1, 1.2, 9.2, 1.3], [3, 1, 5, 7, 0]),
    # the first gap above the mean wins, not the largest (gaps .9 .1 2.0 .0058 .1 .1 .1, mean .4723)
    ([1.0, 1.9, 2.0, 4.0, 4.1, 4.2, 4.3, 4.4], [0]),
    # gaps of the separations, not of the raw distances: mean(gamma) 162.04 / 17 = 9.5318; gaps .66 .1
    # .01 .47 1.24 2.95 1.4164 (mean .978) -> index 4, 5 classes (raw gaps .66 .1 .01 .47 1.24 2.95 3.68,
    # mean 1.303, would cut at index 5: the nearest only)
    ([2.97, 3.63, 3.73, 3.74, 4.21, 5.45, 8.4, 12.08], [0, 1, 2, 3, 4]),
])
def test_max_separation_hand_worked(distances, expected):
    predicted = space.max_separation(np.array([distances]))
    assert sorted(np.flatnonzero(predicted[0]).tolist()) == sorted(expected)


def test_max_separation_ignores_missing_centres():
    d = np.array([[1.0, np.inf, 1.1, 5.0, np.inf, 5.1, 5.2, 5.3]])
    assert np.flatnonzero(space.max_separation(d)[0]).tolist() == [0, 2]


def test_class_without_training_proteins_is_never_predicted():
    """Its centre is undefined (NaN), every distance to it infinite: no rule may predict it, even when
    validation has positives of it, and its threshold is null in JSON."""
    rng = np.random.default_rng(3)
    train_emb, valid_emb = rng.normal(size=(40, 4)), rng.normal(size=(20, 4))
    train_labels = (rng.random((40, 8)) < 0.4).astype(np.uint8)
    train_labels[:, 6] = 0  # class 6 absent from training
    valid_labels = (rng.random((20, 8)) < 0.4).astype(np.uint8)
    valid_labels[:3, 6] = 1
    fitted = space.fit(train_emb, train_labels, valid_emb, valid_labels)
    distances = space.centre_distances(valid_emb, fitted["centres"])
    assert np.isinf(distances[:, 6]).all() and fitted["thresholds"][6] == -np.inf
    assert not (distances <= fitted["thresholds"])[:, 6].any() and not space.max_separation(distances)[:, 6].any()
    metrics = space.centroid_metrics(valid_labels, distances, fitted["thresholds"])
    assert metrics["threshold"]["thresholds"][space.CLASSES[6]] is None
    json.dumps(metrics, allow_nan=False)  # strict JSON


def test_threshold_tuning_hits_the_mcc_optimum():
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.3
    distance = np.where(y, rng.normal(1.0, 0.5, 60), rng.normal(2.0, 0.5, 60))
    (t,) = space.tune_distance_thresholds(y[:, None], distance[:, None])
    got = matthews_corrcoef(y, distance <= t)
    best = max(matthews_corrcoef(y, distance <= c) for c in np.concatenate([distance, [-1.0, 99.0]]))  # every cut
    assert got == pytest.approx(best, abs=1e-12) and best > 0.5
    # hand-worked: positives at 1, 2, negatives at 3, 4 -> any t in [2, 3) is perfect; the midpoint 2.5
    (t,) = space.tune_distance_thresholds(np.array([[1], [1], [0], [0]]), np.array([[1.0], [2.0], [3.0], [4.0]]))
    assert t == 2.5
    # a class without validation positives is never predicted
    assert space.tune_distance_thresholds(np.zeros((3, 1)), np.ones((3, 1)))[0] == -np.inf


def test_knn_matches_scikit_learn():
    rng = np.random.default_rng(1)
    train_emb, query = rng.normal(size=(80, 6)), rng.normal(size=(30, 6))
    labels = (rng.random((80, 8)) < 0.25).astype(np.uint8)
    expected = KNeighborsClassifier(n_neighbors=5).fit(train_emb, labels).predict(query).astype(bool)
    np.testing.assert_array_equal(space.knn_predict(train_emb, labels, query, 5), expected)


def test_knn_blocks_give_the_same_votes():
    rng = np.random.default_rng(4)
    train_emb, query = rng.normal(size=(50, 3)), rng.normal(size=(23, 3))
    labels = (rng.random((50, 8)) < 0.3).astype(np.uint8)
    np.testing.assert_array_equal(space.knn_predict(train_emb, labels, query, 5, block=4),
                                  space.knn_predict(train_emb, labels, query, 5))


def test_silhouettes_match_scikit_learn():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(50, 4))
    labels = (rng.random((50, 8)) < 0.3).astype(np.uint8)
    labels[:, 7] = 0
    labels[3, 7] = 1  # a class with one member: undefined
    emb[labels[:, 0] == 1] += 3.0  # class 0 moved away: well separated
    got = space.class_silhouettes(emb.astype(np.float32), labels)
    for c, name in enumerate(space.CLASSES[:7]):
        member = labels[:, c] == 1
        expected = silhouette_samples(emb, member.astype(int))[member].mean()
        assert got[name] == pytest.approx(expected, abs=1e-5), name
    assert got["Thylakoid"] is None
    assert got["ER"] > 0.3 > max(v for k, v in got.items() if k not in ("ER", "Thylakoid"))


def test_space_metrics_on_separable_clusters():
    """Four well separated classes (one multi-label group): centroid rules and kNN are perfect."""
    rng = np.random.default_rng(3)
    groups = [[0], [3], [4, 5], [6]]

    def sample(n):
        labels = np.zeros((n * len(groups), 8), dtype=np.uint8)
        emb = np.zeros((n * len(groups), 3))
        for g, (classes, corner) in enumerate(zip(groups, itertools.product([0, 10], repeat=2))):
            labels[g * n:(g + 1) * n, classes] = 1
            emb[g * n:(g + 1) * n] = [*corner, 0] + rng.normal(0, 0.3, size=(n, 3))
        return emb.astype(np.float32), labels
    m = space.space_metrics(sample(20), sample(10), sample(10))
    present = ["ER", "SIGNAL", "Nucleus", "Nucleus_export", "chloroplast"]
    for rule in ("threshold", "knn"):
        assert all(m[rule]["per_class_f1"][c] == 1.0 for c in present), rule
    # max-separation: the 2-class group {Nucleus, Nucleus_export} sits on one centre: both predicted
    assert all(m["maxsep"]["per_class_f1"][c] == 1.0 for c in present)
    assert all(m["silhouette"][c] > 0.8 for c in present)
    assert m["knn"]["k"] == 5 and m["macro_average_precision"] == pytest.approx(1.0)


def test_run_stores_centres_and_space_metrics(tiny_run, tmp_path):
    """best.pt holds the training split's class means (computed here another way, protein by protein);
    test_metrics.json the space metrics; add_centroids.py recomputes the same centres for an old checkpoint."""
    import json
    import subprocess
    import sys

    import torch
    from conftest import ROOT

    import data
    import model
    import utils
    best = utils.load_checkpoint(tiny_run / "checkpoints" / "best.pt")
    centroids = best["centroids"]
    assert set(centroids) == {"pooled"}  # no projection head in this run
    config = resolve_config(best["config"])
    m = model.Encoder(config, arch=best["arch"]).eval()
    m.load_state_dict(best["model"])
    train_set = data.build_datasets(config)["train"]
    sums, counts = {}, {}
    for protein in train_set.proteins:
        one = data.LocalizationDataset([protein])
        with torch.no_grad():
            pooled = m(batching.Collate(config.data.max_len, config.data.overlap)([one[0]]))["pooled"][0].numpy()
        for c in np.flatnonzero(protein.labels):
            sums[c] = sums.get(c, 0) + pooled.astype(np.float64)
            counts[c] = counts.get(c, 0) + 1
    for c in range(8):
        np.testing.assert_allclose(centroids["pooled"]["centres"][c], sums[c] / counts[c], atol=1e-5)
    assert centroids["pooled"]["counts"].tolist() == [counts[c] for c in range(8)]
    metrics = json.loads((tiny_run / "test_metrics.json").read_text())["space"]["pooled"]
    for key in ("maxsep", "threshold", "knn"):
        assert 0.0 <= metrics[key]["macro_f1"] <= 1.0
    assert set(metrics["silhouette"]) == set(space.CLASSES)
    old = tmp_path / "old.pt"
    del best["centroids"]
    torch.save(best, old)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "add_centroids.py"), str(old), "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    added = utils.load_checkpoint(old)["centroids"]["pooled"]
    np.testing.assert_allclose(added["centres"], centroids["pooled"]["centres"], atol=1e-6)
    np.testing.assert_allclose(added["thresholds"], centroids["pooled"]["thresholds"], atol=1e-6)


def predict_both(capsys, tmp_path, ckpt, fasta, *extra):
    import predict
    out = {k: tmp_path / f"out.{k}" for k in ("json", "tsv", "gff3", "npz")}
    code = predict.main(["--checkpoint", str(ckpt), "--fasta", str(fasta), "--out", str(out["json"]), "--tsv",
                         str(out["tsv"]), "--gff3", str(out["gff3"]), "--embeddings", str(out["npz"]), "--plot-dir",
                         str(tmp_path / "plots"), "--device", "cpu", "--method", "both", *map(str, extra)])
    return code, capsys.readouterr().err, out


def test_predict_method_both_writes_head_and_centroid_everywhere(supcon_run, tmp_path, capsys):
    import json

    import data
    import predict
    import utils
    proteins = data.build_datasets(load_config(supcon_run / "config.yaml"))["test"].proteins[:12]
    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">{p.entry}\n{p.sequence}\n" for p in proteins))
    ckpt = supcon_run / "checkpoints" / "best.pt"
    code, err, out = predict_both(capsys, tmp_path, ckpt, fasta, "--centroid-rule", "maxsep")
    assert code == 0, err
    centroids = space.from_stored(utils.load_checkpoint(ckpt)["centroids"])["projection"]  # auto: projection
    npz = np.load(out["npz"])
    expected = space.centre_distances(npz["projection"], centroids["centres"])  # independent of predict's path
    np.testing.assert_allclose(npz["centroid_distances"], expected, rtol=1e-4, atol=1e-4)
    records = [json.loads(line.rstrip(",[]\n")) for line in out["json"].read_text().splitlines() if line.strip("[]\n")]
    assert [r["id"] for r in records] == [p.entry for p in proteins]
    maxsep = space.max_separation(expected)
    for r, row, hit in zip(records, expected, maxsep):
        assert {"probabilities", "predicted", "sites", "segments"} <= set(r)  # the heads' fields stay
        cen = r["centroid"]
        assert cen["space"] == "projection" and cen["rule"] == "maxsep"
        assert cen["maxsep"] == [c for c, h in zip(space.CLASSES, hit) if h] == cen["predicted"]
        assert cen["threshold"] == ([c for c, d, t in zip(space.CLASSES, row, centroids["thresholds"]) if d <= t]
                                    or ["Other"])
        assert [cen["distances"][c] for c in space.CLASSES] == pytest.approx(row, abs=2e-4)
    header = out["tsv"].read_text().splitlines()[0].split("\t")
    assert header[:3] == ["id", "length", "predicted"] and "centroid_maxsep" in header and "distance_ER" in header
    gff = out["gff3"].read_text()
    assert "\tMUTarget-centroid\t" in gff and "\tMUTarget\t" in gff or all(r["predicted"] == ["Other"] for r in records)
    n_centroid_features = sum(len(r["centroid"]["sites"]) + sum(len(v) for v in r["centroid"]["segments"].values())
                              for r in records)
    assert gff.count("\tMUTarget-centroid\t") == n_centroid_features > 0
    assert len(list((tmp_path / "plots").glob("*.png"))) == len(records)
    # labelled input: --metrics scores the centroid prediction as space.centroid_metrics does
    csv = tmp_path / "labelled.csv"
    csv.write_text("Entry,MOTIF,Sequence\n" + "".join(
        f"{p.entry},{'|'.join(f'{s}-{e}:{lab}' for lab, s, e in p.annotations)},{p.sequence}\n" for p in proteins))
    metrics_path = tmp_path / "metrics.json"
    assert predict.main(["--checkpoint", str(ckpt), "--csv", str(csv), "--metrics", str(metrics_path), "--device",
                         "cpu", "--method", "both"]) == 0
    metrics = json.loads(metrics_path.read_text())["centroid"]
    want_labels = np.stack([p.labels for p in proteins])
    want = space.centroid_metrics(want_labels, expected, centroids["thresholds"])
    assert metrics["space"] == "projection"
    for rule in ("maxsep", "threshold"):
        assert metrics[rule]["macro_mcc"] == pytest.approx(want[rule]["macro_mcc"], abs=1e-9)
    p = confidence.p_values(expected, centroids["null_distances"])  # the p-value rule at the stored cut too
    assert metrics["pvalue"]["p_value"] == float(centroids["p_value"]) and metrics["pvalue"]["macro_mcc"] == (
        pytest.approx(space.centroid_metrics(want_labels, expected, centroids["thresholds"], p, centroids["p_value"])[
            "pvalue"]["macro_mcc"], abs=1e-9))
    # centroid only: the heads' fields are left out; the pooled space on request
    only = tmp_path / "only.json"
    assert predict.main(["--checkpoint", str(ckpt), "--fasta", str(fasta), "--out", str(only), "--device", "cpu",
                         "--method", "centroid", "--space", "pooled"]) == 0
    first = json.loads(only.read_text().splitlines()[1].rstrip(","))
    assert set(first) == {"id", "length", "warnings", "centroid"} and first["centroid"]["space"] == "pooled"


def test_centroid_prediction_refusals(tiny_run, tmp_path, capsys):
    import torch

    import utils
    fasta = tmp_path / "in.fa"
    fasta.write_text(">A\nMKTAYIAKQRQISFVKSHFSRQ\n")
    ckpt = tiny_run / "checkpoints" / "best.pt"  # a baseline run: no projection head
    code, err, out = predict_both(capsys, tmp_path, ckpt, fasta, "--space", "projection")
    assert code == 2 and f"{ckpt}: --space projection, but this model has no projection head" in err
    assert not any(p.exists() for p in out.values())
    old = tmp_path / "old.pt"
    state = utils.load_checkpoint(ckpt)
    del state["centroids"]
    torch.save(state, old)
    code, err, out = predict_both(capsys, tmp_path, old, fasta)
    assert code == 2 and f"{old}: no class centres of the pooled space stored" in err
    assert f"scripts/add_centroids.py {old}" in err and not any(p.exists() for p in out.values())


def test_missing_centre_is_null_in_json():
    """A distance to a missing centre (inf) cannot go into strict JSON: null there (an empty TSV cell)."""
    import outputs
    distances = np.array([0.5, np.inf, 2.0, 2.1, 2.2, 2.3, 2.4, 2.5])
    centroid = outputs.Centroid("pooled", np.full(8, 1.0), "threshold")
    fields = outputs.centroid_fields(distances, np.zeros((8, 30)), centroid)
    assert fields["distances"][space.CLASSES[1]] is None and fields["distances"][space.CLASSES[0]] == 0.5
    assert fields["predicted"] == [space.CLASSES[0]]
    json.dumps(fields, allow_nan=False)
