"""Ensemble inference of predict.py (inference.py): results independent of the batching, the same as Encoder.forward, ensembles as means, precision."""
import numpy as np
import torch
from helpers import check_failure, probs_of, proteome, records_of, run

import data
import inference
from config import resolve_config
from evaluate import run_inference
from model import Encoder


def test_results_do_not_depend_on_batching(ckpts):
    """Each protein's probabilities, tracks and embeddings are bit-identical however it is batched:
    all in one batch, one window per batch, 3 proteins per batch, or in chunks of 5."""
    proteins = [data.make_protein(i, s, "", i) for i, s in proteome()]
    cpu = torch.device("cpu")
    members = inference.load_ensemble([ckpts["a"]], cpu)
    ref = inference.predict_chunk(members, proteins, inference.Settings(cpu, max_tokens=10 ** 6))
    runs = [inference.predict_chunk(members, proteins, inference.Settings(cpu, max_tokens=96)),
            inference.predict_chunk(members, proteins, inference.Settings(cpu, max_proteins=3)),
            sum((inference.predict_chunk(members, proteins[i:i + 5], inference.Settings(cpu)) for i in range(0, len(proteins), 5)), [])]
    for results in runs:
        for a, b in zip(ref, results):
            for key in ("probs", "motif", "pooled", "projection"):
                assert np.array_equal(getattr(a, key), getattr(b, key)), key


def test_packed_layout_equals_padded(ckpts):
    """predict.py --layout packed (the GPU's default): every protein's probabilities, tracks and embeddings
    agree with the padded layout's to 1e-5, also when the token budget splits a chunk into many batches."""
    proteins = [data.make_protein(i, s, "", i) for i, s in proteome()]
    cpu = torch.device("cpu")
    members = inference.load_ensemble([ckpts["a"]], cpu)
    padded = inference.predict_chunk(members, proteins, inference.Settings(cpu))
    for budget in (96, 16384):
        packed = inference.predict_chunk(members, proteins, inference.Settings(cpu, max_tokens=budget, packed=True))
        for a, b in zip(padded, packed):
            for key in ("probs", "motif", "pooled", "projection"):
                np.testing.assert_allclose(getattr(b, key), getattr(a, key), rtol=0, atol=1e-5, err_msg=key)


def test_plan_batches_hand_worked():
    """Windows of 64 residues overlapping by 16; widths (residues + BOS + EOS) rounded up to 32 tokens:
    10 -> 1 x 32, 30 -> 1 x 32, 40 -> 1 x 64, 100 -> 2 x 96 (starts 0, 36), 200 -> 4 x 96 tokens."""
    lengths = [10, 100, 40, 30, 200]
    assert [inference.window_width(n, 64) for n in lengths] == [32, 96, 64, 32, 96]
    assert inference.plan_batches(lengths, 64, 16, max_tokens=200) == [[0, 3], [2], [1], [4]]  # 200: over budget, alone
    assert inference.plan_batches(lengths, 64, 16, max_tokens=10 ** 6) == [[0, 3], [2], [1, 4]]
    assert inference.plan_batches(lengths, 64, 16, max_tokens=10 ** 6, max_proteins=1) == [[0], [3], [2], [1], [4]]


def test_backbone_call_sizes():
    """Calls of `full` windows (the token budget), the rest in power-of-two calls: few distinct shapes,
    and never more than the budget, also for a protein with more windows than fit in it (titin: 42)."""
    for full in (1, 5, 16, 170):
        for windows in range(1, 3 * full + 2):
            sizes = inference.call_sizes(windows, full)
            assert sum(sizes) == windows and sizes == sorted(sizes, reverse=True) and max(sizes) <= full
            assert all(s == full or s & (s - 1) == 0 for s in sizes)
            assert sizes.count(full) == windows // full
    assert inference.call_sizes(42, 16) == [16, 16, 8, 2]


def test_identical_sequences_are_predicted_once(ckpts, monkeypatch):
    seen = []
    original = inference.run_ensemble

    def counting(members, sequences, *args):
        seen.extend(sequences)
        return original(members, sequences, *args)

    monkeypatch.setattr(inference, "run_ensemble", counting)
    pairs = proteome()
    proteins = [data.make_protein(i, s, "", i) for i, s in pairs]
    cpu = torch.device("cpu")
    results = inference.predict_chunk(inference.load_ensemble([ckpts["a"]], cpu), proteins, inference.Settings(cpu, max_tokens=200))
    assert sorted(seen) == sorted({s for _, s in pairs})
    ids = [i for i, _ in pairs]
    assert results[ids.index("copy_of_prot5")] is results[ids.index("prot5")]
    assert results[ids.index("copy_of_prot0")] is results[ids.index("prot0")]


