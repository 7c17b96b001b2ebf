"""ESM-2 backbone (fair-esm) with MUTarget's heads: per-residue motif tracks and protein classes."""
from __future__ import annotations

import esm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel

from adapters import add_adapters, add_lora, first_adapted_layer, is_peft_parameter
from config import ConfigError
from vocab import NUM_CLASSES, PAD_IDX
from weights import WeightsError, load_pretrained  # noqa: F401  (WeightsError: re-exported)


def build_backbone(encoder_cfg, arch: dict | None = None) -> esm.model.esm2.ESM2:
    """The configured ESM-2 (see weights.py for the sources). With `arch` (from a checkpoint) only
    the architecture is built: the checkpoint holds the weights."""
    if arch is not None:
        return esm.model.esm2.ESM2(alphabet="ESM-1b", **arch)
    if encoder_cfg["scratch"] is not None:
        s = encoder_cfg["scratch"]  # sizes checked by utils.resolve_config
        return esm.model.esm2.ESM2(num_layers=s["num_layers"], embed_dim=s["embed_dim"],
                                   attention_heads=s["attention_heads"], alphabet="ESM-1b")
    return load_pretrained(encoder_cfg)


def load_model_state(model: nn.Module, state: dict, path) -> None:
    """model.load_state_dict(state) for a train.py checkpoint at `path`; a checkpoint made with
    another encoder set-up (tune, LoRA rank / targets, adapter size, layers) is a ConfigError naming
    the file and the keys to check, not a traceback."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        found = "; ".join(f"{what}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for what, names in
                          (("missing", missing), ("unexpected", unexpected), ("other shape", shapes)) if names)
        raise ConfigError(f"{path}: the checkpoint's weights do not fit this encoder configuration ({found}); "
                          f"check encoder.tune, encoder.trainable_layers, encoder.lora.*, encoder.adapter.dim and "
                          f"the supcon head keys against the checkpoint's stored config")
    model.load_state_dict(state)


def backbone_arch(backbone) -> dict:
    return {"num_layers": backbone.num_layers, "embed_dim": backbone.embed_dim,
            "attention_heads": backbone.attention_heads, "token_dropout": backbone.token_dropout}


def stitch_windows(window_repr: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-residue window outputs [W, T, d] (BOS at 0) -> per-protein [B, L, d], overlaps averaged."""
    W, T, d = window_repr.shape
    B, L = batch["residue_mask"].shape
    pos = torch.arange(T - 2, device=window_repr.device)
    real = pos[None, :] < batch["window_len"][:, None]  # [W, T-2]
    dest = batch["window_protein"][:, None] * L + batch["window_start"][:, None] + pos[None, :]
    dest = torch.where(real, dest, torch.full_like(dest, B * L))  # padding goes to a dump row
    values = window_repr[:, 1:T - 1].reshape(-1, d)
    total = window_repr.new_zeros(B * L + 1, d).index_add_(0, dest.reshape(-1), values)
    count = window_repr.new_zeros(B * L + 1).index_add_(0, dest.reshape(-1), real.reshape(-1).to(values.dtype))
    return (total[:-1] / count[:-1].clamp(min=1).unsqueeze(-1)).view(B, L, d)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, L, d] over positions where mask [B, L] is True -> [B, d]."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


class ParallelLinearDecoders(nn.Module):
    """One small per-residue head per class: [B, L, d] -> motif logits [B, C, L].

    Each head is Linear(d, h) - ReLU - Dropout - Linear(h, 1) (h = 0: a single Linear),
    evaluated for all classes at once with batched weights.
    """

    def __init__(self, input_dim: int, num_classes: int, hidden_dim: int = 64, dropout: float = 0.1):
        super().__init__()
        self.hidden_dim = hidden_dim
        if hidden_dim > 0:
            self.w1 = nn.Parameter(torch.empty(num_classes, input_dim, hidden_dim))
            self.b1 = nn.Parameter(torch.zeros(num_classes, hidden_dim))
            self.w2 = nn.Parameter(torch.empty(num_classes, hidden_dim))
            nn.init.uniform_(self.w1, -input_dim ** -0.5, input_dim ** -0.5)  # nn.Linear's default range
            nn.init.uniform_(self.w2, -hidden_dim ** -0.5, hidden_dim ** -0.5)
        else:
            self.w2 = nn.Parameter(torch.empty(num_classes, input_dim))
            nn.init.uniform_(self.w2, -input_dim ** -0.5, input_dim ** -0.5)
        self.b2 = nn.Parameter(torch.zeros(num_classes))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hidden_dim > 0:
            h = self.dropout(F.relu(torch.einsum("bld,cdh->bclh", x, self.w1) + self.b1[None, :, None, :]))
            return torch.einsum("bclh,ch->bcl", h, self.w2) + self.b2[None, :, None]
        return torch.einsum("bld,cd->bcl", x, self.w2) + self.b2[None, :, None]


