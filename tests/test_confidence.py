"""Confidence and p-values of centroid prediction (confidence.py): the mixture posterior against sklearn's,
the p-value rule by hand, checkpoints with and without the fields, predict.py --centroid-rule pvalue."""
import json

import numpy as np
import pytest
from sklearn.mixture import GaussianMixture

import confidence
import release
import space
import utils
from conftest import ROOT
from helpers import run

CLASSES = space.CLASSES
OLD = ROOT / "tests" / "fixtures" / "best_510a3f0.pt"  # written before the confidence fields existed


def two_populations(seed=0, n=300):
    rng = np.random.default_rng(seed)
    return rng.normal(1.0, 0.3, n), rng.normal(3.0, 0.8, 4 * n)


@pytest.mark.parametrize("kind", ["full", "diag", "spherical", "tied"])
def test_mixture_posterior_equals_sklearn(kind):
    """One fitted GaussianMixture, exported (export_mixture) and evaluated with NumPy: its small-mean
    component's column of predict_proba, to 1e-9, over the data's range and the tails. The confidence is that
    posterior at the distance clamped into [smaller mean, larger mean]: never rising with the distance, where the
    plain posterior falls again below the narrow true component's mean (the wide false one takes over)."""
    true, false = two_populations()
    gm = GaussianMixture(2, covariance_type=kind, random_state=0).fit(np.concatenate([true, false])[:, None])
    means, variances, weights = confidence.export_mixture(gm)
    x = np.linspace(-2.0, 8.0, 401)
    expected = gm.predict_proba(x[:, None])[:, np.argmin(gm.means_[:, 0])]
    got = confidence.posterior(x[:, None], means[None], variances[None], weights[None])[:, 0]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-9)
    conf = confidence.mixture_confidence(x, means[None], variances[None], weights[None])
    inside = (x >= means.min()) & (x <= means.max())
    np.testing.assert_allclose(conf[inside], expected[inside], rtol=0, atol=1e-9)
    low = gm.predict_proba([[means.min()]])[0, np.argmin(means)]
    np.testing.assert_allclose(conf[x < means.min()], low, rtol=0, atol=1e-9)
    assert (np.diff(conf) <= 1e-12).all() and conf[0] > 0.9 > 0.05 > conf[200]  # d = -2 and 3 (the false mean)
    if kind != "tied":  # equal variances: no turn
        assert expected[0] < 0.5  # the plain posterior at -2, far below the narrow true component


def test_ensemble_confidence_is_the_mean_of_its_mixtures():
    true, false = two_populations(1)
    fitted = confidence.fit_mixtures(true, false, n=3, cap=200)
    assert all(fitted[k].shape == (3, 2) for k in confidence.MIXTURE_FIELDS)
    d = np.array([[0.5, 1.5], [2.5, np.inf]])  # any shape; an infinite distance (no centre): 0
    each = [confidence.mixture_confidence(d, *(fitted[k][m:m + 1] for k in confidence.MIXTURE_FIELDS))
            for m in range(3)]
    got = confidence.mixture_confidence(d, *(fitted[k] for k in confidence.MIXTURE_FIELDS))
    np.testing.assert_allclose(got, np.mean(each, axis=0), atol=1e-12)
    assert got[1, 1] == 0.0 and got[0, 0] > 0.9 > 0.1 > got[1, 0]
    with pytest.raises(ValueError, match="mixture confidence: 1 NaN distance"):
        confidence.mixture_confidence(np.array([0.5, np.nan]), *(fitted[k] for k in confidence.MIXTURE_FIELDS))


