"""Where the computation runs (runtime.py): precision, threads per process."""
import logging
import os

import torch
from conftest import write_config

import runtime
import train


def test_thread_oversubscription_decision():
    assert runtime.thread_oversubscription(1, 2, 2) is None
    assert runtime.thread_oversubscription(2, 1, 2) is None
    assert runtime.thread_oversubscription(2, 4, 8) is None
    warning = runtime.thread_oversubscription(2, 2, 2)  # torchrun with OMP_NUM_THREADS=2 on 2 cores
    assert "2 process(es) x 2 torch threads = 4 threads on 2 available core(s)" in warning
    assert "set OMP_NUM_THREADS=1 (or torch.set_num_threads(1))" in warning and "at most" not in warning
    assert "OMP_NUM_THREADS=4" in runtime.thread_oversubscription(1, 8, 4)
    assert "OMP_NUM_THREADS=3" in runtime.thread_oversubscription(2, 4, 7)
    many = runtime.thread_oversubscription(4, 1, 2)
    assert "OMP_NUM_THREADS=1" in many and "run at most 2 processes" in many
    assert 1 <= runtime.available_cores() <= (os.cpu_count() or 1)


def test_oversubscription_warning_is_logged(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # 3 processes on this machine (WORLD_SIZE stays 1)
    config = write_config(tmp_path, **{"train.epochs": 1})
    assert train.main(["--config", str(config)]) == 0
    threads = torch.get_num_threads()
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"WARNING 3 process(es) x {threads} torch threads = {3 * threads} threads on 2 available core(s)" in log
    assert "set OMP_NUM_THREADS=1" in log
    records = []  # when the threads fit, nothing is logged; one core fewer, the warning
    logger = logging.getLogger("test_threads")
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    monkeypatch.setattr(runtime, "available_cores", lambda: 3 * threads)
    runtime.warn_thread_oversubscription(logger)
    monkeypatch.setattr(runtime, "available_cores", lambda: 3 * threads - 1)
    runtime.warn_thread_oversubscription(logger)
    logger.removeHandler(handler)
    assert [r.levelname for r in records] == ["WARNING"]
