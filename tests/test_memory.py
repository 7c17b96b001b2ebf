"""Training memory (memory.py): the activation estimate against what autograd really saves, the checkpointing
planner on hand-worked figures, and steps that equal the plain step's gradients with the planner's checkpointed
layers under a simulated memory limit and with gradient caching (fp32, CPU, SupCon on, mixed window lengths)."""
import logging

import pytest
import torch

import contrast
import data
import loss
import memory
import model
import packing
import train
from config import resolve_config


def test_planner_on_hand_worked_figures():
    """650M in bf16: full = 1280 * (8 + 17 * 2) = 53,760 bytes a token and layer, checkpointed 5,120, extra 20,480.
    40,000 tokens over 33 layers: no checkpointing needs 40,000 * (20,480 + 33 * 53,760) = 71.78 GB. With 50 GB,
    k checkpointed layers need 40,000 * (20,480 + 5,120 k + 53,760 (33 - k)) bytes <= 50e9, so
    48,640 k >= 1,794,560 - 1,250,000 = 544,560, k >= 11.2: 12 (48.44 GB; 11 would need 50.38). The fewest bytes
    are with 32 checkpointed (one full layer is held at the peak anyway): 40,000 * (20,480 + 32 * 5,120 + 53,760)
    = 9.52 GB; with 8 GB nothing fits."""
    full, ckpt = memory.layer_bytes(1280, 2)
    assert (full, ckpt) == (53760, 5120)
    extra = memory.EXTRA_BYTES_PER_D * 1280
    assert extra == 20480
    assert memory.checkpointed_layers(40000, 33, full, ckpt, extra, 72e9) == 0
    assert memory.checkpointed_layers(40000, 33, full, ckpt, extra, 50e9) == 12
    assert memory.checkpointed_layers(40000, 33, full, ckpt, extra, 9.6e9) == 32
    assert memory.checkpointed_layers(40000, 33, full, ckpt, extra, 8e9) is None
    assert memory.checkpointed_layers(40000, 0, full, ckpt, extra, 1e9) == 0  # nothing trains: extra only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activation_estimate_matches_what_autograd_saves(dtype):
    """The bytes a token keeps in one trainable layer (memory.layer_bytes) within 10% of the tensors autograd saves
    for a packed layer (their storages counted once; the slope over two stream sizes, so the weights' copies and
    the rotary table drop out), in fp32 and under CPU bf16 autocast."""
    d = 256
    m = model.Encoder(resolve_config({"encoder": {"scratch": {"num_layers": 1, "embed_dim": d, "attention_heads": 4},
                                                  "tune": "full"}}))
    layer, params = m.backbone.layers[0], {p.untyped_storage().data_ptr() for p in m.parameters()}

    def saved_bytes(lengths):
        stream = packing.make_stream(torch.randint(4, 24, (sum(lengths),)), lengths)
        x = torch.randn(sum(lengths), d, requires_grad=True)
        seen = {}

        def keep(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16), \
                torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            layer.packed_forward(x, stream)
        return sum(seen.values())
    measured = (saved_bytes([800, 400, 300]) - saved_bytes([400, 200, 150])) / 750
    estimate, _ = memory.layer_bytes(d, torch.tensor([], dtype=dtype).element_size())
    assert abs(estimate - measured) <= 0.1 * measured, (estimate, measured)


def supcon_setup(tmp_path, **train_keys):
    tree = {"seed": 0, "device": "cpu", "run_dir": str(tmp_path / "run"),
            "data": {"root": str(tmp_path / "data"), "max_len": 120, "overlap": 20,
                     "synthetic": {"generate": True, "n_proteins": 60, "seed": 4}},
            "encoder": {"scratch": {"num_layers": 3, "embed_dim": 32, "attention_heads": 4}, "tune": "full",
                        "lora": {"dropout": 0.0}},
            "decoder": {"dropout": 0.0, "class_dropout": 0.0},
            "train": {"batch_size": 4, **train_keys},
            "supcon": {"apply": True, "loss": "hard", "n_pos": 1, "n_neg": 2, "hidden_dim": 16, "out_dim": 8,
                       "drop_out": 0.0}}
    cfg = resolve_config(tree)
    datasets = data.build_datasets(cfg)
    contrast.setup_supcon(cfg, model.Encoder(cfg), datasets["train"], torch.device("cpu"), logging.getLogger("t"))
    datasets["train"].set_epoch(0, contrastive=True)
    criteria = {"class": loss.ClassLoss(loss.class_weights(datasets["train"].class_counts())),
                "motif": loss.MotifLoss(loss.motif_pos_weights(*datasets["train"].residue_counts()))}
    _, loader = train.make_loader(datasets["train"], cfg)
    return cfg, criteria, next(iter(loader))


