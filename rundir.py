"""The run folder (run_dir): the files a training run writes there, a new run refused where another one lives
(unless --overwrite), a finished run recognised on --resume, run.json (provenance.py's record), the run's last
lines (test figures and outputs), and stop signals (SIGTERM, SIGINT) turned into an exception that the entry
point logs with the state of the checkpoints; a signal that arrives while an epoch's files are being written
waits until they are all written."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import provenance
from checkpoints import apply_resume
from config import ConfigError
from utils import read_json, remove_stale_temps, setup_logging, write_text_atomic

# What train.py writes into run_dir (frozen caches: cache.py; tensorboard/: tblog.py). A checkpoints/ folder
# holding no checkpoint (a run killed before its first epoch ended) is no run.
# In the order the run's last line lists them: results first.
RUN_FILES = ("test_metrics.json", "metrics.jsonl", "checkpoints/best.pt", "checkpoints/last.pt", "config.yaml",
             "run.json", "train.log", "distance_map.json", "tensorboard", "frozen_cache.npy")
RUN_GLOBS = ("frozen_cache.rank*.npy",)


def run_files(run_dir) -> list[Path]:
    """The files and folders of a run that exist in run_dir, in RUN_FILES order."""
    run_dir = Path(run_dir)
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).exists()]
    return found + sorted(p for pattern in RUN_GLOBS for p in run_dir.glob(pattern))


def _names(run_dir, paths) -> str:
    return ", ".join(str(p.relative_to(run_dir)) for p in paths)


def check_new_run(config, resume_path, overwrite: bool) -> None:
    """Before anything is written: a run_dir that holds a run is refused (ConfigError naming its files, and
    --resume / --overwrite / another run_dir), unless --overwrite, or a run continues (--resume: its best.pt
    and metrics are reconciled with the checkpoint, or refused, by checkpoints.check_resume)."""
    run_dir = Path(config.run_dir)
    found = run_files(run_dir)
    if not found or overwrite or resume_path is not None:  # resuming: checkpoints.check_resume reconciles run_dir
        return
    last = run_dir / "checkpoints" / "last.pt"
    resume = f"continue it with --resume {last}, " if last.exists() else ""
    raise ConfigError(f"{config.blame('run_dir')}: run_dir {run_dir} already holds a run "
                      f"({_names(run_dir, found[:4])}); {resume}choose another folder (--set run_dir=...), "
                      f"or add --overwrite to delete that run's files and start again there")


def clear_run(run_dir) -> list[Path]:
    """--overwrite: delete the earlier run's files (RUN_FILES) from run_dir; any other file stays. Returns them."""
    found = run_files(run_dir)
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return found


def open_run(run_dir, overwrite: bool, plan=None):
    """The main process's first writes, once every check has passed: with --overwrite the earlier run's files
    deleted; run_dir/checkpoints made; train.log opened (the lines held since the start first); temporary files of
    killed runs removed; a resume's checkpoints.ResumePlan carried out. Returns the logger."""
    run_dir = Path(run_dir)
    removed = clear_run(run_dir) if overwrite else []
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    log = setup_logging(run_dir)
    if removed:
        log.info("--overwrite: deleted the earlier run's %s", _names(run_dir, removed))
    for stale in remove_stale_temps(run_dir) + remove_stale_temps(run_dir / "checkpoints"):
        log.info("removed %s, a temporary file left by a killed run", stale)
    if plan is not None:  # best.pt re-created if a kill left it behind last.pt; metrics.jsonl from the history
        apply_resume(plan, run_dir, log)
    return log


def finished(ckpt: dict, epochs: int, patience: int) -> str | None:
    """Why the run of a checkpoint has nothing left to train, with what would let it go on; or None."""
    if ckpt["bad_epochs"] >= patience:
        return (f"it stopped early, no val macro-MCC gain for {patience} epochs; to train on raise train.patience "
                f"(--set train.patience=N)")
    if ckpt["epoch"] >= epochs:
        return f"train.epochs: {epochs}, all trained; to train longer raise it (--set train.epochs=N)"
    return None