class LayerNormNet(nn.Module):
    """CLEAN's projection head: [*, d] -> [*, out_dim].

    Linear(d, h) - LayerNorm - Dropout - ReLU - Linear(h, h) - LayerNorm - Dropout - ReLU - Linear(h, out).
    """

    def __init__(self, input_dim: int, hidden_dim: int = 512, out_dim: int = 128, drop_out: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.Dropout(drop_out), nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.Dropout(drop_out), nn.ReLU(),
            nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EmbeddingQueue(nn.Module):
    """A FIFO of the last `size` detached embeddings [size, d] with their multi-hot labels
    [size, C] (buffers: saved in checkpoints). contents() -> (embeddings, labels) filled so far."""

    def __init__(self, size: int, dim: int, num_classes: int):
        super().__init__()
        self.register_buffer("embeddings", torch.zeros(size, dim))
        self.register_buffer("labels", torch.zeros(size, num_classes))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))

    def contents(self):
        n = int(self.filled)
        return self.embeddings[:n], self.labels[:n]

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        size = len(self.embeddings)
        embeddings, labels = embeddings.detach()[-size:], labels.detach()[-size:]
        rows = (int(self.pointer) + torch.arange(len(embeddings), device=embeddings.device)) % size
        self.embeddings[rows] = embeddings.float()
        self.labels[rows] = labels.float()
        self.pointer.fill_((int(self.pointer) + len(embeddings)) % size)
        self.filled.fill_(min(size, int(self.filled) + len(embeddings)))


