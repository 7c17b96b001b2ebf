"""Training speed of every epoch: anchors/s, backbone tokens/s (real and padded) and, on CUDA, the
model-FLOPs utilisation (MFU) as the standard counts it.

Model FLOPs count the useful work on the real tokens (BOS and EOS included, padding never), from what
the backbone ran (model.token_counts, host-side counters: no synchronisation): a forward pass costs 2
FLOPs per weight of each transformer layer per token (12 d^2 weights: q, k, v, out, and the 4 d
feed-forward) plus 4 d per (query, key) pair within a window per layer (2 d for the scores, 2 d for
the weighted sum); the backward pass costs twice the forward in layers whose weights train, once in
layers that only pass gradients back (LoRA / adapters train small added matrices, whose own FLOPs are
neglected), nothing in the frozen leading layers. Those frozen layers are charged only for the windows
they really computed (prefix_tokens / prefix_attention: a frozen-layer cache serves the others free).
Embeddings and heads are neglected. MFU = these FLOPs / the epoch's wall time (the whole steps: data,
backbone, heads, losses, optimiser) / the dense bf16 peak of the GPU (PEAK_TFLOPS; other devices get no
MFU), summed over processes.
"""
from __future__ import annotations

import torch

# Names as torch.cuda.get_device_name gives them, matched as substrings in this order (the more specific
# first: "L40S" before "L40" before "L4", "A10G" before "A10"); the SXM H100 calls itself "NVIDIA H100 80GB HBM3".
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
               "H100": 756.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
               "V100": 125.0, "RTX 4090": 165.0}


def peak_flops(device: torch.device) -> float | None:
    """Dense half-precision tensor-core FLOP/s of the GPU, None when unknown or not a GPU."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return tflops * 1e12
    return None


def backbone_flops(arch: dict, first_trainable: int, weights_train: bool, counts: dict) -> float:
    """Estimated FLOPs of forward + backward over counts["tokens"] tokens and counts["attention"] (query, key)
    pairs per layer (the frozen leading layers: over counts["prefix_tokens"] / counts["prefix_attention"]
    where present, else the same): see the module docstring. weights_train: the trainable layers' own weights
    train (last_k, full), not only added matrices (lora, adapter)."""
    d, n = arch["embed_dim"], arch["num_layers"]
    tokens, attention_pairs = counts["tokens"], counts["attention"]
    prefix_tokens, prefix_attention_pairs = counts.get("prefix_tokens"), counts.get("prefix_attention")

    def per_layer(t, pairs):  # q, k, v, out (4 d^2) + fc1, fc2 (8 d^2) per token; attention per pair
        return 2 * 12 * d * d * t + 4 * d * pairs
    trained = n - min(first_trainable, n)
    prefix = per_layer(tokens if prefix_tokens is None else prefix_tokens,
                       attention_pairs if prefix_attention_pairs is None else prefix_attention_pairs)
    return prefix * (n - trained) + per_layer(tokens, attention_pairs) * trained * (3 if weights_train else 2)


def epoch_speed(counts: dict, seconds: float, arch: dict, first_trainable: int, tune: str, device) -> dict:
    """{anchors_per_s, tokens_per_s (real), padded_tokens_per_s (what the layers processed, padding included),
    mfu (CUDA, known GPU)} from the epoch's counts {anchors, tokens, padded_tokens, attention, prefix_tokens,
    prefix_attention} (summed over processes) and its wall time."""
    seconds = max(seconds, 1e-9)
    speed = {"anchors_per_s": counts["anchors"] / seconds, "tokens_per_s": counts["tokens"] / seconds,
             "padded_tokens_per_s": counts["padded_tokens"] / seconds}
    peak = peak_flops(device)
    if peak is not None:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        flops = backbone_flops(arch, first_trainable, tune in ("last_k", "full"), counts)
        speed["mfu"] = flops / seconds / (peak * world)
    return speed


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM on Linux, which starts afresh at exec
    (ru_maxrss would carry over the peak of the process that forked it); ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
