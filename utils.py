"""Reproducibility and files: seeding and RNG states, logging, temporary files and atomic writes (a failed
write named), torch files read without running code, checkpoint save / load."""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import re
import secrets
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import torch
import yaml


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states of Python, NumPy, torch (and CUDA) as tensors, numbers, tuples and dicts only, so that a
    checkpoint holding them loads with torch.load(weights_only=True)."""
    numpy_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(),
             "numpy": {"key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                       "pos": int(numpy_state["state"]["pos"]), "has_gauss": int(numpy_state["has_gauss"]),
                       "gauss": float(numpy_state["gauss"])},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def duration_text(seconds: float) -> str:
    """Seconds as a person reads them: '45s', '12m05s', '3h07m'."""
    seconds = max(int(round(seconds)), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"
LOG_DATE = "%Y-%m-%d %H:%M:%S%z"  # train.log and stderr: the date, the time and the UTC offset


def setup_logging(run_dir=None, quiet: bool = False, hold: bool = False, carry: bool = True) -> logging.Logger:
    """The 'mutarget' logger: stderr, plus run_dir/train.log; quiet (non-main processes): warnings only.
    hold: also keep the records in memory until a later setup_logging(run_dir) writes them to train.log
    first (a run's folder is written only once every check has passed, but its log starts at the start);
    carry=False: a new run, the records held before (of a run that failed in-process) are dropped."""
    log = logging.getLogger("mutarget")
    held = [r for h in log.handlers if isinstance(h, _Held) for r in h.records] if carry else []
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    log.handlers.clear()
    fmt = logging.Formatter(LOG_FORMAT, LOG_DATE)
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    log.addHandler(stream)
    if run_dir is not None:
        file = _LogFile(Path(run_dir) / "train.log")
        file.setFormatter(fmt)
        for record in held:
            file.handle(record)
        log.addHandler(file)
    elif hold and not quiet:
        keeper = _Held()
        keeper.records = held
        log.addHandler(keeper)
    log.propagate = False
    return log


class _Held(logging.Handler):
    """Records kept for train.log until its folder may be written (at most 10,000)."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record) -> None:
        if len(self.records) < 10_000:
            self.records.append(record)


class _LogFile(logging.FileHandler):
    """train.log; a line that cannot be written (disk full) is dropped quietly: stderr has it, and the
    failed write that matters (a checkpoint, metrics.jsonl) stops the run with its own message."""

    def handleError(self, record) -> None:
        pass


def log_to_file(message: str, level: int = logging.ERROR) -> None:
    """A line in the run's train.log only (not on stderr, which has it already, or need not): written, or held
    until train.log opens (setup_logging's hold); nothing when neither."""
    log = logging.getLogger("mutarget")
    if not log.isEnabledFor(level):
        return
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in log.handlers:
        if isinstance(handler, (_LogFile, _Held)):
            handler.handle(record)


# Temporary files and folders of this project: `.<name>.mutarget.<host>.<pid>.<random>.tmp`, so that the
# ones a killed process left behind are recognised (remove_stale_temps) and never mistaken for anyone else's.
HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:40] or "host"
TEMP_RE = re.compile(r"^\..+\.mutarget\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]{12}\.tmp$")


def _new_temp(folder: Path, name: str, create) -> str:
    """create(path) on a unique temporary path of this process in folder (retried if it exists)."""
    while True:
        tmp = str(Path(folder) / f".{name}.mutarget.{HOST}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            create(tmp)
            return tmp
        except FileExistsError:
            continue


def new_temp_file(folder: Path, name: str) -> str:
    """Create an empty, unique temporary file in `folder` with the mode the umask gives a new
    file (0666 & ~umask: what open() would give), unlike mkstemp's 0600; returns its path."""
    return _new_temp(folder, name, lambda tmp: os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)))


def new_temp_dir(folder: Path, name: str) -> str:
    """Create a unique temporary folder in `folder` with the umask's mode (0777 & ~umask), unlike
    mkdtemp's 0700; returns its path."""
    return _new_temp(folder, name, lambda tmp: os.mkdir(tmp, 0o777))


def current_umask() -> int:
    """The process's umask, read from /proc (Linux) without changing it; elsewhere set and restored."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def give_umask_mode(path) -> None:
    """chmod a file that a library wrote with a mode of its own (safetensors: 0600) to the mode the umask
    gives a new file (0666 & ~umask), as every other file the project writes."""
    os.chmod(path, 0o666 & ~current_umask())


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user counts too)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder) -> list[Path]:
    """Remove the temporary files and folders that killed processes of this project left in `folder`
    (named by new_temp_file / new_temp_dir, made on this host by a process that no longer runs);
    returns what was removed. Others' files, and live processes' temporaries, are left alone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no such folder (yet), or not readable: nothing to clean
        return removed
    for entry in entries:
        match = TEMP_RE.match(entry.name)
        if not match or match["host"] != HOST or process_alive(int(match["pid"])):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:  # removed meanwhile by another process, or not ours to remove
            pass
    return removed


class WriteError(OSError):
    """A file that could not be written (disk full, no permission, ...): the message names the file and
    the operating system's reason."""


