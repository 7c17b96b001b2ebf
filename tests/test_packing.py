"""Packed sequences (packing.py, Encoder's packed layout): outputs and gradients equal the padded layout's (fp32,
CPU) for windows of 1 to 1022 residues, with token dropout, the frozen-layer cache and LoRA; token budgets;
compiled layers equal eager ones; refusals of impossible settings."""
import numpy as np
import pytest
import torch

import backbone
import batching
import cache
import data
import model
import packing
import vocab
from config import ConfigError, resolve_config

LENGTHS = [1, 1022, 5, 300, 2100, 37, 37, 37, 1022]  # one window of every kind; 2100: three overlapping windows


def encoder(packed, seed=0, **encoder_keys):
    torch.manual_seed(seed)
    tree = {"encoder": {"scratch": {"num_layers": 2, "embed_dim": 32, "attention_heads": 4}, "tune": "full",
                        "packed": packed, **encoder_keys},
            "decoder": {"dropout": 0.0, "class_dropout": 0.0}}
    return model.Encoder(resolve_config(tree))


def batch(lengths=LENGTHS, seed=1):
    rng = np.random.default_rng(seed)
    proteins = [data.make_protein(f"P{i}", "".join(rng.choice(list(vocab.STANDARD_RESIDUES), size=n)), "", "t")
                for i, n in enumerate(lengths)]
    dataset = data.LocalizationDataset(proteins)
    return batching.Collate()([dataset[i] for i in range(len(dataset))])


def outputs_and_grads(m, b):
    m.zero_grad()
    out = m(b)
    (out["class_logits"].square().sum() + out["motif_logits"].sum() + out["pooled"].sum()).backward()
    return out, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def assert_close(a, b, tol=1e-5):
    (out_a, grads_a), (out_b, grads_b) = a, b
    for key in ("pooled", "class_logits", "motif_logits"):
        assert (out_a[key] - out_b[key]).abs().max() <= tol, key
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name in grads_a:
        scale = grads_b[name].abs().max().clamp(min=1)
        assert (grads_a[name] - grads_b[name]).abs().max() <= tol * scale, name


@pytest.mark.parametrize("tune,max_padding", [("full", "auto"), ("lora", "auto"), ("full", 1.0)])
def test_packed_equals_padded_outputs_and_gradients(tune, max_padding):
    """Windows of 1 and 1022 residues, a long protein stitched from three, equal-length windows side by side;
    every parameter's gradient; LoRA adapters too; the exact attention's groups of windows padded for attention
    alone (max_padding 1.0: all windows in one group, keys masked)."""
    b = batch()
    keys = {"tune": tune, "trainable_layers": 0, "lora": {"dropout": 0.0}} if tune == "lora" else {}
    keys["chunk_max_padding"] = max_padding
    padded, packed = encoder(False, **keys), encoder(True, **keys)
    assert packed.packed and not padded.packed
    if tune == "lora":  # B starts at zero: move it, so the adapters change the outputs
        for m in (padded, packed):
            torch.manual_seed(5)
            for name, p in m.named_parameters():
                if "lora_B" in name:
                    p.data.normal_()
    assert_close(outputs_and_grads(packed, b), outputs_and_grads(padded, b))


def test_token_dropout_rescaling_is_per_window():
    """<mask> tokens: fair-esm rescales each row by its own share of masks; the stream does it per window."""
    m = encoder(True).eval()
    assert m.backbone.token_dropout
    tokens = batch([30, 12, 64])["tokens"]
    tokens[0, 3:9] = vocab.MASK_IDX  # 6 of 32 tokens in the first window, 1 of 14 in the second, none in the third
    tokens[1, 5] = vocab.MASK_IDX
    real = tokens.ne(vocab.PAD_IDX)
    with torch.no_grad():
        packed, padded = m.backbone_forward(tokens, packed=True), m.backbone_forward(tokens, packed=False)
    assert (packed[real] - padded[real]).abs().max() <= 1e-5
    assert (packed[~real] == 0).all()  # no padding was computed


