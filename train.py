"""Train MUTarget (and SupCon) on ESM-2, then test the best epoch.

  python train.py --config configs/demo.yaml                       the demo: synthetic data, CPU, 2 minutes
  python train.py --config configs/supcon.yaml --set data.fold=1 run_dir=runs/supcon_fold1
  python train.py --resume runs/supcon_fold1/checkpoints/last.pt   continue a run that stopped

A run writes into run_dir: config.yaml (the resolved config), run.json (command, code and package versions,
device, the weights' SHA-256), train.log, metrics.jsonl (one row per epoch), checkpoints/last.pt and best.pt,
and at the end test_metrics.json. A run_dir holding a run is refused unless --resume or --overwrite.
Every config key: docs/configuration.md; the outputs and resuming: docs/training.md.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set train.epochs=3 encoder.tune=frozen (repeatable; applied "
                        "in order)")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (its config is used; --set still applies)")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in a run_dir that holds a run: its files (checkpoints, metrics, logs) are deleted")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="end the process once N epochs of the run are trained (epochs 0 to N-1, counted from the "
                        "run's start, resumed epochs included); continue with --resume")
    args = p.parse_args(argv)
    if not args.config and not args.resume:
        p.error("--config is required (or --resume CHECKPOINT)")
    if args.overwrite and args.resume:
        p.error("--overwrite starts a new run: it cannot go with --resume")
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for run.json
    return args


if __name__ == "__main__":
    parse_args()  # --help and usage errors answer here, before torch and the project load (several seconds)

import json
import logging
import math
import os
import shlex
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import provenance
import tblog
from adapters import is_peft_parameter
from backbone import backbone_arch
from batching import make_loader
from cache import make_cache
from checkpoints import check_resume, commit_epoch
from config import ConfigError, check_paths, load_config, resolve_config
from contrast import anchor_cosines, phase_of, remine, setup_supcon, uses_mutations
from data import DataError
from evaluate import evaluate, final_test
from loss import ClassLoss, MotifLoss, class_weights, contrastive_loss, motif_pos_weights
from memory import Planner
from metrics import score
from model import Encoder, load_model_state
from packing import warn_if_unfused
from rundir import (NO_SIGNALS, StopSignals, Stopped, check_new_run, finished_and_tested, log_results, open_run,
                    saved_state, write_run_json)
from runtime import (amp_dtype, autocast, average_over_ranks, build_datasets_once, check_compiler, full_state,
                     init_distributed, load_optimizer_state, shard_model, to_device, warn_thread_oversubscription)
from throughput import epoch_speed, speed_text
from utils import (duration_text, load_checkpoint, log_to_file, rng_state, seed_everything, set_rng_state,
                   setup_logging, write_text_atomic, write_yaml)
from vocab import CLASSES


def main(argv=None) -> int:
    args = parse_args(argv)
    with StopSignals() as signals:
        try:
            return run(args, signals)
        except (ConfigError, DataError, OSError) as err:  # OSError: WeightsError, CheckpointError, WriteError, ...
            print(f"error: {err}", file=sys.stderr)
            log_to_file(f"error: {err}")
            return 2
        except Stopped as stop:  # before the first epoch (set-up)
            logging.getLogger("mutarget").warning("stopped by %s before training began", stop)
            return 128 + stop.signum
        finally:
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


# --------------------------------------------------------------------------- the state of a run
@dataclass
class Progress:
    """Where a run stands; checkpoints store these four fields at their top level."""

    epoch: int = 0  # the next epoch to train
    best_metric: float = -math.inf  # best validation macro-MCC so far
    best_epoch: int | None = None
    bad_epochs: int = 0  # epochs since the last gain (early stopping)


def progress_of(ckpt: dict) -> Progress:
    return Progress(**{k: ckpt[k] for k in asdict(Progress())})


@dataclass
class EpochStats:
    """An epoch of training: mean losses per batch ('loss', 'class_loss', 'motif_loss', 'supcon_loss',
    'cos_anchor_pos', 'cos_anchor_neg': those computed), the mean gradient norm per optimiser step, the
    SupCon fallback counts, and the work done (anchors, backbone token counts, seconds) for throughput."""

    losses: dict
    grad_norm: float | None
    fallbacks: dict
    work: dict
    seconds: float

    def record(self) -> dict:
        """The epoch's training part of metrics.jsonl: train_<loss>, grad_norm, supcon_fallback_<kind>."""
        out = {f"train_{k}": v for k, v in self.losses.items()}
        if self.grad_norm is not None:
            out["grad_norm"] = self.grad_norm
        return {**out, **{f"supcon_{k}": v for k, v in self.fallbacks.items()}}


