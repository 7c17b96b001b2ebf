"""Packed sequences: the windows of a backbone call as one token stream without padding (the "THD" layout of
flash-attention's variable-length kernels and BioNeMo), attention restricted to each window.

A call's windows, longest first, are concatenated: tokens [N] (each window BOS, residues, EOS) with their
lengths (a host list; cumulative lengths on the device for the fused kernel). Every per-token operation
(layer norms, projections, feed-forward) runs on [N, d], with no padding at all; attention runs per window:
  - on CUDA in bf16 / fp16: PyTorch's fused variable-length kernel (torch.nn.attention.varlen.varlen_attn,
    flash-attention based, in PyTorch itself: no flash-attn wheel to match to torch and CUDA), one launch for
    the whole call;
  - otherwise (the CPU, fp32, older GPUs): scaled_dot_product_attention per group of adjacent windows (sorted by
    length), each padded to the group's longest for attention alone, with a key mask: exact. A group holds
    windows of one length, or at most encoder.chunk_max_padding of padding (auto: 0.1 on the CPU), since one
    call on a few padded windows is cheaper than a call per window; every other operation stays unpadded.
Rotary positions restart at every window's BOS; fair-esm's token-dropout rescaling is computed per window.
The results equal the padded layout's at every real token (tests: 1e-5 in fp32, gradients too).
"""
from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

UNRESOLVED = object()
varlen_attn = UNRESOLVED  # torch.nn.attention.varlen.varlen_attn (PyTorch >= 2.10), imported at its first use on
# CUDA (the import loads torch._dynamo: 1.4 s of every process's start-up on the CPU); None where PyTorch lacks it


def fused_kernel():
    """varlen_attn, or None where this PyTorch has none."""
    global varlen_attn
    if varlen_attn is UNRESOLVED:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:  # older PyTorch: the exact path everywhere
            varlen_attn = None
    return varlen_attn

log = logging.getLogger("mutarget")


# Fused attention kernels allowed. Not cuDNN's: PyTorch prefers it for bf16 / fp16 on recent GPUs, and it builds a
# plan for every new sequence length (150-350 ms each on an H100, measured), while protein batches seldom repeat a
# length: bf16 training of the demo ran 10x slower than fp32 with it.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class Stream:
    """One backbone call's windows as a token stream: tokens [N] (device), lengths (host, BOS and EOS included,
    non-increasing), positions [N] (each token's position in its window, 0 at BOS; device), cu [W + 1]
    (int32 cumulative lengths; device), groups (host: (first token, lengths of the windows) of each run of
    adjacent windows that the exact attention path pads to their longest: equal lengths, or at most
    max_padding of padding)."""

    tokens: torch.Tensor
    lengths: list
    positions: torch.Tensor
    cu: torch.Tensor
    groups: list
    rotary: tuple | None = None  # cos, signed sin [N, 1, dh]: computed by the first layer, shared by the others
    padded_groups: list | None = None  # per group: gather / take indices and key mask (exact path), built once

    @property
    def max_len(self) -> int:
        return max(self.lengths, default=0)


def make_stream(tokens: torch.Tensor, lengths: list, max_padding: float = 0.0) -> Stream:
    """Stream of windows `tokens` [N] whose lengths (host list, non-increasing) sum to N. Everything is
    computed on the host from `lengths` and copied without waiting: no synchronisation with the device.
    max_padding: the share of padding the exact attention path may add to a group of windows (0: groups of
    equal length only)."""
    groups, start = [], 0
    for length in lengths:
        if groups:
            first, members = groups[-1]
            size = len(members) + 1  # members[0] is the group's longest window
            if size * members[0] - (sum(members) + length) <= max_padding * size * members[0]:
                members.append(length)
                start += length
                continue
        groups.append((start, [length]))
        start += length
    positions = torch.cat([torch.arange(length) for length in lengths]) if lengths else torch.zeros(0, dtype=torch.long)
    cu = torch.tensor([0] + list(_cumsum(lengths)), dtype=torch.int32)
    device = tokens.device
    if device.type == "cuda":  # pinned: the copies below return at once, behind the GPU's queued work
        positions, cu = positions.pin_memory(), cu.pin_memory()
    return Stream(tokens, list(lengths), positions.to(device, non_blocking=True), cu.to(device, non_blocking=True),
                  groups)