def _write_error(path, err: OSError) -> WriteError:
    return WriteError(f"{path}: cannot write: {err.strerror or err}")


def write_atomic(path, write, temp_folder=None) -> None:
    """write(tmp) to a temporary file in path's folder (or in temp_folder, on the same file system),
    then rename it over path (never half-written); the file gets the umask's ordinary mode. An OSError
    while writing (disk full, permissions) becomes a WriteError naming `path`, and the temporary file
    is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_temp_file(Path(temp_folder or path.parent), path.name)
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise _write_error(path, err) from None
        raise


class _RecordingWriter(io.RawIOBase):
    """A binary file wrapper that keeps the first OSError of its writes: torch.save reports a failed write
    (disk full) only as a RuntimeError without the reason."""

    def __init__(self, handle):
        super().__init__()
        self.handle, self.error = handle, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.handle.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def flush(self) -> None:
        self.handle.flush()


def save_checkpoint(state: dict, path) -> None:
    """torch.save to a temporary file in the same folder, then rename (never half-written); a failed
    write is a WriteError naming the file and the reason."""
    def write(tmp):
        with open(tmp, "wb") as handle:
            sink = _RecordingWriter(handle)
            try:
                torch.save(state, sink)
            except RuntimeError:
                if sink.error is not None:
                    raise sink.error from None
                raise
    write_atomic(path, write)


class CheckpointError(OSError):
    """A checkpoint file that cannot be read or lacks what is needed; the message names the file."""


class UnsafeFileError(CheckpointError):
    """A file that is not a safe tensor file: a torch file holding Python objects other than tensors, numbers,
    strings, lists, tuples and dicts (loading it could run code), or a raw pickle or tar archive (read only by
    a full unpickling). `name` is the first such object, e.g. 'posix.system' (None: no object named); `legacy`:
    the file opens with legacy_globals() (a checkpoint of an earlier version of this project)."""

    def __init__(self, path, name: str | None, message: str, legacy: bool = False):
        super().__init__(message)
        self.path, self.name, self.legacy = path, name, legacy


UNSAFE_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
TORCH_LEGACY_MAGIC = b"l\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's pre-zip format begins with this number, pickled


def legacy_globals() -> list:
    """What checkpoints of earlier versions of this project held besides tensors: NumPy arrays and scalars (the
    functions that rebuild them from their bytes, ndarray, dtype and its classes) and argparse.Namespace. Each
    builds data only, under the names NumPy 1 and 2 pickle them with; nothing else is allowed."""
    from argparse import Namespace
    try:
        from numpy._core import multiarray
    except ImportError:  # NumPy 1
        from numpy.core import multiarray
    names = [(f, f"numpy.{core}.multiarray.{f.__name__}") for f in (multiarray._reconstruct, multiarray.scalar)
             for core in ("core", "_core")]
    dtypes = {type(np.dtype(code)) for code in np.typecodes["All"]}
    return names + [np.ndarray, np.dtype, Namespace] + sorted(dtypes, key=lambda t: t.__name__)


def _container_problem(path) -> str | None:
    """Why `path` is no torch file at all (a raw pickle, a tar archive), or None: torch.save writes a zip
    archive (or, before torch 1.6, a pickled magic number and then the data)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(512)
    except (OSError, TypeError):  # not a path (a file object): torch.load says what is wrong
        return None
    if head.startswith(b"PK") or TORCH_LEGACY_MAGIC in head[:32]:
        return None
    if head[257:262] == b"ustar":
        return "a tar archive (torch's pre-1.6 .tar format, or any archive), which only a full unpickling reads"
    if head.startswith(b"\x80"):
        return "a raw Python pickle, not a torch.save file; only a full unpickling reads it"
    return None