def test_p_value_rule_hand_worked():
    """Two classes. Null distances (training proteins without the class), by hand:
        class 0: 1, 2, 3, 4 (n = 4);  class 1: 0.5, 5 (n = 2; +inf pads the row)
    p = (1 + #{null <= d}) / (n + 1):
        protein A, d = (0.5, 0.4): class 0: (1 + 0) / 5 = 0.2;  class 1: (1 + 0) / 3 = 1/3
        protein B, d = (2, 5):     class 0: (1 + 2) / 5 = 0.6;  class 1: (1 + 2) / 3 = 1    (ties count: <=)
        protein C, d = (4.5, 9):   class 0: (1 + 4) / 5 = 1;    class 1: 1
        protein D, d = (3, inf):   class 0: (1 + 3) / 5 = 0.8;  class 1 (no centre): 1
    Calls at alpha 0.25: A class 0 only; B, C, D no signal. At alpha 0.4: A both classes.
    The cut from validation, labels A = (1, 1), the rest (0, 0): on the grid (0.1, 0.2, 0.5, 0.9), 0.1 calls
    nothing (macro-MCC 0), 0.2 class 0 of A (MCC 1, 0: macro 0.5), 0.5 both of A (macro 1), 0.9 also D's
    class 0 (MCC of class 0 below 1): 0.5. With the grid (0.4, 0.5) both reach 1: the smaller, 0.4."""
    train_d = np.array([[3, 9], [1, 0.5], [4, 5], [2, 7], [0.1, 0.2]])  # training proteins' distances
    train_labels = np.array([[0, 1], [0, 0], [0, 0], [0, 1], [1, 1]])
    null = confidence.null_distances(train_d, train_labels)
    np.testing.assert_array_equal(null, [[1, 2, 3, 4], [0.5, 5, np.inf, np.inf]])
    d = np.array([[0.5, 0.4], [2, 5], [4.5, 9], [3, np.inf]])
    p = confidence.p_values(d, null)
    np.testing.assert_allclose(p, [[0.2, 1 / 3], [0.6, 1], [1, 1], [0.8, 1]], atol=1e-15)
    assert (p <= 0.25).tolist() == [[True, False], [False, False], [False, False], [False, False]]
    assert (p <= 0.4).tolist()[0] == [True, True]
    labels = np.array([[1, 1], [0, 0], [0, 0], [0, 0]])
    assert confidence.choose_p_value(labels, p, grid=(0.1, 0.2, 0.5, 0.9)) == 0.5
    assert confidence.choose_p_value(labels, p, grid=(0.4, 0.5)) == 0.4
    capped = confidence.null_distances(train_d[:4], train_labels[:4], cap=2)  # a seeded subsample of 2
    assert capped.shape == (2, 2) and set(capped[0].tolist()) < {1, 2, 3, 4} and capped[0, 0] < capped[0, 1]
    np.testing.assert_array_equal(capped, confidence.null_distances(train_d[:4], train_labels[:4], cap=2))
    with pytest.raises(ValueError, match="p-values: 1 NaN distance"):
        confidence.p_values(np.array([[np.nan, 1.0]]), null)


def test_fit_and_stored_checks():
    """confidence.fit on two populations of distances: plain arrays that pass the checks; damaged ones are
    named (release.stored_problem, which checkpoints and model folders go through)."""
    rng = np.random.default_rng(2)
    labels = (rng.random((200, 8)) < 0.2).astype(int)
    distances = np.where(labels == 1, rng.normal(1.0, 0.3, labels.shape), rng.normal(3.0, 0.6, labels.shape))
    fitted = confidence.fit(distances[:120], labels[:120], distances[120:], labels[120:])
    assert fitted["mixture_means"].shape == (confidence.N_MIXTURES, 2) and fitted["null_distances"].shape[0] == 8
    assert fitted["p_value"] in confidence.P_VALUE_GRID
    assert confidence.mixture_confidence(np.array([1.0, 3.0]), *(fitted[k] for k in confidence.MIXTURE_FIELDS)
                                         ).round(1).tolist() == [1.0, 0.0]
    base = {"centres": np.zeros((8, 3)), "counts": np.ones(8), "thresholds": np.ones(8)}
    dims = {"pooled": 3, "projection": None}
    assert release.stored_problem(None, {"pooled": {**base, **fitted}}, dims) is None
    assert release.stored_problem(None, {"pooled": base}, dims) is None  # none of the fields: fine
    for change, named in [
        ({"p_value": None}, "centroids.pooled.p_value: missing"),
        ({"mixture_variances": -fitted["mixture_variances"]}, "centroids.pooled.mixture_variances: a variance <= 0"),
        ({"null_distances": fitted["null_distances"][:, ::-1]}, "centroids.pooled.null_distances: each row"),
        ({"p_value": np.float64(1.5)}, "centroids.pooled.p_value: 1.5, expected one number between 0 and 1"),
        ({"mixture_weights": fitted["mixture_weights"][:3]}, "centroids.pooled.mixture_weights: shape (3, 2)"),
    ]:
        damaged = {k: v for k, v in {**base, **fitted, **change}.items() if v is not None}
        assert release.stored_problem(None, {"pooled": damaged}, dims).startswith(named), named
    assert confidence.fit(distances[:120], labels[:120], distances[120:122], np.zeros((2, 8))) == {}  # no true
    stored = {"pooled": {**base, **fitted}}  # model.json (release.py): exact, the null as base64 float32
    back = release._centroids_from_json(json.loads(json.dumps(release._centroids_to_json(stored), allow_nan=False)))
    for key in confidence.FIELDS:
        assert np.asarray(back["pooled"][key]).tobytes() == np.asarray(fitted[key]).tobytes(), key
    with pytest.raises(ValueError, match=r"null_distances: 4 bytes, but shape \[8, 2\] needs 64"):
        release._float32_array({"shape": [8, 2], "float32_base64": "AACAPw=="})