def test_stream_layout_hand_worked():
    s = packing.make_stream(torch.arange(10), [4, 4, 2])
    assert s.groups == [(0, [4, 4]), (8, [2])] and s.max_len == 4
    assert s.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1] and s.cu.tolist() == [0, 4, 8, 10]
    # padding allowed: windows 4, 4, 3 padded to 4 are 12 slots, 1 of them padding (1/12 <= 0.2); adding the
    # window of 1 would make 16 slots, 4 of them padding (1/4 > 0.2)
    s = packing.make_stream(torch.arange(12), [4, 4, 3, 1], max_padding=0.2)
    assert s.groups == [(0, [4, 4, 3]), (11, [1])]
    gather, take, keep = packing._padded_group([4, 4, 3], torch.device("cpu"))
    assert gather.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 8]  # the padding slot repeats the window's BOS
    assert take.tolist() == list(range(11)) and keep[:, 0, 0].tolist() == [[True] * 4, [True] * 4, [True] * 3 + [False]]
    b = batch([3, 7])
    assert b["window_widths"] == [9, 5]  # longest first
    assert b["packed_tokens"].tolist() == torch.cat([b["tokens"][0, :9], b["tokens"][1, :5]]).tolist()
    # rows are protein * 7 + residue (7: the longest protein); BOS and EOS go to the dump row 2 * 7 = 14
    assert b["packed_dest"].tolist() == [14, 7, 8, 9, 10, 11, 12, 13, 14, 14, 0, 1, 2, 14]


def test_frozen_layer_cache_on_the_stream(tmp_path):
    b = batch([50, 1022, 9, 300])
    plain = encoder(True, tune="last_k", trainable_layers=1)
    cached = encoder(True, tune="last_k", trainable_layers=1)
    windows = {key: width for key, width in zip(b["window_keys"], b["window_widths"])}
    cached.cache = cache.FrozenCache(windows, 32, "float32")
    expected = outputs_and_grads(plain, b)
    for attempt in range(2):  # fills, then reads only
        cached.token_counts.update(dict.fromkeys(cached.token_counts, 0))
        assert_close(outputs_and_grads(cached, b), expected)
        assert cached.token_counts["prefix_tokens"] == (sum(b["window_widths"]) if attempt == 0 else 0)
    assert cached.cache.hits == len(windows)


def test_token_budget_splits_calls_without_changing_results():
    b = batch()
    m = encoder(True).eval()
    calls = []
    real_call = m.packed_call
    m.packed_call = lambda tokens, widths, keys: calls.append(sum(widths)) or real_call(tokens, widths, keys)
    with torch.no_grad():
        whole = m.packed_forward(b["packed_tokens"], b["window_widths"], budget=0)
        split = m.packed_forward(b["packed_tokens"], b["window_widths"], budget=1100)
    assert calls[0] == sum(b["window_widths"]) and len(calls) > 3 and max(calls[1:]) <= 1100
    assert (whole - split).abs().max() <= 1e-5


def test_counts_are_real_tokens_and_pairs():
    """Throughput counts the real tokens (BOS and EOS included) and the (query, key) pairs within windows; the
    padded layout also counts what its padding cost."""
    b = batch([3, 7, 40])
    for packed in (True, False):
        m = encoder(packed, chunk_max_padding=1.0).eval()  # padded: one call, padded to its longest window
        with torch.no_grad():
            m(b)
        widths = b["window_widths"]
        assert m.token_counts["tokens"] == sum(widths) and m.token_counts["attention"] == sum(w * w for w in widths)
        assert m.token_counts["padded_tokens"] == (sum(widths) if packed else len(widths) * max(widths))