def _starts_like_torch(path) -> bool:
    """Whether the file begins as torch.save's output does (a zip archive, or a pickle: pre-1.6 torch files)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
    except (OSError, TypeError):
        return True
    return head.startswith(b"PK") or head.startswith(b"\x80")


def _one_line(err: Exception) -> str:
    """The gist of an error of torch's weights-only reader on one line (its message spans several and advises
    turning that reader off, which this project never does)."""
    text = str(err)
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return (found.group(1) if found else text).strip().splitlines()[0] if text.strip() else type(err).__name__


def torch_load_safe(path, allowed=(), mmap: bool = False, what: str = "torch file"):
    """torch.load(weights_only=True) onto the CPU: only tensors, numbers, strings, lists, tuples, dicts
    and the `allowed` classes are built. A file referring to anything else (a function to call, a class
    to build), a raw pickle or a tar archive is refused before any of it runs: UnsafeFileError, one line
    naming the file (and the object)."""
    problem = _container_problem(path)
    if problem:
        raise UnsafeFileError(path, None, f"{path}: refused: not a safe tensor file: {problem}")
    with torch.serialization.safe_globals(list(allowed)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:
            found = UNSAFE_GLOBAL_RE.search(str(err))
            if not found:
                if "weights only" not in str(err).lower() or not _starts_like_torch(path):
                    raise  # not a torch file at all (junk, text): the caller's "not readable" error
                raise UnsafeFileError(path, None, f"{path}: refused: this {what} is not a safe tensor file "
                                                  f"({_one_line(err)})") from None
            name = found.group(1)
    legacy = False
    if name.startswith("numpy."):  # a checkpoint of an earlier version, or NumPy in front of something else
        beyond = _beyond_legacy(path, allowed)
        legacy, name = beyond is None, beyond or name
    hint = (f". It is a checkpoint of an earlier version of this project (NumPy arrays); convert it once with: "
            f"python scripts/upgrade_checkpoint.py {path} NEW.pt" if legacy else "")
    raise UnsafeFileError(path, name, (
        f"{path}: refused: this {what} refers to the Python object {name}, which loading it would build or "
        f"call; only tensors, numbers, strings, lists and dicts are read from files, so that no file can run "
        f"code{hint}"), legacy)


def _beyond_legacy(path, allowed=()) -> str | None:
    """None when the file loads with weights_only=True once NumPy's arrays are allowed (legacy_globals): what
    scripts/upgrade_checkpoint.py converts. Else the first object it still refers to (a payload's function),
    or '' when it is unreadable."""
    with torch.serialization.safe_globals([*allowed, *legacy_globals()]):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
            return None
        except Exception as err:  # refused (another object) or unreadable
            found = UNSAFE_GLOBAL_RE.search(str(err))
            return found.group(1) if found else ""


def load_checkpoint(path, required=()) -> dict:
    """Load a checkpoint written by save_checkpoint (tensors, numbers, strings, lists and dicts only:
    read with weights_only=True, so no code in it can run). A truncated, corrupt or foreign file, or
    one missing a `required` key: CheckpointError. A checkpoint of an earlier version of this project
    (it held NumPy arrays; it loads with legacy_globals) is refused with the command that converts it.
    With 'arch' and 'model' required, the model it holds is checked (release.check_model: architecture,
    tensors, thresholds, class centres) before anything is built from it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        ckpt = torch_load_safe(path, what="checkpoint")
    except UnsafeFileError as err:
        if err.legacy:  # what checkpoints of earlier versions held (RNG states, class centres)
            raise CheckpointError(
                f"{path}: written by an earlier version of this project, whose checkpoints held NumPy arrays "
                f"({err.name}), which this version does not read; convert it once with: "
                f"python scripts/upgrade_checkpoint.py {path} NEW.pt") from None
        raise
    except Exception as err:  # zip / pickle / EOF errors of a damaged or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint, truncated or corrupt? "
                              f"({type(err).__name__}: {_one_line(err)})") from None
    missing = [k for k in required if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: not a train.py checkpoint (missing {', '.join(missing)})")
    if {"arch", "model"} <= set(required):
        from release import check_model  # release reads checkpoints with this function
        check_model(path, ckpt["arch"], ckpt["model"], ckpt.get("thresholds"), ckpt.get("centroids"))
    return ckpt


def write_text_atomic(path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w") as handle:
            handle.write(text)
    write_atomic(path, write)


def write_folder_atomic(out, write) -> None:
    """write(tmp) into a new temporary folder beside `out`, then renamed to `out` (all or nothing; an empty folder
    at `out` is replaced). An OSError while writing becomes a WriteError naming `out`; the temporary folder is
    removed on any failure."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(out.parent)
        tmp = Path(new_temp_dir(out.parent, out.name))
    except OSError as err:
        raise WriteError(f"{out}: cannot write: {err.strerror or err}") from None
    try:
        write(tmp)
        if out.exists():
            out.rmdir()  # only an empty folder is replaced
        os.replace(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(f"{out}: cannot write: {err.strerror or err}") from None
        raise


def write_yaml(path, tree: dict) -> None:
    write_text_atomic(path, yaml.safe_dump(tree, sort_keys=False))


def read_json(path, what: str, error=ValueError, max_bytes: int = 16 << 20):
    """A JSON file from outside (a class distance map, a model folder's model.json), bounded: at most max_bytes,
    UTF-8, integers of at most 30 digits, nesting Python's JSON reader can follow. `error` (the caller's kind:
    DataError, ReleaseError, WeightsError) naming the file and `what` it should have been on anything else."""
    path = Path(path)
    try:
        size = path.stat().st_size
        raw = path.read_bytes() if size <= max_bytes else None
    except OSError as err:
        raise error(f"{path}: cannot read {what} ({err.strerror or err})") from None
    if raw is None:
        raise error(f"{path}: not {what}: {size} bytes, more than the {max_bytes} such a file can need")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{path}: not {what}: not UTF-8 text (a binary file?)") from None

    def bounded_int(digits: str) -> int:
        if len(digits) > 31:
            raise ValueError(f"an integer of {len(digits)} digits")
        return int(digits)
    try:
        return json.loads(text, parse_int=bounded_int)
    except RecursionError:
        raise error(f"{path}: not {what}: JSON nested too deeply") from None
    except ValueError as err:  # json.JSONDecodeError too
        raise error(f"{path}: not {what}: invalid JSON ({str(err)[:200]})") from None
