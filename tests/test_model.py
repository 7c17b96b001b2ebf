"""Backbone loading, tuning modes, window stitching and heads of model.py; config validation."""
from argparse import Namespace

import esm
import helpers
import pytest
import torch
from helpers import batch_of, make_config

import model
import vocab
from config import ConfigError


@pytest.mark.parametrize("fused", [True, False])
def test_backbone_forward_equals_fair_esm(fused):
    torch.manual_seed(0)
    m = model.Encoder(make_config(fused_attention=fused)).eval()
    reference = esm.model.esm2.ESM2(2, 32, 4, alphabet="ESM-1b").eval()
    reference.load_state_dict(m.backbone.state_dict(), strict=False)  # lm/contact heads dropped in ours
    tokens = batch_of([5, 18, 11], max_len=30)["tokens"]
    real = tokens.ne(vocab.PAD_IDX)
    with torch.no_grad():
        ours = m.backbone_forward(tokens)
        theirs = reference(tokens, repr_layers=[2])["representations"][2]
    assert torch.allclose(ours[real], theirs[real], atol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_fused_attention_never_takes_cudnn(monkeypatch, packed):
    """cuDNN's attention builds a plan per new sequence length (150-350 ms each on an H100, measured
    with bf16): the backbone's attention must run with that backend switched off, while leaving the
    process-wide setting as it found it."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch.backends.cuda.cudnn_sdp_enabled())
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    m = model.Encoder(make_config(packed=packed)).eval()
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with torch.no_grad():
        m.backbone_forward(batch_of([5, 18, 11], max_len=30)["tokens"])
    assert seen == [False] * (6 if packed else 2)  # both layers (packed: each window's length on its own)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_stitching_long_protein_equals_average_of_window_outputs():
    torch.manual_seed(0)
    m = model.Encoder(make_config()).eval()
    batch = batch_of([47, 9], max_len=20, overlap=6)
    with torch.no_grad():
        windows = m.backbone_forward(batch["tokens"]).numpy()
        stitched = model.stitch_anchors(m.embed(batch), batch).numpy()  # [47 + 9, d]: the anchors' residues, flat
        motif = m(batch)["motif_logits"]
    w0 = (batch["window_protein"] == 0).nonzero().flatten().tolist()
    starts = batch["window_start"][w0].tolist()
    expected = helpers.stitch_average(windows[w0, 1:21], starts, 47)  # residues without BOS/EOS
    assert abs(stitched[:47] - expected).max() < 1e-5
    w1 = (batch["window_protein"] == 1).nonzero().flatten().item()
    assert stitched.shape[0] == 56 and abs(stitched[47:] - windows[w1, 1:10]).max() < 1e-6
    assert motif.shape == (2, 8, 47) and (motif[1, :, 9:] == 0).all()


def test_padding_never_changes_outputs():
    """A protein's outputs are the same alone or batched with a longer one (mask works)."""
    torch.manual_seed(0)
    m = model.Encoder(make_config()).eval()
    both = batch_of([12, 19], max_len=64)
    alone = batch_of([12], max_len=64)
    with torch.no_grad():
        a, b = m(both), m(alone)
    assert torch.allclose(a["class_logits"][0], b["class_logits"][0], atol=1e-5)
    assert torch.allclose(a["motif_logits"][0, :, :12], b["motif_logits"][0], atol=1e-5)
    assert a["motif_logits"].shape == (2, 8, 19) and a["class_logits"].shape == (2, 8)


@pytest.mark.parametrize("tune,k,trainable_layers,norm,embed", [
    ("frozen", 2, [], False, False), ("last_k", 1, [1], True, False), ("last_k", 2, [0, 1], True, False),
    ("full", 2, [0, 1], True, True)])
def test_tuning_modes(tune, k, trainable_layers, norm, embed):
    torch.manual_seed(0)
    m = model.Encoder(make_config(tune=tune, trainable_layers=k))
    bb = m.backbone
    assert [i for i, layer in enumerate(bb.layers) if all(p.requires_grad for p in layer.parameters())] == trainable_layers
    assert all(p.requires_grad == norm for p in bb.emb_layer_norm_after.parameters())
    assert bb.embed_tokens.weight.requires_grad == embed
    out = m(batch_of([10, 14]))
    (out["class_logits"].sum() + out["motif_logits"].sum()).backward()
    for name, p in m.named_parameters():  # gradients reach exactly the trainable parameters
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, name


@pytest.mark.parametrize("packed", [False, True])
def test_load_fair_esm_format_checkpoint(tmp_path, packed):
    torch.manual_seed(0)
    source = esm.model.esm2.ESM2(2, 32, 4, alphabet="ESM-1b")
    state = {"encoder." + k: v for k, v in source.state_dict().items() if not k.startswith("contact_head.regression")}
    cfg = Namespace(encoder_layers=2, encoder_embed_dim=32, encoder_attention_heads=4, token_dropout=True)
    path = tmp_path / "esm2_tiny.pt"
    torch.save({"cfg": {"model": cfg}, "model": state}, path)
    m = model.Encoder(make_config(scratch=None, checkpoint=str(path), packed=packed)).eval()
    tokens = batch_of([8, 15])["tokens"]
    real = tokens.ne(vocab.PAD_IDX)  # padding positions hold arbitrary values (packed: none are computed)
    with torch.no_grad():
        assert torch.allclose(m.backbone_forward(tokens)[real],
                              source.eval()(tokens, repr_layers=[2])["representations"][2][real], atol=1e-6)


def test_missing_weight_files_fail_with_both_remedies(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    with pytest.raises(model.WeightsError) as err:
        model.Encoder(make_config(scratch=None, model_name="esm2_t33_650M_UR50D"))
    msg = str(err.value)
    assert str(tmp_path / "hub" / "hub" / "checkpoints" / "esm2_t33_650M_UR50D.pt") in msg
    assert "encoder.checkpoint" in msg and "TORCH_HOME" in msg
    with pytest.raises(model.WeightsError, match=r"not found: .*missing\.pt"):
        model.Encoder(make_config(scratch=None, checkpoint=str(tmp_path / "missing.pt")))


def test_parallel_decoders_equal_separate_heads():
    torch.manual_seed(0)
    heads = model.ParallelLinearDecoders(16, 8, hidden_dim=5, dropout=0.0)
    x = torch.randn(3, 7, 16)
    out = heads(x)
    for c in range(8):
        h = torch.relu(x @ heads.w1[c] + heads.b1[c])
        assert torch.allclose(out[:, c], h @ heads.w2[c] + heads.b2[c], atol=1e-5)


def test_chunked_backbone_equals_single_call():
    """Windows run longest-first in token-budget chunks give the same outputs and gradients."""
    torch.manual_seed(0)
    m = model.Encoder(make_config(packed=False)).eval()  # the padded layout; no dropout; gradients still flow
    batch = batch_of([20, 150, 33, 90, 61, 7], max_len=64, overlap=16)
    results = []
    for budget in (120, 0):  # 120 tokens: several chunks of different widths; 0: one call
        m.chunk_tokens = budget
        m.zero_grad()
        out = m(batch)
        (out["class_logits"].square().sum() + out["motif_logits"].sum()).backward()
        results.append((out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    assert torch.allclose(a["motif_logits"], b["motif_logits"], atol=1e-5)
    assert torch.allclose(a["class_logits"], b["class_logits"], atol=1e-5)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert torch.allclose(ga[name], gb[name], atol=1e-5), name


def test_chunk_max_padding_auto_is_the_cpu_value_on_the_cpu(monkeypatch):
    """encoder.chunk_max_padding: auto chunks as 0.1 on the CPU; a looser bound gives fewer chunks;
    the key takes a number or auto, nothing else."""
    batch = batch_of([20, 150, 33, 90, 61, 7, 44, 120], max_len=64, overlap=16)
    calls = {}
    for value in ("auto", 0.1, 0.5):
        m = model.Encoder(make_config(chunk_tokens=4096, chunk_max_padding=value, packed=False)).eval()
        count = []
        real = m._backbone
        monkeypatch.setattr(m, "_backbone", lambda tokens, widths, keys=None, real=real: count.append(1) or real(
            tokens, widths, keys))
        with torch.no_grad():
            m.embed(batch)
        calls[value] = len(count)
    assert calls["auto"] == calls[0.1] > calls[0.5] >= 1
    assert make_config(chunk_max_padding=1).encoder.chunk_max_padding == 1.0
    with pytest.raises(ConfigError, match="chunk_max_padding"):
        make_config(chunk_max_padding="fast")


