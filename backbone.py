"""The ESM-2 backbone as this project runs it: built (scratch, pretrained, or a checkpoint's architecture),
tuned (which layers train; LoRA / adapters), one layer's fused forward on a padded batch, and the size of a
backbone call. The packed layout's layer is in packing.py; model.Encoder runs them."""
from __future__ import annotations

import esm
import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from adapters import add_adapters, add_lora, first_adapted_layer, is_peft_parameter
from config import ConfigError
from packing import ATTENTION_BACKENDS, after_attention, before_attention, compute_dtype, rotary_table
from release import arch_problem
from weights import load_pretrained


def build_backbone(encoder_cfg, arch: dict | None = None) -> esm.model.esm2.ESM2:
    """The configured ESM-2 (see weights.py for the sources). With `arch` (from a checkpoint) only
    the architecture is built: the checkpoint holds the weights. An arch that is no ESM-2 architecture
    (release.arch_problem) is a ConfigError naming the field, before anything is built."""
    if arch is not None:
        problem = arch_problem(arch)
        if problem:
            raise ConfigError(f"the checkpoint's {problem}")
        return esm.model.esm2.ESM2(alphabet="ESM-1b", **arch)
    if encoder_cfg["scratch"] is not None:
        s = encoder_cfg["scratch"]  # sizes checked by config.resolve_config
        return esm.model.esm2.ESM2(num_layers=s["num_layers"], embed_dim=s["embed_dim"],
                                   attention_heads=s["attention_heads"], alphabet="ESM-1b")
    return load_pretrained(encoder_cfg)


def backbone_arch(backbone) -> dict:
    return {"num_layers": backbone.num_layers, "embed_dim": backbone.embed_dim,
            "attention_heads": backbone.attention_heads, "token_dropout": backbone.token_dropout}


def auto_chunk_tokens(device: torch.device, embed_dim: int, trained_layers: int) -> int:
    """encoder.chunk_tokens: auto, the tokens of one backbone call. On the CPU 16384. On CUDA what half of the
    GPU's free memory holds: each token keeps about 40 d bytes of bf16 activations per layer that trains (the
    layer norms' inputs, q, k, v, the attention output and the feed-forward's two 4 d hiddens, for the backward
    pass) and about 24 d bytes passing through; rounded down to 1024 tokens, between 8192 and 262144. An
    estimate: a budget that runs out of memory is set by hand (encoder.chunk_tokens: N)."""
    if device.type != "cuda":
        return 16384
    free, _ = torch.cuda.mem_get_info(device)
    per_token = embed_dim * (40 * max(trained_layers, 0) + 24)
    return max(8192, min(int(free * 0.5 / per_token) // 1024 * 1024, 262144))


# encoder.chunk_max_padding: auto, by device. On the CPU padding costs its full compute, so chunks stay
# tight; on a GPU every chunk costs kernel launches, and fewer, fuller chunks win: a 150M-size
# last_k step (bf16, H100) took 0.35 s at 0.1 against 0.10 s at 0.5 (8 anchors; 0.47 vs 0.27 s at 32).
AUTO_CHUNK_MAX_PADDING = {"cpu": 0.1, "cuda": 0.5}


def transformer_layer(layer, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """One fair-esm TransformerLayer (pre-LayerNorm, rotary self-attention, GELU feed-forward) on
    x [B, T, d], with PyTorch's fused scaled_dot_product_attention instead of fair-esm's explicit
    [B*H, T, T] attention matrix; keep [B, 1, 1, T] marks real tokens. Same weights, same result."""
    rot_emb = layer.self_attn.rot_emb
    cos = sin = None
    if rot_emb is not None:
        cos, sin = (t[:, None, :] for t in rotary_table(rot_emb, x.shape[1], x.device, compute_dtype(x)))  # [T, 1, dh]
    q, k, v = before_attention(layer, x, cos, sin)  # [B, T, H, dh]: the packed layout's per-token code
    with sdpa_kernel(ATTENTION_BACKENDS):  # here, not around the layer loop: activation checkpointing
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=keep,
                                           scale=1.0)  # recomputes outside that loop
    return after_attention(layer, x, o.transpose(1, 2))


def set_trainable(backbone, encoder_cfg) -> int:
    """Freeze the backbone by encoder.tune and add LoRA / adapters; returns the index of the first
    layer that trains (num_layers when none does): layers before it are frozen and cacheable.

    frozen: nothing trains. last_k: the last k = trainable_layers layers and the final layer norm.
    full: everything, token embeddings included. lora / adapter: only the LoRA matrices or the
    bottleneck adapters of the last k layers (k = 0: all layers); every pretrained weight stays frozen.
    """
    tune, k, n = encoder_cfg["tune"], encoder_cfg["trainable_layers"], backbone.num_layers
    if tune in ("lora", "adapter"):
        first = first_adapted_layer(n, k, tune)
        if tune == "lora":
            lora = encoder_cfg["lora"]
            add_lora(backbone, first, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"])
        else:
            add_adapters(backbone, first, encoder_cfg["adapter"]["dim"])
        for name, param in backbone.named_parameters():
            param.requires_grad = is_peft_parameter(name)
        return first
    first = {"frozen": n, "full": 0}.get(tune, n - min(max(k, 0), n))
    for name, param in backbone.named_parameters():
        if name.startswith("layers."):
            param.requires_grad = int(name.split(".")[1]) >= first
        elif name.startswith("emb_layer_norm_after"):
            param.requires_grad = first < n
        else:  # token embeddings
            param.requires_grad = tune == "full"
    return first