def test_checkpoint_without_the_fields_predicts_as_before(tmp_path, capsys):
    """A checkpoint written before the confidence fields (the fixture): --method centroid as before (distances,
    both rules), the new fields null or empty with one note on stderr; --centroid-rule pvalue refused."""
    fasta = tmp_path / "in.fa"
    fasta.write_text(">A\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRV\n>B\nMSDNQLLKKVAEGLRALLDEQWSKVTLFTLAGGVAP\n")
    out, tsv = tmp_path / "out.json", tmp_path / "out.tsv"
    code, err = run(capsys, "--checkpoint", OLD, "--fasta", fasta, "--out", out, "--tsv", tsv, "--method",
                    "centroid", "--embeddings", tmp_path / "e.npz", "--device", "cpu")
    assert code == 0, err
    assert err.count("no centroid confidence mixtures or null distances stored") == 1 and str(OLD) in err
    fitted = space.from_stored(utils.load_checkpoint(OLD)["centroids"])["pooled"]
    distances = space.centre_distances(np.load(tmp_path / "e.npz")["pooled"], fitted["centres"])
    for r, row in zip(json.loads(out.read_text()), distances):
        cen = r["centroid"]
        assert [cen["distances"][c] for c in CLASSES] == pytest.approx(row, abs=2e-4)
        assert cen["threshold"] == cen["predicted"] == ([c for c, d, t in zip(CLASSES, row, fitted["thresholds"])
                                                         if d <= t] or ["Other"])
        assert cen["maxsep"] == [c for c, h in zip(CLASSES, space.max_separation(row[None])[0]) if h]
        assert cen["pvalue"] is cen["p_value"] is cen["confidence"] is cen["p_values"] is None
    header, *rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    new = [i for i, h in enumerate(header) if h.startswith(("centroid_confidence_", "centroid_pvalue"))]
    assert len(new) == 17 and all(row[i] == "" for row in rows for i in new)
    code, err = run(capsys, "--checkpoint", OLD, "--fasta", fasta, "--out", out, "--method", "centroid",
                    "--centroid-rule", "pvalue", "--device", "cpu")
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {OLD}: --centroid-rule pvalue needs")
    assert errors[0].endswith(f"add them with: python scripts/add_centroids.py {OLD}, or retrain")


def sklearn_confidence(fitted, d):
    """The mixture confidence through sklearn itself: each stored mixture set into a GaussianMixture."""
    out = []
    for means, variances, weights in zip(*(fitted[k] for k in confidence.MIXTURE_FIELDS)):
        gm = GaussianMixture(2)
        gm.means_, gm.weights_ = means[:, None], weights
        gm.covariances_ = variances[:, None, None]
        gm.precisions_cholesky_ = 1 / np.sqrt(variances)[:, None, None]
        x = np.clip(d, means.min(), means.max())  # clamped into [smaller mean, larger mean]
        out.append(gm.predict_proba(x.reshape(-1, 1))[:, np.argmin(means)].reshape(d.shape))
    return np.mean(out, axis=0)


