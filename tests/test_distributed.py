"""DistributedDataParallel on CPU (gloo): gradient equality with one process, torchrun end to end."""
import datetime
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
import runtime
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


def first_steps_losses(config, rank=0, world=1, steps=3):
    """Losses of the first `steps` optimiser steps on the global batches of epoch 0; with world > 1 the model
    is sharded (train.parallel: fsdp) and each step's loss is the mean of the processes' (the loss of the
    global batch: the motif loss is normalised over the global batch)."""
    train_set = data.build_datasets(config)["train"]
    torch.manual_seed(0)
    model = train.Encoder(config)
    if world > 1:
        runtime.shard_model(model)
    optimizer = train.make_optimizer(model, config.train)
    criteria = {"class": loss.ClassLoss(loss.class_weights(train_set.class_counts())),
                "motif": loss.MotifLoss(loss.motif_pos_weights(*train_set.residue_counts()))}
    _, loader = train.make_loader(train_set, config, rank, world)
    losses = []
    for _, batch in zip(range(steps), loader):
        total, _, _ = train.step_losses(model, batch, criteria, config)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = total.detach().clone()
        if world > 1:
            dist.all_reduce(value)
        losses.append(float(value) / world)
    return losses


def _worker(rank, world, init_file, trees, fsdp_tree, out):  # noqa: D103
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))  # a collective that never matches fails
    try:
        results = {"grads": []}
        for tree in trees:
            grads, n_anchors = first_step_gradients(resolve_config(tree), rank, world)
            assert n_anchors == 8 // world
            results["grads"].append(grads)
        results["fsdp_losses"] = first_steps_losses(resolve_config(fsdp_tree), rank, world)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


CASES = [("hard", "full"), ("supcon", "full"), ("instance", "full"), ("cluster", "full"), ("tcr", "full"),
         ("hard", "lora"), ("supcon", "adapter")]


def test_two_processes_give_the_gradients_of_one(tmp_path):
    """Two gloo processes (one spawn for every case, to pay for starting them once):
    - DistributedDataParallel: the gradients of one process on the global batch, for anchor batches (hard)
      and the in-batch losses over views gathered across processes, LoRA and adapters too;
    - FSDP2 (train.parallel: fsdp): the losses of the first 3 optimiser steps equal one unsharded process's,
      to 1e-5 (relative): the sharded gradients and AdamW steps are the unsharded ones. A token budget of one
      window per call, under which the two processes' batches (other window counts) would run their layers a
      different number of times, is set aside under FSDP (one call per forward), so the gathers match."""
    trees = [tiny_supcon_tree(tmp_path, loss_name, tune) for loss_name, tune in CASES]
    fsdp_tree = tiny_config(tmp_path, **{"train.batch_size": 8, "train.parallel": "fsdp", "decoder.dropout": 0.0,
                                         "decoder.class_dropout": 0.0, "encoder.chunk_tokens": 66})
    expected = [first_step_gradients(resolve_config(tree)) for tree in trees]  # also writes the synthetic data
    expected_losses = first_steps_losses(resolve_config(fsdp_tree))
    out = tmp_path / "ranks.pt"
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), trees, fsdp_tree, str(out)), nprocs=2)
    got = torch.load(out, weights_only=True)
    for (loss_name, tune), (grads, n_anchors), ranks in zip(CASES, expected, got["grads"]):
        assert n_anchors == 8
        assert ranks.keys() == grads.keys() and len(ranks) > (6 if tune != "full" else 10), (loss_name, tune)
        for name, g in grads.items():
            assert (ranks[name] - g).norm() <= 1e-4 * g.norm() + 1e-8, (loss_name, tune, name)  # fp32 rounding only
    assert len(expected_losses) == 3 and expected_losses[0] != expected_losses[2]
    assert got["fsdp_losses"] == pytest.approx(expected_losses, rel=1e-5)


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
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "run.json",
                                                         "train.log"]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt"]  # warm start: no best yet
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0]  # written once, by the main process
    assert train.main(["--resume", str(run_dir / "checkpoints" / "last.pt")]) == 0
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["warm_start", "joint"]
    assert (run_dir / "test_metrics.json").is_file()


def test_fsdp_under_torchrun_then_resume_in_one_process(tmp_path, capsys):
    """train.parallel: fsdp trains under torchrun (2 gloo processes, the demo's kind of backbone) and writes
    checkpoints that hold the whole state: one process resumes them (as ddp). Without torchrun, fsdp is refused."""
    config = write_config(tmp_path, **{"train.epochs": 2, "train.parallel": "fsdp"})
    assert train.main(["--config", str(config)]) == 2
    assert "train.parallel: fsdp shards the model over processes: start it with torchrun" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), "--config", str(config), "--stop-after", "1"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "run"
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    model = train.Encoder(resolve_config(ckpt["config"]), arch=ckpt["arch"])
    assert {k: tuple(v.shape) for k, v in ckpt["model"].items()} == {k: tuple(v.shape) for k, v in
                                                                      model.state_dict().items()}  # whole tensors
    assert all(isinstance(k, str) for k in ckpt["optimizer"]["state"])  # by parameter name: any number of processes
    assert train.main(["--resume", str(run_dir / "checkpoints" / "last.pt"), "--set", "train.parallel=ddp"]) == 0
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0, 1] and (run_dir / "test_metrics.json").is_file()
