"""Real-size benchmark: an ESM-2 architecture (default esm2_t33_650M_UR50D) with random weights.

python scripts/bench_real.py [--arch esm2_t33_650M_UR50D] [--dir bench_weights] [--json OUT.json]
                             [--device cpu|cuda] [--anchors 8] [--n-pos 3] [--n-neg 9] [--warmup 2] [--steps 4]
                             [--modes ...] [--precisions fp32 bf16] [--layouts packed padded] [--predict N]
                             [--no-load] [--child-timeout S]

1. Writes the random model once into --dir in both formats (fair-esm .pt and a Hugging Face folder with
   model.safetensors), then (unless --no-load) loads each with this project's loader (weights.py) in a process of
   its own: load time and peak RSS.
2. SupCon training steps of the SupCon branch's workload (supcon.loss hard: each of --anchors anchors with
   --n-pos positives and --n-neg negatives, real proteins of the MUTarget training split, so real lengths) for
   each of --modes (none: no training steps): encoder.tune last_k (2 layers), lora (last 2 layers; rank 8,
   q k v out), adapter (last 2 layers, dim 64), full (train.checkpointing: auto, the planner's layers, as train.py),
   and full with every layer checkpointed, in each precision and layout (packed / padded), each in a process of
   its own, --warmup steps then --steps timed ones. Each timed step is what train.py runs: the next batch from the
   DataLoader (sampling and collation included), forward, losses, backward (as memory.Planner decides), clipping,
   fused AdamW (CUDA), timed to a synchronisation. Figures: seconds per step, real tokens per second, MFU
   (throughput.py's count of the real tokens against the GPU's dense bf16 peak), HFU (recomputation included) and
   the peak's name, model and hardware TFLOP/s, the layers checkpointed, peak memory (GPU allocated on CUDA, RSS
   on the CPU),
   and the share of the step outside the backbone (1 - the backbone's own forward + backward time, measured on the
   same batch without heads, losses or optimiser, over the step time).
3. With --predict N: predict.py on N proteins of the real length distribution with the same architecture (a
   train.py checkpoint of the random model), per layout: proteins per second as predict.py reports them.
Speed does not depend on the weights' values, so random weights measure what the pretrained ones cost.

A process that fails (an error, out of memory, more than --child-timeout seconds) is recorded in the figures
({"ok": false, "rc", "timed_out", "oom", "stderr_tail"}) and the next one runs; --json is rewritten (atomically)
after every process, with "complete": false until the last one has finished. Exit status 1 when any failed.
This parent imports no PyTorch unless it writes the weights: the processes it starts do the work. The arch
`tiny` (2 layers x 64 dims x 4 heads) is for tests and `scripts/gpu_check.sh --dry-run` only.
`python scripts/bench_real.py gpu-check {env,get,record,summary} ...`: scripts/gpu_check.sh's helpers (the
machine's facts, one JSON line per step, the closing table), so that the shell script writes no JSON itself.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARCHS = {"esm2_t6_8M_UR50D": (6, 320, 20), "esm2_t12_35M_UR50D": (12, 480, 20), "esm2_t30_150M_UR50D": (30, 640, 20),
         "esm2_t33_650M_UR50D": (33, 1280, 20), "esm2_t36_3B_UR50D": (36, 2560, 40),
         "tiny": (2, 64, 4)}  # test-only: the dry run of scripts/gpu_check.sh
MODES = {"last_k": {"tune": "last_k", "trainable_layers": 2},
         "lora": {"tune": "lora", "trainable_layers": 2},
         "adapter": {"tune": "adapter", "trainable_layers": 2},
         "full": {"tune": "full"},
         "full_checkpointing": {"tune": "full"}}
CHECKPOINTING = {"full_checkpointing": "all"}  # train.checkpointing of a mode (default auto: the planner's)
OOM = re.compile(r"out of memory|OutOfMemoryError", re.IGNORECASE)
TAIL_LINES = 40


def peak_memory_mb(device: str) -> float:
    """Peak GPU memory allocated (CUDA), else this process's peak RSS."""
    import torch
    from throughput import peak_rss_mb
    return torch.cuda.max_memory_allocated() / 2 ** 20 if device.startswith("cuda") else peak_rss_mb()