@dataclass
class Trainer:
    """What the loop works with, built by set_up."""

    config: object
    device: torch.device
    model: Encoder  # the model; `net` is what the steps call (DistributedDataParallel under torchrun)
    net: torch.nn.Module
    datasets: dict
    sampler: torch.utils.data.Sampler  # the training split's epoch order (set_epoch)
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    criteria: dict
    distance_map: dict | None
    log: logging.Logger
    planner: Planner  # train.checkpointing / train.gradient_cache per step
    main_process: bool = True
    sharded: bool = False  # train.parallel: fsdp: every process validates and gathers the checkpoint with rank 0
    tb: tblog.Off = tblog.OFF
    history: list = field(default_factory=list)  # metrics.jsonl records so far
    provenance: dict = field(default_factory=dict)  # run.json's record without local paths; in every checkpoint
    signals: StopSignals = NO_SIGNALS  # a stop signal waits while an epoch's files are written

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)


# --------------------------------------------------------------------------- set-up
def run(args, signals: StopSignals = NO_SIGNALS) -> int:
    trainer, progress = set_up(args, signals)
    if trainer is None:
        return 0  # a finished run (logged)
    config, log = trainer.config, trainer.log
    try:
        for epoch in range(progress.epoch, config.train.epochs):
            if progress.bad_epochs >= config.train.patience:  # checked before the epoch: a resumed run stops too
                log.info("early stop: no val macro-MCC gain for %d epochs", config.train.patience)
                break
            if args.stop_after is not None and epoch >= args.stop_after:  # resumed ones included
                log.info("stopping as asked: %d of %d epochs trained (--stop-after %d); continue with --resume %s",
                         epoch, config.train.epochs, args.stop_after, trainer.run_dir / "checkpoints" / "last.pt")
                trainer.tb.close()
                return 0
            start, phase = time.time(), phase_of(config, epoch)
            if trainer.distance_map is not None and config.supcon.remine_every and epoch and \
                    epoch % config.supcon.remine_every == 0:
                trainer.distance_map = remine(trainer.model, trainer.datasets["train"], config, trainer.device,
                                              trainer.distance_map, log)
            trainer.sampler.set_epoch(epoch)
            trainer.datasets["train"].set_epoch(epoch, contrastive=phase != "supervised")
            stats = average_over_ranks(train_epoch(trainer, epoch))
            if trainer.main_process or trainer.sharded:
                progress = end_epoch(trainer, progress, epoch, phase, stats, start)
            if dist.is_available() and dist.is_initialized():  # everyone follows the main process's decisions
                box = [progress]
                dist.broadcast_object_list(box)
                progress = box[0]
        trainer.tb.close()
        result = None
        if trainer.main_process or trainer.sharded:
            result = final_test(trainer, progress.best_epoch, progress.best_metric)  # best.pt checked, test_metrics.json
    except Stopped as stop:
        trainer.tb.close()
        if trainer.main_process:  # the only process that knows the files
            log.warning("stopped by %s: %s", stop, saved_state(trainer.run_dir, trainer.history, config.train.epochs))
        return 128 + stop.signum
    if trainer.main_process:
        log_results(log, trainer.run_dir, result)
    return 0


RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_metric", "best_epoch", "bad_epochs",
               "rng", "config", "arch")


