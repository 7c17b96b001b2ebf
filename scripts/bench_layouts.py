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
import runtime  # noqa: E402
from bench import ROOT, bench_config, supcon_training  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12, help="batches, each run in both layouts (the first: warm-up)")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "mutarget"))
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    config = bench_config(args.data_root, chunk_tokens=16384, fused_attention=True, packed=True)
    model, loader, step = supcon_training(config, device)
    batches = [runtime.to_device(b, device) for _, b in zip(range(args.steps), loader)]
    seconds = {"packed": 0.0, "padded": 0.0}
    for i, batch in enumerate(batches):
        for layout in (("packed", "padded") if i % 2 == 0 else ("padded", "packed")):
            model.pack = layout == "packed"
            start = time.perf_counter()
            step(batch)
            if i > 0:
                seconds[layout] += time.perf_counter() - start
    result = {"device": str(device), "threads": torch.get_num_threads(), "steps": len(batches) - 1, **seconds,
              "padded_over_packed": seconds["padded"] / seconds["packed"]}
    print(f"{result['steps']} steps: packed {seconds['packed']:.1f} s, padded {seconds['padded']:.1f} s; "
          f"packed is {result['padded_over_packed']:.2f}x as fast as padded")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
