"""Prediction benchmark: streaming predict.py against the former one-shot path, on synthetic proteomes.

python scripts/bench_predict.py [--sizes 1000 10000 100000] [--modes stream one_shot] [--data-root DIR]
                                [--work DIR] [--json OUT.json] [--device cpu] [--threads N]

Proteomes: N proteins whose lengths are drawn (with replacement, seed 0) from the lengths of the real
data's CSVs (data.root), residues uniform over the 20 standard amino acids. Model: the demo
architecture (configs/demo.yaml: 2-layer, 64-dim scratch ESM-2, max_len 1022), untrained and saved
as a train.py checkpoint (speed and memory do not depend on the weights).
Modes, each size and mode in its own process (so that peak RSS is its own), outputs JSON + TSV:
  stream:   predict.py as it is (chunks of 1000 proteins, --max-tokens 16384, fp32 on the CPU);
  one_shot: the former predict.py: every protein read, run_inference (batches of 16) per checkpoint
            over the whole input, every output text built in memory, then written (its memory grows
            by about 0.22 MB per protein, as measured: some 22 GB at 100k; --modes stream leaves it out).
Time: from reading the input to the files written (imports excluded). Peak RSS: VmHWM (throughput.peak_rss_mb).
On a CPU shared with other jobs, --threads 1 avoids measuring thread start-up waits: with 2 threads
on 2 busy cores every operation of the small demo model waited ~8 ms for the second thread.
"""
from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402
import inference  # noqa: E402
import outputs  # noqa: E402
import predict  # noqa: E402
import release  # noqa: E402
from backbone import backbone_arch  # noqa: E402
from config import load_config  # noqa: E402
from evaluate import run_inference  # noqa: E402
from model import Encoder  # noqa: E402
from throughput import peak_rss_mb  # noqa: E402
from utils import write_text_atomic  # noqa: E402
from vocab import CLASSES, SITE_CLASSES  # noqa: E402

STANDARD = np.array(list("ACDEFGHIKLMNPQRSTVWY"))


def real_lengths(data_root) -> np.ndarray:
    files = sorted(glob.glob(str(Path(data_root) / "*_uniprot.csv")))
    if not files:
        sys.exit(f"error: {data_root}: no *_uniprot.csv files (give --data-root)")
    return np.concatenate([pd.read_csv(f, dtype=str, keep_default_na=False)["Sequence"].str.len().to_numpy()
                           for f in files])


