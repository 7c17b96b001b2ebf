"""LoRA, bottleneck adapters and activation checkpointing of the ESM-2 backbone."""
import json
import logging
import subprocess
import sys

import esm
import pytest
import torch
from conftest import ROOT, write_config

import adapters
import batching
import cache
import contrast
import data
import loss
import model
import predict
import train
import utils
import vocab
import weights
from config import resolve_config

D, LAYERS = 32, 3


def config(tune="lora", k=2, checkpointing="auto", **encoder):
    tree = {"encoder": {"scratch": {"num_layers": LAYERS, "embed_dim": D, "attention_heads": 4}, "tune": tune,
                        "trainable_layers": k, **encoder},
            "decoder": {"dropout": 0.0, "class_dropout": 0.0}, "train": {"checkpointing": checkpointing}}
    return resolve_config(tree)


def batch_of(lengths=(12, 30, 7), seed=0):
    rng = torch.Generator().manual_seed(seed)
    proteins = [data.make_protein(f"P{i}", "".join(vocab.RESIDUES[j] for j in torch.randint(0, 20, (n,), generator=rng)),
                                  "", "t") for i, n in enumerate(lengths)]
    ds = data.LocalizationDataset(proteins)
    return batching.Collate(64, 16)([ds[i] for i in range(len(ds))])


def plain_esm2(state):
    """fair-esm's own ESM2 holding `state` (fair-esm names): the reference implementation."""
    ref = esm.model.esm2.ESM2(LAYERS, D, 4, alphabet="ESM-1b").eval()
    missing, unexpected = ref.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("lm_head", "contact_head")) for k in missing)
    return ref


def base_state(backbone):
    """The pretrained weights of a backbone with LoRA / adapters, without the added parameters."""
    return {k: v for k, v in backbone.state_dict().items() if not adapters.is_peft_parameter(k)}


def reference_outputs(ref, batch):
    with torch.no_grad():
        return ref(batch["tokens"], repr_layers=[LAYERS])["representations"][LAYERS]


def one_step(m, batch, lr=0.5):
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr)
    out = m(batch)
    (out["class_logits"].square().sum() + out["motif_logits"].sigmoid().sum()).backward()
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("tune", ["lora", "adapter"])
def test_identity_at_initialisation(tune):
    torch.manual_seed(0)
    m = model.Encoder(config(tune, k=0)).eval()
    batch = batch_of()
    real = batch["tokens"].ne(vocab.PAD_IDX)
    with torch.no_grad():
        ours = m.backbone_forward(batch["tokens"])
    ref = reference_outputs(plain_esm2(base_state(m.backbone)), batch)
    assert (ours[real] - ref[real]).abs().max() <= 1e-5  # fused attention vs fair-esm's: rounding only
    m.fused_attention = False  # fair-esm's own layer code with the same wrapped Linears: exactly the reference
    with torch.no_grad():
        assert torch.equal(m.backbone_forward(batch["tokens"])[real], ref[real])