class Encoder(nn.Module):
    """ESM-2 over windows, stitched per protein, then MUTarget's heads.

    forward(batch, heads=True, contrastive=False) ->
      'pooled' [M, d] always;
      heads: 'motif_logits' [B, 8, L], 'class_logits' [B, 8] (the B anchors = the batch's first rows);
      contrastive: 'projection' [B, 1 + P + N, out_dim] (or [B, V, out_dim] for V views), rows
      gathered by batch['group_index']; with the cluster loss also 'clusters' [B, V, K] (softmax).
    SupCon warm start runs heads=False, contrastive=True: the heads are not run at all.
    Padding, BOS and EOS never enter pooling (residue_mask) or the heads' targets.
    """

    def __init__(self, config, arch: dict | None = None):
        super().__init__()
        enc, dec = config["encoder"], config["decoder"]
        self.backbone = build_backbone(enc, arch)
        self.backbone.lm_head = None  # not used: saves memory and checkpoint size
        self.backbone.contact_head = None
        self.first_trainable = set_trainable(self.backbone, enc)
        self.activation_checkpointing = enc["activation_checkpointing"]
        self.chunk_tokens, self.chunk_max_padding = enc["chunk_tokens"], enc["chunk_max_padding"]
        # what the backbone ran (throughput.py); prefix_*: what the frozen leading layers really computed
        # (fewer than tokens / attention when the frozen-layer cache serves windows)
        self.token_counts = {"tokens": 0, "padding": 0, "attention": 0, "prefix_tokens": 0, "prefix_attention": 0}
        self.fused_attention = enc["fused_attention"]
        self.cache = None  # cache.FrozenCache / DiskCache, attached by the trainer (encoder.cache_frozen / cache_dir)
        d = self.backbone.embed_dim
        self.decoders = ParallelLinearDecoders(d, NUM_CLASSES, dec["hidden_dim"], dec["dropout"])
        self.class_dropout = nn.Dropout(dec["class_dropout"])
        self.classifier = nn.Linear(d, NUM_CLASSES)
        sc = config.get("supcon") or {}
        self.projection = (LayerNormNet(d, sc["hidden_dim"], sc["out_dim"], sc["drop_out"])
                           if sc.get("apply") else None)
        self.cluster_head = (nn.Linear(sc["out_dim"], sc["n_clusters"])  # softmax cluster assignments
                             if sc.get("apply") and sc.get("loss") == "cluster" else None)
        self.queue = (EmbeddingQueue(sc["queue_size"], sc["out_dim"], NUM_CLASSES)  # past embeddings
                      if sc.get("apply") and sc.get("loss") in ("supcon", "mixed") and sc.get("queue_size") else None)

    def backbone_forward(self, tokens: torch.Tensor, window_len: torch.Tensor | None = None,
                         window_keys: list | None = None) -> torch.Tensor:
        """tokens [W, T] -> last-layer representations [W, T, d] (after the final layer norm).

        With window_len [W] and encoder.chunk_tokens > 0 the windows run longest first in chunks
        of at most chunk_tokens tokens and at most chunk_max_padding padding (auto: by device, see
        AUTO_CHUNK_MAX_PADDING), each chunk padded only to its own longest window: less padding and
        bounded memory, the same outputs at every real position (positions past a
        window's EOS hold arbitrary values, as padding does in a single call). With a frozen-layer
        cache and window_keys [(entry, start)] the frozen layers run once per window, ever.
        """
        if self.chunk_tokens <= 0 or window_len is None:
            return self._backbone(tokens, window_keys)
        max_padding = self.chunk_max_padding
        if max_padding == "auto":
            max_padding = AUTO_CHUNK_MAX_PADDING.get(tokens.device.type, 0.1)
        widths = (window_len + 2).tolist()
        order = sorted(range(len(widths)), key=lambda w: -widths[w])
        chunks, current = [], []
        for w in order:  # descending widths: the chunk's first window is its widest
            size, width = len(current) + 1, widths[current[0]] if current else 0
            padding = size * width - (sum(widths[v] for v in current) + widths[w])
            if current and (size * width > self.chunk_tokens or padding > max_padding * size * width):
                chunks.append(current)
                current = []
            current.append(w)
        chunks.append(current)
        if len(chunks) == 1 and widths[order[0]] == tokens.shape[1]:
            return self._backbone(tokens, window_keys)
        parts = [self._backbone(tokens[idx, :widths[idx[0]]], window_keys and [window_keys[w] for w in idx])
                 for idx in chunks]
        out = parts[0].new_zeros(tokens.shape[0], tokens.shape[1], parts[0].shape[-1])
        for idx, part in zip(chunks, parts):
            out[idx, :part.shape[1]] = part
        return out

    def _backbone(self, tokens: torch.Tensor, keys: list | None = None) -> torch.Tensor:
        """fair-esm's ESM2.forward without the LM head: tokens [W, T] -> [W, T, d]. The frozen
        leading layers run without autograd, or come from the frozen-layer cache."""
        keep = (tokens.ne(PAD_IDX))[:, None, None, :]  # attend to real tokens only
        self.token_counts["tokens"] += tokens.numel()  # what the backbone processes, padding included
        self.token_counts["padding"] += int(tokens.eq(PAD_IDX).sum())
        self.token_counts["attention"] += tokens.shape[0] * tokens.shape[1] ** 2  # (query, key) pairs per layer
        if self.cache is not None and keys is not None:
            x = self.cache.fetch(keys, tokens, self._frozen_prefix)
        else:
            x = self._frozen_prefix(tokens)
        x = self._layers(x, keep, self.first_trainable, self.backbone.num_layers)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.first_trainable < self.backbone.num_layers):
            return self.backbone.emb_layer_norm_after(x)

    def _frozen_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embedding (with fair-esm's token-dropout scaling) and the layers before
        first_trainable: tokens [W, T] -> [W, T, d]."""
        bb = self.backbone
        padding = tokens.eq(PAD_IDX)
        self.token_counts["prefix_tokens"] += tokens.numel()
        self.token_counts["prefix_attention"] += tokens.shape[0] * tokens.shape[1] ** 2
        with torch.set_grad_enabled(torch.is_grad_enabled() and bb.embed_tokens.weight.requires_grad):
            x = bb.embed_scale * bb.embed_tokens(tokens)
            if bb.token_dropout:  # fair-esm rescales by the training mask ratio even without masks
                is_mask = tokens.eq(bb.mask_idx)
                x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
                observed = is_mask.sum(-1).to(x.dtype) / (~padding).sum(-1)
                x = x * (1 - 0.15 * 0.8) / (1 - observed)[:, None, None]
            x = x * (~padding).unsqueeze(-1).to(x.dtype)
        return self._layers(x, (~padding)[:, None, None, :], 0, min(self.first_trainable, bb.num_layers))

    def _layers(self, x: torch.Tensor, keep: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Transformer layers start..stop-1 on x [W, T, d]; autograd only for trainable ones.
        encoder.fused_attention: false runs fair-esm's own layer code instead (explicit attention)."""
        keep = keep if not keep.all() else None
        padding = None if keep is None else ~keep[:, 0, 0, :]

        def layer(i, x):
            if self.fused_attention:
                return transformer_layer(self.backbone.layers[i], x, keep)
            return self.backbone.layers[i](x.transpose(0, 1), self_attn_padding_mask=padding)[0].transpose(0, 1)

        for i in range(start, stop):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= self.first_trainable):
                if self.activation_checkpointing and torch.is_grad_enabled():  # recompute in the backward pass
                    x = torch.utils.checkpoint.checkpoint(layer, i, x, use_reentrant=False)
                else:
                    x = layer(i, x)
        return x

    def embed(self, batch: dict) -> torch.Tensor:
        """Per-residue embeddings of each protein [B, L, d], windows stitched."""
        reps = self.backbone_forward(batch["tokens"], batch["window_len"], batch.get("window_keys"))
        return stitch_windows(reps, batch)

    def forward(self, batch: dict, heads: bool = True, contrastive: bool = False) -> dict:
        residues = self.embed(batch)
        pooled = masked_mean(residues, batch["residue_mask"])
        out = {"pooled": pooled}
        if heads:
            n_anchors = batch["labels"].shape[0]
            out["motif_logits"] = self.decoders(residues[:n_anchors])
            out["class_logits"] = self.classifier(self.class_dropout(pooled[:n_anchors]))
        if contrastive:
            out["projection"] = self.projection(pooled)[batch["group_index"]]
            if self.cluster_head is not None:
                out["clusters"] = torch.softmax(self.cluster_head(out["projection"]).float(), dim=-1)
        return out


