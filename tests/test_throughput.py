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
    # per layer: 24 d^2 per token * 10 tokens + 4 d * 100 pairs = 960 + 800
    pairs = {"tokens": 10, "attention": 100}
    assert throughput.backbone_flops(arch, 1, True, pairs) == 1760 * (3 + 2 * 2)  # forward 3, backward 2 x 2
    assert throughput.backbone_flops(arch, 1, False, pairs) == 1760 * (3 + 2)  # LoRA: gradients pass through
    assert throughput.backbone_flops(arch, 3, True, pairs) == 1760 * 3  # frozen: forward only
    # frozen-layer cache: the frozen layer 0 computed 5 tokens and 20 pairs only (480 + 160 per layer)
    assert throughput.backbone_flops(arch, 1, True, dict(pairs, prefix_tokens=5, prefix_attention=20)) == 640 * 1 + 1760 * 2 * 3
    assert throughput.peak_flops(torch.device("cpu")) is None


@pytest.mark.parametrize("name,tflops", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                         ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                                         ("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
                                         ("NVIDIA A10G", 70.0), ("NVIDIA A10", 125.0), ("Tesla T4", None)])
def test_peak_flops_by_device_name(monkeypatch, name, tflops):
    """The SXM H100 names itself "NVIDIA H100 80GB HBM3" (read on a lent machine): its peak, not the PCIe card's."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    expected = None if tflops is None else tflops * 1e12
    assert throughput.peak_flops(torch.device("cuda")) == expected