def env_facts(device: str) -> dict:
    """PyTorch's version, its CPU threads and the GPU's name, as a child process sees them."""
    import torch
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}


def write_weights(arch_name: str, folder: Path) -> dict:
    """Random ESM-2 of that architecture as folder/<name>.pt and folder/<name>_hf/ (once)."""
    layers, dim, heads = ARCHS[arch_name]
    arch = {"num_layers": layers, "embed_dim": dim, "attention_heads": heads, "token_dropout": True}
    pt, hf = folder / f"{arch_name}.pt", folder / f"{arch_name}_hf"
    if not (pt.is_file() and (hf / "model.safetensors").is_file()):
        import esm
        import torch
        import weights
        torch.manual_seed(0)
        model = esm.model.esm2.ESM2(alphabet="ESM-1b", **arch)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("contact_head")}
        folder.mkdir(parents=True, exist_ok=True)
        weights.write_fair_esm(arch, state, pt)
        weights.write_hf_folder(arch, state, hf)
    return {"fair-esm": pt, "hf": hf}


def run_load(path: str) -> dict:
    import weights
    t0 = time.perf_counter()
    backbone = weights.load_pretrained({"checkpoint": path, "model_name": None, "revision": None})
    seconds = time.perf_counter() - t0
    return {"load_s": seconds, "parameters": sum(p.numel() for p in backbone.parameters()),
            "peak_rss_mb": peak_memory_mb("cpu")}