def set_up(args, signals: StopSignals = NO_SIGNALS) -> tuple[Trainer | None, Progress]:
    """Everything before the first epoch. Config, data and weights are checked before anything is written; the
    log is kept from the first line and written to train.log once run_dir may be written. (None, progress) for
    a finished run whose final test is written (logged: nothing to do)."""
    log = setup_logging(quiet=int(os.environ.get("RANK", "0")) != 0, hold=True, carry=False)
    log_to_file(f"train.py {shlex.join(args.argv)}", logging.INFO)  # train.log's first line: the command
    resume = load_checkpoint(args.resume, RESUME_KEYS) if args.resume else None
    if resume is not None:
        config = resolve_config(resume["config"], args.set, where=f"{args.resume} (stored config)")
    else:
        config = load_config(args.config, args.set)
    check_paths(config)  # run_dir and data.root: named errors before anything is written
    check_new_run(config, args.resume, args.overwrite)  # a run_dir holding another run is refused
    tblog.require(config)
    rank, world, device = init_distributed(config)
    amp_dtype(config.train.amp, device)  # an impossible train.amp fails here, before anything is written
    if config.train.compile:
        check_compiler(device)
    if config.train.parallel == "fsdp" and world == 1:
        raise ConfigError("train.parallel: fsdp shards the model over processes: start it with torchrun "
                          "--nproc_per_node=N (N >= 2), or use train.parallel: ddp in one process")
    main_process = rank == 0  # only the main process logs and writes files
    log = setup_logging(quiet=not main_process, hold=True)
    seed_everything(config.seed)  # the same initial model on every rank
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    datasets = build_datasets_once(config, main_process, world)
    model = Encoder(config, arch=resume["arch"] if resume else None).to(device)
    if resume is not None:
        load_model_state(model, resume["model"], args.resume)
    caching = config.encoder.cache_frozen or config.encoder.cache_dir is not None
    if caching and model.first_trainable == 0:
        raise ConfigError("encoder.cache_frozen needs frozen leading layers, but every layer trains "
                          f"(encoder.tune: {config.encoder.tune}); use tune: last_k or frozen, or turn the cache off")
    if caching and uses_mutations(config):
        raise ConfigError("encoder.cache_frozen would be wrong with mutated sequences (train.augment.apply or "
                          "a view-based supcon.loss): the frozen layers' outputs change every epoch")
    distance_map = setup_supcon(config, model, datasets["train"], device, log, resume)
    plan = None  # every field of the checkpoint, and best.pt of the run, checked before anything is written
    if resume is not None:
        plan = check_resume(resume, args.resume, config, model, make_optimizer(model, config.train),
                            amp_dtype(config.train.amp, device) == torch.float16)
    done = resume is not None and finished_and_tested(config, resume, args.resume, log)  # nothing to train or test
    record = None
    if main_process and not done:  # what this run uses: run.json (the weights are hashed here, before anything is written)
        record = provenance.collect(args.argv, config, device, world, resume, args.resume)

    run_dir = Path(config.run_dir)  # from here on, files are written
    if done and not plan.changes(run_dir):  # a finished, tested run whose files agree: nothing to write
        return None, progress_of(resume)
    if main_process:  # train.log (the lines held so far first); best.pt and metrics.jsonl made to agree on resume
        log = open_run(run_dir, args.overwrite, plan)
    if done:  # a finished, tested run: its files repaired, nothing else to do
        return None, progress_of(resume)
    if main_process:
        write_yaml(run_dir / "config.yaml", config.to_dict())
        record = write_run_json(run_dir, record, log)
        if distance_map is not None:
            write_text_atomic(run_dir / "distance_map.json", json.dumps(distance_map, indent=1))
        warn_thread_oversubscription(log)
    if world > 1:
        dist.barrier()  # the other processes write (frozen caches) only once run_dir is set up
    if caching:
        model.cache = make_cache(model, datasets, config, rank)
    if config.train.compile:
        model.compile_layers()
    warn_if_unfused(model, device, amp_dtype(config.train.amp, device), log)
    if config.supcon.apply and config.encoder.tune == "frozen":
        log.warning("SupCon is on but the backbone is frozen: the contrastive loss can only train the "
                    "projection head, which no prediction uses (set encoder.tune: last_k or full)")
    log.info("data %s fold %d: train %d, valid %d, test %d proteins; %d process(es) on %s", config.data.root,
             config.data.fold, *(len(datasets[k]) for k in ("train", "valid", "test")), world, device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model: ESM-2 %s, tune=%s, %d trainable / %d parameters", backbone_arch(model.backbone),
             config.encoder.tune, n_train, sum(p.numel() for p in model.parameters()))

    train_set = datasets["train"]
    criteria = {"class": ClassLoss(class_weights(train_set.class_counts(), config.train.class_weighting)).to(device),
                "motif": MotifLoss(motif_pos_weights(*train_set.residue_counts(), config.train.max_pos_weight)).to(device)}
    sampler, loader = make_loader(train_set, config, rank, world, device)
    sharded = config.train.parallel == "fsdp"
    if sharded:
        shard_model(model)  # before the optimiser: it steps the shards
        log.info("train.parallel: fsdp: each backbone call takes the whole batch (encoder.chunk_tokens not applied): "
                 "every process must run each layer equally often for the sharded weights' gathers to match")
    optimizer = make_optimizer(model, config.train)
    scheduler = make_scheduler(optimizer, config.train, math.ceil(len(loader) / config.train.accumulate))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(config.train.amp, device) == torch.float16)
    net = model
    if world > 1:
        seed_everything(config.seed + rank)  # per-rank dropout streams
    if world > 1 and not sharded:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.supcon.apply)  # warm start leaves the heads unused
    planner = Planner(model, config, device, amp_dtype(config.train.amp, device) or torch.float32, world)
    trainer = Trainer(config, device, model, net, datasets, sampler, loader, optimizer, scheduler, scaler, criteria,
                      distance_map, log, planner, main_process, sharded,
                      provenance=provenance.public(record) if record else {}, signals=signals)

    progress = Progress()
    if resume is not None:
        load_optimizer_state(model, optimizer, resume["optimizer"], args.resume)
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        progress = progress_of(resume)
        set_rng_state({**resume["rng"], "cuda": resume["rng"].get("cuda", [])[:torch.cuda.device_count()]})
        trainer.history = plan.history
        log.info("resumed from %s at epoch %d (best val macro-MCC %.4f)", args.resume, progress.epoch,
                 progress.best_metric)
    trainer.tb = tblog.open_log(config, main_process, progress.epoch, len(loader))
    return trainer, progress


