"""Real-size benchmark: an ESM-2 architecture (default esm2_t33_650M_UR50D) with random weights.

python scripts/bench_real.py [--arch esm2_t33_650M_UR50D] [--dir bench_weights] [--json OUT.json]
                             [--device cpu|cuda] [--anchors 2] [--steps 2] [--precisions fp32 bf16]

1. Writes the random model once into --dir in both formats (fair-esm .pt and a Hugging Face folder with
   model.safetensors), then loads each with this project's loader (weights.py) in a process of its own:
   load time and peak RSS.
2. Seconds per SupCon training step (supcon.loss hard, n_pos 1, n_neg 1: up to 3 x --anchors proteins per
   step, real proteins of the MUTarget training split, so real lengths) for encoder.tune last_k (2 layers),
   lora (last 2 layers; rank 8, q k v out), adapter (last 2 layers, dim 64), full, and full with
   activation checkpointing, each in fp32 and bf16 autocast, each in a process of its own: mean step time
   after one warm-up step, and peak RSS (CPU) or peak allocated GPU memory (CUDA).
Speed does not depend on the weights' values, so random weights measure what the pretrained ones cost.
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
import train  # noqa: E402
import vocab  # noqa: E402
import weights  # noqa: E402
from config import resolve_config  # noqa: E402
from model import Encoder  # noqa: E402
from throughput import peak_rss_mb  # noqa: E402

ARCHS = {"esm2_t6_8M_UR50D": (6, 320, 20), "esm2_t12_35M_UR50D": (12, 480, 20), "esm2_t30_150M_UR50D": (30, 640, 20),
         "esm2_t33_650M_UR50D": (33, 1280, 20), "esm2_t36_3B_UR50D": (36, 2560, 40)}
MODES = {"last_k": {"tune": "last_k", "trainable_layers": 2},
         "lora": {"tune": "lora", "trainable_layers": 2},
         "adapter": {"tune": "adapter", "trainable_layers": 2},
         "full": {"tune": "full"},
         "full_checkpointing": {"tune": "full", "activation_checkpointing": True}}


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated (CUDA), else this process's peak RSS."""
    return torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else peak_rss_mb()


def write_weights(arch_name: str, folder: Path) -> dict:
    """Random ESM-2 of that architecture as folder/<name>.pt and folder/<name>_hf/ (once)."""
    layers, dim, heads = ARCHS[arch_name]
    arch = {"num_layers": layers, "embed_dim": dim, "attention_heads": heads, "token_dropout": True}
    pt, hf = folder / f"{arch_name}.pt", folder / f"{arch_name}_hf"
    if not (pt.is_file() and (hf / "model.safetensors").is_file()):
        import esm
        torch.manual_seed(0)
        model = esm.model.esm2.ESM2(alphabet="ESM-1b", **arch)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("contact_head")}
        folder.mkdir(parents=True, exist_ok=True)
        weights.write_fair_esm(arch, state, pt)
        weights.write_hf_folder(arch, state, hf)
    return {"fair-esm": pt, "hf": hf}


def run_load(path: str) -> dict:
    t0 = time.perf_counter()
    backbone = weights.load_pretrained({"checkpoint": path, "model_name": None, "revision": None})
    seconds = time.perf_counter() - t0
    return {"load_s": seconds, "parameters": sum(p.numel() for p in backbone.parameters()),
            "peak_rss_mb": peak_memory_mb("cpu")}


def run_steps(path: str, mode: str, precision: str, data_root: str, anchors: int, steps: int, device: str) -> dict:
    """Seconds per SupCon training step of one tuning mode and precision."""
    config = resolve_config({
        "seed": 0, "device": device, "data": {"root": data_root, "fold": 0},
        "encoder": {"checkpoint": path, **MODES[mode]},
        "train": {"batch_size": anchors, "amp": "bf16" if precision == "bf16" else "none"},
        "supcon": {"apply": True, "loss": "hard", "n_pos": 1, "n_neg": 1}})
    dev = torch.device(device)
    train_set = data.build_datasets(config)["train"]
    contrast.enable_supcon(train_set, 1, 1, seed=0)
    model = Encoder(config).to(dev)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    criteria = {"class": loss.ClassLoss(loss.class_weights(train_set.class_counts())).to(dev),
                "motif": loss.MotifLoss(loss.motif_pos_weights(*train_set.residue_counts())).to(dev)}
    loader = torch.utils.data.DataLoader(train_set, batch_size=anchors, sampler=batching.EpochShuffleSampler(len(train_set), 0),
                                         collate_fn=batching.Collate())
    dtype = runtime.amp_dtype(config.train.amp, dev)
    model.train()
    times, tokens, batches = [], 0, iter(loader)
    for step in range(steps + 1):
        batch = runtime.to_device(next(batches), dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with runtime.autocast(dev, dtype):
            total, _, _ = train.step_losses(model, batch, criteria, config)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step:  # the first step warms up (allocations, kernels): not counted
            times.append(time.perf_counter() - t0)
            tokens += int(batch["tokens"].ne(vocab.PAD_IDX).sum())
    return {"step_s": sum(times) / len(times), "tokens_per_step": tokens / steps,
            "trainable_parameters": sum(p.numel() for p in trainable), "peak_memory_mb": peak_memory_mb(device)}


def child(args, *extra) -> dict:
    cmd = [sys.executable, __file__, "--child", *extra, "--data-root", args.data_root, "--anchors", str(args.anchors),
           "--steps", str(args.steps), "--device", args.device]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="esm2_t33_650M_UR50D", choices=sorted(ARCHS))
    p.add_argument("--dir", type=Path, default=ROOT / "bench_weights", help="where the random weights are written")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "mutarget"))
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--anchors", type=int, default=2)
    p.add_argument("--steps", type=int, default=2, help="measured steps per mode (after one warm-up step)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # load PATH | steps PATH MODE PRECISION
    args = p.parse_args(argv)
    if args.child:
        kind, path, *rest = args.child
        result = run_load(path) if kind == "load" else run_steps(path, *rest, args.data_root, args.anchors, args.steps,
                                                                 args.device)
        print(json.dumps(result))
        return 0
    t0 = time.perf_counter()
    files = write_weights(args.arch, args.dir)
    results = {"arch": args.arch, "device": args.device, "threads": torch.get_num_threads(),
               "write_s": time.perf_counter() - t0, "load": {}, "steps": {}}
    for fmt, path in files.items():
        results["load"][fmt] = child(args, "load", str(path))
        print(f"load {fmt:8}: {results['load'][fmt]['load_s']:.1f} s, peak RSS "
              f"{results['load'][fmt]['peak_rss_mb']:.0f} MB", flush=True)
    for mode in args.modes:
        for precision in args.precisions:
            r = results["steps"][f"{mode}/{precision}"] = child(args, "steps", str(files["fair-esm"]), mode, precision)
            print(f"{mode:20} {precision}: {r['step_s']:.2f} s/step ({r['tokens_per_step']:.0f} tokens), "
                  f"{r['trainable_parameters']} trainable parameters, peak memory {r['peak_memory_mb']:.0f} MB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