def test_predict_pvalue_rule_end_to_end(supcon_run, tmp_path, capsys):
    """A tiny SupCon run stores the fields of both spaces; predict.py --centroid-rule pvalue writes p-values
    and confidences that equal independent computations (a loop over the null distances; sklearn's posterior)
    and calls the classes with p <= the stored cut; --p-value overrides it, and is refused outside (0, 1)."""
    import data
    from config import load_config
    ckpt = supcon_run / "checkpoints" / "best.pt"
    stored = space.from_stored(utils.load_checkpoint(ckpt)["centroids"])
    assert set(stored) == {"pooled", "projection"} and all(confidence.calibrated(f) for f in stored.values())
    fitted = stored["projection"]
    assert float(fitted["p_value"]) in confidence.P_VALUE_GRID
    proteins = data.build_datasets(load_config(supcon_run / "config.yaml"))["test"].proteins[:12]
    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">{p.entry}\n{p.sequence}\n" for p in proteins))
    out, tsv, gff3, npz = (tmp_path / f"out.{k}" for k in ("json", "tsv", "gff3", "npz"))
    code, err = run(capsys, "--checkpoint", ckpt, "--fasta", fasta, "--out", out, "--tsv", tsv, "--gff3", gff3,
                    "--embeddings", npz, "--method", "centroid", "--centroid-rule", "pvalue", "--device", "cpu")
    assert code == 0 and "no centroid confidence" not in err, err
    distances = space.centre_distances(np.load(npz)["projection"], fitted["centres"])
    null = fitted["null_distances"]
    expected_p = np.array([[(1 + sum(x <= d for x in null[c] if np.isfinite(x))) / (1 + np.isfinite(null[c]).sum())
                            for c, d in enumerate(row)] for row in distances])
    expected_conf = sklearn_confidence(fitted, distances)
    records = json.loads(out.read_text())
    header, *rows = [line.split("\t") for line in tsv.read_text().splitlines()]
    called = 0
    for r, row, p, conf in zip(records, rows, expected_p, expected_conf):
        cen = r["centroid"]
        assert cen["rule"] == "pvalue" and cen["p_value"] == float(fitted["p_value"])
        assert [cen["p_values"][c] for c in CLASSES] == pytest.approx(p, rel=1e-3)
        assert [cen["confidence"][c] for c in CLASSES] == pytest.approx(conf, abs=2e-4)
        assert cen["predicted"] == cen["pvalue"] == ([c for c, v in zip(CLASSES, p) if v <= fitted["p_value"]]
                                                     or ["Other"])
        cells = dict(zip(header, row))
        assert cells["centroid_pvalue"] == ",".join(cen["pvalue"]) and cells["centroid_predicted"] == cells[
            "centroid_pvalue"]
        assert [float(cells[f"centroid_pvalue_{c}"]) for c in CLASSES] == pytest.approx(p, rel=1e-3)
        assert [float(cells[f"centroid_confidence_{c}"]) for c in CLASSES] == pytest.approx(conf, abs=2e-4)
        called += cen["pvalue"] != ["Other"]
    assert called > 0 and gff3.read_text().count("\tMUTarget-centroid\t") > 0 and ";p_value=" in gff3.read_text()
    code, err = run(capsys, "--checkpoint", ckpt, "--fasta", fasta, "--out", out, "--method", "both",
                    "--space", "pooled", "--p-value", "0.5", "--device", "cpu")
    first = json.loads(out.read_text())[0]["centroid"]
    assert code == 0 and first["p_value"] == 0.5 and first["rule"] == "threshold", err
    assert first["pvalue"] == ([c for c in CLASSES if first["p_values"][c] <= 0.5] or ["Other"])
    for bad in ("1.5", "0", "nan"):
        code, err = run(capsys, "--checkpoint", ckpt, "--fasta", fasta, "--out", tmp_path / "bad.json", "--method",
                        "centroid", "--p-value", bad, "--device", "cpu")
        assert code == 2 and err == f"error: --p-value: must be between 0 and 1 (exclusive), got {float(bad)}\n"


def test_nan_embedding_is_an_error_naming_the_protein(tmp_path, capsys, monkeypatch):
    """A protein whose embedding holds NaN (numbers out of range) has no distance: one error line naming it, no
    file written (never an infinite distance, which would read as 'no centre')."""
    import inference
    real = inference.run_member

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        out["pooled"][0] = np.nan
        return out
    monkeypatch.setattr(inference, "run_member", broken)
    fasta, out = tmp_path / "in.fa", tmp_path / "out.json"
    fasta.write_text(">broken\nMKTAYIAKQRQISFVKSHFSRQ\n")
    code, err = run(capsys, "--checkpoint", OLD, "--fasta", fasta, "--out", out, "--method", "centroid", "--device",
                    "cpu")
    errors = [line for line in err.splitlines() if line.startswith("error")]
    assert code == 2 and errors == ["error: broken: NaN distances to the class centres: its pooled embedding holds NaN "
                                    "or infinite values (numbers out of range; try --precision fp32)"]
    assert not out.exists()