def make_optimizer(model: Encoder, train_cfg) -> torch.optim.AdamW:
    """AdamW; heads at train.lr, trainable backbone layers at train.backbone_lr; no decay on
    biases and norms."""
    groups = defaultdict(list)
    for name, param in model.named_parameters():
        if param.requires_grad:
            # pretrained backbone weights at backbone_lr; heads and new LoRA / adapter weights at lr
            part = "backbone" if name.startswith("backbone.") and not is_peft_parameter(name) else "heads"
            groups[(part, param.ndim > 1 and not name.endswith("b1"))].append(param)
    lr = {"backbone": train_cfg.backbone_lr, "heads": train_cfg.lr}
    fused = next(model.parameters()).is_cuda  # one kernel for all parameters, no host synchronisation
    return torch.optim.AdamW([{"params": ps, "lr": lr[part], "weight_decay": train_cfg.weight_decay if decay else 0.0}
                              for (part, decay), ps in sorted(groups.items())], fused=fused or None)


def make_scheduler(optimizer, train_cfg, steps_per_epoch: int):
    """Linear warm-up over train.warmup_epochs, then cosine decay to min_lr_ratio * lr (per step)."""
    total = max(train_cfg.epochs * steps_per_epoch, 1)
    warmup = int(round(train_cfg.warmup_epochs * steps_per_epoch))

    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return train_cfg.min_lr_ratio + (1 - train_cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --------------------------------------------------------------------------- the loop
def train_epoch(trainer: Trainer, epoch: int) -> EpochStats:
    """One epoch. Zero grads after every optimiser step, clip after AMP unscale, accumulate
    `train.accumulate` batches per step; TensorBoard gets every batch.

    SupCon: a batch holding 'group_index' was extended (decided per batch, before the forward
    pass) with each anchor's positives and negatives, or with its mutated views; it adds
    supcon.weight * the configured contrastive term. In warm start only that term is computed
    and the heads are not run.
    """
    config, device, net, loader, optimizer = trainer.config, trainer.device, trainer.net, trainer.loader, trainer.optimizer
    net.train()
    cfg, dtype = config.train, amp_dtype(config.train.amp, device)
    heads = phase_of(config, epoch) != "warm_start"
    trainable = [p for p in net.parameters() if p.requires_grad]
    sums, fallbacks, n_batches, steps, anchors = defaultdict(float), defaultdict(int), len(loader), 0, 0
    model = trainer.model
    model.token_counts.update(dict.fromkeys(model.token_counts, 0))  # tokens the backbone runs (throughput)
    if model.cache is not None:
        model.cache.hits = model.cache.misses = 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch} ({epoch + 1} of {cfg.epochs})", leave=False, disable=None)
    start, every = time.time(), max(n_batches // 10, 1)
    last_line = start
    for step, batch in enumerate(bar):
        if bar.disable and step % every == 0 and time.time() - last_line >= 30:  # no bar (not a terminal)
            last_line = time.time()
            left = f", about {duration_text((last_line - start) / step * (n_batches - step))} left in it" if step else ""
            trainer.log.info("epoch %d (%d of %d): %d/%d batches, %s%s%s", epoch, epoch + 1, cfg.epochs, step,
                             n_batches, duration_text(last_line - start), left,
                             f", loss {float(sums['loss']) / step:.4f}" if step else "")  # step 0: a slow first batch
        batch = to_device(batch, device)
        anchors += batch["labels"].shape[0]
        group_start = step - step % cfg.accumulate
        group_size = min(cfg.accumulate, n_batches - group_start)
        loss, losses, out = forward_backward(trainer, batch, heads, dtype, group_size)
        trainer.tb.step(epoch * n_batches + step, loss, losses, trainer.scheduler.get_last_lr()[0])
        if "fallback" in batch:  # anchor / positive / negative batches (supcon.loss: hard)
            cos_pos, cos_neg = anchor_cosines(out["projection"].detach(), config.supcon.n_pos)
            sums["cos_anchor_pos"] += cos_pos
            sums["cos_anchor_neg"] += cos_neg
            for name, count in batch["fallback"].items():
                fallbacks[name] += count
        if step + 1 == group_start + group_size:
            trainer.scaler.unscale_(optimizer)
            if cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip).detach()
                sums["grad_norm"] += norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
            trainer.scaler.step(optimizer)
            trainer.scaler.update()
            trainer.scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
        sums["loss"] += loss.detach()
        for k, v in losses.items():
            sums[k] += v.detach()
    grad_norm = float(sums.pop("grad_norm")) / max(steps, 1) if "grad_norm" in sums else None
    return EpochStats({k: float(v) / n_batches for k, v in sums.items()}, grad_norm, dict(fallbacks),
                      {"anchors": anchors, **model.token_counts}, time.time() - start)


