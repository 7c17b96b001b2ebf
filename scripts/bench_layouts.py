"""Packed against padded layout on the same training steps, interleaved in one process.

python scripts/bench_layouts.py [--steps 12] [--data-root DIR] [--json OUT.json] [--device cpu]

scripts/bench.py times each mode in its own process for a fixed time, so the two layouts cover different
batches and drift of a shared machine falls on one of them. Here one model trains on the same first N
batches of bench.py's fast mode (fold 0, SupCon n_pos 2 / n_neg 2, 8 anchors, the 4-layer 128-dim scratch
ESM-2), each batch once packed and once padded, the order alternating from batch to batch; the first batch
is a warm-up. Prints the seconds of each layout and the ratio (padded time / packed time: above 1, packed
is faster).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import batching  # noqa: E402
import contrast  # noqa: E402
import data  # noqa: E402
import loss  # noqa: E402
import runtime  # noqa: E402
from bench import ROOT, bench_config  # noqa: E402
from model import Encoder  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="batches, each run in both layouts (the first: warm-up)")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "mutarget"))
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    config = bench_config(args.data_root, chunk_tokens=16384, fused_attention=True, packed=True)
    torch.manual_seed(0)
    train_set = data.build_datasets(config)["train"]
    contrast.enable_supcon(train_set, 2, 2, seed=0)
    model = Encoder(config).to(device).train()
    collate = batching.Collate(config.data.max_len, config.data.overlap)
    loader = torch.utils.data.DataLoader(train_set, collate_fn=collate,
                                         batch_sampler=batching.LengthBucketSampler(train_set.lengths, 8, 0))
    batches = [runtime.to_device(b, device) for _, b in zip(range(args.steps), loader)]
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    class_loss = loss.ClassLoss(loss.class_weights(train_set.class_counts())).to(device)
    motif_loss = loss.MotifLoss(loss.motif_pos_weights(*train_set.residue_counts())).to(device)

    def step(batch) -> float:
        start = time.perf_counter()
        out = model(batch, heads=True, contrastive=True)
        total = (class_loss(out["class_logits"], batch["labels"])
                 + motif_loss(out["motif_logits"], batch["targets"], batch["target_mask"])
                 + loss.SupConHardLoss(out["projection"], 0.1, 2))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    seconds = {"packed": 0.0, "padded": 0.0}
    for i, batch in enumerate(batches):
        for layout in (("packed", "padded") if i % 2 == 0 else ("padded", "packed")):
            model.pack = layout == "packed"
            elapsed = step(batch)
            if i > 0:
                seconds[layout] += elapsed
    result = {"device": str(device), "threads": torch.get_num_threads(), "steps": len(batches) - 1, **seconds,
              "padded_over_packed": seconds["padded"] / seconds["packed"]}
    print(f"{result['steps']} steps: packed {seconds['packed']:.1f} s, padded {seconds['padded']:.1f} s; "
          f"packed is {result['padded_over_packed']:.2f}x as fast as padded")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