def write_proteome(path: Path, n: int, lengths: np.ndarray, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        for i, length in enumerate(rng.choice(lengths, size=n, replace=True)):
            handle.write(f">synthetic_{i:06d}\n{''.join(rng.choice(STANDARD, size=int(length)))}\n")


def write_demo_checkpoint(path: Path) -> None:
    config = load_config(ROOT / "configs" / "demo.yaml")
    torch.manual_seed(0)
    model = Encoder(config)
    torch.save({"model": model.state_dict(), "config": config.to_dict(), "arch": backbone_arch(model.backbone),
                "classes": CLASSES}, path)


# --------------------------------------------------------------------------- the former one-shot path
def one_shot(checkpoints, fasta, out, tsv, device="cpu", batch_size: int = 16) -> None:
    """predict.py before streaming: all proteins in memory, each checkpoint over the whole input,
    all per-residue tracks kept until the end, the output texts built whole."""
    device = torch.device(device)
    proteins = [data.make_protein(i, raw, "", f"{fasta}: record {i!r}") for i, _, raw in data.read_fasta(Path(fasta))]
    dataset = data.LocalizationDataset(proteins, "predict")
    total = None
    for path in checkpoints:
        trained = release.from_checkpoint(path)
        config, _ = inference.checked_config(trained, False)
        model = inference.load_model(trained, config, device)
        del trained
        res = run_inference(model, dataset, batch_size, device, "none", config.data.max_len, config.data.overlap)
        del model
        probs, motifs = res["probs"].astype(np.float64), [m.astype(np.float64) for m in res["motif_probs"]]
        if total is None:
            total = {**res, "probs": probs, "motif_probs": motifs}
        else:
            total["probs"] += probs
            total["motif_probs"] = [a + b for a, b in zip(total["motif_probs"], motifs)]
    n = len(checkpoints)
    thresholds = np.full(len(CLASSES), 0.5)
    records = [outputs.protein_record(p.entry, total["probs"][i] / n, total["motif_probs"][i] / n, thresholds)
               for i, p in enumerate(proteins)]
    head = ["id", "length", "predicted"] + [f"prob_{c}" for c in CLASSES] + [f"site_{c}" for c in SITE_CLASSES]
    rows = ["\t".join(head)] + ["\t".join([r["id"], str(r["length"]), ",".join(r["predicted"])]
                                          + [f"{r['probabilities'][c]:.4f}" for c in CLASSES]
                                          + [str(r["sites"].get(c, "")) for c in SITE_CLASSES]) for r in records]
    write_text_atomic(out, json.dumps(records, indent=1) + "\n")
    write_text_atomic(tsv, "\n".join(rows) + "\n")


def child(mode: str, checkpoint: str, fasta: str, out_dir: str, device: str) -> dict:
    out, tsv = Path(out_dir) / f"{mode}.json", Path(out_dir) / f"{mode}.tsv"
    t0 = time.perf_counter()
    if mode == "stream":
        code = predict.main(["--checkpoint", checkpoint, "--fasta", fasta, "--out", str(out), "--tsv", str(tsv),
                             "--device", device])
        if code != 0:
            sys.exit(code)
    else:
        one_shot([checkpoint], fasta, out, tsv, device)
    seconds = time.perf_counter() - t0
    n = sum(1 for line in open(fasta) if line.startswith(">"))
    return {"mode": mode, "n": n, "seconds": seconds, "proteins_per_s": n / seconds,
            "peak_rss_mb": peak_rss_mb()}


def projected_rss(runs: list, n: int) -> str:
    """The one-shot path's peak RSS at n proteins, extrapolated linearly from its two largest measured sizes."""
    measured = sorted((r["n"], r["peak_rss_mb"]) for r in runs if r["mode"] == "one_shot" and "peak_rss_mb" in r)
    if len(measured) < 2:
        return f"above --one-shot-limit ({n} proteins)"
    (n0, m0), (n1, m1) = measured[-2:]
    per = (m1 - m0) / (n1 - n0)
    return f"projected peak RSS {m1 + per * (n - n1):.0f} MB ({per:.3f} MB per protein from {n0} and {n1} proteins)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--modes", nargs="+", choices=["stream", "one_shot"], default=["stream", "one_shot"])
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "mutarget"))
    p.add_argument("--work", help="folder for the proteomes, the checkpoint and the outputs (default: a temporary one)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads in each measured process (default: torch's own)")
    p.add_argument("--one-shot-limit", type=int, default=20000, metavar="N",
                   help="run the one-shot path only up to N proteins: above, its memory (about 0.22 MB per protein) "
                        "would outgrow the machine; the projection from the measured sizes is reported instead")
    p.add_argument("--child", nargs=4, metavar=("MODE", "CKPT", "FASTA", "OUT_DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(*args.child, args.device)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        checkpoint = work / "demo_untrained.pt"
        write_demo_checkpoint(checkpoint)
        lengths = real_lengths(args.data_root)
        results = {"device": args.device, "threads": torch.get_num_threads(), "real_proteins": len(lengths),
                   "mean_length": float(lengths.mean()), "runs": []}
        print(f"lengths drawn from {len(lengths)} real proteins (mean {lengths.mean():.0f}, median "
              f"{np.median(lengths):.0f}, max {lengths.max()}); {torch.get_num_threads()} threads on {args.device}",
              flush=True)
        print(f"{'proteins':>9} {'mode':>9} {'seconds':>9} {'proteins/s':>11} {'peak RSS MB':>12}", flush=True)
        for n in args.sizes:
            fasta = work / f"proteome_{n}.fa"
            write_proteome(fasta, n, lengths)
            for mode in args.modes:
                if mode == "one_shot" and n > args.one_shot_limit:
                    print(f"{n:9d} {mode:>9}   not run: {projected_rss(results['runs'], n)}", flush=True)
                    results["runs"].append({"mode": mode, "n": n, "not_run": projected_rss(results["runs"], n)})
                    continue
                threads = ["--threads", str(args.threads)] if args.threads else []
                done = subprocess.run([sys.executable, __file__, "--device", args.device, *threads, "--child", mode,
                                       str(checkpoint), str(fasta), str(work)], capture_output=True, text=True)
                if done.returncode != 0:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return done.returncode
                r = json.loads(done.stdout.strip().splitlines()[-1])
                results["runs"].append(r)
                print(f"{n:9d} {mode:>9} {r['seconds']:9.1f} {r['proteins_per_s']:11.1f} {r['peak_rss_mb']:12.0f}",
                      flush=True)
            fasta.unlink()
        stream = {r["n"]: r["peak_rss_mb"] for r in results["runs"] if r["mode"] == "stream"}
        if len(stream) > 1:
            base = 1000 if 1000 in stream else min(stream)
            results["stream_rss_ratio_to"] = {"base": base, **{n: rss / stream[base] for n, rss in stream.items()}}
            for n in sorted(stream):
                if n > base:
                    ratio = stream[n] / stream[base]
                    print(f"streaming peak RSS at {n} / at {base} proteins: {ratio:.3f} "
                          f"({'within' if ratio <= 1.2 else 'ABOVE'} the 1.2x bound)")
        if args.json:
            write_text_atomic(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
