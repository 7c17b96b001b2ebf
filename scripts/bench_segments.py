"""Peak memory of a training step holding one 5,400-residue protein: the dense per-protein layout against pooling
and stitching on the token stream (model.pool_stream, stitch_anchors).

python scripts/bench_segments.py [--long 5400] [--anchors 4] [--others 12] [--dim 1280] [--layers 1] [--repeats 1]
                                 [--json OUT.json]
python scripts/bench_segments.py --interleaved 12 [--data-root DIR]

Each variant runs in a process of its own (its peak RSS is VmHWM, throughput.peak_rss_mb), on the same batch:
one protein of --long residues (windows of 1022 residues overlapping by 200) and short ones, as an extended
SupCon batch (--anchors anchors, the long protein first, each sampling 2 positives and 2 negatives among
--others more proteins: M = anchors + others rows); a randomly initialised packed ESM-2 of --layers layers of
--dim width (1280: the 650M model's; fused attention), every layer trained, heads and projection head as in
training. One step: forward, class + motif + hard SupCon losses, backward, AdamW.
  dense:   the code before the segment path: every protein's residues stitched into [M, L, d] (model.py's
           stitch_packed), pooled by a masked mean over it, the decoders on the anchors' rows [B, L, d];
  segment: Encoder.forward: pooled by segment sums over the stream [M, d], only the anchors' residues stitched,
           flat [R, d], the decoders on those rows.
Dropout off: both variants compute the same loss. Prints each variant's peak RSS, RSS before the step, the step's
wall and CPU seconds (the process's), the loss, and the ratios of the fastest / leanest runs.

--interleaved N: speed on ordinary batches, robust to a shared machine's drift: the first N + 1 batches of
scripts/bench.py's fast mode (real data, fold 0, SupCon 2 / 2, 8 anchors, 4-layer 128-dim scratch ESM-2), each
step run twice dense and twice segment in one process (dense, segment, segment, dense or the reverse, alternating
from batch to batch); the first batch is a warm-up. Also times pooling, stitching and heads alone.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import batching  # noqa: E402
import data  # noqa: E402
import loss  # noqa: E402
import vocab  # noqa: E402
from config import resolve_config  # noqa: E402
from model import Encoder  # noqa: E402
from throughput import peak_rss_mb  # noqa: E402

VARIANTS = ("dense", "segment")


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def make_batch(long: int, anchors: int, others: int, seed: int = 0) -> dict:
    """The long protein and anchors - 1 + others short ones (150 to 600 residues); anchor a samples positives and
    negatives among the others, round robin (shared samples go through the backbone once)."""
    rng = np.random.default_rng(seed)
    lengths = [long] + rng.integers(150, 600, size=anchors - 1 + others).tolist()
    proteins = [data.make_protein(f"P{i}", "".join(rng.choice(list(vocab.STANDARD_RESIDUES), size=n)), "", "t")
                for i, n in enumerate(lengths)]
    ds = data.LocalizationDataset(proteins)
    items = [ds[i] for i in range(anchors)]
    pool = list(range(anchors, anchors + others))
    for a, it in enumerate(items):
        picked = [pool[(4 * a + k) % len(pool)] for k in range(4)]
        it["labels"] = np.eye(8, dtype=np.uint8)[a % 8]
        it["pos_neg"] = {"pos": picked[:2], "neg": picked[2:], "tokens": {i: ds.tokens[i] for i in picked},
                         "entries": {i: ds.proteins[i].entry for i in picked}}
    return batching.Collate(1022, 200)(items)


def dense_forward(model: Encoder, batch: dict) -> dict:
    """Encoder.forward as it was before the segment path (model.py's stitch_packed and masked_mean, 2026-12-05)."""
    stream = model.embed(batch)  # [N, d]
    M, L = batch["residue_mask"].shape
    d, dest = stream.shape[-1], batch["packed_dest"]
    total = stream.new_zeros(M * L + 1, d).index_add_(0, dest, stream)
    count = stream.new_zeros(M * L + 1).index_add_(0, dest, stream.new_ones(dest.shape[0]))
    residues = (total[:-1] / count[:-1].clamp(min=1).unsqueeze(-1)).view(M, L, d)  # [M, L, d]
    mask = batch["residue_mask"].unsqueeze(-1).to(residues.dtype)
    pooled = (residues * mask).sum(1) / mask.sum(1).clamp(min=1)
    B = batch["labels"].shape[0]
    return {"pooled": pooled, "motif_logits": model.decoders(residues[:B]),
            "class_logits": model.classifier(model.class_dropout(pooled[:B])),
            "projection": model.projection(pooled)[batch["group_index"]]}


def run_variant(variant: str, args) -> dict:
    torch.manual_seed(0)
    config = resolve_config({"seed": 0, "device": "cpu",
                             "encoder": {"scratch": {"num_layers": args.layers, "embed_dim": args.dim,
                                                     "attention_heads": args.dim // 64},
                                         "tune": "full", "packed": True},
                             "decoder": {"dropout": 0.0, "class_dropout": 0.0},  # the same loss in both variants
                             "supcon": {"apply": True, "n_pos": 2, "n_neg": 2, "drop_out": 0.0}})
    model = Encoder(config).train()
    batch = make_batch(args.long, args.anchors, args.others)
    batch["targets"][:, :, ::50] = 1.0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    criteria = (loss.ClassLoss(torch.ones(8)), loss.MotifLoss(torch.full((8,), 10.0)))
    before = rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    out = dense_forward(model, batch) if variant == "dense" else model(batch, heads=True, contrastive=True)
    total = (criteria[0](out["class_logits"], batch["labels"])
             + criteria[1](out["motif_logits"], batch["targets"], batch["target_mask"])
             + loss.SupConHardLoss(out["projection"], 0.1, 2))
    total.backward()
    optimizer.step()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return {"variant": variant, "peak_rss_mb": peak_rss_mb(), "rss_before_step_mb": before, "step_s": seconds,
            "step_cpu_s": cpu, "loss": float(total.detach()), "proteins": int(batch["lengths"].shape[0]),
            "anchors": int(batch["labels"].shape[0]), "longest": int(batch["lengths"].max()),
            "tokens": len(batch["packed_tokens"]), "dim": args.dim, "layers": args.layers,
            "threads": torch.get_num_threads()}


def interleaved(steps: int, data_root: str) -> dict:
    """Seconds of `steps` training steps of bench.py's fast mode, each batch twice dense and twice segment (in the
    order dense, segment, segment, dense or the reverse, alternating from batch to batch; wall and process CPU
    time), and of what changed alone: pooling, stitching and heads, forward and backward, on the batch's backbone
    outputs computed beforehand."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import bench_config, supcon_training
    config = bench_config(data_root, chunk_tokens=16384, fused_attention=True, packed=True)
    model, loader, step = supcon_training(config, torch.device("cpu"))
    batches = [b for _, b in zip(range(steps + 1), loader)]
    seconds = {f"{v}_{what}": 0.0 for v in VARIANTS for what in ("wall_s", "cpu_s", "heads_cpu_s")}
    for i, batch in enumerate(batches):
        with torch.no_grad():
            stream = model.embed(batch)
        for variant in VARIANTS + VARIANTS[::-1] if i % 2 == 0 else VARIANTS[::-1] + VARIANTS:  # ABBA / BAAB
            if variant == "dense":  # the instance's forward: what nn.Module.__call__ runs
                model.forward = lambda batch, **_: dense_forward(model, batch)
            else:
                model.__dict__.pop("forward", None)
            wall, cpu = time.perf_counter(), time.process_time()
            step(batch)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            leaf = stream.clone().requires_grad_()
            model.embed = lambda batch: leaf  # the heads alone: the backbone's outputs given
            heads = time.process_time()
            out = model(batch, heads=True, contrastive=True)
            (out["class_logits"].sum() + out["motif_logits"].sum() + out["projection"].sum()).backward()
            heads = time.process_time() - heads
            del model.embed
            model.zero_grad(set_to_none=True)
            if i > 0:
                seconds[f"{variant}_wall_s"] += wall
                seconds[f"{variant}_cpu_s"] += cpu
                seconds[f"{variant}_heads_cpu_s"] += heads
    model.__dict__.pop("forward", None)
    ratios = {f"dense_over_segment_{what}": seconds[f"dense_{what}"] / seconds[f"segment_{what}"]
              for what in ("wall_s", "cpu_s", "heads_cpu_s")}
    result = {"steps": steps, "threads": torch.get_num_threads(), **seconds, **ratios}
    print(f"{steps} batches of bench.py's fast mode, each twice per variant ({result['threads']} threads), "
          f"dense / segment:")
    for what, name in (("wall_s", "step, wall"), ("cpu_s", "step, CPU"), ("heads_cpu_s", "pooling + heads, CPU")):
        print(f"  {name:21} {seconds[f'dense_{what}']:7.2f} s / {seconds[f'segment_{what}']:7.2f} s: "
              f"segment {ratios[f'dense_over_segment_{what}']:.2f}x as fast")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--long", type=int, default=5400, help="residues of the long protein")
    p.add_argument("--anchors", type=int, default=4, help="anchors (the long protein is the first)")
    p.add_argument("--others", type=int, default=12, help="short proteins the anchors sample as positives / negatives")
    p.add_argument("--dim", type=int, default=1280, help="model width (heads of 64)")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="runs of each variant, alternating")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--interleaved", type=int, metavar="N", help="N steps of bench.py's fast mode, dense and segment")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "mutarget"), help="for --interleaved")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one child
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.interleaved:
        result = interleaved(args.interleaved, args.data_root)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        return 0
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return 0
    runs = []
    for r in range(args.repeats):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            child = subprocess.run([sys.executable, __file__, "--variant", variant, "--long", str(args.long),
                                    "--anchors", str(args.anchors), "--others", str(args.others), "--dim",
                                    str(args.dim), "--layers", str(args.layers)]
                                   + (["--threads", str(args.threads)] if args.threads else []),
                                   capture_output=True, text=True)
            if child.returncode != 0:
                print(child.stderr, file=sys.stderr)
                return child.returncode
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
    first = runs[0]
    print(f"{first['proteins']} proteins ({first['anchors']} anchors), longest {first['longest']} residues, "
          f"{first['tokens']} tokens; {first['layers']} layer(s) of width {first['dim']}; {first['threads']} threads")
    print(f"{'variant':8} {'peak RSS (MB)':>14} {'RSS before step':>16} {'step increase':>14} {'step (s)':>9} "
          f"{'CPU (s)':>8} {'loss':>9}")
    for run in runs:
        print(f"{run['variant']:8} {run['peak_rss_mb']:14.0f} {run['rss_before_step_mb']:16.0f} "
              f"{run['peak_rss_mb'] - run['rss_before_step_mb']:14.0f} {run['step_s']:9.2f} {run['step_cpu_s']:8.2f} "
              f"{run['loss']:9.5f}")

    def best(variant, key):
        return min(run[key] for run in runs if run["variant"] == variant)
    ratios = {"peak_rss": best("segment", "peak_rss_mb") / best("dense", "peak_rss_mb"),
              "step_s": best("segment", "step_s") / best("dense", "step_s")}
    print(f"segment / dense: peak RSS {ratios['peak_rss']:.2f}x, step time {ratios['step_s']:.2f}x (fastest runs)")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "segment_over_dense": ratios}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
