"""DistributedDataParallel on CPU (gloo): gradient equality with one process, torchrun end to end."""
import json
import logging
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, tiny_config, write_config

import batching
import contrast
import data
import loss
import train
from config import resolve_config


def tiny_supcon_tree(tmp_path, loss_name="hard", tune="full"):
    return tiny_config(tmp_path, **{
        "encoder.tune": tune, "encoder.trainable_layers": 1, "encoder.lora.dropout": 0.0,
        "train.batch_size": 8, "supcon.apply": True, "supcon.n_pos": 2, "supcon.n_neg": 3,
        "supcon.loss": loss_name, "supcon.n_clusters": 3, "train.augment.views": 2,
        "supcon.hidden_dim": 16, "supcon.out_dim": 8, "supcon.drop_out": 0.0,
        "decoder.dropout": 0.0, "decoder.class_dropout": 0.0})


def first_step_gradients(config, rank=0, world=1):
    """Gradients of the first training step (global batch = first batch of epoch 0)."""
    train_set = data.build_datasets(config)["train"]
    torch.manual_seed(0)
    model = train.Encoder(config)
    contrast.setup_supcon(config, model, train_set, torch.device("cpu"), logging.getLogger("test"))
    train_set.set_epoch(0, contrastive=True)
    net = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True) if world > 1 else model
    criteria = {"class": loss.ClassLoss(loss.class_weights(train_set.class_counts())),
                "motif": loss.MotifLoss(loss.motif_pos_weights(*train_set.residue_counts()))}
    _, loader = train.make_loader(train_set, config, rank, world)
    batch = next(iter(loader))
    total, _, _ = train.step_losses(net, batch, criteria, config)
    total.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}, len(batch["labels"])


def _worker(rank, world, init_file, tree, out):  # noqa: D103
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        grads, n_anchors = first_step_gradients(resolve_config(tree), rank, world)
        assert n_anchors == 8 // world
        if rank == 0:
            torch.save(grads, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("loss_name,tune", [("hard", "full"), ("supcon", "full"), ("instance", "full"),
                                            ("cluster", "full"), ("tcr", "full"), ("hard", "lora"), ("supcon", "adapter")])
def test_two_processes_give_the_gradients_of_one(tmp_path, loss_name, tune):
    """Anchor batches (hard) and in-batch losses over views gathered across processes; LoRA and adapters too."""
    tree = tiny_supcon_tree(tmp_path, loss_name, tune)
    config = resolve_config(tree)
    expected, n_anchors = first_step_gradients(config)  # also writes the synthetic data once
    assert n_anchors == 8
    out = tmp_path / "ddp_grads.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), tree, str(out)), nprocs=2)
    got = torch.load(out)
    assert got.keys() == expected.keys() and len(got) > (6 if tune != "full" else 10)
    for name, g in expected.items():
        assert (got[name] - g).norm() <= 1e-4 * g.norm() + 1e-8, name  # fp32 rounding only


def test_rank_slices_make_up_the_global_batch():
    batches = [[0, 1, 2, 3, 4], [5, 6, 7], [8]]
    parts = [list(batching.RankSlice(batches, r, 2)) for r in range(2)]
    assert parts[0] == [[0, 1, 2], [5, 6], [8]] and parts[1] == [[3, 4], [7], [8]]


def test_torchrun_then_resume_in_one_process(tmp_path):
    config = write_config(tmp_path, **{"train.epochs": 2, "supcon.apply": True, "supcon.warm_start": 1,
                                       "supcon.hidden_dim": 16, "supcon.out_dim": 8})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), "--config", str(config), "--stop-after", "1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "run"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "train.log"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt"]  # warm start: no best yet
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0]  # written once, by the main process
    assert train.main(["--resume", str(run_dir / "checkpoints" / "last.pt")]) == 0
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["warm_start", "joint"]
    assert (run_dir / "test_metrics.json").is_file()