def test_lora_after_a_step_equals_merged_weights():
    torch.manual_seed(0)
    m = model.Encoder(config("lora", k=2, lora={"rank": 4, "alpha": 16.0, "dropout": 0.0,
                                                "targets": ["q", "v", "out", "fc1"]}))
    batch = batch_of()
    one_step(m, batch)
    state = base_state(m.backbone)
    changed = 0
    for name, module in m.backbone.named_modules():
        if isinstance(module, adapters.LoRALinear):  # merged by the formula, written independently here
            delta = (16.0 / 4) * torch.einsum("or,ri->oi", module.lora_B.detach(), module.lora_A.detach())
            state[name + ".weight"] = state[name + ".weight"] + delta
            changed += int(delta.abs().max() > 1e-4)
    assert changed == 2 * 4  # every adapted Linear of the last 2 layers moved
    m.eval()
    real = batch["tokens"].ne(vocab.PAD_IDX)
    with torch.no_grad():
        ours = m.backbone_forward(batch["tokens"])
    ref = reference_outputs(plain_esm2(state), batch)
    assert (ours[real] - ref[real]).abs().max() <= 1e-5
    adapters.merge_lora(m.backbone)  # the export path gives the same plain model
    assert not any(isinstance(x, adapters.LoRALinear) for x in m.backbone.modules())
    with torch.no_grad():
        assert (m.backbone_forward(batch["tokens"])[real] - ref[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("targets,k", [(["q", "k", "v", "out"], 0), (["q", "v", "fc1"], 1), (["fc2", "k"], 2)])
def test_lora_trainable_parameter_count_is_the_formula(targets, k):
    r = 3
    m = model.Encoder(config("lora", k=k, lora={"rank": r, "targets": targets}))
    shapes = {"q": (D, D), "k": (D, D), "v": (D, D), "out": (D, D), "fc1": (D, 4 * D), "fc2": (4 * D, D)}
    layers = LAYERS if k == 0 else k
    per_layer = sum(r * (i + o) for i, o in (shapes[t] for t in targets))
    backbone_trainable = sum(p.numel() for p in m.backbone.parameters() if p.requires_grad)
    assert backbone_trainable == layers * per_layer
    assert m.first_trainable == LAYERS - layers


def test_adapter_parameter_count_and_placement():
    m = model.Encoder(config("adapter", k=2, adapter={"dim": 5}))
    assert m.first_trainable == LAYERS - 2
    per_adapter = (D * 5 + 5) + (5 * D + D)
    assert sum(p.numel() for p in m.backbone.parameters() if p.requires_grad) == 2 * 2 * per_adapter
    for i, layer in enumerate(m.backbone.layers):
        wrapped = isinstance(layer.self_attn.out_proj, adapters.AdaptedLinear) and isinstance(layer.fc2, adapters.AdaptedLinear)
        assert wrapped == (i >= 1)


@pytest.mark.parametrize("tune", ["lora", "adapter"])
def test_gradients_reach_only_adapters_and_heads(tune):
    torch.manual_seed(0)
    m = model.Encoder(config(tune, k=2))
    batch = batch_of()
    one_step(m, batch)  # B (LoRA) / up (adapters) start at zero; after a step every added matrix gets a gradient
    out = m(batch)
    (out["class_logits"].square().sum() + out["motif_logits"].sigmoid().sum()).backward()
    for name, p in m.named_parameters():
        is_backbone = name.startswith("backbone.")
        assert p.requires_grad == (not is_backbone or adapters.is_peft_parameter(name)), name
        assert (p.grad is not None and p.grad.abs().sum() > 0) == p.requires_grad, name
    assert all(".layers.0." not in n for n, p in m.named_parameters() if p.requires_grad)  # layer 0 not adapted


@pytest.mark.parametrize("tune", ["full", "lora", "last_k"])
def test_activation_checkpointing_gives_the_same_gradients(tune):
    grads = []
    for checkpointing in ("none", "all"):
        torch.manual_seed(0)
        m = model.Encoder(config(tune, k=2, checkpointing=checkpointing, lora={"dropout": 0.2}))
        m.train()
        torch.manual_seed(1)  # the same LoRA dropout masks, recomputed identically in the backward pass
        out = m(batch_of())
        (out["class_logits"].square().sum() + out["motif_logits"].sigmoid().sum()).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name, g in grads[0].items():
        assert (grads[1][name] - g).abs().max() <= 1e-6, name


@pytest.mark.parametrize("loss_name", ["hard", "supcon", "mixed", "instance", "cluster", "tcr"])
def test_lora_with_every_contrastive_loss_and_the_frozen_cache(tmp_path, loss_name):
    """One SupCon training step per loss with LoRA on the last layer and the first two layers cached."""
    tree = {"seed": 0, "device": "cpu", "run_dir": str(tmp_path / "run"),
            "data": {"root": str(ROOT / "data" / "demo_peft"), "max_len": 64, "overlap": 16,
                     "synthetic": {"generate": True, "n_proteins": 60, "seed": 2}},
            "encoder": {"scratch": {"num_layers": LAYERS, "embed_dim": D, "attention_heads": 4}, "tune": "lora",
                        "trainable_layers": 1, "cache_frozen": loss_name == "hard"},
            "train": {"batch_size": 8},
            "supcon": {"apply": True, "loss": loss_name, "n_pos": 1, "n_neg": 2, "hidden_dim": 16, "out_dim": 8,
                       "n_clusters": 3}}
    cfg = resolve_config(tree)
    datasets = data.build_datasets(cfg)
    torch.manual_seed(0)
    m = model.Encoder(cfg)
    if cfg.encoder.cache_frozen:
        m.cache = cache.make_cache(m, datasets, cfg)
    contrast.setup_supcon(cfg, m, datasets["train"], torch.device("cpu"), logging.getLogger("test"))
    datasets["train"].set_epoch(0, contrastive=True)
    criteria = {"class": loss.ClassLoss(loss.class_weights(datasets["train"].class_counts())),
                "motif": loss.MotifLoss(loss.motif_pos_weights(*datasets["train"].residue_counts()))}
    _, loader = train.make_loader(datasets["train"], cfg)
    for batch in list(loader)[:2]:  # the second batch reads cached frozen layers for repeated proteins
        total, losses, _ = train.step_losses(m, batch, criteria, cfg)
        assert torch.isfinite(total) and "supcon_loss" in losses
        total.backward()
    trained = {n for n, p in m.named_parameters() if p.grad is not None}
    assert trained and all(not n.startswith("backbone.") or ".lora_" in n for n in trained)
    assert any(".lora_B" in n for n in trained)


def test_lora_and_adapter_runs_train_and_predict(tmp_path, capsys):
    fasta = tmp_path / "in.fa"
    fasta.write_text(">A\nMKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ\n>B\nMLSRAVCGTSRQLAPVLGYLGSRQKHSLPDKKR\n")
    for tune in ("lora", "adapter"):
        cfg = write_config(tmp_path / tune, **{"train.epochs": 1, "encoder.tune": tune, "encoder.trainable_layers": 1,
                                               "encoder.scratch.num_layers": 2, "supcon.apply": True,
                                               "supcon.hidden_dim": 16, "supcon.out_dim": 8})
        assert train.main(["--config", str(cfg)]) == 0
        run = tmp_path / tune / "run"
        record = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
        for key in ("train_loss", "train_class_loss", "train_motif_loss", "train_supcon_loss", "val_macro_mcc"):
            assert record[key] == record[key] and abs(record[key]) < 1e6, key  # finite
        out = tmp_path / f"{tune}.json"
        assert predict.main(["--checkpoint", str(run / "checkpoints" / "best.pt"), "--fasta", str(fasta),
                             "--out", str(out), "--device", "cpu"]) == 0, capsys.readouterr().err
        assert out.is_file()


def test_merged_lora_export_matches_the_trained_model(tmp_path):
    """scripts/convert_weights.py exports a LoRA run's backbone with the adapters merged."""
    cfg = write_config(tmp_path, **{"train.epochs": 1, "encoder.tune": "lora", "encoder.trainable_layers": 0,
                                    "encoder.scratch.num_layers": 2, "train.lr": 0.05})
    assert train.main(["--config", str(cfg)]) == 0
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "convert_weights.py"), str(ckpt),
                           str(tmp_path / "merged.pt"), "--to", "fair-esm"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    state = utils.load_checkpoint(ckpt)
    trained = model.Encoder(resolve_config(state["config"]), arch=state["arch"]).eval()
    trained.load_state_dict(state["model"])
    assert any(float(p.detach().abs().max()) > 0 for n, p in trained.named_parameters() if n.endswith("lora_B"))
    arch, merged_state = weights.read_fair_esm(tmp_path / "merged.pt")
    assert arch["num_layers"] == 2 and not any("lora" in k for k in merged_state)
    merged = esm.model.esm2.ESM2(2, D, 4, alphabet="ESM-1b").eval()
    assert not merged.load_state_dict(merged_state, strict=False).unexpected_keys
    batch = batch_of()
    real = batch["tokens"].ne(vocab.PAD_IDX)
    with torch.no_grad():
        ours = trained.backbone_forward(batch["tokens"])
        plain = merged(batch["tokens"], repr_layers=[2])["representations"][2]
    assert (ours[real] - plain[real]).abs().max() <= 1e-5


@pytest.mark.parametrize("sets,needle", [
    (["encoder.lora.rank=0"], "encoder.lora.rank must be >= 1"),
    (["encoder.lora.targets=[q, query]"], "encoder.lora.targets: unknown target(s) ['query']"),
    (["encoder.trainable_layers=5"], "encoder.trainable_layers is 5, but the model has 1 layers"),
    (["encoder.tune=adapter", "encoder.trainable_layers=3"], "encoder.trainable_layers is 3")])
def test_bad_peft_config_exits_2_without_writing(tmp_path, capsys, sets, needle):
    cfg = write_config(tmp_path, **{"encoder.tune": "lora", "encoder.trainable_layers": 1})
    assert train.main(["--config", str(cfg), "--set", *sets]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_resume_with_mismatching_lora_config_exits_2(tmp_path, capsys):
    cfg = write_config(tmp_path, **{"train.epochs": 2, "encoder.tune": "lora", "encoder.trainable_layers": 1})
    assert train.main(["--config", str(cfg), "--stop-after", "1"]) == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    assert train.main(["--resume", str(last), "--set", "encoder.lora.rank=4"]) == 2
    err = capsys.readouterr().err
    assert str(last) in err and "encoder.lora" in err and "lora_A" in err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
