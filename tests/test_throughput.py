"""Speed figures (throughput.py): FLOPs by hand, the GPU peak by name, figures in metrics.jsonl."""
import pytest
import torch
from helpers import cached_run, read_metrics

import data
import throughput
import vocab
from config import load_config


def test_speed_figures_in_metrics(tmp_path):
    run = cached_run(tmp_path, "speed", None, **{"train.epochs": 1})
    record = read_metrics(run)[0]
    assert 0 < record["tokens_per_s"] <= record["padded_tokens_per_s"] and record["anchors_per_s"] > 0
    assert "mfu" not in record  # CPU: no MFU
    train_set = data.build_datasets(load_config(run / "config.yaml"))["train"]
    real = sum(min(64, len(p.sequence) - s) + 2 for p in train_set.proteins
               for s in vocab.window_starts(len(p.sequence), 64, 16))  # residues + BOS / EOS of every window
    assert record["tokens_per_s"] / record["anchors_per_s"] == pytest.approx(real / len(train_set), rel=1e-6)


def test_flops_estimate_hand_worked():
    arch = {"embed_dim": 2, "num_layers": 3}
    # per layer: 24 d^2 per token * 10 tokens = 960 for the weights + 4 d * 100 pairs = 800 for attention
    pairs = {"tokens": 10, "attention": 100}
    assert throughput.backbone_flops(arch, 1, True, pairs) == 1760 * (1 + 2 * 3)  # forward 3, backward 2 x 2
    # LoRA: the weights' backward is the input gradient only (960 once more), attention's is twice (800 x 2)
    assert throughput.backbone_flops(arch, 1, False, pairs) == 1760 + 2 * (960 * 2 + 800 * 3)
    assert throughput.backbone_flops(arch, 3, True, pairs) == 1760 * 3  # frozen: forward only
    # frozen-layer cache: the frozen layer 0 computed 5 tokens and 20 pairs only (480 + 160 per layer)
    assert throughput.backbone_flops(arch, 1, True, dict(pairs, prefix_tokens=5, prefix_attention=20)) == 640 * 1 + 1760 * 2 * 3
    # recomputation (two layer runs of 10 tokens, 100 pairs each): hardware FLOPs only
    recomputed = dict(pairs, recomputed_layer_tokens=20, recomputed_layer_attention=200)
    assert throughput.backbone_flops(arch, 1, True, recomputed) == 1760 * 7
    assert throughput.hardware_flops(arch, 1, True, recomputed) == 1760 * 7 + 1760 * 2
    assert throughput.peak_flops(torch.device("cpu")) is None


GB = 2 ** 30


@pytest.mark.parametrize("name,memory,sms,model,tflops", [
    ("NVIDIA H100 80GB HBM3", 79.6, 132, "H100 SXM", 989.0), ("NVIDIA H100", 79.6, 132, "H100 SXM", 989.0),
    ("NVIDIA H100", 79.6, 114, "H100 PCIe", 756.0), ("NVIDIA H100 PCIe", 79.6, 114, "H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 93.6, 132, "H100 NVL", 835.0), ("NVIDIA H100", 93.6, 132, "H100 NVL", 835.0),
    ("NVIDIA H200", 139.8, 132, "H200 SXM", 989.0), ("NVIDIA H200 NVL", 139.8, 132, "H200 NVL", 835.0),
    ("NVIDIA A100-SXM4-80GB", 79.2, 108, "A100", 312.0), ("NVIDIA A100-PCIE-40GB", 39.4, 108, "A100", 312.0),
    ("NVIDIA L40", 44.5, 142, "L40", 181.0), ("NVIDIA L40S", 44.5, 142, "L40S", 362.0),
    ("NVIDIA L4", 22.0, 58, "L4", 121.0), ("NVIDIA A10G", 22.0, 80, "A10G", 70.0),
    ("NVIDIA A10", 22.0, 72, "A10", 125.0), ("Tesla T4", 14.6, 40, None, None)])
def test_gpu_peak_by_name_memory_and_multiprocessors(monkeypatch, name, memory, sms, model, tflops):
    """H100 SXM and PCIe share 80 GB but not their multiprocessor counts (132 / 114), and a driver may call either
    just "NVIDIA H100"; the NVL card has 94 GB; an H200 is SXM unless named NVL."""
    props = type("Props", (), {"name": name, "total_memory": int(memory * GB), "multi_processor_count": sms})
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    expected = None if tflops is None else (model, tflops * 1e12)
    assert throughput.gpu_peak(torch.device("cuda")) == expected
    speed = throughput.epoch_speed({"anchors": 1, "tokens": 10, "padded_tokens": 10, "attention": 100}, 1e-6,
                                   {"embed_dim": 2, "num_layers": 3}, 0, "full", torch.device("cuda"))
    assert ("mfu" in speed) == (tflops is not None)
    if tflops is not None:
        assert speed["mfu"] == pytest.approx(1760 * 9 / 1e-6 / (tflops * 1e12))
        assert speed["gpu_peak"] == f"{model} {tflops:.0f}" and model in throughput.speed_text(speed)