def finished_and_tested(config, ckpt: dict, path, log) -> bool:
    """--resume of a run with nothing left to train: True (logged: nothing to do) when its test_metrics.json
    tests the run's best epoch; False when there is training left, or the final test is to run (logged)."""
    why = finished(ckpt, config.train.epochs, config.train.patience)
    if why is None:
        return False
    test = Path(config.run_dir) / "test_metrics.json"
    if test.is_file() and read_json(test, "test metrics", ConfigError).get("best_epoch") == ckpt["best_epoch"]:
        log.info("%s: the run is finished and tested (%s): nothing to do; its results: %s (delete it to test "
                 "again)", path, why, test)
        return True
    log.info("%s: the run is finished (%s); its final test is not written yet: testing", path, why)
    return False


# --------------------------------------------------------------------------- what the run says about itself
def write_run_json(run_dir, record: dict, log) -> dict:
    """run.json: this start's provenance record, after those of the run's earlier starts (provenance.merge);
    returns the merged record."""
    path, earlier = Path(run_dir) / "run.json", None
    if path.is_file():
        try:
            earlier = read_json(path, "run record", ValueError)
        except ValueError as err:
            log.warning("%s is not readable (%s): written anew", path, err)
    merged = provenance.merge(earlier, record)
    write_text_atomic(path, json.dumps(merged, indent=1) + "\n")
    weights = (merged.get("initial") or {}).get("weights") or merged["weights"]
    files = ", ".join(f"{n} sha256 {f['sha256'][:12]}..." for n, f in weights.get("files", {}).items())
    log.info("run.json: code %s, torch %s, fair-esm %s on %s; weights %s", merged["code"].get(
        "git_commit", merged["code"]["sources_sha256"])[:12], merged["versions"]["torch"],
        merged["versions"]["fair-esm"], merged["device"]["name"], files or weights.get("source"))
    return merged


def saved_state(run_dir, history: list, epochs: int) -> str:
    """What the checkpoints hold after a stop (history: the metrics rows written), and how to go on."""
    last = Path(run_dir) / "checkpoints" / "last.pt"
    if not history:
        return "no epoch was completed, so no checkpoint was written; start again with --overwrite"
    done = history[-1]["epoch"]
    best = [r["epoch"] for r in history if r.get("best")]
    state = (f"{last} holds epochs 0-{done} ({done + 1} of {epochs} trained"
             f"{f'; best epoch {best[-1]}' if best else ''}), and metrics.jsonl agrees")
    return f"{state}; continue with --resume {last}"


def log_results(log, run_dir, result: dict | None) -> None:
    """The run's last lines: the test figures at threshold 0.5 and at the tuned thresholds (result:
    evaluate.final_test's), and where every output is."""
    run_dir = Path(run_dir)
    if result is not None:
        log.info("test at threshold 0.5: macro-F1 %.4f, macro-MCC %.4f (best epoch %s, %d test proteins)",
                 result["macro_f1"], result["macro_mcc"], result["best_epoch"], result["n_test"])
        log.info("test at tuned thresholds: macro-F1 %.4f, macro-MCC %.4f (thresholds tuned on validation)",
                 result["tuned"]["macro_f1"], result["tuned"]["macro_mcc"])
    log.info("outputs in %s: %s", run_dir, _names(run_dir, run_files(run_dir)))


# --------------------------------------------------------------------------- stop signals
class Stopped(BaseException):
    """A stop signal (SIGTERM from a scheduler or kill, SIGINT from Ctrl-C) arrived; exit status 128 + signal.
    A BaseException, as KeyboardInterrupt: no `except Exception` (a file reader's, say) takes it for an error."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """While installed (a context manager, main thread only): SIGTERM and SIGINT raise Stopped, at once, or at
    the end of a `writing()` block that was running when they arrived."""

    def __init__(self):
        self.depth, self.pending, self.previous, self.pid = 0, None, {}, None

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:  # a forked child (a DataLoader worker): the signal acts as it would by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.depth:
            self.pending = signum
            return
        raise Stopped(signum)

    def __enter__(self):
        self.pid = os.getpid()
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)

    @contextlib.contextmanager
    def writing(self):
        """Files that must be written together: a stop signal waits for the block's end (when the block fails,
        its error goes on, and the process ends with it)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if not self.depth and self.pending is not None:
            signum, self.pending = self.pending, None
            raise Stopped(signum)


NO_SIGNALS = StopSignals()  # writing() without handlers installed: signals act as always
