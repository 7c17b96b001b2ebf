"""Training-step benchmark of SupCon extended batches on the real data's length distribution.

python scripts/bench.py [--data-root DIR] [--json OUT.json] [--seconds S] [--device cpu]

Modes, each measured in its own process (so peak memory is its own), same model and data:
  naive: every window padded to 1024 tokens, no deduplication, random batches, fair-esm's own
         attention code (the upstream SupCon branch's cost);
  fast:  length-bucketed batches, each distinct protein once per step, fused attention, the windows of a
         step packed into one token stream without padding (encoder.packed, the default);
  fast_padded: fast with encoder.packed: false (windows run longest-first in chunks with little padding),
         for the packed / padded speed ratio;
  fast_bf16: fast under bf16 autocast (train.amp: bf16), for the bf16 / fp32 speed ratio.
Model: scratch ESM-2, 4 layers, 128 dims, 8 heads, all trainable; batch 8 anchors, n_pos 2,
n_neg 2, fold 0 training split. Padding fraction counts every token the backbone processes,
positives and negatives included. Then the frozen-layer cache: epoch time of a 12-layer,
128-dim scratch backbone with the last 2 layers trainable on a fixed subset of the real data,
without and with encoder.cache_frozen in the default storage (encoder.cache_dtype; the cached epoch is the
second, the first fills it).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import batching  # noqa: E402
import contrast  # noqa: E402
import data  # noqa: E402
import loss  # noqa: E402
import runtime  # noqa: E402
import vocab  # noqa: E402
from cache import FrozenCache  # noqa: E402
from config import resolve_config  # noqa: E402
from model import Encoder  # noqa: E402
from throughput import peak_rss_mb  # noqa: E402


MODES = ("naive", "fast", "fast_padded", "fast_bf16")


def bench_config(data_root, layers=4, tune="full", supcon=True, **encoder):
    return resolve_config({
        "seed": 0, "device": "cpu", "data": {"root": str(data_root), "fold": 0},
        "encoder": {"scratch": {"num_layers": layers, "embed_dim": 128, "attention_heads": 8},
                    "tune": tune, "trainable_layers": 2, **encoder},
        "train": {"batch_size": 8, "lr": 1e-3, "backbone_lr": 1e-3},
        "supcon": {"apply": supcon, "n_pos": 2, "n_neg": 2, "hidden_dim": 128, "out_dim": 64}})


class PadTo:
    """Collate whose windows are all padded to a fixed width (upstream's 1024 tokens)."""

    def __init__(self, collate, width=1024):
        self.collate, self.width = collate, width

    def __call__(self, items):
        batch = self.collate(items)
        extra = self.width - batch["tokens"].shape[1]
        batch["tokens"] = torch.nn.functional.pad(batch["tokens"], (0, extra), value=vocab.PAD_IDX)
        return batch


def supcon_training(config, device: torch.device, naive: bool = False, dtype=None):
    """The SupCon training of every mode on fold 0 (n_pos 2, n_neg 2): (model, loader, step); step(batch) runs
    one training step (forward under `dtype` autocast, class + motif + hard SupCon losses, backward, AdamW),
    waiting for the GPU at its end. naive: random batches padded to 1024 tokens, no deduplication;
    otherwise length-bucketed batches."""
    torch.manual_seed(0)
    train_set = data.build_datasets(config)["train"]
    contrast.enable_supcon(train_set, 2, 2, seed=0)
    model = Encoder(config).to(device).train()
    collate = batching.Collate(config.data.max_len, config.data.overlap, dedup=not naive)
    if naive:
        sampler = batching.EpochShuffleSampler(len(train_set), 0)
        loader = torch.utils.data.DataLoader(train_set, batch_size=8, sampler=sampler, collate_fn=PadTo(collate))
    else:
        loader = torch.utils.data.DataLoader(train_set, batch_sampler=batching.LengthBucketSampler(train_set.lengths, 8, 0),
                                             collate_fn=collate)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    criteria = (loss.ClassLoss(loss.class_weights(train_set.class_counts())).to(device),
                loss.MotifLoss(loss.motif_pos_weights(*train_set.residue_counts())).to(device))

    def step(batch) -> None:
        with runtime.autocast(device, dtype):
            out = model(batch, heads=True, contrastive=True)
            total = (criteria[0](out["class_logits"], batch["labels"])
                     + criteria[1](out["motif_logits"], batch["targets"], batch["target_mask"])
                     + loss.SupConHardLoss(out["projection"], 0.1, 2))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return model, loader, step


def run_mode(mode: str, data_root, seconds: float, device: str) -> dict:
    """Training steps for about `seconds` (after one warm-up step) -> figures of the mode."""
    naive = mode == "naive"
    config = bench_config(data_root, chunk_tokens=0 if naive else 16384, fused_attention=not naive,
                          packed=mode != "fast_padded")
    device = torch.device(device)
    dtype = runtime.amp_dtype("bf16" if mode == "fast_bf16" else "none", device)
    model, loader, step = supcon_training(config, device, naive, dtype)
    anchors = steps = 0
    data_time = step_time = 0.0
    iterator = iter(loader)
    for n in range(10 ** 6):
        t0 = time.perf_counter()
        batch = runtime.to_device(next(iterator), device)
        t1 = time.perf_counter()
        step(batch)
        t2 = time.perf_counter()
        if n == 0:  # warm-up step: not counted
            model.token_counts.update(dict.fromkeys(model.token_counts, 0))
            continue
        data_time, step_time = data_time + t1 - t0, step_time + t2 - t1
        anchors, steps = anchors + batch["labels"].shape[0], steps + 1
        if data_time + step_time >= seconds:
            break
    counts = model.token_counts
    return {"anchors_per_s": anchors / (data_time + step_time), "tokens_per_anchor": counts["padded_tokens"] / anchors,
            "padding_fraction": 1 - counts["tokens"] / counts["padded_tokens"], "data_time_fraction": data_time / (data_time + step_time),
            "peak_rss_mb": peak_rss_mb(), "steps": steps, "anchors": anchors}


def run_cache(data_root, n_proteins: int, device: str) -> dict:
    """Epoch time of a 12-layer backbone (last 2 trainable) on a fixed subset, uncached vs cached."""
    times = {}
    for cached in (False, True):
        config = bench_config(data_root, layers=12, tune="last_k", supcon=False, cache_frozen=cached)
        torch.manual_seed(0)
        full = data.build_datasets(config)["train"]
        subset = data.LocalizationDataset(full.proteins[:n_proteins], "train")
        model = Encoder(config).to(device)
        if cached:
            windows = {(p.entry, s): min(1022, len(p.sequence) - s) + 2 for p in subset.proteins
                       for s in vocab.window_starts(len(p.sequence), 1022, 200)}
            model.cache = FrozenCache(windows, 128, config.encoder.cache_dtype)  # the default storage
        loader = torch.utils.data.DataLoader(subset, batch_sampler=batching.LengthBucketSampler(subset.lengths, 8, 0),
                                             collate_fn=batching.Collate())
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        criterion = loss.ClassLoss(loss.class_weights(subset.class_counts())).to(device)
        model.train()
        epochs = []
        for epoch in range(2 if cached else 1):
            t0 = time.perf_counter()
            for batch in loader:
                out = model(runtime.to_device(batch, torch.device(device)))
                optimizer.zero_grad(set_to_none=True)
                criterion(out["class_logits"], batch["labels"].to(device)).backward()
                optimizer.step()
            epochs.append(time.perf_counter() - t0)
        times["cached_s" if cached else "uncached_s"] = epochs[-1]
        if cached:
            times["cache_fill_epoch_s"] = epochs[0]
    times["speedup"] = times["uncached_s"] / times["cached_s"]
    times["n_proteins"] = n_proteins
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "mutarget"))
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--seconds", type=float, default=90.0, help="measured time per mode")
    p.add_argument("--cache-proteins", type=int, default=160, help="proteins in the cache benchmark's subset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--mode", choices=MODES + ("cache",), help=argparse.SUPPRESS)  # one child
    args = p.parse_args(argv)
    if args.mode:
        result = (run_cache(args.data_root, args.cache_proteins, args.device) if args.mode == "cache"
                  else run_mode(args.mode, args.data_root, args.seconds, args.device))
        print(json.dumps(result))
        return 0
    results = {"device": args.device, "threads": torch.get_num_threads()}
    for mode in MODES + ("cache",):
        child = subprocess.run([sys.executable, __file__, "--mode", mode, "--data-root", args.data_root,
                                "--seconds", str(args.seconds), "--cache-proteins", str(args.cache_proteins),
                                "--device", args.device], capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return child.returncode
        results[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    results["fast_over_naive"] = results["fast"]["anchors_per_s"] / results["naive"]["anchors_per_s"]
    results["bf16_over_fp32"] = results["fast_bf16"]["anchors_per_s"] / results["fast"]["anchors_per_s"]
    results["packed_over_padded"] = results["fast"]["anchors_per_s"] / results["fast_padded"]["anchors_per_s"]
    keys = ("anchors_per_s", "tokens_per_anchor", "padding_fraction", "data_time_fraction", "peak_rss_mb")
    print(f"{'mode':11} " + " ".join(f"{k:>18}" for k in keys))
    for mode in MODES:
        print(f"{mode:11} " + " ".join(f"{results[mode][k]:18.3f}" for k in keys))
    print(f"fast / naive anchors per second: {results['fast_over_naive']:.2f}x; packed / padded (fast): "
          f"{results['packed_over_padded']:.2f}x; bf16 / fp32 (fast): {results['bf16_over_fp32']:.2f}x")
    c = results["cache"]
    print(f"frozen-layer cache, 12 layers (last 2 trainable), {c['n_proteins']} proteins: uncached epoch "
          f"{c['uncached_s']:.1f}s, cached epoch {c['cached_s']:.1f}s ({c['speedup']:.2f}x; filling epoch "
          f"{c['cache_fill_epoch_s']:.1f}s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
