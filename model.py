"""MUTarget's model: the ESM-2 backbone run over windows (padded or packed, with the frozen-layer cache),
stitched per protein, then the heads: per-residue motif tracks and protein classes (and SupCon's projection)."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

import packing
from backbone import AUTO_CHUNK_MAX_PADDING, auto_chunk_tokens, build_backbone, set_trainable, transformer_layer
from config import ConfigError
from vocab import NUM_CLASSES, PAD_IDX
from weights import WeightsError  # noqa: F401  (re-exported: model.WeightsError)


def load_model_state(model: nn.Module, state: dict, path) -> None:
    """model.load_state_dict(state) for a train.py checkpoint at `path`, checked by check_model_state."""
    check_model_state(model, state, path)
    model.load_state_dict(state)


def check_model_state(model: nn.Module, state: dict, path) -> None:
    """A checkpoint made with another encoder set-up (tune, LoRA rank / targets, adapter size, layers) than
    `model`'s is a ConfigError naming the file and the keys to check, not a traceback. Sharded models compare
    their parameters' whole shapes."""
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


def stitch_packed(stream_repr: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-token stream outputs [N, d] -> per-protein [M, L, d], overlaps averaged (batch['packed_dest'] sends
    each residue's output to its protein row, BOS / EOS to a dump row)."""
    M, L = batch["residue_mask"].shape
    d = stream_repr.shape[-1]
    dest = batch["packed_dest"]
    total = stream_repr.new_zeros(M * L + 1, d).index_add_(0, dest, stream_repr)
    count = stream_repr.new_zeros(M * L + 1).index_add_(0, dest, stream_repr.new_ones(dest.shape[0]))
    return (total[:-1] / count[:-1].clamp(min=1).unsqueeze(-1)).view(M, L, d)


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
      gathered by batch['group_index']; with the cluster loss also 'clusters' [B, V, K] (softmax);
      project: 'pooled_projection' [M, out_dim], the projection head on every protein.
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
        # what the backbone ran (throughput.py): real tokens (BOS and EOS included), padded_tokens (what the
        # layers processed, padding included), (query, key) pairs within windows; prefix_*: what the frozen
        # leading layers really computed (less when the frozen-layer cache serves windows)
        self.token_counts = {"tokens": 0, "padded_tokens": 0, "attention": 0, "prefix_tokens": 0,
                             "prefix_attention": 0}
        self.fused_attention = enc["fused_attention"]
        self.pack = enc["packed"]  # the packed layout when attention is fused (see the packed property)
        for layer in self.backbone.layers:  # each layer's fused forwards, as methods of the layer (FSDP hooks them)
            layer.packed_forward = functools.partial(packing.transformer_layer, layer)
            layer.padded_forward = functools.partial(transformer_layer, layer)
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

    @property
    def packed(self) -> bool:
        """Whether the backbone runs packed streams (encoder.packed): with fused attention only, since fair-esm's
        own layer code (encoder.fused_attention: false) needs padded batches."""
        return self.pack and self.fused_attention

    def backbone_forward(self, tokens: torch.Tensor, widths: list | None = None,
                         window_keys: list | None = None, packed: bool | None = None) -> torch.Tensor:
        """tokens [W, T] (BOS, residues, EOS, padding) -> last-layer representations [W, T, d] (after the final
        layer norm; positions past a window's EOS hold arbitrary values). widths: each window's token count
        (host list; read from the tokens, one wait for the device, when not given).

        Packed (encoder.packed): the windows run as one stream without padding (packed_forward). Padded: the
        windows run longest first in chunks of at most encoder.chunk_tokens tokens and at most
        encoder.chunk_max_padding padding (auto: by device, see AUTO_CHUNK_MAX_PADDING), each chunk padded
        only to its own longest window. With a frozen-layer cache and window_keys [(entry, start)] the frozen
        layers run once per window, ever. packed: True / False overrides the model's layout (prediction picks
        its own).
        """
        packed = self.packed if packed is None else packed
        chunked = widths is not None  # padded: batches without their widths run in one call, as given
        if widths is None:
            widths = tokens.ne(PAD_IDX).sum(1).tolist()
        order = sorted(range(len(widths)), key=lambda w: -widths[w])  # longest first
        keys = window_keys and [window_keys[w] for w in order]
        if packed:
            flat = torch.cat([tokens[w, :widths[w]] for w in order])
            reps = self.packed_forward(flat, [widths[w] for w in order], keys)
            out = reps.new_zeros(tokens.shape[0], tokens.shape[1], reps.shape[-1])
            start = 0
            for w in order:
                out[w, :widths[w]] = reps[start:start + widths[w]]
                start += widths[w]
            return out
        budget = self.token_budget(tokens.device)
        if not chunked or not budget:
            return self._backbone(tokens, widths, window_keys)
        max_padding = self.max_padding(tokens.device)
        chunks, current = [], []
        for w in order:  # descending widths: the chunk's first window is its widest
            size, width = len(current) + 1, widths[current[0]] if current else 0
            padding = size * width - (sum(widths[v] for v in current) + widths[w])
            if current and (size * width > budget or padding > max_padding * size * width):
                chunks.append(current)
                current = []
            current.append(w)
        chunks.append(current)
        if len(chunks) == 1 and widths[order[0]] == tokens.shape[1]:
            return self._backbone(tokens, widths, window_keys)
        parts = [self._backbone(tokens[idx, :widths[idx[0]]], [widths[w] for w in idx],
                                window_keys and [window_keys[w] for w in idx]) for idx in chunks]
        out = parts[0].new_zeros(tokens.shape[0], tokens.shape[1], parts[0].shape[-1])
        for idx, part in zip(chunks, parts):
            out[idx, :part.shape[1]] = part
        return out

    def max_padding(self, device: torch.device) -> float:
        """encoder.chunk_max_padding (auto: by device, see AUTO_CHUNK_MAX_PADDING): the share of padding a
        padded chunk, or a group of windows in the packed layout's exact attention, may hold."""
        if self.chunk_max_padding == "auto":
            return AUTO_CHUNK_MAX_PADDING.get(device.type, 0.1)
        return self.chunk_max_padding

    def token_budget(self, device: torch.device) -> int:
        """Tokens per backbone call (encoder.chunk_tokens; auto: by device and model, see auto_chunk_tokens);
        0: no limit."""
        if self.chunk_tokens == "auto":
            self.chunk_tokens = auto_chunk_tokens(device, self.backbone.embed_dim,
                                                  self.backbone.num_layers - self.first_trainable)
        return self.chunk_tokens

    def _backbone(self, tokens: torch.Tensor, widths: list, keys: list | None = None) -> torch.Tensor:
        """fair-esm's ESM2.forward without the LM head, padded: tokens [W, T] -> [W, T, d]. The frozen
        leading layers run without autograd, or come from the frozen-layer cache."""
        keep = (tokens.ne(PAD_IDX))[:, None, None, :]  # attend to real tokens only
        self.count(widths, padded=tokens.numel())
        if self.cache is not None and keys is not None:
            windows = [tokens[w, :width] for w, width in enumerate(widths)]
            x = tokens.new_zeros(*tokens.shape, self.backbone.embed_dim, dtype=torch.float32)
            for w, values in enumerate(self.cache.fetch(keys, windows, self._padded_prefix)):
                x[w, :widths[w]] = values
        else:
            x = self._frozen_prefix(tokens, widths)
        x = self._layers(x, keep, self.first_trainable, self.backbone.num_layers)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.first_trainable < self.backbone.num_layers):
            return self.backbone.emb_layer_norm_after(x)

    def _padded_prefix(self, windows: list) -> list:
        """The frozen prefix of windows (token tensors, longest first) run padded -> [width, d] each."""
        widths = [len(w) for w in windows]
        tokens = torch.full((len(windows), widths[0]), PAD_IDX, dtype=torch.long, device=windows[0].device)
        for w, window in enumerate(windows):
            tokens[w, :widths[w]] = window
        x = self._frozen_prefix(tokens, widths)
        return [x[w, :width] for w, width in enumerate(widths)]

    def _frozen_prefix(self, tokens: torch.Tensor, widths: list) -> torch.Tensor:
        """Token embedding (with fair-esm's token-dropout scaling) and the layers before
        first_trainable: tokens [W, T] -> [W, T, d]."""
        bb = self.backbone
        padding = tokens.eq(PAD_IDX)
        self.count(widths, prefix=True)
        with torch.set_grad_enabled(torch.is_grad_enabled() and bb.embed_tokens.weight.requires_grad):
            x = bb.embed_scale * bb.embed_tokens(tokens)
            if bb.token_dropout:  # fair-esm rescales by the training mask ratio even without masks
                is_mask = tokens.eq(bb.mask_idx)
                x = x.masked_fill(is_mask.unsqueeze(-1), 0.0)
                observed = is_mask.sum(-1).to(x.dtype) / (~padding).sum(-1)
                x = x * (1 - 0.15 * 0.8) / (1 - observed)[:, None, None]
            x = x * (~padding).unsqueeze(-1).to(x.dtype)
        return self._layers(x, (~padding)[:, None, None, :], 0, min(self.first_trainable, bb.num_layers))

    def count(self, widths: list, padded: int | None = None, prefix: bool = False) -> None:
        """Add a call's work to token_counts (host arithmetic only: no wait for the device)."""
        tokens, pairs = sum(widths), sum(w * w for w in widths)
        if prefix:
            self.token_counts["prefix_tokens"] += tokens
            self.token_counts["prefix_attention"] += pairs
            return
        self.token_counts["tokens"] += tokens
        self.token_counts["padded_tokens"] += tokens if padded is None else padded
        self.token_counts["attention"] += pairs

    def _layers(self, x: torch.Tensor, keep: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Transformer layers start..stop-1 on x [W, T, d]; autograd only for trainable ones.
        encoder.fused_attention: false runs fair-esm's own layer code instead (explicit attention)."""
        keep = keep if not keep.all() else None
        padding = None if keep is None else ~keep[:, 0, 0, :]

        def layer(i, x):
            if self.fused_attention:
                return self.backbone.layers[i].padded_forward(x, keep)
            return self.backbone.layers[i](x.transpose(0, 1), self_attn_padding_mask=padding)[0].transpose(0, 1)

        for i in range(start, stop):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= self.first_trainable):
                if self.activation_checkpointing and torch.is_grad_enabled():  # recompute in the backward pass
                    x = torch.utils.checkpoint.checkpoint(layer, i, x, use_reentrant=False)
                else:
                    x = layer(i, x)
        return x

    # ------------------------------------------------------------------ packed
    def packed_forward(self, tokens: torch.Tensor, widths: list, keys: list | None = None,
                       budget: int | None = None) -> torch.Tensor:
        """The windows of a packed stream, tokens [N] (each window BOS .. EOS, widths: host list, longest
        first) -> last-layer representations [N, d]: in calls of at most `budget` tokens (default the
        token_budget; 0: one call), filled greedily, each with no padding at all (packing.py)."""
        budget = self.token_budget(tokens.device) if budget is None else budget
        calls, current, size = [], [], 0
        for w, width in enumerate(widths):
            if current and budget and size + width > budget:
                calls.append(current)
                current, size = [], 0
            current.append(w)
            size += width
        calls.append(current)
        parts, start = [], 0
        for idx in calls:
            n = sum(widths[w] for w in idx)
            parts.append(self._packed_call(tokens[start:start + n], [widths[w] for w in idx],
                                           keys and [keys[w] for w in idx]))
            start += n
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _packed_call(self, tokens: torch.Tensor, widths: list, keys: list | None) -> torch.Tensor:
        """One backbone call on a stream: tokens [N] -> [N, d]; frozen leading layers without autograd or
        from the cache."""
        self.count(widths)
        stream = packing.make_stream(tokens, widths, self.max_padding(tokens.device))
        if self.cache is not None and keys is not None:
            windows = list(torch.split(tokens, widths))
            x = torch.cat(self.cache.fetch(keys, windows, self._stream_prefix))
        else:
            x = self._packed_prefix(stream)
        x = self._packed_layers(x, stream, self.first_trainable, self.backbone.num_layers)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.first_trainable < self.backbone.num_layers):
            return self.backbone.emb_layer_norm_after(x)

    def _stream_prefix(self, windows: list) -> list:
        """The frozen prefix of windows (token tensors) run as one stream -> [width, d] each."""
        widths = [len(w) for w in windows]
        stream = packing.make_stream(torch.cat(windows), widths, self.max_padding(windows[0].device))
        return list(torch.split(self._packed_prefix(stream), widths))

    def _packed_prefix(self, stream: packing.Stream) -> torch.Tensor:
        """Token embeddings and the frozen leading layers of a stream -> [N, d]."""
        bb = self.backbone
        self.count(stream.lengths, prefix=True)
        with torch.set_grad_enabled(torch.is_grad_enabled() and bb.embed_tokens.weight.requires_grad):
            x = packing.embed(bb, stream)
        return self._packed_layers(x, stream, 0, min(self.first_trainable, bb.num_layers))

    def _packed_layers(self, x: torch.Tensor, stream: packing.Stream, start: int, stop: int) -> torch.Tensor:
        """Transformer layers start..stop-1 on the stream x [N, d]; autograd only for trainable ones."""
        for i in range(start, stop):
            layer = self.backbone.layers[i]
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= self.first_trainable):
                if self.activation_checkpointing and torch.is_grad_enabled():  # recompute in the backward pass
                    x = torch.utils.checkpoint.checkpoint(layer.packed_forward, x, stream, use_reentrant=False)
                else:
                    x = layer.packed_forward(x, stream)
        return x

    def compile_layers(self, backend: str = "inductor") -> None:
        """train.compile: each layer's per-token work before and after attention through torch.compile
        (dynamic shapes: one graph per layer and grad mode serves every token count); attention itself stays
        eager (the fused variable-length kernel, or exact grouped calls on the CPU); the residue decoders and the
        projection head too. A `backend` other than inductor only for tests (aot_eager: the same captured graphs
        without code generation)."""
        import torch._dynamo
        layers = self.backbone.layers
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(layers))
        before = torch.compile(packing.before_attention, dynamic=True, backend=backend)
        after = torch.compile(packing.after_attention, dynamic=True, backend=backend)
        for layer in layers:
            layer.packed_forward = functools.partial(packing.transformer_layer, layer, parts=(before, after))
        for head in (self.decoders, self.projection):  # in place: parameter names (checkpoints) stay the same
            if head is not None:
                head.compile(dynamic=True, backend=backend)

    def embed(self, batch: dict) -> torch.Tensor:
        """Per-residue embeddings of each protein [B, L, d], windows stitched."""
        if self.packed:
            reps = self.packed_forward(batch["packed_tokens"], batch["window_widths"], batch.get("window_keys"))
            return stitch_packed(reps, batch)
        reps = self.backbone_forward(batch["tokens"], batch["window_widths"], batch.get("window_keys"))
        return stitch_windows(reps, batch)

    def forward(self, batch: dict, heads: bool = True, contrastive: bool = False, project: bool = False) -> dict:
        residues = self.embed(batch)
        pooled = masked_mean(residues, batch["residue_mask"])
        out = {"pooled": pooled}
        if project:  # every protein's projection (evaluation: the embedding space of centroid prediction)
            out["pooled_projection"] = self.projection(pooled)
        if heads:
            n_anchors = batch["labels"].shape[0]
            out["motif_logits"] = self.decoders(residues[:n_anchors])
            out["class_logits"] = self.classifier(self.class_dropout(pooled[:n_anchors]))
        if contrastive:
            out["projection"] = self.projection(pooled)[batch["group_index"]]
            if self.cluster_head is not None:
                out["clusters"] = torch.softmax(self.cluster_head(out["projection"]).float(), dim=-1)
        return out


