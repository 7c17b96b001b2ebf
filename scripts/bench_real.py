"""Real-size benchmark: an ESM-2 architecture (default esm2_t33_650M_UR50D) with random weights.

python scripts/bench_real.py [--arch esm2_t33_650M_UR50D] [--dir bench_weights] [--json OUT.json]
                             [--device cpu|cuda] [--anchors 8] [--n-pos 3] [--n-neg 9] [--warmup 2] [--steps 4]
                             [--modes ...] [--precisions fp32 bf16] [--layouts packed padded] [--predict N]

1. Writes the random model once into --dir in both formats (fair-esm .pt and a Hugging Face folder with
   model.safetensors), then loads each with this project's loader (weights.py) in a process of its own:
   load time and peak RSS.
2. SupCon training steps of the SupCon branch's workload (supcon.loss hard: each of --anchors anchors with
   --n-pos positives and --n-neg negatives, real proteins of the MUTarget training split, so real lengths) for
   encoder.tune last_k (2 layers), lora (last 2 layers; rank 8, q k v out), adapter (last 2 layers, dim 64),
   full, and full with activation checkpointing, in each precision and layout (packed / padded), each in a
   process of its own, --warmup steps then --steps timed ones. Each timed step is what train.py runs: the next
   batch from the DataLoader (sampling and collation included), forward, losses, backward, clipping, fused AdamW
   (CUDA), timed to a synchronisation. Figures: seconds per step, real tokens per second, MFU (throughput.py's
   count of the real tokens against the GPU's dense bf16 peak), peak memory (GPU allocated on CUDA, RSS on the
   CPU), and the share of the step outside the backbone (1 - the backbone's own forward + backward time, measured
   on the same batch without heads, losses or optimiser, over the step time).
3. With --predict N: predict.py on N proteins of the real length distribution with the same architecture (a
   train.py checkpoint of the random model), per layout: proteins per second as predict.py reports them.
Speed does not depend on the weights' values, so random weights measure what the pretrained ones cost.
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

import contrast  # noqa: E402
import data  # noqa: E402
import loss  # noqa: E402
import runtime  # noqa: E402
import throughput  # noqa: E402
import train  # noqa: E402
import vocab  # noqa: E402
import weights  # noqa: E402
from backbone import backbone_arch  # noqa: E402
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


def run_steps(path: str, mode: str, precision: str, layout: str, args) -> dict:
    """Timed SupCon training steps of one tuning mode, precision and layout."""
    config = resolve_config({
        "seed": 0, "device": args.device, "data": {"root": args.data_root, "fold": 0},
        "encoder": {"checkpoint": path, "packed": layout == "packed", **MODES[mode]},
        "train": {"batch_size": args.anchors, "amp": "bf16" if precision == "bf16" else "none"},
        "supcon": {"apply": True, "loss": "hard", "n_pos": args.n_pos, "n_neg": args.n_neg}})
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    train_set = data.build_datasets(config)["train"]
    contrast.enable_supcon(train_set, args.n_pos, args.n_neg, seed=0)
    model = Encoder(config).to(dev)
    optimizer = train.make_optimizer(model, config.train)
    criteria = {"class": loss.ClassLoss(loss.class_weights(train_set.class_counts())).to(dev),
                "motif": loss.MotifLoss(loss.motif_pos_weights(*train_set.residue_counts())).to(dev)}
    _, loader = train.make_loader(train_set, config, device=dev)
    dtype = runtime.amp_dtype(config.train.amp, dev)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    batches = iter(loader)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step():
        batch = runtime.to_device(next(batches), dev)
        with runtime.autocast(dev, dtype):
            total, _, _ = train.step_losses(model, batch, criteria, config)
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return batch

    for _ in range(args.warmup):  # allocations, kernels, plans: not counted
        step()
    sync()
    model.token_counts.update(dict.fromkeys(model.token_counts, 0))
    t0 = time.perf_counter()
    last = [step() for _ in range(args.steps)][-1]
    sync()
    seconds = (time.perf_counter() - t0) / args.steps
    counts = {"anchors": args.anchors * args.steps, **model.token_counts}
    tokens = counts["tokens"] / args.steps
    speed = throughput.epoch_speed(counts, seconds * args.steps, backbone_arch(model.backbone), model.first_trainable,
                                   config.encoder.tune, dev)
    backbone_s = []  # the backbone alone on the last batch: forward and backward, no heads, losses or optimiser
    for _ in range(2):
        sync()
        t1 = time.perf_counter()
        with runtime.autocast(dev, dtype):
            reps = model.embed(last)
        reps.float().sum().backward() if reps.requires_grad else None
        sync()
        backbone_s.append(time.perf_counter() - t1)
    optimizer.zero_grad(set_to_none=True)
    return {"step_s": seconds, "tokens_per_step": tokens, "tokens_per_s": speed["tokens_per_s"],
            "mfu": speed.get("mfu"), "outside_backbone_share": max(0.0, 1 - min(backbone_s) / seconds),
            "trainable_parameters": sum(p.numel() for p in trainable), "peak_memory_mb": peak_memory_mb(args.device)}


def run_predict(path: str, layout: str, args) -> dict:
    """predict.py on --predict proteins of the real length distribution: proteins per second."""
    import predict
    from utils import save_checkpoint
    folder = args.dir / "predict"
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / f"{args.arch}.pt"
    if not ckpt.is_file():  # a train.py checkpoint of the random model (heads included)
        config = resolve_config({"encoder": {"checkpoint": path}, "data": {"root": args.data_root}})
        model = Encoder(config)
        save_checkpoint({"model": model.state_dict(), "config": config.to_dict(), "arch": backbone_arch(model.backbone),
                         "classes": vocab.CLASSES}, ckpt)
    fasta = folder / f"proteins_{args.predict}.fa"
    if not fasta.is_file():
        lengths = [len(p.sequence) for p in data.load_proteins(args.data_root)[0]]
        rng = np.random.default_rng(0)
        with open(fasta, "w") as handle:
            for i, n in enumerate(rng.choice(lengths, size=args.predict)):
                handle.write(f">p{i}\n{''.join(rng.choice(list(vocab.STANDARD_RESIDUES), size=int(n)))}\n")
    out = folder / f"out_{layout}.jsonl"
    t0 = time.perf_counter()
    code = predict.main(["--checkpoint", str(ckpt), "--fasta", str(fasta), "--out", str(out), "--device", args.device,
                         "--layout", layout, "--max-tokens", str(args.max_tokens)])
    seconds = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"predict.py exited with {code}")
    return {"proteins": args.predict, "seconds": seconds, "proteins_per_s": args.predict / seconds,
            "peak_memory_mb": peak_memory_mb(args.device)}


def child(args, *extra) -> dict:
    cmd = [sys.executable, __file__, "--child", *extra, "--data-root", args.data_root, "--anchors", str(args.anchors),
           "--n-pos", str(args.n_pos), "--n-neg", str(args.n_neg), "--warmup", str(args.warmup), "--steps",
           str(args.steps), "--device", args.device, "--dir", str(args.dir), "--arch", args.arch,
           "--predict", str(args.predict), "--max-tokens", str(args.max_tokens)]
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
    p.add_argument("--anchors", type=int, default=8)
    p.add_argument("--n-pos", type=int, default=3)
    p.add_argument("--n-neg", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2, help="steps before the timed ones")
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--precisions", nargs="+", default=["bf16"], choices=["fp32", "bf16"])
    p.add_argument("--layouts", nargs="+", default=["packed", "padded"], choices=["packed", "padded"])
    p.add_argument("--predict", type=int, default=0, help="also predict this many proteins per layout (0: no)")
    p.add_argument("--max-tokens", type=int, default=65536, help="predict.py --max-tokens")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # load PATH | steps PATH MODE PRECISION LAYOUT
    args = p.parse_args(argv)
    if args.child:
        kind, path, *rest = args.child
        result = (run_load(path) if kind == "load" else run_predict(path, *rest, args) if kind == "predict"
                  else run_steps(path, *rest, args))
        print(json.dumps(result))
        return 0
    t0 = time.perf_counter()
    files = write_weights(args.arch, args.dir)
    results = {"arch": args.arch, "device": args.device, "threads": torch.get_num_threads(),
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "torch": torch.__version__, "write_s": time.perf_counter() - t0, "load": {}, "steps": {}, "predict": {}}
    for fmt, path in files.items():
        results["load"][fmt] = child(args, "load", str(path))
        print(f"load {fmt:8}: {results['load'][fmt]['load_s']:.1f} s, peak RSS "
              f"{results['load'][fmt]['peak_rss_mb']:.0f} MB", flush=True)
    for mode in args.modes:
        for precision in args.precisions:
            for layout in args.layouts:
                r = results["steps"][f"{mode}/{precision}/{layout}"] = child(
                    args, "steps", str(files["fair-esm"]), mode, precision, layout)
                mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
                print(f"{mode:20} {precision} {layout:6}: {r['step_s']:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s "
                      f"({r['tokens_per_step']:.0f} per step), MFU {mfu}, outside the backbone "
                      f"{r['outside_backbone_share']:.0%}, peak memory {r['peak_memory_mb']:.0f} MB", flush=True)
    for layout in args.layouts if args.predict else []:
        r = results["predict"][layout] = child(args, "predict", str(files["fair-esm"]), layout)
        print(f"predict {layout:6}: {r['proteins']} proteins in {r['seconds']:.1f} s ({r['proteins_per_s']:.0f} "
              f"proteins/s, loading included), peak memory {r['peak_memory_mb']:.0f} MB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
