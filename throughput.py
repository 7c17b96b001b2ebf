"""Training speed of every epoch: anchors/s, backbone tokens/s (real and padded), model and hardware TFLOP/s and,
on a known GPU, the model-FLOPs utilisation (MFU) as the standard counts it, and the hardware-FLOPs one (HFU).

Model FLOPs count the useful work on the real tokens (BOS and EOS included, padding never), from what the backbone
ran (model.token_counts, host-side counters: no synchronisation). A layer's forward pass costs 2 FLOPs per weight per
token (12 d^2 weights: q, k, v, out, and the 4 d feed-forward) plus 4 d per (query, key) pair within a window (2 d
for the scores, 2 d for the weighted sum). Its backward pass: in layers whose weights train, twice the forward
(gradients of inputs and of weights); in layers that only pass gradients back (LoRA / adapters train small added
matrices, whose own FLOPs are neglected) once the forward for the weights' products (input gradients only) but
twice for attention (it has no weights: the gradients of q, k and v take two products for each of the forward's
two); nothing in the frozen leading layers. Those frozen layers are charged only for the windows they really
computed (prefix_tokens / prefix_attention: a frozen-layer cache serves the others free). Recomputation (activation
checkpointing, gradient caching: recomputed_layer_tokens / recomputed_layer_attention, per layer run) is not work
for the model: MFU leaves it out, the hardware FLOPs add it. Embeddings and heads are neglected. MFU = model FLOPs /
the epoch's wall time (the whole steps: data, backbone, heads, losses, optimiser) / the dense bf16 peak of the GPU
(gpu_peak: by name, memory and multiprocessor count), summed over processes.
"""
from __future__ import annotations

import torch

# Dense half-precision tensor-core TFLOP/s (no sparsity) by GPU name, matched as substrings in this order (the more
# specific first: "L40S" before "L40" before "L4", "A10G" before "A10"); H100 and H200 are told apart by gpu_peak.
PEAK_TFLOPS = {"A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0, "V100": 125.0,
               "RTX 4090": 165.0}
HOPPER_TFLOPS = {"H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200 SXM": 989.0, "H200 NVL": 835.0}


def peak_of(name: str, memory_bytes: int, multiprocessors: int) -> tuple[str, float] | None:
    """(the GPU's model, its dense bf16 peak in TFLOP/s) from torch.cuda's device name, memory and multiprocessor
    count; None when unknown. H100 SXM and PCIe both have 80 GB, but 132 against 114 multiprocessors (the SXM card
    names itself "NVIDIA H100 80GB HBM3", some drivers just "NVIDIA H100"); the NVL card has 94 GB; an H200 is SXM
    unless named NVL (both 141 GB)."""
    if "H200" in name:
        model = "H200 NVL" if "NVL" in name else "H200 SXM"
    elif "H100" in name:
        model = ("H100 NVL" if "NVL" in name or memory_bytes > 90 * 2 ** 30 else
                 "H100 PCIe" if "PCIe" in name or multiprocessors < 132 else "H100 SXM")
    else:
        model = next((key for key in PEAK_TFLOPS if key in name), None)
        return None if model is None else (model, PEAK_TFLOPS[model])
    return model, HOPPER_TFLOPS[model]


def gpu_peak(device: torch.device) -> tuple[str, float] | None:
    """(model, dense bf16 FLOP/s) of this GPU; None when unknown or not a GPU."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    found = peak_of(props.name, props.total_memory, props.multi_processor_count)
    return None if found is None else (found[0], found[1] * 1e12)


def peak_flops(device: torch.device) -> float | None:
    """Dense half-precision tensor-core FLOP/s of the GPU, None when unknown or not a GPU."""
    found = gpu_peak(device)
    return None if found is None else found[1]


def layer_flops(d: int, tokens: int, pairs: int) -> tuple[int, int]:
    """Forward FLOPs of one layer: (the weights' products, attention) over `tokens` tokens and `pairs` pairs."""
    return 2 * 12 * d * d * tokens, 4 * d * pairs


def backbone_flops(arch: dict, first_trainable: int, weights_train: bool, counts: dict) -> float:
    """Model FLOPs of forward + backward over counts["tokens"] tokens and counts["attention"] (query, key) pairs per
    layer (the frozen leading layers: over counts["prefix_tokens"] / counts["prefix_attention"] where present, else
    the same): see the module docstring. weights_train: the trainable layers' own weights train (last_k, full), not
    only added matrices (lora, adapter)."""
    d, n = arch["embed_dim"], arch["num_layers"]
    tokens, attention_pairs = counts["tokens"], counts["attention"]
    trained = n - min(first_trainable, n)
    prefix = sum(layer_flops(d, counts.get("prefix_tokens", tokens), counts.get("prefix_attention", attention_pairs)))
    weights, attention = layer_flops(d, tokens, attention_pairs)
    return prefix * (n - trained) + trained * (weights * (3 if weights_train else 2) + attention * 3)


def hardware_flops(arch: dict, first_trainable: int, weights_train: bool, counts: dict) -> float:
    """backbone_flops plus the forward FLOPs of the recomputed layer runs."""
    recomputed = sum(layer_flops(arch["embed_dim"], counts.get("recomputed_layer_tokens", 0),
                                 counts.get("recomputed_layer_attention", 0)))
    return backbone_flops(arch, first_trainable, weights_train, counts) + recomputed


def epoch_speed(counts: dict, seconds: float, arch: dict, first_trainable: int, tune: str, device) -> dict:
    """{anchors_per_s, tokens_per_s (real), padded_tokens_per_s (what the layers processed, padding included),
    model_tflops_per_s, hardware_tflops_per_s (recomputation included), and on a known GPU mfu, hfu and gpu_peak
    (its model and TFLOP/s, e.g. "H100 SXM 989")} from the epoch's counts {anchors, tokens, padded_tokens,
    attention, prefix_tokens, prefix_attention, recomputed_layer_tokens, recomputed_layer_attention} (summed over
    processes) and its wall time."""
    seconds = max(seconds, 1e-9)
    weights_train = tune in ("last_k", "full")
    model, hardware = (f(arch, first_trainable, weights_train, counts) for f in (backbone_flops, hardware_flops))
    speed = {"anchors_per_s": counts["anchors"] / seconds, "tokens_per_s": counts["tokens"] / seconds,
             "padded_tokens_per_s": counts["padded_tokens"] / seconds, "model_tflops_per_s": model / seconds / 1e12,
             "hardware_tflops_per_s": hardware / seconds / 1e12}
    peak = gpu_peak(device)
    if peak is not None:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        speed["mfu"] = model / seconds / (peak[1] * world)
        speed["hfu"] = hardware / seconds / (peak[1] * world)
        speed["gpu_peak"] = f"{peak[0]} {peak[1] / 1e12:.0f}"
    return speed


def speed_text(speed: dict) -> str:
    """The log's words for epoch_speed's figures: anchors/s, tokens/s and, on a known GPU, MFU against which peak."""
    text = f"{speed['anchors_per_s']:.1f} anchors/s, {speed['tokens_per_s']:.0f} tokens/s"
    if "mfu" in speed:
        text += f", MFU {speed['mfu']:.2%} (HFU {speed['hfu']:.2%}) of {speed['gpu_peak']} TFLOP/s"
    return text


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: VmHWM on Linux, which starts afresh at exec
    (ru_maxrss would carry over the peak of the process that forked it); ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