def forward_backward(trainer: Trainer, batch: dict, heads: bool, dtype, group_size: int):
    """step_losses (under autocast) and the backward pass of the loss / group_size (scaled) -> step_losses' result.
    The planner picks the checkpointed layers, or splits the step by gradient caching (memory.py)."""
    def losses_of(stream=None):
        with autocast(trainer.device, dtype):
            return step_losses(trainer.net, batch, trainer.criteria, trainer.config, heads, stream)
    return trainer.planner.step(batch, trainer.optimizer, losses_of,
                                lambda loss: trainer.scaler.scale(loss / group_size).backward(),
                                lambda: autocast(trainer.device, dtype))


def step_losses(model, batch: dict, criteria: dict, config, heads: bool = True, stream=None):
    """Forward and losses of one batch -> (total loss, {name: loss}, model outputs). stream: the backbone's
    outputs when computed already (gradient caching).

    A batch holding 'group_index' is an extended SupCon batch: the contrastive term is added.
    Under DistributedDataParallel the motif loss is divided by the scored residues of the global
    batch (all ranks), so that averaged gradients equal those of one process on that batch.
    """
    extended = "group_index" in batch
    out = model(batch, heads=heads, contrastive=extended, stream=stream)
    losses = {}
    if heads:
        denominator = None
        if dist.is_available() and dist.is_initialized():
            denominator = batch["target_mask"].sum().float()
            dist.all_reduce(denominator)
            denominator = denominator / dist.get_world_size()
        losses["class_loss"] = criteria["class"](out["class_logits"], batch["labels"])
        losses["motif_loss"] = criteria["motif"](out["motif_logits"], batch["targets"], batch["target_mask"], denominator)
    if extended:
        losses["supcon_loss"] = contrastive_loss(config, out, batch["labels"], getattr(model, "module", model).queue)
    loss = (losses.get("class_loss", 0) + config.train.motif_weight * losses.get("motif_loss", 0)
            + config.supcon.weight * losses.get("supcon_loss", 0))
    return loss, losses, out