def _cumsum(values):
    total = 0
    for v in values:
        total += v
        yield total


def embed(backbone, stream: Stream) -> torch.Tensor:
    """Token embeddings [N, d] with fair-esm's token-dropout rescaling, computed per window: scaled by
    (1 - 0.15 * 0.8) / (1 - the window's share of <mask> tokens)."""
    x = backbone.embed_scale * backbone.embed_tokens(stream.tokens)
    if backbone.token_dropout:
        is_mask = stream.tokens.eq(backbone.mask_idx)
        x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
        lengths = stream.cu[1:] - stream.cu[:-1]  # on the device already: no wait for a copy
        window = torch.repeat_interleave(torch.arange(len(stream.lengths), device=x.device), lengths,
                                         output_size=stream.tokens.shape[0])
        masked = torch.zeros(len(stream.lengths), device=x.device, dtype=x.dtype).index_add_(
            0, window, is_mask.to(x.dtype))
        observed = masked / lengths.to(x.dtype)
        x = x * token_dropout_scale(observed)[window][:, None]
    return x


def token_dropout_scale(mask_share: torch.Tensor) -> torch.Tensor:
    """fair-esm's token-dropout rescaling of embeddings, by each window's share of <mask> tokens: ESM-2 was trained
    with 15% of tokens masked and 80% of those replaced by <mask>, so scale by (1 - 0.12) / (1 - share)."""
    return (1 - 0.15 * 0.8) / (1 - mask_share)


def rotary_table(rot_emb, length: int, device, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, signed sin [length, dh] of fair-esm's rotary embedding at positions 0 .. length - 1 (its own formula;
    the sine's first half negated, see rotate), in `dtype` (default: the frequencies', fp32)."""
    t = torch.arange(length, device=device, dtype=rot_emb.inv_freq.dtype)
    freqs = torch.einsum("i,j->ij", t, rot_emb.inv_freq)
    table = torch.cat((freqs, freqs), dim=-1)
    sin = table.sin()
    sin[:, :freqs.shape[1]].neg_()
    return table.cos().to(dtype), sin.to(dtype)


def rotary_tables(rot_emb, stream: Stream, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, signed sin [N, 1, dh] of fair-esm's rotary embedding at each token's position within its window (the
    values fair-esm computes for a padded row: positions restart at every window's BOS), in `dtype`."""
    cos, sin = rotary_table(rot_emb, stream.max_len, stream.tokens.device, dtype)
    return cos[stream.positions][:, None, :], sin[stream.positions][:, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """fair-esm's rotary embedding x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1) for the halves
    x1, x2 of the last dimension: the halves swapped by one flip of a [2, dh / 2] view, times the sine whose first
    half is negated (rotary_table), so no negation or concatenation per call."""
    swapped = x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2)
    return x * cos + swapped * signed_sin


