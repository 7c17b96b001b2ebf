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


def pool_stream(stream: torch.Tensor, batch: dict) -> torch.Tensor:
    """Each protein's mean residue representation [M, d] straight from the backbone's per-token outputs
    stream [N, d] (the order of batch['packed_tokens']), overlaps averaged, without a per-protein [M, L, d]:
    every residue token adds its output times batch['packed_share'] (1 / the windows holding the residue; 0 at
    BOS / EOS) to its protein's row (batch['packed_protein']), each row then divided by the protein's length.
    Accumulated in fp32 at least."""
    dtype = torch.promote_types(stream.dtype, torch.float32)
    weighted = stream.to(dtype) * batch["packed_share"].to(dtype)[:, None]
    total = weighted.new_zeros(batch["lengths"].shape[0], stream.shape[-1])
    total = total.index_add_(0, batch["packed_protein"], weighted)
    return (total / batch["lengths"].clamp(min=1).to(dtype)[:, None]).to(stream.dtype)


def stitch_anchors(stream: torch.Tensor, batch: dict) -> torch.Tensor:
    """The anchors' (the batch's first B proteins) residue representations, flat: [R, d], R = the sum of the
    anchors' lengths, anchor after anchor, no padding; overlapping windows averaged. Only the anchors' residue
    tokens (batch['anchor_tokens']) are read, each weighted by its packed_share and added to its row
    (batch['anchor_slot'])."""
    dtype = torch.promote_types(stream.dtype, torch.float32)
    tokens = batch["anchor_tokens"]
    picked = stream.index_select(0, tokens).to(dtype) * batch["packed_share"].index_select(0, tokens).to(dtype)[:, None]
    residues = picked.new_zeros(batch["anchor_rows"].shape[0], stream.shape[-1])
    return residues.index_add_(0, batch["anchor_slot"], picked).to(stream.dtype)