# encoder.chunk_max_padding: auto, by device. On the CPU padding costs its full compute, so chunks stay
# tight; on a GPU every chunk costs kernel launches, and fewer, fuller chunks win: a 150M-size
# last_k step (bf16, H100) took 0.35 s at 0.1 against 0.10 s at 0.5 (8 anchors; 0.47 vs 0.27 s at 32).
AUTO_CHUNK_MAX_PADDING = {"cpu": 0.1, "cuda": 0.5}

# Fused attention kernels allowed. Not cuDNN's: PyTorch prefers it for bf16 / fp16 on recent GPUs,
# and it builds a plan for every new sequence length (150-350 ms each on an H100, measured), while
# protein batches seldom repeat a length: bf16 training of the demo ran 10x slower than fp32 with it.
ATTENTION_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def transformer_layer(layer, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """One fair-esm TransformerLayer (pre-LayerNorm, rotary self-attention, GELU feed-forward) on
    x [B, T, d], with PyTorch's fused scaled_dot_product_attention instead of fair-esm's explicit
    [B*H, T, T] attention matrix; keep [B, 1, 1, T] marks real tokens. Same weights, same result."""
    attn = layer.self_attn
    B, T, d = x.shape
    heads = attn.num_heads

    def split(t):  # [B, T, d] -> [B, H, T, d / H]
        return t.view(B, T, heads, d // heads).transpose(1, 2)

    h = layer.self_attn_layer_norm(x)
    q, k, v = split(attn.q_proj(h) * attn.scaling), split(attn.k_proj(h)), split(attn.v_proj(h))
    if attn.rot_emb is not None:
        q, k = attn.rot_emb(q, k)
    with sdpa_kernel(ATTENTION_BACKENDS):  # here, not around the layer loop: activation checkpointing
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=1.0)  # recomputes outside that loop
    x = x + attn.out_proj(o.transpose(1, 2).reshape(B, T, d))
    return x + layer.fc2(F.gelu(layer.fc1(layer.final_layer_norm(x))))


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
