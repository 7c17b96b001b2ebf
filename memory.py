"""Training memory: what a step's activations cost, how many layers to checkpoint so that a step fits the GPU
(train.checkpointing: auto), and gradient caching for a step that does not fit even with every layer checkpointed
(train.gradient_cache).

Activations. Each token keeps, in each layer that trains, about d * (8 + 17 c) bytes for the backward pass (c: bytes
of the compute dtype): the fp32 residual stream twice (the two layer norms' inputs) and 17 d values in the compute
dtype (the layer norms' outputs, q, k, v, the attention output, the feed-forward's two 4 d hiddens). That is 42 d in
bf16 (1.75 MB a token at 650M over 33 layers, as measured on an H100) and 76 d in fp32; tests check it against the
tensors autograd really saves. A checkpointed layer keeps only its fp32 input (4 d) and recomputes the rest in the
backward pass, one layer at a time.

The planner: with B bytes free for activations (the GPU's free memory at the first step, less the gradients and
AdamW state still to come, less a margin), a step of T tokens over n trainable layers peaks at
T * (extra + k * checkpointed + max(n - k, 1) * full) bytes with k > 0 layers checkpointed (extra: the stream's
output, its gradient and the heads' inputs; the backward pass recomputes a checkpointed layer after the later
layers' activations are freed); the fewest k that fits is used, the leading trainable layers.

Gradient caching, when no k fits: (1) every backbone call of the step without autograd (their RNG states kept),
its outputs [N, d] as one leaf tensor; (2) the heads and losses (supervised and contrastive) on that leaf, backward:
the heads' gradients and the gradient with respect to every backbone output; (3) each call again with autograd
(the same RNG), back-propagating its part of that gradient. The step's gradients equal the plain step's; its
calls hold one call's activations at a time.
"""
from __future__ import annotations

import logging
import math

import torch

FULL_COMPUTE_VALUES = 17  # per token and trainable layer: values of d kept in the compute dtype
FULL_FP32_VALUES = 2  # ... and in fp32 (the residual stream at the two layer norms)
CHECKPOINTED_FP32_VALUES = 1  # a checkpointed layer's input
EXTRA_BYTES_PER_D = 16  # per token, outside the layers: the stream's output and gradient, the heads' inputs
MARGIN = 0.1  # of the GPU's memory, kept free (allocator fragmentation, the kernels' workspaces)

log = logging.getLogger("mutarget")


def layer_bytes(d: int, compute_bytes: int) -> tuple[float, float]:
    """Bytes one token keeps for the backward pass in one trainable layer: (not checkpointed, checkpointed)."""
    return d * (4 * FULL_FP32_VALUES + FULL_COMPUTE_VALUES * compute_bytes), d * 4.0 * CHECKPOINTED_FP32_VALUES


def peak_bytes(tokens: int, trained: int, k: int, full: float, checkpointed: float, extra: float) -> float:
    """Activation bytes at the peak of a step of `tokens` tokens with the first k of `trained` layers checkpointed:
    each token keeps `extra` bytes, `full` per layer not checkpointed and `checkpointed` per checkpointed one; the
    backward pass recomputes a checkpointed layer (`full` again) only after the later layers' activations are
    freed, so the peak holds max(trained - k, 1) full layers once any layer is checkpointed."""
    return tokens * (extra + k * checkpointed + max(trained - k, 1 if k else 0) * full)


def checkpointed_layers(tokens: int, trained: int, full: float, checkpointed: float, extra: float,
                        budget: float) -> int | None:
    """The fewest of `trained` layers to checkpoint so that a step of `tokens` tokens keeps at most `budget` bytes
    of activations (peak_bytes); None when even checkpointing all does not fit."""
    for k in range(trained + 1):
        if peak_bytes(tokens, trained, k, full, checkpointed, extra) <= budget:
            return k
    return None