def test_settings_that_cannot_work_are_refused():
    base = {"encoder": {"scratch": {}}}
    with pytest.raises(ConfigError, match=r"encoder.chunk_tokens \(500\) is smaller than a window .*1024 tokens"):
        resolve_config(base, ["encoder.chunk_tokens=500"])
    assert resolve_config(base, ["encoder.chunk_tokens=500", "data.max_len=200", "data.overlap=50"])
    assert resolve_config(base)["encoder"]["chunk_tokens"] == "auto" and resolve_config(base)["encoder"]["packed"]
    assert backbone.auto_chunk_tokens(torch.device("cpu"), 1280, 33) == 16384
    unfused = encoder(True, fused_attention=False)
    assert not unfused.packed  # fair-esm's own layer code: padded


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_layers_equal_eager(backend):
    """train.compile: the per-token parts of each layer through torch.compile; outputs and gradients equal the
    eager ones, with a bounded number of graphs for any token count. aot_eager captures the same graphs (forward
    and backward) without generating code; inductor (the real backend: a C++ compiler on the CPU, about a minute
    cold) runs with `pytest -m slow` and in scripts/gpu_check.sh."""
    import runtime
    if backend == "inductor":
        try:
            runtime.check_compiler(torch.device("cpu"))
        except ConfigError as err:
            pytest.skip(f"no compiler on this platform: {err}")
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    b = batch([40, 300, 9, 9])
    eager, compiled = encoder(True), encoder(True)
    compiled.compile_layers(backend)
    assert_close(outputs_and_grads(compiled, b), outputs_and_grads(eager, b), tol=1e-4)
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 4 * 2 * len(compiled.backbone.layers)
    outputs_and_grads(compiled, batch([41, 120, 13]))  # other token and residue counts: no new graph
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run by scripts/gpu_check.sh)")
@pytest.mark.parametrize("dtype,tol", [(None, 1e-4), (torch.bfloat16, 5e-2)])
def test_cuda_packed_equals_padded(dtype, tol):
    """On a GPU: in bf16 the packed layout's attention is the fused variable-length kernel (when this PyTorch has
    it and the GPU runs it: Ampere or later), in fp32 the exact grouped path; both agree with the padded layout at
    every real token. The test model's head size (embed_dim / heads) is one the fused kernel takes, so the bf16
    comparison did run it."""
    device = torch.device("cuda")
    m = encoder(True).to(device).eval()
    head_dim = m.backbone.embed_dim // m.backbone.attention_heads
    tokens = batch()["tokens"].to(device)
    real = tokens.ne(vocab.PAD_IDX)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
        packed, padded = m.backbone_forward(tokens, packed=True), m.backbone_forward(tokens, packed=False)
    assert (packed[real].float() - padded[real].float()).abs().max() <= tol
    if dtype is not None and packing.fused_kernel() is not None and torch.cuda.get_device_capability(device) >= (8, 0):
        assert packing.fused_varlen_supported(device, dtype, head_dim)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run by scripts/gpu_check.sh)")
def test_cuda_packed_prediction_does_not_depend_on_batch_mates():
    """Without autograd the fused kernel runs the keys in one split, so its result for a window does not depend on
    the call's longest window: a window's bf16 outputs alone and beside a 1022-token window agree within bf16
    rounding (rtol = atol = 2e-2, on values of order 1). Not bit for bit: the matrix products over the call's
    other token count may use another cuBLAS kernel, which rounds differently."""
    device = torch.device("cuda")
    m = encoder(True).to(device).eval()
    head_dim = m.backbone.embed_dim // m.backbone.attention_heads
    if not packing.fused_varlen_supported(device, torch.bfloat16, head_dim):
        pytest.skip("the fused variable-length kernel does not run on this GPU")
    rng = np.random.default_rng(3)
    long, short = ("".join(rng.choice(list(vocab.STANDARD_RESIDUES), size=n)) for n in (1022, 300))

    def collate(seqs):
        dataset = data.LocalizationDataset([data.make_protein(f"P{i}", s, "", "t") for i, s in enumerate(seqs)])
        return batching.Collate()([dataset[i] for i in range(len(dataset))])
    alone, together = collate([short]), collate([long, short])
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        a = m.backbone_forward(alone["tokens"].to(device), alone["window_widths"])
        b = m.backbone_forward(together["tokens"].to(device), together["window_widths"])
    torch.testing.assert_close(a[0, :302].float(), b[1, :302].float(), rtol=2e-2, atol=2e-2)


# ---------------------------------------------------------------- the fused kernel's call, on the CPU
def reference_varlen(q, k, v, cu, scale):
    """Attention within each window written out (scores, softmax, weighted sum): q, k, v [N, H, dh]."""
    out, cu = torch.empty_like(q), cu.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        scores = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * scale
        out[a:b] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[a:b])
    return out


CALLS = []


def varlen_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """PyTorch 2.10's signature: no scale (always 1 / sqrt(dh)), no num_splits."""
    CALLS.append({"cu": cu_seq_q, "q": query, "max": (max_q, max_k)})
    return reference_varlen(query, key, value, cu_seq_q, query.shape[-1] ** -0.5)