def end_epoch(trainer: Trainer, progress: Progress, epoch: int, phase: str, stats: EpochStats,
              start: float) -> Progress:
    """Validate, select on val macro-MCC (after the warm start), write last.pt (holding the metrics rows so
    far), best.pt when improved, then metrics.jsonl (checkpoints.commit_epoch: in that order, consistent after
    a kill at any instant), TensorBoard values, and log. Returns the new progress.
    Sharded (train.parallel: fsdp), every process runs it (validation and gathering the weights need them
    all); the main process alone writes."""
    config, model = trainer.config, trainer.model
    val = score(evaluate(model, trainer.datasets["valid"], config, trainer.device))
    selectable = phase != "warm_start"  # model selection starts after the warm start
    improved = selectable and val["macro_mcc"] > progress.best_metric
    progress = Progress(epoch + 1, val["macro_mcc"] if improved else progress.best_metric,
                        epoch if improved else progress.best_epoch, 0 if improved else progress.bad_epochs + selectable)
    model_state, optimizer_state = full_state(model, trainer.optimizer)
    if not trainer.main_process:
        return progress
    speed = epoch_speed(stats.work, stats.seconds, backbone_arch(model.backbone), model.first_trainable,
                        config.encoder.tune, trainer.device)
    cache = {"cache_hits": model.cache.hits, "cache_misses": model.cache.misses} if model.cache is not None else {}
    record = {"epoch": epoch, "phase": phase, **stats.record(), **speed, **cache,
              "lr": trainer.scheduler.get_last_lr()[0], "val_macro_f1": val["macro_f1"],
              "val_macro_mcc": val["macro_mcc"], "val_macro_site_accuracy": val["residue"]["macro_site_accuracy"],
              "val_macro_iou": val["residue"]["macro_iou"], "best": improved, "time_s": time.time() - start}
    checkpoint = {"model": model_state, "optimizer": optimizer_state, "scheduler": trainer.scheduler.state_dict(),
                  "scaler": trainer.scaler.state_dict(), **asdict(progress), "rng": rng_state(),
                  "config": config.to_dict(), "arch": backbone_arch(model.backbone), "classes": CLASSES,
                  "distance_map": trainer.distance_map, "history": trainer.history + [record],
                  "provenance": trainer.provenance}
    with trainer.signals.writing():  # a stop signal waits until the epoch's files agree
        commit_epoch(trainer.run_dir, checkpoint, improved)
        trainer.history = checkpoint["history"]
    trainer.tb.epoch(record)
    losses = ", ".join(f"{k} {v:.4f}" for k, v in stats.losses.items() if k.endswith("_loss"))
    epochs, times = config.train.epochs, [r["time_s"] for r in trainer.history if "time_s" in r]
    left = f"; about {duration_text(sum(times) / len(times) * (epochs - epoch - 1))} left" if epoch + 1 < epochs else ""
    trainer.log.info("epoch %d (%d of %d, %s): loss %.4f (%s) val macro-F1 %.4f macro-MCC %.4f%s (%.1fs; %s%s)",
                     epoch, epoch + 1, epochs, phase, stats.losses["loss"], losses, val["macro_f1"], val["macro_mcc"],
                     " *" if improved else "", record["time_s"], speed_text(speed), left)
    return progress


if __name__ == "__main__":
    sys.exit(main())
