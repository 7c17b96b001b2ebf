"""What a training run used, written to run_dir/run.json: the command line, the date and time zone, the code
version (git commit, or a hash of the project's sources), Python and package versions, the device, the resolved
ESM-2 weights (path, format, size, SHA-256 of each weight file, the Hugging Face snapshot id) and where the SupCon
distance map came from. `public` is the same without local paths (command line, host, folders): checkpoints
carry it, and model folders (release.py) with it."""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import platform
import socket
import subprocess
from pathlib import Path

import torch

PROJECT = Path(__file__).resolve().parent
PACKAGES = ("torch", "fair-esm", "numpy", "scikit-learn", "safetensors")


def sha256_of(path, block: int = 1 << 24) -> str:
    """Hex SHA-256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def now() -> dict:
    """{'time': ISO 8601 local time with its UTC offset, 'timezone': its name}."""
    moment = datetime.datetime.now().astimezone()
    return {"time": moment.isoformat(timespec="seconds"), "timezone": moment.tzname()}


def code_version() -> dict:
    """{'git_commit', 'git_dirty' (tracked files changed): when the project is a git checkout; 'sources_sha256':
    one hash over the project's top-level *.py files (name and bytes), which identifies the code of any copy}."""
    digest = hashlib.sha256()
    for path in sorted(PROJECT.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    version = {"sources_sha256": digest.hexdigest()}
    try:
        def git(*args):
            return subprocess.run(["git", "-C", str(PROJECT), *args], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        if Path(git("rev-parse", "--show-toplevel")).resolve() == PROJECT:  # not a copy inside another repository
            version = {"git_commit": git("rev-parse", "HEAD"),
                       "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")), **version}
    except (OSError, subprocess.SubprocessError):
        pass  # no git, or not a checkout
    return version


def versions() -> dict:
    """Python and the packages that decide the numbers (None: not installed)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    found["cuda"] = torch.version.cuda
    return found


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device, processes: int) -> dict:
    """The device kind and name, the processes and (on the CPU) torch's threads per process."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return {"type": "cuda", "name": name, "processes": processes}
    return {"type": device.type, "name": cpu_name(), "processes": processes, "threads": torch.get_num_threads()}


def weights_info(encoder_cfg) -> dict:
    """The backbone's initial weights as resolved now (weights.locate): scratch, or a fair-esm file / a Hugging Face
    folder with each weight file's size and SHA-256 (and the snapshot id when the folder is a hub cache snapshot)."""
    if encoder_cfg["scratch"] is not None:
        return {"source": "scratch", "arch": encoder_cfg["scratch"]}
    from weights import hf_weight_files, locate
    kind, path = locate(encoder_cfg)
    asked = {"model_name": encoder_cfg["model_name"], "revision": encoder_cfg["revision"],
             "checkpoint": encoder_cfg["checkpoint"]}
    asked = {k: v for k, v in asked.items() if v is not None}
    if kind == "fair-esm":
        return {"source": "pretrained", "asked": asked, "format": "fair-esm", "path": str(path.resolve()),
                "files": {path.name: {"bytes": path.stat().st_size, "sha256": sha256_of(path)}}}
    _, files = hf_weight_files(path)
    snapshot = path.name if path.parent.name == "snapshots" else None
    return {"source": "pretrained", "asked": asked, "format": "hugging face", "path": str(path.resolve()),
            "snapshot": snapshot,
            "files": {f: {"bytes": (path / f).stat().st_size, "sha256": sha256_of(path / f)} for f in files}}


def distance_map_info(config, from_checkpoint: bool) -> dict | None:
    """Where supcon's hard-negative distance map came from (contrast.setup_supcon's order), or None without one."""
    sc = config.supcon
    if not (sc.apply and sc.loss == "hard" and sc.hard_neg):
        return None
    if from_checkpoint:
        return {"origin": "checkpoint", "note": "the map stored in the resumed checkpoint"}
    if sc.distance_map is not None:
        path = Path(sc.distance_map)
        return {"origin": "file", "path": str(path.resolve()), "name": path.name, "sha256": sha256_of(path)}
    return {"origin": "built", "note": "from the initial model's pooled embeddings of the training split"}


def collect(argv: list, config, device: torch.device, processes: int, resume: dict | None = None,
            resume_path=None, program: str = "train.py") -> dict:
    """run.json's record of this start of the run: `program` and its arguments `argv` as typed; resume: the
    checkpoint resumed from (read at resume_path), whose own provenance (if any) says how the run began."""
    record = {"command": [program, *argv], "cwd": str(Path.cwd()), "started": now(), "host": socket.gethostname(),
              "code": code_version(), "versions": versions(), "device": device_info(device, processes)}
    if resume is None:
        return {**record, "weights": weights_info(config.encoder), "distance_map": distance_map_info(config, False),
                "resumed_from": None}
    return {**record, "weights": {"source": "checkpoint", "path": str(Path(resume_path).resolve())},
            "distance_map": distance_map_info(config, resume.get("distance_map") is not None),
            "resumed_from": {"checkpoint": str(resume_path), "epoch": resume["epoch"]},
            "initial": (resume.get("provenance") or {}).get("initial")}


def merge(earlier: dict | None, record: dict) -> dict:
    """run.json after this start: the newest start at the top level, the earlier ones (oldest first) in
    'earlier_starts', and 'initial': the first start's weights and distance map (what the model began from; on a
    resume without run.json, as the checkpoint's provenance records them)."""
    starts = []
    if earlier:
        starts = earlier.pop("earlier_starts", []) + [earlier]
    first = starts[0] if starts else record
    initial = ({"weights": first["weights"], "distance_map": first["distance_map"]}
               if first.get("resumed_from") is None else record.get("initial"))
    merged = {**record, "initial": initial}
    return {**merged, "earlier_starts": starts} if starts else merged


def public(record: dict) -> dict:
    """A run.json record without local paths or the host: what a checkpoint and a model folder carry. Its
    'initial' weights and distance map are those the run began from."""
    def strip(tree):
        if not isinstance(tree, dict):
            return tree
        out = {k: v for k, v in tree.items() if k != "path"}
        if isinstance(out.get("asked"), dict) and out["asked"].get("checkpoint"):
            out["asked"] = {**out["asked"], "checkpoint": Path(out["asked"]["checkpoint"]).name}
        return out
    initial = record.get("initial") or {}
    return {"started": record["started"], "code": record["code"], "versions": record["versions"],
            "device": record["device"], "initial": {"weights": strip(initial.get("weights")),
                                                    "distance_map": strip(initial.get("distance_map"))}}