def compute_dtype(x: torch.Tensor):
    """The dtype the layers' matrix products give for input x: autocast's where it is on, else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


def fused_varlen_available(q: torch.Tensor) -> bool:
    """Whether attention of this call, q [N, H, dh], can use the fused variable-length kernel."""
    return fused_varlen_supported(q.device, q.dtype, q.shape[-1])


def warn_if_unfused(model, device: torch.device, dtype, log) -> None:
    """encoder.packed on a GPU where the fused kernel cannot run (fused_varlen_supported): one logged warning."""
    head_dim = model.backbone.embed_dim // model.backbone.attention_heads
    if model.packed and device.type == "cuda" and not fused_varlen_supported(device, dtype, head_dim):
        log.warning("encoder.packed: the fused variable-length attention kernel does not run here (it needs compute "
                    "capability 8.0+, train.amp bf16 / fp16 and a head size that is a multiple of 8): attention runs "
                    "once per group of windows, usually slower than encoder.packed: false on a GPU")


def fused_varlen_supported(device: torch.device, dtype, head_dim: int = 64) -> bool:
    """Whether the fused variable-length kernel (flash attention) runs here: CUDA on a GPU of compute capability
    8.0 or later (Ampere, Hopper, ...), half precision, a head size that is a multiple of 8 up to 256 (every
    ESM-2: 16 to 128), and no earlier call of it failed in this process (see attention)."""
    return (device.type == "cuda" and not FUSED_FAILED and dtype in (torch.float16, torch.bfloat16)
            and head_dim % 8 == 0 and head_dim <= 256 and torch.cuda.get_device_capability(device) >= (8, 0)
            and fused_kernel() is not None)


FUSED_FAILED = False  # set by the first fused call that raises: the exact path from then on, one line logged


@functools.lru_cache(maxsize=None)
def varlen_keywords(fn) -> frozenset:
    """The parameter names `fn` (a varlen_attn) accepts, read once from its signature: PyTorch 2.10's takes
    (..., max_k, is_causal=False, return_aux=None), 2.11's adds keyword-only scale and window_size, 2.12's
    num_splits (and enable_gqa, seqused_k, block_table)."""
    try:
        return frozenset(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a readable signature: the arguments every version takes
        return frozenset()


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stream: Stream) -> torch.Tensor:
    """varlen_attn over the stream's windows with the arguments this PyTorch's varlen_attn accepts: scale 1 where it
    takes `scale` (else q is multiplied by sqrt(dh) to cancel its default 1 / sqrt(dh)), and without autograd one
    split of the keys where it takes `num_splits` (a window's result then does not depend on the longest window of
    the call, so a protein predicts the same whatever its batch-mates)."""
    kernel = fused_kernel()
    accepted, extra = varlen_keywords(kernel), {}
    if "scale" in accepted:
        extra["scale"] = 1.0
    else:
        q = q * q.shape[-1] ** 0.5
    if "num_splits" in accepted and not torch.is_grad_enabled():
        extra["num_splits"] = 1
    return kernel(q, k, v, stream.cu, stream.cu, stream.max_len, stream.max_len, **extra)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stream: Stream) -> torch.Tensor:
    """Softmax attention within each window (scale 1: the query is scaled already): q, k, v [N, H, dh] -> [N, H, dh].
    The fused kernel where it runs; if it raises (a PyTorch whose kernel refuses these inputs), one line is logged
    and this process uses the exact path from then on."""
    global FUSED_FAILED
    if q.is_cuda and torch.is_autocast_enabled("cuda"):  # the fused kernel takes one half-precision dtype
        dtype = torch.get_autocast_dtype("cuda")
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if fused_varlen_available(q):
        try:
            return fused_attention(q, k, v, stream)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as err:
            FUSED_FAILED = True
            log.warning("fused variable-length attention failed (%s: %s); using the exact attention path from now "
                        "on (correct, usually slower on a GPU)", type(err).__name__, str(err).splitlines()[0][:200])
    return exact_attention(q, k, v, stream)


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stream: Stream) -> torch.Tensor:
    """attention() without the fused kernel: scaled_dot_product_attention per group of adjacent windows, each
    padded to the group's longest for attention alone, with a key mask."""
    if stream.padded_groups is None:
        stream.padded_groups = [_padded_group(members, q.device) for _, members in stream.groups]
    sizes = [sum(members) for _, members in stream.groups]
    parts = []  # split once (its backward is one concatenation), not sliced per group (a full-size gradient each)
    for members, (gather, take, keep), *qkv in zip((m for _, m in stream.groups), stream.padded_groups,
                                                   q.split(sizes), k.split(sizes), v.split(sizes)):
        count, width = len(members), members[0]

        def heads_first(t):  # [count, H, width, dh]: the group's windows, each padded to the longest
            t = t if gather is None else t.index_select(0, gather)
            return t.view(count, width, *t.shape[1:]).transpose(1, 2)
        with sdpa_kernel(ATTENTION_BACKENDS):
            o = F.scaled_dot_product_attention(*map(heads_first, qkv), attn_mask=keep, scale=1.0)
        o = o.transpose(1, 2).reshape(count * width, *q.shape[1:])
        parts.append(o if take is None else o.index_select(0, take))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _padded_group(members: list, device: torch.device):
    """Indices of a group of windows (lengths `members`, longest first) padded to the longest: gather
    [count * width] rows of the group's tokens (padding repeats the window's BOS: masked as a key, dropped as a
    query), take [sum(members)] the real rows back in order, keep [count, 1, 1, width] the real keys. None, None,
    None for windows of equal length (a plain view, no mask)."""
    width = members[0]
    if all(m == width for m in members):
        return None, None, None
    offsets = torch.tensor([0] + list(_cumsum(members[:-1])))[:, None]
    columns = torch.arange(width)[None, :]
    real = columns < torch.tensor(members)[:, None]  # [count, width]
    gather = torch.where(real, offsets + columns, offsets).reshape(-1)
    take = real.reshape(-1).nonzero().squeeze(1)
    return gather.to(device), take.to(device), real[:, None, None, :].to(device)


