"""Train MUTarget on ESM-2: python train.py --config CONFIG [--set KEY=VALUE ...] [--resume CKPT]."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import space
import tblog
from adapters import is_peft_parameter
from cache import DiskCache, FrozenCache, model_key
from data import (CLASSES, FALLBACKS, Collate, DataError, EpochShuffleSampler, LengthBucketSampler,
                  LocalizationDataset, RankSlice, build_datasets, class_distance_map, length_sorted_batches, read_distance_map,
                  window_starts)
from loss import ClassLoss, MotifLoss, class_weights, contrastive_loss, motif_pos_weights
from metrics import classification_metrics, format_table, residue_metrics, tune_thresholds
from model import Encoder, backbone_arch, load_model_state
from throughput import epoch_speed
from utils import (ConfigError, load_checkpoint, load_config, log_to_file, remove_stale_temps, resolve_config,
                   rng_state, save_checkpoint, seed_everything, set_rng_state, setup_logging,
                   warn_thread_oversubscription, write_atomic, write_text_atomic, write_yaml)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set train.epochs=3 encoder.tune=frozen")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (its config is used; --set still applies)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="end the process after epoch N (for time-limited jobs; continue with --resume)")
    args = p.parse_args(argv)
    if not args.config and not args.resume:
        p.error("--config is required (or --resume CHECKPOINT)")
    return args


# --------------------------------------------------------------------------- set-up
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from None


def amp_dtype(amp: str, device: torch.device):
    """Autocast dtype, None = fp32. CUDA: auto = bf16 where supported, else fp16. CPU: bf16 when asked
    (train.amp: bf16); auto stays fp32 on the CPU (see the README's measurement); fp16 is CUDA-only."""
    if amp == "none":
        return None
    if device.type != "cuda":
        if amp == "fp16":
            raise ConfigError("train.amp: fp16 needs CUDA; on the CPU use bf16 or none (auto = fp32 on the CPU)")
        return torch.bfloat16 if amp == "bf16" else None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def autocast(device: torch.device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


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
    return torch.optim.AdamW([{"params": ps, "lr": lr[part], "weight_decay": train_cfg.weight_decay if decay else 0.0}
                              for (part, decay), ps in sorted(groups.items())])


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


def init_distributed(config) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group:
    NCCL with one GPU per process, else gloo on the CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, resolve_device(config.device)
    device = resolve_device(config.device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def make_loader(train_set, config, rank: int = 0, world: int = 1, device=torch.device("cpu")):
    """(epoch sampler, DataLoader) of the training split: global batches of train.batch_size,
    shuffled per (seed, epoch), length-bucketed if train.length_buckets; each rank loads its part."""
    if config.train.length_buckets:
        sampler = LengthBucketSampler(train_set.item_lengths(), config.train.batch_size, config.seed)
        batches = sampler
    else:
        sampler = EpochShuffleSampler(len(train_set), config.seed)
        batches = torch.utils.data.BatchSampler(sampler, config.train.batch_size, drop_last=False)
    if world > 1:
        if config.train.batch_size < world:
            raise ConfigError(f"train.batch_size ({config.train.batch_size}) is the global batch: it must be at "
                              f"least the number of processes ({world})")
        batches = RankSlice(batches, rank, world)
    loader = DataLoader(train_set, batch_sampler=batches, collate_fn=Collate(config.data.max_len, config.data.overlap),
                        num_workers=config.data.num_workers, pin_memory=device.type == "cuda")
    return sampler, loader


# --------------------------------------------------------------------------- training
def phase_of(config, epoch: int) -> str:
    """'warm_start' (SupCon only), 'joint' (supervised + SupCon) or 'supervised'."""
    sc = config.supcon
    if sc.apply and epoch < sc.warm_start:
        return "warm_start"
    return "joint" if sc.apply and sc.apply_supcon_loss else "supervised"


def train_loop(model, loader, optimizer, scheduler, scaler, criteria, config, device, epoch: int,
               tb=tblog.OFF) -> dict:
    """One epoch. Zero grads after every optimiser step, clip after AMP unscale, accumulate
    `train.accumulate` batches per step. Returns mean losses of the epoch; `tb` logs every batch.

    SupCon: a batch holding 'group_index' was extended (decided per batch, before the forward
    pass) with each anchor's positives and negatives, or with its mutated views; it adds
    supcon.weight * the configured contrastive term. In warm start only that term is computed
    and the heads are not run.
    """
    model.train()
    cfg, dtype = config.train, amp_dtype(config.train.amp, device)
    heads = phase_of(config, epoch) != "warm_start"
    trainable = [p for p in model.parameters() if p.requires_grad]
    sums, fallbacks, n_batches = defaultdict(float), defaultdict(int), len(loader)
    counts = getattr(model, "module", model).token_counts  # tokens the backbone runs (throughput)
    counts.update(dict.fromkeys(counts, 0))
    anchors = 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=None)
    log, start, every = logging.getLogger("mutarget"), time.time(), max(n_batches // 10, 1)
    last_line = start
    for step, batch in enumerate(bar):
        if bar.disable and step % every == 0 and time.time() - last_line >= 30:  # no bar (not a terminal)
            last_line = time.time()
            log.info("epoch %d: %d/%d batches, %.0fs, loss %.4f", epoch, step, n_batches, last_line - start,
                     float(sums["loss"]) / step)
        batch = to_device(batch, device)
        anchors += batch["labels"].shape[0]
        with autocast(device, dtype):
            loss, losses, out = step_losses(model, batch, criteria, config, heads)
        tb.step(epoch * n_batches + step, loss, losses, scheduler.get_last_lr()[0])
        if "fallback" in batch:  # anchor / positive / negative batches (supcon.loss: hard)
            cos_pos, cos_neg = anchor_cosines(out["projection"].detach(), config.supcon.n_pos)
            sums["cos_anchor_pos"] += cos_pos
            sums["cos_anchor_neg"] += cos_neg
            for name, count in zip(FALLBACKS, batch["fallback"].tolist()):
                fallbacks["supcon_" + name] += count
        group_start = step - step % cfg.accumulate
        group_size = min(cfg.accumulate, n_batches - group_start)
        scaler.scale(loss / group_size).backward()
        if step + 1 == group_start + group_size:
            scaler.unscale_(optimizer)
            if cfg.grad_clip > 0:
                sums["grad_norm"] += torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip).detach()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            sums["steps"] += 1
        sums["loss"] += loss.detach()
        for k, v in losses.items():
            sums[k] += v.detach()
    steps = max(sums.pop("steps", 0), 1)
    stats = {f"train_{k}": float(v) / n_batches for k, v in sums.items() if k != "grad_norm"}
    if "grad_norm" in sums:
        stats["grad_norm"] = float(sums["grad_norm"]) / steps
    work = {"anchors": anchors, **counts, "train_time_s": time.time() - start}  # summed over processes
    return {**stats, **fallbacks, **{f"count_{k}": v for k, v in work.items()}}


def step_losses(model, batch: dict, criteria: dict, config, heads: bool = True):
    """Forward and losses of one batch -> (total loss, {name: loss}, model outputs).

    A batch holding 'group_index' is an extended SupCon batch: the contrastive term is added.
    Under DistributedDataParallel the motif loss is divided by the scored residues of the global
    batch (all ranks), so that averaged gradients equal those of one process on that batch.
    """
    extended = "group_index" in batch
    out = model(batch, heads=heads, contrastive=extended)
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


def anchor_cosines(projection: torch.Tensor, n_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cosine similarity of anchors with their positives and with their negatives."""
    z = torch.nn.functional.normalize(projection.float(), dim=-1)
    cos = torch.einsum("bd,bkd->bk", z[:, 0], z[:, 1:])
    return cos[:, :n_pos].mean(), cos[:, n_pos:].mean()


@torch.no_grad()
def run_inference(model, dataset, batch_size: int, device, amp: str = "none", max_len=1022, overlap=200) -> dict:
    """Probabilities for every protein of `dataset`, in dataset order: probs [N, 8],
    motif_probs (list of [8, L_i]), pooled embeddings [N, d] and their projections [N, k] (None
    without a projection head), plus the truth: labels [N, 8], targets, target_masks."""
    model.eval()
    loader = DataLoader(dataset, batch_sampler=length_sorted_batches(dataset.lengths, batch_size),
                        collate_fn=Collate(max_len, overlap), pin_memory=device.type == "cuda")
    n = len(dataset)
    probs = np.zeros((n, len(CLASSES)), dtype=np.float32)
    pooled = np.zeros((n, model.backbone.embed_dim), dtype=np.float32)
    projection = None if model.projection is None else np.zeros((n, model.projection.net[-1].out_features), np.float32)
    motif_probs, masks = [None] * n, [None] * n
    for batch in tqdm(loader, desc=f"eval {dataset.name}", leave=False, disable=None):
        batch = to_device(batch, device)
        with autocast(device, amp_dtype(amp, device)):
            out = model(batch)
        p = torch.sigmoid(out["class_logits"].float()).cpu().numpy()
        mp = torch.sigmoid(out["motif_logits"].float()).cpu().numpy()
        tm = batch["target_mask"].cpu().numpy()
        rows = batch["indices"].cpu().numpy()
        pooled[rows] = out["pooled"].float().cpu().numpy()
        if projection is not None:
            projection[rows] = model.projection(out["pooled"]).float().cpu().numpy()
        for row, (i, length) in enumerate(zip(batch["indices"].tolist(), batch["lengths"].tolist())):
            probs[i] = p[row]
            motif_probs[i] = mp[row, :, :length]
            masks[i] = tm[row, :, :length]
    return {"probs": probs, "motif_probs": motif_probs, "pooled": pooled, "projection": projection,
            "labels": dataset.labels.astype(np.int64),
            "targets": [p.targets for p in dataset.proteins], "target_masks": masks}


def evaluate(model, dataset, config, device) -> dict:
    """run_inference with the run's settings: train.eval_batch_size, train.amp, data.max_len / overlap."""
    return run_inference(model, dataset, config.train.eval_batch_size, device, config.train.amp,
                         config.data.max_len, config.data.overlap)


def score(outputs: dict, thresholds=None) -> dict:
    """Protein-level and residue-level metrics of run_inference outputs."""
    m = classification_metrics(outputs["labels"], outputs["probs"], thresholds)
    thr = 0.5 if thresholds is None else np.asarray(thresholds)[None, :]
    y_pred = (outputs["probs"] >= thr).astype(np.int64)
    m["residue"] = residue_metrics(outputs["labels"], y_pred, outputs["motif_probs"], outputs["targets"],
                                   outputs["target_masks"])
    return m


# --------------------------------------------------------------------------- run
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (ConfigError, DataError, OSError) as err:  # OSError: WeightsError, CheckpointError, WriteError, ...
        print(f"error: {err}", file=sys.stderr)
        log_to_file(f"error: {err}")
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


RESUME_KEYS = ("model", "optimizer", "scheduler", "scaler", "epoch", "best_metric", "best_epoch", "bad_epochs",
               "rng", "config", "arch")


def run(args) -> int:
    resume = load_checkpoint(args.resume, RESUME_KEYS) if args.resume else None
    if resume is not None:
        config = resolve_config(resume["config"], args.set, where=f"{args.resume} (stored config)")
    else:
        config = load_config(args.config, args.set)
    tblog.require(config)
    rank, world, device = init_distributed(config)
    amp_dtype(config.train.amp, device)  # an impossible train.amp fails here, before anything is written
    main_process = rank == 0  # only the main process logs and writes files
    log = setup_logging(quiet=not main_process)
    seed_everything(config.seed)  # the same initial model on every rank
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # Data and weights are checked before anything is written to the run directory.
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
    run_dir = Path(config.run_dir)
    if main_process:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        log = setup_logging(run_dir)
        for stale in remove_stale_temps(run_dir) + remove_stale_temps(run_dir / "checkpoints"):
            log.info("removed %s, a temporary file left by a killed run", stale)
        write_yaml(run_dir / "config.yaml", config.to_dict())
        if distance_map is not None:
            write_text_atomic(run_dir / "distance_map.json", json.dumps(distance_map, indent=1))
    if caching:
        model.cache = frozen_cache(model, datasets, config, run_dir, rank)
    if config.supcon.apply and config.encoder.tune == "frozen":
        log.warning("SupCon is on but the backbone is frozen: the contrastive loss can only train the "
                    "projection head, which no prediction uses (set encoder.tune: last_k or full)")
    if main_process:
        warn_thread_oversubscription(log)
    log.info("data %s fold %d: train %d, valid %d, test %d proteins; %d process(es) on %s", config.data.root,
             config.data.fold, *(len(datasets[k]) for k in ("train", "valid", "test")), world, device)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("model: ESM-2 %s, tune=%s, %d trainable / %d parameters", backbone_arch(model.backbone),
             config.encoder.tune, n_train, sum(p.numel() for p in model.parameters()))

    train_set = datasets["train"]
    criteria = {"class": ClassLoss(class_weights(train_set.class_counts(), config.train.class_weighting)).to(device),
                "motif": MotifLoss(motif_pos_weights(*train_set.residue_counts(), config.train.max_pos_weight)).to(device)}
    sampler, loader = make_loader(train_set, config, rank, world, device)
    optimizer = make_optimizer(model, config.train)
    scheduler = make_scheduler(optimizer, config.train, math.ceil(len(loader) / config.train.accumulate))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype(config.train.amp, device) == torch.float16)
    net = model
    if world > 1:
        seed_everything(config.seed + rank)  # per-rank dropout streams
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=config.supcon.apply)  # warm start leaves the heads unused

    state = {"epoch": 0, "best_metric": -float("inf"), "best_epoch": None, "bad_epochs": 0}
    history = []
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        state = {k: resume[k] for k in state}
        set_rng_state(resume["rng"])
        if main_process and (run_dir / "metrics.jsonl").is_file():
            history = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                       if r["epoch"] < state["epoch"]]
        log.info("resumed from %s at epoch %d (best val macro-MCC %.4f)", args.resume, state["epoch"], state["best_metric"])

    tb = tblog.open_log(config, main_process, state["epoch"], len(loader))
    training = {"optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "distance_map": distance_map, "tb": tb}
    for epoch in range(state["epoch"], config.train.epochs):
        start, phase = time.time(), phase_of(config, epoch)
        if distance_map is not None and config.supcon.remine_every and epoch and epoch % config.supcon.remine_every == 0:
            distance_map = training["distance_map"] = remine(model, train_set, config, device, distance_map, run_dir, log)
        sampler.set_epoch(epoch)
        train_set.set_epoch(epoch, contrastive=phase != "supervised")
        if model.cache is not None:
            model.cache.hits = model.cache.misses = 0
        stats = average_over_ranks(train_loop(net, loader, optimizer, scheduler, scaler, criteria, config, device, epoch, tb))
        counts = {k[6:]: stats.pop(k) for k in list(stats) if k.startswith("count_")}
        stats.update(epoch_speed(counts, counts.pop("train_time_s"), backbone_arch(model.backbone),
                                 model.first_trainable, config.encoder.tune, device))
        if model.cache is not None:  # windows of this epoch's training read from / added to the cache
            stats["cache_hits"], stats["cache_misses"] = model.cache.hits, model.cache.misses
        if main_process:
            state = end_epoch(model, datasets["valid"], config, device, epoch, phase, stats, state, history, training,
                              start, log)
        if world > 1:  # everyone follows the main process's decisions
            box = [state]
            dist.broadcast_object_list(box)
            state = box[0]
        if args.stop_after is not None and epoch + 1 >= args.stop_after and epoch + 1 < config.train.epochs:
            log.info("stopping after epoch %d as asked; continue with --resume %s", epoch, run_dir / "checkpoints" / "last.pt")
            tb.close()
            return 0
        if state["bad_epochs"] >= config.train.patience:
            log.info("early stop: no val macro-MCC gain for %d epochs", config.train.patience)
            break
    tb.close()
    if main_process:
        final_test(model, datasets, config, device, run_dir / "checkpoints", state, log)
    return 0


def build_datasets_once(config, main_process: bool, world: int) -> dict:
    """build_datasets; under torchrun the main process goes first (it may write synthetic data)."""
    datasets = build_datasets(config) if main_process else None
    if world > 1:
        dist.barrier()
    return datasets if main_process else build_datasets(config)


def average_over_ranks(stats: dict) -> dict:
    """Epoch statistics averaged over processes (fallback counts summed); unchanged in one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return stats
    keys = sorted(stats)
    values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    world = dist.get_world_size()
    summed = ("supcon_fallback", "count_anchors", "count_tokens", "count_padding", "count_attention", "count_prefix")
    return {k: int(v) if k.startswith(summed) else v / world for k, v in zip(keys, values.tolist())}


def end_epoch(model, valid_set, config, device, epoch: int, phase: str, stats: dict, state: dict, history: list,
              training: dict, start: float, log) -> dict:
    """Validate, select on val macro-MCC (after the warm start), log, write metrics.jsonl and
    checkpoints (last.pt; best.pt when improved). Returns the updated state."""
    val = score(evaluate(model, valid_set, config, device))
    selectable = phase != "warm_start"  # model selection starts after the warm start
    improved = selectable and val["macro_mcc"] > state["best_metric"]
    state = {**state, "epoch": epoch + 1, "bad_epochs": 0 if improved else state["bad_epochs"] + selectable}
    if improved:
        state.update(best_metric=val["macro_mcc"], best_epoch=epoch)
    record = {"epoch": epoch, "phase": phase, **stats, "lr": training["scheduler"].get_last_lr()[0],
              "val_macro_f1": val["macro_f1"], "val_macro_mcc": val["macro_mcc"],
              "val_macro_site_accuracy": val["residue"]["macro_site_accuracy"],
              "val_macro_iou": val["residue"]["macro_iou"], "best": improved, "time_s": time.time() - start}
    checkpoint = {"model": model.state_dict(), "optimizer": training["optimizer"].state_dict(),
                  "scheduler": training["scheduler"].state_dict(), "scaler": training["scaler"].state_dict(), **state,
                  "rng": rng_state(), "config": config.to_dict(), "arch": backbone_arch(model.backbone),
                  "classes": CLASSES, "distance_map": training["distance_map"]}
    run_dir = Path(config.run_dir)
    ckpt_dir = run_dir / "checkpoints"
    save_checkpoint(checkpoint, ckpt_dir / "last.pt")  # first: a metrics row always has its checkpoint
    if improved:
        write_atomic(ckpt_dir / "best.pt", lambda tmp: shutil.copyfile(ckpt_dir / "last.pt", tmp))
    history.append(record)
    write_text_atomic(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    training["tb"].epoch(record)
    losses = ", ".join(f"{k[6:]} {v:.4f}" for k, v in stats.items() if k.endswith("_loss") and k != "train_loss")
    speed = f"{stats['anchors_per_s']:.1f} anchors/s, {stats['tokens_per_s']:.0f} tokens/s" + (
        f", MFU {stats['mfu']:.2%}" if "mfu" in stats else "")
    log.info("epoch %d (%s): loss %.4f (%s) val macro-F1 %.4f macro-MCC %.4f%s (%.1fs; %s)", epoch, phase,
             stats["train_loss"], losses, val["macro_f1"], val["macro_mcc"], " *" if improved else "", record["time_s"],
             speed)
    return state


def frozen_cache(model, datasets, config, run_dir: Path, rank: int = 0):
    """The frozen-layer cache (run() has refused configurations where nothing is frozen or inputs
    are mutated): a DiskCache under encoder.cache_dir shared across runs, else a FrozenCache of this
    run holding every window of every split (computed on first use)."""
    enc = config.encoder
    if enc.cache_dir is not None:
        device = next(model.parameters()).device
        key = model_key(model.backbone, model.first_trainable, model.fused_attention, amp_dtype(config.train.amp, device),
                        enc.cache_dtype, device.type)
        logging.getLogger("mutarget").info("frozen-layer cache shared across runs: %s", Path(enc.cache_dir) / key)
        return DiskCache(enc.cache_dir, key, enc.cache_dtype)
    windows = {}
    for dataset in datasets.values():
        for protein in dataset.proteins:
            n = len(protein.sequence)
            for start in window_starts(n, config.data.max_len, config.data.overlap):
                windows[(protein.entry, start)] = min(config.data.max_len, n - start) + 2
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / (f"frozen_cache.rank{rank}.npy" if rank else "frozen_cache.npy") if enc.cache_on_disk else None
    return FrozenCache(windows, model.backbone.embed_dim, enc.cache_dtype, path)


def distance_map_of(model, proteins, config, device, key: str) -> dict:
    """Class distance map from the model's `key` embeddings ('pooled' or 'projection') of
    `proteins`, each once and unmutated (never the training set's augmented items or copies)."""
    plain = LocalizationDataset(proteins, "train")
    out = evaluate(model, plain, config, device)
    return class_distance_map(out[key], plain.labels)


def remine(model, train_set, config, device, old_map: dict, run_dir: Path, log) -> dict:
    """Adaptive hard-negative mining (CLEAN): a new class distance map from the current model's
    projections of the training split (unmutated, every protein once); the sampler uses it from
    now on; written to run_dir/distance_map.json. Every process computes the same map."""
    new_map = distance_map_of(model, train_set.proteins, config, device, "projection")
    train_set.sampler.set_distance_map(new_map)
    change = [abs(new_map[a][b] - old_map.get(a, {}).get(b, float("nan"))) for a in new_map for b in new_map[a]]
    changed = [c for c in change if c == c]
    log.info("re-mined the class distance map from the model's projections: mean |change| %.4f over %d pairs",
             sum(changed) / max(len(changed), 1), len(changed))
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return new_map
    write_text_atomic(run_dir / "distance_map.json", json.dumps(new_map, indent=1))
    return new_map


def uses_mutations(config) -> bool:
    """True when training sequences are mutated: augmentation, or the views of an in-batch loss."""
    return config.train.augment.apply or (config.supcon.apply and config.supcon.loss != "hard")


def setup_supcon(config, model, train_set, device, log, resume=None):
    """Turn on mutation augmentation / views and positive / negative sampling (supcon.loss: hard)
    for the training split; returns the class distance map used for hard negatives (read from supcon.distance_map, or built from the initial model's
    pooled embeddings of the training split), or None."""
    sc, aug = config.supcon, config.train.augment
    if uses_mutations(config):
        views = max(aug.views, 2) if sc.apply and sc.loss != "hard" else 1
        train_set.enable_augmentation(aug.apply, aug.pos_rate, aug.neg_rate, aug.max_copies, views, config.seed)
    if not sc.apply or sc.loss != "hard":  # the in-batch losses need views, not sampled pairs
        return None
    distance_map = None
    if sc.hard_neg and resume is not None and resume.get("distance_map") is not None:
        distance_map = resume["distance_map"]
    elif sc.hard_neg and sc.distance_map is not None:
        distance_map = read_distance_map(sc.distance_map)
    elif sc.hard_neg:
        log.info("supcon.distance_map not set: building it from the initial model's pooled embeddings")
        distance_map = distance_map_of(model, train_set.proteins, config, device, "pooled")
    train_set.enable_supcon(sc.n_pos, sc.n_neg, sc.hard_neg, distance_map, config.seed)
    return distance_map


def final_test(model, datasets, config, device, ckpt_dir: Path, state: dict, log) -> dict:
    """Evaluate the best checkpoint on test at 0.5 and at MCC-optimal thresholds tuned on valid."""
    best_path = ckpt_dir / "best.pt" if (ckpt_dir / "best.pt").is_file() else ckpt_dir / "last.pt"
    best = load_checkpoint(best_path) if best_path.is_file() else None
    if best is not None:
        load_model_state(model, best["model"], best_path)
    else:
        log.warning("no checkpoint was written (0 epochs?): evaluating the current model")
    valid = evaluate(model, datasets["valid"], config, device)
    thresholds = tune_thresholds(valid["labels"], valid["probs"])
    valid_scores = score(valid)
    test = evaluate(model, datasets["test"], config, device)
    result = score(test)
    tuned = score(test, thresholds)
    centroids, train_out = fit_centroids(model, datasets["train"].proteins, valid, config, device)
    result.update({"best_epoch": state["best_epoch"], "checkpoint": str(best_path) if best else None,
                   "thresholds": dict(zip(CLASSES, map(float, thresholds))),
                   "tuned": {k: tuned[k] for k in ("macro_f1", "macro_mcc", "per_class", "subset_accuracy", "jaccard")},
                   "valid": {k: valid_scores[k] for k in ("macro_f1", "macro_mcc")},
                   "space": {name: space.space_metrics(*[(out[name], out["labels"]) for out in (train_out, valid, test)],
                                                       fitted=fitted) for name, fitted in centroids.items()}})
    write_text_atomic(Path(config.run_dir) / "test_metrics.json", json.dumps(result, indent=2))
    if best is not None:
        best["thresholds"], best["centroids"] = result["thresholds"], space.to_stored(centroids)
        save_checkpoint(best, best_path)
    log.info("test (best epoch %s):\n%s", state["best_epoch"], format_table(result))
    log.info("test with valid-tuned thresholds: macro-F1 %.4f macro-MCC %.4f", tuned["macro_f1"], tuned["macro_mcc"])
    for name, m in result["space"].items():
        log.info("%s space: centroid macro-MCC %.4f (max-separation) %.4f (thresholds), macro AP %.4f, %d-NN macro-MCC "
                 "%.4f, macro silhouette %s", name, m["maxsep"]["macro_mcc"], m["threshold"]["macro_mcc"],
                 m["macro_average_precision"], m["knn"]["k"], m["knn"]["macro_mcc"],
                 "-" if m["macro_silhouette"] is None else f"{m['macro_silhouette']:.4f}")
    return result


def fit_centroids(model, train_proteins, valid_out: dict, config, device) -> tuple[dict, dict]:
    """Class centres of the training split (every protein once, unmutated) and distance thresholds
    tuned on validation, per embedding space ('pooled', and 'projection' with a projection head):
    ({space: {'centres' [8, d], 'counts' [8], 'thresholds' [8]}}, run_inference outputs of the training split)."""
    plain = LocalizationDataset(train_proteins, "train")
    train_out = evaluate(model, plain, config, device)
    spaces = ["pooled"] + (["projection"] if model.projection is not None else [])
    return {name: space.fit(train_out[name], train_out["labels"], valid_out[name], valid_out["labels"])
            for name in spaces}, train_out


if __name__ == "__main__":
    sys.exit(main())