def varlen_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1)):
    """PyTorch 2.11's signature: keyword-only scale and window_size, no num_splits."""
    CALLS.append({"cu": cu_seq_q, "q": query, "max": (max_q, max_k), "scale": scale})
    return reference_varlen(query, key, value, cu_seq_q, query.shape[-1] ** -0.5 if scale is None else scale)


def varlen_2_13(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """PyTorch 2.12 / 2.13's signature: num_splits too."""
    CALLS.append({"cu": cu_seq_q, "q": query, "max": (max_q, max_k), "scale": scale, "num_splits": num_splits})
    return reference_varlen(query, key, value, cu_seq_q, query.shape[-1] ** -0.5 if scale is None else scale)


@pytest.mark.parametrize("standin", [varlen_2_10, varlen_2_11, varlen_2_13])
def test_fused_branch_with_each_signature_equals_the_exact_path(standin, monkeypatch):
    """packing.attention's fused branch, driven on the CPU through stand-ins with each PyTorch's exact varlen_attn
    signature that compute attention exactly: outputs and gradients equal the exact path's to 1e-5 (fp32); only
    keywords the signature has are passed; cu is int32 on q's device, the max lengths are the stream's."""
    b = batch()
    exact = outputs_and_grads(encoder(True), b)
    monkeypatch.setattr(packing, "varlen_attn", standin)
    monkeypatch.setattr(packing, "fused_varlen_available", lambda q: True)
    CALLS.clear()
    fused = outputs_and_grads(encoder(True), b)
    assert_close(fused, exact)
    assert CALLS and all(c["cu"].dtype == torch.int32 and c["cu"].device == c["q"].device for c in CALLS)
    assert all(c["max"][0] == c["max"][1] == max(np.diff(c["cu"].tolist())) for c in CALLS)
    assert all(c.get("scale", 1.0) == 1.0 for c in CALLS)
    assert all(c.get("num_splits") is None for c in CALLS)  # with autograd: the kernel's own split heuristic
    CALLS.clear()
    with torch.no_grad():
        m = encoder(True).eval()
        m.backbone_forward(b["tokens"], b["window_widths"])
    assert CALLS and all(c.get("num_splits", 1) == 1 for c in CALLS)
    assert ("num_splits" in CALLS[0]) == (standin is varlen_2_13)


def test_a_failing_fused_kernel_falls_back_to_the_exact_path_with_one_line(monkeypatch, caplog):
    """A varlen_attn that raises (as 2.11's did for num_splits): one warning, the exact path's result, and the
    fused kernel is not tried again in this process."""
    b = batch([40, 7, 300])
    with torch.no_grad():
        expected = encoder(True).eval().backbone_forward(b["tokens"], b["window_widths"])
    tries = []

    def broken(*args, **kwargs):
        tries.append(1)
        raise TypeError("varlen_attn() got an unexpected keyword argument 'num_splits'")
    monkeypatch.setattr(packing, "varlen_attn", broken)
    monkeypatch.setattr(packing, "FUSED_FAILED", False)
    monkeypatch.setattr(packing, "fused_varlen_available", lambda q: not packing.FUSED_FAILED)
    with torch.no_grad(), caplog.at_level("WARNING", logger="mutarget"):
        got = encoder(True).eval().backbone_forward(b["tokens"], b["window_widths"])
    real = b["tokens"].ne(vocab.PAD_IDX)
    assert (got[real] - expected[real]).abs().max() <= 1e-6
    assert len(tries) == 1 and packing.FUSED_FAILED
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "num_splits" in caplog.records[0].getMessage() and "exact attention path" in caplog.records[0].getMessage()


def test_rotate_equals_fair_esm_rotary():
    """packing.rotate with the signed-sine table equals fair-esm's own apply_rotary_pos_emb (cos, sin, rotate_half)."""
    from esm.rotary_embedding import apply_rotary_pos_emb, RotaryEmbedding
    rot = RotaryEmbedding(16)
    x = torch.randn(3, 11, 16)
    cos_ref, sin_ref = rot._update_cos_sin_tables(x, seq_dimension=1)
    cos, sin = packing.rotary_table(rot, 11, x.device)
    assert torch.allclose(packing.rotate(x, cos, sin), apply_rotary_pos_emb(x, cos_ref, sin_ref), atol=1e-6)