def device_free_bytes(device: torch.device) -> int | None:
    """Memory the step may still use on this device: the GPU's free memory plus what PyTorch's allocator holds
    unused; None on the CPU (no plan: the operating system pages)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def device_total_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0


class Planner:
    """train.checkpointing and train.gradient_cache for each step: plan(batch) sets model.checkpointed_layers and
    says whether the step is split by gradient caching (and into calls of how many tokens)."""

    def __init__(self, model, config, device: torch.device, compute_dtype, world: int = 1):
        self.model, self.device, self.world = model, device, world
        self.mode, self.cache_mode = config.train.checkpointing, config.train.gradient_cache
        d = model.backbone.embed_dim
        self.trained = model.backbone.num_layers - min(model.first_trainable, model.backbone.num_layers)
        self.full, self.checkpointed = layer_bytes(d, torch.tensor([], dtype=compute_dtype).element_size())
        self.extra = EXTRA_BYTES_PER_D * d
        self.stored = 2 * 4 * d  # gradient caching: the calls' outputs [N, d] and their gradient, fp32
        self.budget = None  # bytes for activations, from the first step's free memory (auto only)
        self.largest = 0  # the most layers checkpointed so far (logged when it grows)
        self.split_said = False  # gradient caching logged once
        model.checkpointed_layers = self.trained if self.mode == "all" else 0

    def activation_budget(self, optimizer) -> float | None:
        """Free memory for activations: the device's free memory, less the gradients and AdamW state not yet
        allocated (before the first optimiser step) and a margin; None on the CPU."""
        free = device_free_bytes(self.device)
        if free is None:
            return None
        pending = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                pending += (p.grad is None) * p.numel() * p.element_size()
                pending += (not optimizer.state.get(p)) * 2 * p.numel() * 4  # AdamW's two moments
        return free - pending - MARGIN * device_total_bytes(self.device)

    def plan(self, batch: dict, optimizer) -> int | None:
        """Checkpointed layers for this batch (model.checkpointed_layers is set); returns the token budget of the
        gradient-caching calls when the step is split, else None."""
        model = self.model
        if self.mode != "auto" and self.cache_mode != "always":
            return None
        tokens = sum(batch["window_widths"])
        if self.budget is None:
            self.budget = self.activation_budget(optimizer)
            if self.budget is None and self.cache_mode != "always":  # the CPU: nothing to plan
                self.mode = "none" if self.mode == "auto" else self.mode
                return None
        budget = math.inf if self.budget is None else self.budget
        k = checkpointed_layers(tokens, self.trained, self.full, self.checkpointed, self.extra, budget)
        split = self.cache_mode == "always" or (k is None and self.cache_mode == "auto")
        if split and not (model.packed and self.world == 1):
            if k is None:
                log.warning("train.gradient_cache: a step of %d tokens does not fit even with every layer "
                            "checkpointed, and gradient caching needs encoder.packed and one process: trying with "
                            "every layer checkpointed", tokens)
            split = False
        if split:
            return self.plan_calls(tokens, budget, batch)
        if self.mode == "auto":
            model.checkpointed_layers = self.trained if k is None else k
            if model.checkpointed_layers > self.largest:
                self.largest = model.checkpointed_layers
                log.info("train.checkpointing auto: %d of %d trainable layers checkpointed for a step of %d tokens "
                         "(%.0f bytes a token in each layer, %.1f GB free for activations)", self.largest,
                         self.trained, tokens, self.full, budget / 1e9)
        return None

    def step(self, batch: dict, optimizer, losses_of, backward, forward_context):
        """One training step's forward and backward pass, as planned: losses_of(stream=None) -> (loss, losses,
        outputs), then backward(loss); or cached_step. Returns losses_of's result."""
        call_tokens = self.plan(batch, optimizer)
        if call_tokens is not None:
            return cached_step(self.model, batch, losses_of, backward, call_tokens, forward_context)
        loss, losses, out = losses_of()
        backward(loss)
        return loss, losses, out

    def plan_calls(self, tokens: int, budget: float, batch: dict) -> int:
        """Gradient caching: the tokens of each recomputed call, the most that fit beside the stored outputs with no
        layer checkpointed, else with all but one checkpointed (model.checkpointed_layers set); at most
        encoder.chunk_tokens, at least the longest window."""
        room = budget - tokens * self.stored
        longest = max(batch["window_widths"])
        for k in (0, max(self.trained - 1, 0)):  # (trained - 1 checkpointed holds as little as all)
            per_token = peak_bytes(1, self.trained, k, self.full, self.checkpointed, self.extra)
            call = int(room // per_token) if math.isfinite(room) else tokens
            if call >= longest:
                break
        self.model.checkpointed_layers = k
        call = max(min(call, self.model.token_budget(self.model.backbone.embed_tokens.weight.device) or call), longest)
        if not self.split_said:
            self.split_said = True
            log.info("train.gradient_cache: a step of %d tokens does not fit the GPU even with every layer "
                     "checkpointed: the backbone runs without autograd, then again per call of at most %d tokens "
                     "(%d layers checkpointed) with the losses' gradients", tokens, call, k)
        return call


def rng_states(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def cached_step(model, batch: dict, losses_of, backward, call_tokens: int, forward_context):
    """One step by gradient caching (see the module docstring): losses_of(stream) -> (loss, losses, outputs) runs
    the heads and losses with the backbone's outputs `stream` [N, d] in place of the backbone; backward(loss) runs
    the (scaled) backward pass; forward_context() the context of the backbone's calls (autocast). Returns what
    losses_of returned; the parameters' .grad hold the step's gradients."""
    tokens, widths, keys = batch["packed_tokens"], batch["window_widths"], batch.get("window_keys")
    device = tokens.device
    calls, starts = model.packed_calls(widths, call_tokens), [0]
    for idx in calls:
        starts.append(starts[-1] + sum(widths[w] for w in idx))

    def run_call(c):
        idx = calls[c]
        return model.packed_call(tokens[starts[c]:starts[c + 1]], [widths[w] for w in idx],
                                 keys and [keys[w] for w in idx])
    states, parts = [], []
    with torch.no_grad(), forward_context():
        for c in range(len(calls)):
            states.append(rng_states(device))
            parts.append(run_call(c))
    stream = torch.cat(parts).requires_grad_()
    loss, losses, out = losses_of(stream)
    backward(loss)
    if stream.grad is None:  # nothing in the losses depends on the backbone
        return loss, losses, out
    before = dict(model.token_counts)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for c, (cpu_state, device_state) in enumerate(states):
            torch.set_rng_state(cpu_state)
            if device_state is not None:
                torch.cuda.set_rng_state(device_state, device)
            with forward_context():
                part = run_call(c)
            if part.requires_grad:
                part.backward(stream.grad[starts[c]:starts[c + 1]])
    recount(model, before)
    return loss, losses, out


def recount(model, before: dict) -> None:
    """The second run of the calls is recomputation, not work for the model: its counts move from token_counts'
    tokens / attention to recomputed_layer_tokens / recomputed_layer_attention (per layer run)."""
    counts, bb = model.token_counts, model.backbone
    prefix_layers = min(model.first_trainable, bb.num_layers)
    for kind, key in (("tokens", "tokens"), ("attention", "attention")):
        trained = counts[key] - before[key]
        prefix = counts[f"prefix_{key}"] - before[f"prefix_{key}"]
        counts[key], counts[f"prefix_{key}"] = before[key], before[f"prefix_{key}"]
        counts[f"recomputed_layer_{kind}"] += trained * (bb.num_layers - prefix_layers) + prefix * prefix_layers
    counts["padded_tokens"] = before["padded_tokens"]