def run_steps(path: str, mode: str, precision: str, layout: str, args) -> dict:
    """Timed SupCon training steps of one tuning mode, precision and layout."""
    import torch

    import contrast
    import data
    import loss
    import memory
    import runtime
    import throughput
    import train
    from backbone import backbone_arch
    from config import resolve_config
    from model import Encoder
    config = resolve_config({
        "seed": 0, "device": args.device, "data": {"root": args.data_root, "fold": 0},
        "encoder": {"checkpoint": path, "packed": layout == "packed", **MODES[mode]},
        "train": {"batch_size": args.anchors, "amp": "bf16" if precision == "bf16" else "none",
                  "checkpointing": CHECKPOINTING.get(mode, "auto")},
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

    planner = memory.Planner(model, config, dev, dtype or torch.float32)  # train.checkpointing: auto, as train.py

    def step():
        batch = runtime.to_device(next(batches), dev)

        def losses_of(stream=None):
            with runtime.autocast(dev, dtype):
                return train.step_losses(model, batch, criteria, config, stream=stream)
        planner.step(batch, optimizer, losses_of, lambda total: total.backward(), lambda: runtime.autocast(dev, dtype))
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
    extra = {key: speed[key] for key in ("hfu", "gpu_peak", "model_tflops_per_s", "hardware_tflops_per_s")
             if key in speed}
    extra["checkpointed_layers"] = model.checkpointed_layers  # the planner's choice at the last step
    return {"step_s": seconds, "tokens_per_step": tokens, "tokens_per_s": speed["tokens_per_s"],
            "mfu": speed.get("mfu"), **extra, "outside_backbone_share": max(0.0, 1 - min(backbone_s) / seconds),
            "trainable_parameters": sum(p.numel() for p in trainable), "peak_memory_mb": peak_memory_mb(args.device)}


def run_predict(path: str, layout: str, args) -> dict:
    """predict.py on --predict proteins of the real length distribution: proteins per second."""
    import numpy as np

    import data
    import predict
    import vocab
    from backbone import backbone_arch
    from config import resolve_config
    from model import Encoder
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
        partial = fasta.with_name(f".{fasta.name}.{os.getpid()}")  # renamed when whole: a killed run leaves none
        with open(partial, "w") as handle:
            for i, n in enumerate(rng.choice(lengths, size=args.predict)):
                handle.write(f">p{i}\n{''.join(rng.choice(list(vocab.STANDARD_RESIDUES), size=int(n)))}\n")
        os.replace(partial, fasta)
    out = folder / f"out_{layout}.jsonl"
    t0 = time.perf_counter()
    code = predict.main(["--checkpoint", str(ckpt), "--fasta", str(fasta), "--out", str(out), "--device", args.device,
                         "--layout", layout, "--max-tokens", str(args.max_tokens)])
    seconds = time.perf_counter() - t0
    if code != 0:
        raise RuntimeError(f"predict.py exited with {code}")
    return {"proteins": args.predict, "seconds": seconds, "proteins_per_s": args.predict / seconds,
            "peak_memory_mb": peak_memory_mb(args.device)}


def tail(text: str | bytes | None, lines: int = TAIL_LINES) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").splitlines()[-lines:])


def child(args, *extra) -> dict:
    """One job in a process of its own: its figures with "ok": true, or what went wrong with "ok": false (exit
    status, whether it ran out of memory or past --child-timeout, the last lines of its error output)."""
    cmd = [sys.executable, __file__, "--child", *extra, "--data-root", args.data_root, "--anchors", str(args.anchors),
           "--n-pos", str(args.n_pos), "--n-neg", str(args.n_neg), "--warmup", str(args.warmup), "--steps",
           str(args.steps), "--device", args.device, "--dir", str(args.dir), "--arch", args.arch,
           "--predict", str(args.predict), "--max-tokens", str(args.max_tokens)]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
        rc, out, err, timed_out = done.returncode, done.stdout, done.stderr, False
    except subprocess.TimeoutExpired as expired:  # the child is killed: its GPU memory goes with it
        rc, out, err, timed_out = None, expired.stdout, expired.stderr, True
    seconds = time.perf_counter() - t0
    if rc == 0:
        try:
            return {"ok": True, **json.loads(out.strip().splitlines()[-1])}
        except (ValueError, IndexError):
            err = f"{tail(err)}\nno JSON result on the last line of the output:\n{tail(out, 5)}"
    failed = tail(err) or tail(out)
    return {"ok": False, "rc": rc, "timed_out": timed_out, "oom": bool(OOM.search(f"{out or ''}{err or ''}")),
            "seconds": seconds, "stderr_tail": failed}


def write_json(results: dict, path: str | None) -> None:
    """results as JSON at path, never half-written: a temporary file beside it, then renamed over it."""
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(results, indent=2) + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def failure_line(name: str, r: dict) -> str:
    why = ("timed out" if r["timed_out"] else "out of memory" if r["oom"] else f"exit status {r['rc']}")
    last = r["stderr_tail"].splitlines()[-1] if r["stderr_tail"] else ""
    return f"{name}: FAILED ({why}) {last}"


def percent(value) -> str:
    return "-" if value is None else f"{value:.1%}"


# --------------------------------------------------------------------- scripts/gpu_check.sh's helpers (no PyTorch)
# python scripts/bench_real.py gpu-check env FILE DATA_ROOT      the run's facts and what is missing, into FILE
# python scripts/bench_real.py gpu-check get FILE KEY            one fact, for the shell
# python scripts/bench_real.py gpu-check record RESULTS STEP KIND [--rc N --seconds S --timeout-s S --log FILE
#                                               --figures FILE --reason TEXT]   one JSON line appended to RESULTS
# python scripts/bench_real.py gpu-check summary RESULTS         a table of the steps; exit 1 when any failed
CHECK_MODULES = {"torch": "torch", "esm": "fair-esm", "numpy": "numpy", "pandas": "pandas", "yaml": "PyYAML",
                 "sklearn": "scikit-learn", "tqdm": "tqdm", "safetensors": "safetensors"}


def check_env(path: str, data_root: str) -> int:
    """The facts of this machine (Python, PyTorch, CUDA, the GPU and its memory, whether PyTorch has the fused
    variable-length attention) and what the check needs but lacks: modules ({module: why}) and the data."""
    import importlib
    import importlib.util
    import platform
    import shutil
    facts = {"python": platform.python_version(), "cpus": os.cpu_count(), "missing": {}, "data_root": data_root}
    for module, package in CHECK_MODULES.items():
        try:
            loaded = importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - any failure to import is a missing package here
            facts["missing"][module] = f"{package} ({type(err).__name__}: {err})"
            continue
        if module == "esm" and not hasattr(loaded, "pretrained"):
            facts["missing"][module] = ("fair-esm (the esm module here is another package's, e.g. EvolutionaryScale's "
                                        "esm: pip uninstall esm, then pip install fair-esm)")
    try:
        try:
            import data
        except ImportError:  # the modules are missing (reported above): at least look at the folder
            facts["data_ok"] = any(Path(data_root).glob("**/*_uniprot.csv"))
        else:
            data.find_data_files(data_root)
            facts["data_ok"] = True
    except Exception as err:  # noqa: BLE001 - a missing folder or file: the data steps cannot run
        facts["data_ok"], facts["data_error"] = False, f"{type(err).__name__}: {err}"
    if not facts["data_ok"]:
        facts.setdefault("data_error", f"{data_root}: no MUTarget data (*_uniprot.csv, partition.csv)")
    if "torch" not in facts["missing"]:
        import torch
        cuda = torch.cuda.is_available()
        facts.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=cuda,
                     varlen_attn=importlib.util.find_spec("torch.nn.attention.varlen") is not None)
        if cuda:
            props = torch.cuda.get_device_properties(0)
            facts.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_mib=props.total_memory >> 20,
                         capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    if shutil.which("nvidia-smi"):
        try:
            query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
            smi = subprocess.run(query, capture_output=True, text=True, timeout=30)
            facts["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
        except (OSError, subprocess.SubprocessError) as err:
            facts["nvidia_smi"] = f"failed: {err}"
    write_json(facts, path)
    for key, value in facts.items():
        if key != "missing":
            print(f"{key}: {value}")
    for module, why in facts["missing"].items():
        print(f"MISSING {module}: {why}")
    return 0


def get_fact(path: str, key: str) -> int:
    """A fact for the shell: lists and dicts as their items (keys) separated by spaces, None as nothing."""
    value = json.loads(Path(path).read_text()).get(key)
    print(" ".join(map(str, value)) if isinstance(value, (list, dict)) else "" if value is None else
          str(value).lower() if isinstance(value, bool) else value)
    return 0


def junit_counts(xml_path: Path) -> dict:
    """pytest's counts from its JUnit XML, with the names of the tests that failed or were skipped (and why)."""
    import xml.etree.ElementTree as ElementTree
    root = ElementTree.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    counts = {key: sum(int(suite.get(key, 0)) for suite in suites) for key in keys}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["time_s"] = sum(float(suite.get("time", 0)) for suite in suites)
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        for tag, field in (("failure", "failed"), ("error", "failed"), ("skipped", "skipped_tests")):
            found = case.find(tag)
            if found is not None:
                counts.setdefault(field, {})[name] = (found.get("message") or "")[:300]
    return counts


def record_step(results: str, step: str, kind: str, rc: int | None, seconds: float | None, timeout_s: float | None,
                log: str | None, figures: str | None, reason: str | None) -> int:
    """One JSON line for a finished (rc given) or skipped (rc None) step, appended to results and synced to disk;
    one line of it printed."""
    line = {"step": step, "kind": kind, "status": "skipped" if rc is None else "ok" if rc == 0 else "failed",
            "ok": rc == 0, "skipped": rc is None, "rc": rc, "seconds": None if seconds is None else round(seconds, 2),
            "timeout_s": timeout_s, "timed_out": False, "oom": False, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if reason:
        line["reason"] = reason
    text = Path(log).read_text(errors="replace") if log and Path(log).is_file() else ""
    if log:
        line["log"] = os.path.relpath(log, Path(results).parent)
    if rc is not None:
        # timeout(1) exits 124 after its TERM, 137 after the KILL that follows; a KILL well before the limit
        # came from elsewhere (most likely the kernel's out-of-memory killer)
        line["timed_out"] = rc == 124 or (rc == 137 and None not in (timeout_s, seconds) and seconds >= timeout_s - 2)
        line["killed"] = rc == 137 and not line["timed_out"]
        line["oom"] = bool(OOM.search(text))
        if rc != 0:
            line["tail"] = tail(text)
    if figures and Path(figures).is_file() and Path(figures).stat().st_size:
        try:
            line["figures"] = (junit_counts(Path(figures)) if figures.endswith(".xml")
                               else json.loads(Path(figures).read_text()))
        except Exception as err:  # noqa: BLE001 - a half-written or foreign file: say so, keep the line
            line["figures_error"] = f"{figures}: {type(err).__name__}: {err}"
    with open(results, "a") as handle:
        handle.write(json.dumps(line) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    print(step_summary(line), flush=True)
    return 0


def step_summary(line: dict) -> str:
    """One line: the step, how it went, its main figures."""
    head = f"[{line['step']}] {line['status'].upper()}"
    if line["skipped"]:
        return f"{head}: {line.get('reason', '')}"
    head += f" in {line['seconds']:.1f} s"
    if not line["ok"]:
        why = "timed out" if line["timed_out"] else "out of memory" if line["oom"] else f"exit status {line['rc']}"
        head += f" ({why}{'; ' + line['reason'] if line.get('reason') else ''})"
    fig = line.get("figures") or {}
    parts = []
    if line["kind"] == "tests" and "tests" in fig:
        parts.append(f"{fig['passed']} passed, {fig['failures'] + fig['errors']} failed, {fig['skipped']} skipped")
    for section in ("load", "steps", "predict"):
        for name, r in (fig.get(section) or {}).items():
            if not r.get("ok"):
                parts.append(f"{name} FAILED")
            elif section == "load":
                parts.append(f"load {name} {r['load_s']:.1f} s")
            elif section == "steps":
                hfu = f" HFU {percent(r['hfu'])} of {r['gpu_peak']}" if "hfu" in r else ""
                parts.append(f"{name} {r['step_s']:.3f} s/step {r['tokens_per_s']:.0f} tok/s MFU {percent(r['mfu'])}"
                             f"{hfu} {r['peak_memory_mb']:.0f} MB")
            else:
                parts.append(f"predict {name} {r['proteins_per_s']:.1f} proteins/s {r['peak_memory_mb']:.0f} MB")
    if line["kind"] == "env":
        parts += [f"{k}={fig[k]}" for k in ("gpu", "gpu_memory_mib", "torch", "varlen_attn") if k in fig]
        parts += [f"missing {m}" for m in fig.get("missing", {})] + (["no data"] if fig.get("data_ok") is False else [])
    return head + (": " + "; ".join(parts) if parts else "")


def summarize(results: str) -> int:
    """Every step's line again, then the count; exit status 1 when any step failed."""
    lines = [json.loads(text) for text in Path(results).read_text().splitlines() if text.strip()]
    print(f"\n{results}:")
    for line in lines:
        print("  " + step_summary(line))
    failed = [line["step"] for line in lines if line["status"] == "failed"]
    skipped = [line["step"] for line in lines if line["status"] == "skipped"]
    print(f"{len(lines) - len(failed) - len(skipped)} ok, {len(failed)} failed"
          f"{' (' + ', '.join(failed) + ')' if failed else ''}, {len(skipped)} skipped")
    return 1 if failed else 0


def gpu_check_helper(argv) -> int:
    p = argparse.ArgumentParser(prog="bench_real.py gpu-check", description="scripts/gpu_check.sh's helpers")
    sub = p.add_subparsers(dest="what", required=True)
    env = sub.add_parser("env")
    env.add_argument("file")
    env.add_argument("data_root")
    get = sub.add_parser("get")
    get.add_argument("file")
    get.add_argument("key")
    rec = sub.add_parser("record")
    rec.add_argument("results")
    rec.add_argument("step")
    rec.add_argument("kind")
    rec.add_argument("--rc", type=int, help="the exit status; none: the step was skipped")
    rec.add_argument("--seconds", type=float)
    rec.add_argument("--timeout-s", type=float)
    rec.add_argument("--log")
    rec.add_argument("--figures", help="a JSON file (bench_real.py --json, the facts) or pytest's JUnit XML")
    rec.add_argument("--reason", help="why it was skipped or forced to fail")
    summary = sub.add_parser("summary")
    summary.add_argument("results")
    a = p.parse_args(argv)
    if a.what == "env":
        return check_env(a.file, a.data_root)
    if a.what == "get":
        return get_fact(a.file, a.key)
    if a.what == "record":
        return record_step(a.results, a.step, a.kind, a.rc, a.seconds, a.timeout_s, a.log, a.figures, a.reason)
    return summarize(a.results)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["gpu-check"]:
        return gpu_check_helper(argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="esm2_t33_650M_UR50D", choices=sorted(ARCHS))
    p.add_argument("--dir", type=Path, default=ROOT / "bench_weights", help="where the random weights are written")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "mutarget"))
    p.add_argument("--json", help="write the figures here (after every process)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--anchors", type=int, default=8)
    p.add_argument("--n-pos", type=int, default=3)
    p.add_argument("--n-neg", type=int, default=9)
    p.add_argument("--warmup", type=int, default=2, help="steps before the timed ones")
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode")
    p.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES), help="none: no training steps")
    p.add_argument("--precisions", nargs="+", default=["bf16"], choices=["fp32", "bf16"])
    p.add_argument("--layouts", nargs="+", default=["packed", "padded"], choices=["packed", "padded"])
    p.add_argument("--predict", type=int, default=0, help="also predict this many proteins per layout (0: no)")
    p.add_argument("--max-tokens", type=int, default=65536, help="predict.py --max-tokens")
    p.add_argument("--load", action=argparse.BooleanOptionalAction, default=True,
                   help="time loading the weights in both formats (--no-load: skip)")
    p.add_argument("--child-timeout", type=float, default=1800.0,
                   help="seconds one process may run before it is killed and recorded as timed out")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)  # load PATH | steps PATH MODE PRECISION LAYOUT
    args = p.parse_args(argv)
    if args.child:
        kind, path, *rest = args.child
        result = (run_load(path) if kind == "load" else run_predict(path, *rest, args) if kind == "predict"
                  else run_steps(path, *rest, args))
        print(json.dumps({**result, "env": env_facts(args.device)}))
        return 0
    t0 = time.perf_counter()
    files = write_weights(args.arch, args.dir)
    results = {"arch": args.arch, "device": args.device, "threads": None, "gpu": None, "torch": None,
               "anchors": args.anchors, "write_s": time.perf_counter() - t0, "complete": False, "failures": 0,
               "load": {}, "steps": {}, "predict": {}}
    write_json(results, args.json)

    def record(section: str, name: str, r: dict) -> bool:
        """r into results[section][name], the run's facts from the first process that reports them; --json
        rewritten. Whether the process succeeded."""
        for key, value in r.pop("env", {}).items():
            if results.get(key) is None:
                results[key] = value
        results[section][name] = r
        results["failures"] += not r["ok"]
        write_json(results, args.json)
        if not r["ok"]:
            print(failure_line(f"{section} {name}", r), flush=True)
        return r["ok"]

    for fmt, path in files.items() if args.load else []:
        if record("load", fmt, r := child(args, "load", str(path))):
            print(f"load {fmt:8}: {r['load_s']:.1f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    for mode in args.modes:
        for precision in args.precisions:
            for layout in args.layouts:
                name = f"{mode}/{precision}/{layout}"
                if record("steps", name, r := child(args, "steps", str(files["fair-esm"]), mode, precision, layout)):
                    hfu = (f", HFU {percent(r['hfu'])} of {r['gpu_peak']} TFLOP/s" if "hfu" in r else "") + (
                        f", {r['hardware_tflops_per_s']:.3g} hardware TFLOP/s, {r['checkpointed_layers']} layers "
                        f"checkpointed" if "hardware_tflops_per_s" in r else "")
                    print(f"{mode:20} {precision} {layout:6}: {r['step_s']:.3f} s/step, {r['tokens_per_s']:.0f} "
                          f"tokens/s ({r['tokens_per_step']:.0f} per step), MFU {percent(r['mfu'])}{hfu}, outside "
                          f"the backbone {r['outside_backbone_share']:.0%}, peak memory {r['peak_memory_mb']:.0f} MB",
                          flush=True)
    for layout in args.layouts if args.predict else []:
        if record("predict", layout, r := child(args, "predict", str(files["fair-esm"]), layout)):
            print(f"predict {layout:6}: {r['proteins']} proteins in {r['seconds']:.1f} s ({r['proteins_per_s']:.0f} "
                  f"proteins/s, loading included), peak memory {r['peak_memory_mb']:.0f} MB", flush=True)
    results["complete"] = True
    results["total_s"] = time.perf_counter() - t0
    write_json(results, args.json)
    return 1 if results["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