def step_gradients(cfg, criteria, batch, free_bytes=None, monkeypatch=None):
    """One training step through train.forward_backward (the planner deciding) -> (loss, gradients, model)."""
    if free_bytes is not None:
        monkeypatch.setattr(memory, "device_free_bytes", lambda device: free_bytes)
        monkeypatch.setattr(memory, "device_total_bytes", lambda device: 0)
    torch.manual_seed(0)
    m = model.Encoder(cfg)
    optimizer = train.make_optimizer(m, cfg.train)
    trainer = train.Trainer(cfg, torch.device("cpu"), m, m, {}, None, None, optimizer, None,
                            torch.amp.GradScaler("cpu", enabled=False), criteria, None, logging.getLogger("t"),
                            memory.Planner(m, cfg, torch.device("cpu"), torch.float32))
    torch.manual_seed(1)
    total, _, _ = train.forward_backward(trainer, batch, True, None, 1)
    return total, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, m


def assert_same(a, b, tol=1e-5):
    (loss_a, grads_a, _), (loss_b, grads_b, _) = a, b
    assert abs(float(loss_a.detach()) - float(loss_b.detach())) <= tol
    assert grads_a.keys() == grads_b.keys() and any(n.startswith("backbone.layers.") for n in grads_a)
    for name in grads_a:
        scale = grads_b[name].abs().max().clamp(min=1)
        assert (grads_a[name] - grads_b[name]).abs().max() <= tol * scale, name


def test_auto_checkpointing_under_a_memory_limit_equals_the_plain_step(tmp_path, monkeypatch, caplog):
    """A SupCon step (anchors, positives, negatives; windows of mixed lengths) with a simulated GPU whose free
    memory fits the step only with one of its 3 layers checkpointed: the planner checkpoints one, says so in the log, counts their recomputation, and the gradients equal the plain step's."""
    cfg, criteria, batch = supcon_setup(tmp_path)
    assert len(set(batch["window_widths"])) > 3  # mixed window lengths
    plain = step_gradients(cfg, criteria, batch)
    assert plain[2].checkpointed_layers == 0  # the CPU: auto plans nothing
    tokens, (full, ckpt) = sum(batch["window_widths"]), memory.layer_bytes(32, 4)
    free = tokens * (memory.EXTRA_BYTES_PER_D * 32 + ckpt + 2 * full) + 1  # fits with one layer checkpointed
    free += sum(p.numel() * 4 * 3 for p in plain[2].parameters() if p.requires_grad)  # gradients and AdamW
    with caplog.at_level("INFO", logger="mutarget"):
        planned = step_gradients(cfg, criteria, batch, free, monkeypatch)
    assert planned[2].checkpointed_layers == 1
    assert planned[2].token_counts["recomputed_layer_tokens"] == tokens
    assert any("1 of 3 trainable layers checkpointed" in r.getMessage() for r in caplog.records)
    assert_same(planned, plain)


@pytest.mark.parametrize("tune", ["full", "lora"])
def test_gradient_caching_equals_the_plain_step(tmp_path, monkeypatch, tune):
    """Too little memory even with every layer checkpointed: the step runs by gradient caching (the backbone
    without autograd, the losses' gradients with respect to its outputs, then each call again with autograd);
    its loss and every gradient equal the plain step's (whose calls are split alike, encoder.chunk_tokens 600),
    with LoRA dropout replayed in the recomputed calls, and the second run counted as recomputation."""
    cfg, criteria, batch = supcon_setup(tmp_path)
    keys = ["encoder.chunk_tokens=600"] + (["encoder.tune=lora", "encoder.trainable_layers=2",
                                            "encoder.lora.dropout=0.3"] if tune == "lora" else [])
    cfg = resolve_config(cfg.to_dict(), keys)
    plain = step_gradients(cfg, criteria, batch)
    tokens, (full, ckpt) = sum(batch["window_widths"]), memory.layer_bytes(32, 4)
    planner = memory.Planner(plain[2], cfg, torch.device("cpu"), torch.float32)
    calls = []
    real_call = model.Encoder.packed_call

    def counting(self, toks, widths, keys):
        calls.append((sum(widths), torch.is_grad_enabled()))
        return real_call(self, toks, widths, keys)
    monkeypatch.setattr(model.Encoder, "packed_call", counting)
    smallest = memory.peak_bytes(tokens, planner.trained, planner.trained - 1, full, ckpt, planner.extra)
    free = smallest - 1  # the whole step does not fit in any way
    free += sum(p.numel() * 4 * 3 for p in plain[2].parameters() if p.requires_grad)  # gradients and AdamW
    cached = step_gradients(cfg, criteria, batch, free, monkeypatch)
    with_grad = [n for n, grad in calls if grad]
    assert len(with_grad) >= 3 and max(with_grad) <= 600
    assert sum(with_grad) == tokens == sum(n for n, grad in calls if not grad)
    assert cached[2].token_counts["tokens"] == tokens  # the second run is counted as recomputation
    assert cached[2].token_counts["recomputed_layer_tokens"] == tokens * 3
    assert_same(cached, plain)


def test_gradient_cache_always_on_the_cpu_equals_the_plain_step(tmp_path):
    """train.gradient_cache: always, on the CPU (no memory figure: one call of the whole step): the same loss and
    gradients as the plain step."""
    cfg, criteria, batch = supcon_setup(tmp_path)
    plain = step_gradients(cfg, criteria, batch)
    assert_same(step_gradients(resolve_config(cfg.to_dict(), ["train.gradient_cache=always"]), criteria, batch), plain)