def test_results_match_encoder_forward(ckpts):
    """The streaming path computes what the model's own forward (evaluate.run_inference) computes."""
    proteins = [data.make_protein(i, s, "", i) for i, s in proteome()]
    cpu = torch.device("cpu")
    members = inference.load_ensemble([ckpts["a"]], cpu)
    ours = inference.predict_chunk(members, proteins, inference.Settings(cpu, max_tokens=300))
    ref = run_inference(members[0].model, data.LocalizationDataset(proteins), 4, cpu, "none",
                        members[0].max_len, members[0].overlap)
    for i, r in enumerate(ours):
        np.testing.assert_allclose(r.probs, ref["probs"][i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(r.motif, ref["motif_probs"][i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(r.pooled, ref["pooled"][i], rtol=0, atol=1e-5)
        np.testing.assert_allclose(r.projection, ref["projection"][i], rtol=0, atol=1e-5)


def test_ensemble_is_the_mean_of_single_runs(tmp_path, ckpts, fasta, capsys):
    def single(name, *paths):
        folder = tmp_path / name
        code, err = run(capsys, "--checkpoint", *paths, "--fasta", fasta, "--out", folder / "out.json",
                        "--embeddings", folder / "emb.npz", "--device", "cpu", "--chunk-size", 5)
        assert code == 0, err
        return probs_of(records_of(folder / "out.json")), np.load(folder / "emb.npz")

    (pa, za), (pb, zb), (pab, zab) = single("a", ckpts["a"]), single("b", ckpts["b"]), single("ab", ckpts["a"], ckpts["b"])
    assert not np.allclose(pa, pb) and not np.allclose(za["projection"], zb["projection"])
    np.testing.assert_allclose(pab, (pa + pb) / 2, rtol=0, atol=1.01e-4)  # JSON rounds to 4 decimals
    for key in ("pooled", "projection"):
        np.testing.assert_allclose(zab[key], (za[key].astype(np.float64) + zb[key]) / 2, rtol=0, atol=1e-6)


def test_projection_left_out_when_heads_differ(tmp_path, ckpts, fasta, capsys):
    out = tmp_path / "emb.npz"
    code, err = run(capsys, "--checkpoint", ckpts["a"], ckpts["best"], "--fasta", fasta, "--embeddings", out,
                    "--device", "cpu")
    assert code == 0, err
    assert "projection embeddings left out" in err and str(ckpts["best"]) in err
    assert sorted(np.load(out).files) == ["ids", "pooled"]


def test_windowing_mismatch(tmp_path, ckpts, fasta, capsys):
    state = torch.load(ckpts["a"], weights_only=True)
    state["config"]["data"]["overlap"] = 8
    odd = tmp_path / "odd_window.pt"
    torch.save(state, odd)
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], odd, "--fasta", fasta], str(odd), "data.overlap=8",
                  str(ckpts["a"]))


def test_bf16_on_cpu_is_close_to_fp32(ckpts):
    """Tolerances: 0.01 on class probabilities, 0.02 on residue probabilities, 2% of the largest
    pooled value (measured: 0.0009, 0.002, 0.25%)."""
    proteins = [data.make_protein(i, s, "", i) for i, s in proteome()]
    cpu = torch.device("cpu")
    members = inference.load_ensemble([ckpts["a"]], cpu)
    assert inference.autocast_dtype("auto", cpu) is None and inference.autocast_dtype("bf16", cpu) is torch.bfloat16
    fp32 = inference.predict_chunk(members, proteins, inference.Settings(cpu))
    bf16 = inference.predict_chunk(members, proteins, inference.Settings(cpu, torch.bfloat16))
    assert any(not np.array_equal(a.probs, b.probs) for a, b in zip(fp32, bf16))  # bf16 really ran
    for a, b in zip(fp32, bf16):
        assert np.abs(a.probs - b.probs).max() <= 0.01
        assert np.abs(a.motif - b.motif).max() <= 0.02
        assert np.abs(a.pooled - b.pooled).max() <= 0.02 * np.abs(a.pooled).max()
        assert b.probs.dtype == np.float64 and b.pooled.dtype == np.float32


def test_ensemble_of_backbones_of_different_sizes(tmp_path, ckpts, fasta, capsys):
    """Probabilities and tracks average across backbone sizes; the mean embedding does not exist, so
    only --embeddings is refused (naming the file)."""
    state = torch.load(ckpts["best"], weights_only=True)
    arch = {**state["arch"], "embed_dim": state["arch"]["embed_dim"] // 2}
    state["config"]["encoder"]["scratch"] = {k: arch[k] for k in ("num_layers", "embed_dim", "attention_heads")}
    torch.manual_seed(5)
    state["model"] = Encoder(resolve_config(state["config"]), arch=arch).state_dict()
    state["arch"] = arch
    state.pop("centroids", None)  # the wide model's class centres do not fit the narrow one (refused)
    torch.save(state, tmp_path / "narrow.pt")
    code, err = run(capsys, "--checkpoint", ckpts["best"], tmp_path / "narrow.pt", "--fasta", fasta,
                    "--out", tmp_path / "out.jsonl", "--tsv", tmp_path / "out.tsv")
    assert code == 0, err
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == fasta.read_text().count("\n>") + 1
    code, err = run(capsys, "--checkpoint", ckpts["best"], tmp_path / "narrow.pt", "--fasta", fasta,
                    "--embeddings", tmp_path / "emb.npz")
    assert code == 2 and "narrow.pt" in err and "size" in err and not (tmp_path / "emb.npz").exists()