def anchor_tracks(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-residue values of the anchors, flat [C, R] (stitch_anchors' rows) -> [B, C, L] (L: the batch's
    longest protein, as targets), 0 past each anchor's length."""
    B, L = batch["labels"].shape[0], batch["residue_mask"].shape[1]
    tracks = values.new_zeros(values.shape[0], B * L).index_copy_(1, batch["anchor_rows"], values)
    return tracks.view(-1, B, L).transpose(0, 1)


def padding_mask(tokens: torch.Tensor, widths: list) -> torch.Tensor | None:
    """keep [W, 1, 1, T]: the real tokens of a padded batch whose windows hold `widths` tokens (host list); None
    when no window is padded (decided on the host: no wait for the device)."""
    return None if all(w == tokens.shape[1] for w in widths) else tokens.ne(PAD_IDX)[:, None, None, :]


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

        self.host = None  # (filled, pointer) as host integers: read from the buffers once, then kept in step
        self._register_load_state_dict_pre_hook(lambda *args, **kwargs: setattr(self, "host", None))

    def counters(self) -> tuple[int, int]:
        """(filled, pointer) without a wait for the device (after the first read since building or loading)."""
        if self.host is None:
            self.host = int(self.filled), int(self.pointer)
        return self.host

    def contents(self):
        n, _ = self.counters()
        return self.embeddings[:n], self.labels[:n]

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        size = len(self.embeddings)
        embeddings, labels = embeddings.detach()[-size:], labels.detach()[-size:]
        filled, pointer = self.counters()
        rows = (pointer + torch.arange(len(embeddings), device=embeddings.device)) % size
        self.embeddings[rows] = embeddings.float()
        self.labels[rows] = labels.float()
        self.host = min(size, filled + len(embeddings)), (pointer + len(embeddings)) % size
        self.filled.fill_(self.host[0])
        self.pointer.fill_(self.host[1])


class Encoder(nn.Module):
    """ESM-2 over windows, stitched per protein, then MUTarget's heads.

    forward(batch, heads=True, contrastive=False) ->
      'pooled' [M, d] always;
      heads: 'motif_logits' [B, 8, L] (0 past each anchor's length), 'class_logits' [B, 8] (the B anchors =
      the batch's first rows);
      contrastive: 'projection' [B, 1 + P + N, out_dim] (or [B, V, out_dim] for V views), rows
      gathered by batch['group_index']; with the cluster loss also 'clusters' [B, V, K] (softmax);
      project: 'pooled_projection' [M, out_dim], the projection head on every protein.
    SupCon warm start runs heads=False, contrastive=True: the heads are not run at all.
    Padding, BOS and EOS never enter pooling (packed_share) or the heads (anchor_tokens).
    """

    def __init__(self, config, arch: dict | None = None):
        super().__init__()
        enc, dec = config["encoder"], config["decoder"]
        self.backbone = build_backbone(enc, arch)
        self.backbone.lm_head = None  # not used: saves memory and checkpoint size
        self.backbone.contact_head = None
        self.first_trainable = set_trainable(self.backbone, enc)
        # leading trainable layers that recompute their activations in the backward pass (train.checkpointing: all;
        # auto: memory.Planner sets it per step)
        trained = self.backbone.num_layers - min(self.first_trainable, self.backbone.num_layers)
        self.checkpointed_layers = trained if config["train"]["checkpointing"] == "all" else 0
        self.chunk_tokens, self.chunk_max_padding = enc["chunk_tokens"], enc["chunk_max_padding"]
        # what the backbone ran (throughput.py): real tokens (BOS and EOS included), padded_tokens (what the
        # layers processed, padding included), (query, key) pairs within windows; prefix_*: what the frozen
        # leading layers really computed (less when the frozen-layer cache serves windows)
        # recomputed_layer_*: layer forwards run again (activation checkpointing, gradient caching), per layer
        self.token_counts = {"tokens": 0, "padded_tokens": 0, "attention": 0, "prefix_tokens": 0,
                             "prefix_attention": 0, "recomputed_layer_tokens": 0, "recomputed_layer_attention": 0}
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
                         window_keys: list | None = None, packed: bool | None = None,
                         split: bool | None = None) -> torch.Tensor:
        """tokens [W, T] (BOS, residues, EOS, padding) -> last-layer representations [W, T, d] (after the final
        layer norm; positions past a window's EOS hold arbitrary values). widths: each window's token count
        (host list; read from the tokens, one wait for the device, when not given).

        Packed (encoder.packed): the windows run as one stream without padding (packed_forward). Padded: the
        windows run longest first in chunks of at most encoder.chunk_tokens tokens and at most
        encoder.chunk_max_padding padding (auto: by device, see AUTO_CHUNK_MAX_PADDING), each chunk padded
        only to its own longest window. With a frozen-layer cache and window_keys [(entry, start)] the frozen
        layers run once per window, ever. packed: True / False overrides the model's layout (prediction picks
        its own). split: padded, run the windows in chunks as above (default: when widths are given; else in one
        call, as given).
        """
        packed = self.packed if packed is None else packed
        chunked = widths is not None if split is None else split
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
        keep = padding_mask(tokens, widths)
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
        return self._layers(x, padding_mask(tokens, widths), 0, min(self.first_trainable, bb.num_layers))

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

    def _layers(self, x: torch.Tensor, keep: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
        """Transformer layers start..stop-1 on x [W, T, d]; autograd only for trainable ones.
        encoder.fused_attention: false runs fair-esm's own layer code instead (explicit attention)."""
        padding = None if keep is None else ~keep[:, 0, 0, :]

        def layer(i, x):
            if self.fused_attention:
                return self.backbone.layers[i].padded_forward(x, keep)
            return self.backbone.layers[i](x.transpose(0, 1), self_attn_padding_mask=padding)[0].transpose(0, 1)

        for i in range(start, stop):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= self.first_trainable):
                if self.checkpointed(i, x.shape[0] * x.shape[1], x.shape[0] * x.shape[1] ** 2):
                    x = torch.utils.checkpoint.checkpoint(layer, i, x, use_reentrant=False)
                else:
                    x = layer(i, x)
        return x

    def checkpointed(self, i: int, tokens: int, pairs: int) -> bool:
        """Whether layer i recomputes its activations in the backward pass (one of the first checkpointed_layers
        trainable layers, with autograd on); if so its recomputation (tokens, (query, key) pairs) is counted."""
        if not (torch.is_grad_enabled() and i < self.first_trainable + self.checkpointed_layers):
            return False
        self.token_counts["recomputed_layer_tokens"] += tokens
        self.token_counts["recomputed_layer_attention"] += pairs
        return True

    # ------------------------------------------------------------------ packed
    def packed_forward(self, tokens: torch.Tensor, widths: list, keys: list | None = None,
                       budget: int | None = None) -> torch.Tensor:
        """The windows of a packed stream, tokens [N] (each window BOS .. EOS, widths: host list, longest
        first) -> last-layer representations [N, d]: in calls of at most `budget` tokens (default the
        token_budget; 0: one call), filled greedily, each with no padding at all (packing.py)."""
        budget = self.token_budget(tokens.device) if budget is None else budget
        parts, start = [], 0
        for idx in self.packed_calls(widths, budget):
            n = sum(widths[w] for w in idx)
            parts.append(self.packed_call(tokens[start:start + n], [widths[w] for w in idx],
                                          keys and [keys[w] for w in idx]))
            start += n
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def packed_calls(widths: list, budget: int) -> list[list[int]]:
        """The windows (indices into widths, in order) of each backbone call of at most `budget` tokens (0: one
        call), filled greedily."""
        calls, current, size = [], [], 0
        for w, width in enumerate(widths):
            if current and budget and size + width > budget:
                calls.append(current)
                current, size = [], 0
            current.append(w)
            size += width
        calls.append(current)
        return calls

    def packed_call(self, tokens: torch.Tensor, widths: list, keys: list | None) -> torch.Tensor:
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
        pairs = sum(n * n for n in stream.lengths)
        for i in range(start, stop):
            layer = self.backbone.layers[i]
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= self.first_trainable):
                if self.checkpointed(i, x.shape[0], pairs):
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
        """The backbone's last-layer outputs of the batch's windows as one stream [N, d], in the order of
        batch['packed_tokens'] (windows longest first, each BOS, residues, EOS), in either layout (padded: the
        windows' real tokens gathered by batch['stream_index']). Pooling and stitching read it
        (pool_stream, stitch_anchors): no per-protein [M, L, d] tensor is ever built."""
        if self.packed:
            return self.packed_forward(batch["packed_tokens"], batch["window_widths"], batch.get("window_keys"))
        reps = self.backbone_forward(batch["tokens"], batch["window_widths"], batch.get("window_keys"))
        width = batch["window_widths"][0]  # the collated tokens' width (a caller may have padded them wider)
        return reps[:, :width].reshape(-1, reps.shape[-1]).index_select(0, batch["stream_index"])

    def forward(self, batch: dict, heads: bool = True, contrastive: bool = False, project: bool = False,
                stream: torch.Tensor | None = None) -> dict:
        """stream: the backbone's outputs [N, d] (embed's) when computed already (gradient caching, memory.py)."""
        stream = self.embed(batch) if stream is None else stream
        pooled = pool_stream(stream, batch)
        out = {"pooled": pooled}
        if project:  # every protein's projection (evaluation: the embedding space of centroid prediction)
            out["pooled_projection"] = self.projection(pooled)
        if heads:  # per-residue representations of the anchors only, flat: the decoders see no padding
            n_anchors = batch["labels"].shape[0]
            motif = self.decoders(stitch_anchors(stream, batch)[None])[0]  # [8, R]
            out["motif_logits"] = anchor_tracks(motif, batch)  # [B, 8, L], 0 past each anchor's length
            out["class_logits"] = self.classifier(self.class_dropout(pooled[:n_anchors]))
        if contrastive:
            out["projection"] = self.projection(pooled)[batch["group_index"]]
            if self.cluster_head is not None:
                out["clusters"] = torch.softmax(self.cluster_head(out["projection"]).float(), dim=-1)
        return out