def before_attention(layer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """The per-token part of a layer before attention: pre-LayerNorm, q (scaled), k, v, rotary. x [..., d]
    (a stream [N, d] or a padded batch [B, T, d]) -> [..., H, dh] each; cos, signed sin (rotary_table) in the
    compute dtype, broadcast against them ([N, 1, dh] per token, [T, 1, dh] per position)."""
    attn = layer.self_attn
    heads_shape = (*x.shape[:-1], attn.num_heads, x.shape[-1] // attn.num_heads)
    q, k, v = (t.view(heads_shape) for t in qkv_projection(attn, layer.self_attn_layer_norm(x)))
    if attn.rot_emb is not None:
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    return q, k, v


def qkv_projection(attn, h: torch.Tensor):
    """q (times attn.scaling), k, v [..., d] of the normalised input h [..., d]: one matrix product with the three
    projections' weights stacked (the query's rows scaled), so h is read, and cast under autocast, once; a LoRA
    projection's low-rank update is added to its part. Other kinds of projection run one by one."""
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    if not all(type(p) is torch.nn.Linear or hasattr(p, "low_rank_update") for p in projections):
        return attn.q_proj(h) * attn.scaling, attn.k_proj(h), attn.v_proj(h)
    scales = (attn.scaling, 1.0, 1.0)
    weight = torch.cat([p.weight * s if s != 1.0 else p.weight for p, s in zip(projections, scales)])
    bias = None if attn.q_proj.bias is None else torch.cat(
        [p.bias * s if s != 1.0 else p.bias for p, s in zip(projections, scales)])
    parts = F.linear(h, weight, bias).chunk(3, dim=-1)
    return tuple(part if not hasattr(p, "low_rank_update") else part + p.low_rank_update(h) * s
                 for part, p, s in zip(parts, projections, scales))


def after_attention(layer, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """The per-token part of a layer after attention: output projection, residual, GELU feed-forward. x [..., d],
    o [..., H, dh]."""
    x = x + layer.self_attn.out_proj(o.reshape(x.shape))
    return x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))


def transformer_layer(layer, x: torch.Tensor, stream: Stream, parts=(before_attention, after_attention)) -> torch.Tensor:
    """One fair-esm TransformerLayer (pre-LayerNorm, rotary self-attention, GELU feed-forward) on the packed
    stream x [N, d]: the same weights and arithmetic as backbone.transformer_layer on a padded batch. `parts`:
    the per-token functions before and after attention (compiled ones with train.compile)."""
    before, after = parts
    if layer.self_attn.rot_emb is None:
        cos = sin = None
    else:  # every layer's rotary embedding has the same frequencies: one table per stream, in the compute dtype
        dtype = compute_dtype(x)
        if stream.rotary is None or stream.rotary[0].dtype != dtype:
            stream.rotary = rotary_tables(layer.self_attn.rot_emb, stream, dtype)
        cos, sin = stream.rotary
    q, k, v = before(layer, x, cos, sin)
    return after(layer, x, attention(q, k, v, stream))
