"""scripts/gpu_check.sh on the CPU (--dry-run: the GPU check's steps with a tiny model): one JSON line per step
in results.jsonl, each with its figures; a failing step is recorded and the others still run; bench_real.py's
parent records a failing child and goes on."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REAL_DATA, ROOT

pytestmark = [pytest.mark.skipif(not REAL_DATA.is_dir(), reason="shared MUTarget data not present"),
              pytest.mark.skipif(not (shutil.which("bash") and shutil.which("timeout")),
                                 reason="needs bash and coreutils' timeout")]
BENCH = [f"bench_{mode}_{layout}" for mode in ("lora", "adapter", "last_k", "full") for layout in ("packed", "padded")]
STEPS = ["env", "test_packing", "bench_load", *BENCH, "predict_packed", "predict_padded"]


def gpu_check(out, **env):
    """bash scripts/gpu_check.sh --dry-run into out: (the finished process, the JSON lines of results.jsonl)."""
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "DATA_ROOT": str(REAL_DATA),
           "GPU_CHECK_STEPS": "", "GPU_CHECK_FAIL_STEP": "", "GPU_CHECK_BUDGET_S": "900", **env}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    results = out / "results.jsonl"
    lines = [json.loads(text) for text in results.read_text().splitlines()] if results.is_file() else []
    return done, lines


def test_dry_run_records_every_step_with_its_figures(tmp_path):
    """Every step ok (the dry run runs two at a time, so lines come in the order steps end; env, the tests and
    loading first, the padded prediction last), with its whole log kept and its figures: the facts, pytest's
    counts, bench_real.py's JSON (complete, every process ok)."""
    done, lines = gpu_check(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [line["step"] for line in lines]
    assert sorted(steps) == sorted(STEPS) and len(steps) == len(STEPS)
    assert set(steps[:3]) == set(STEPS[:3]) and steps[-1] == STEPS[-1]
    for line in lines:
        assert line["ok"] and line["status"] == "ok" and line["rc"] == 0 and not line["skipped"], line
        assert not line["timed_out"] and not line["oom"] and "tail" not in line
        assert line["seconds"] > 0 and (tmp_path / line["log"]).is_file()
        assert "figures" in line, line
    by_step = {line["step"]: line["figures"] for line in lines}
    env, tests = by_step["env"], by_step["test_packing"]
    assert env["missing"] == {} and env["data_ok"] and env["torch"]
    assert tests["passed"] >= 1 and tests["failures"] == tests["errors"] == 0
    log = next(line["log"] for line in lines if line["step"] == "test_packing")
    assert "passed" in (tmp_path / log).read_text()  # pytest's own output, whole
    assert tests["skipped_tests"]  # the GPU tests: skipped on the CPU, with their reason
    assert set(by_step["bench_load"]["load"]) == {"fair-esm", "hf"}
    for step in STEPS[3:]:
        figures = by_step[step]
        assert figures["complete"] and figures["failures"] == 0 and figures["arch"] == "tiny"
        section = figures["predict" if step.startswith("predict") else "steps"]
        assert len(section) == 1
        (result,) = section.values()
        assert result["ok"]
        if step.startswith("predict"):
            assert result["proteins"] == 8 and result["proteins_per_s"] > 0
        else:
            assert result["step_s"] > 0 and result["tokens_per_s"] > 0 and result["peak_memory_mb"] > 0
    assert "13 ok, 0 failed, 0 skipped" in done.stdout


def test_a_failing_step_is_recorded_and_the_others_still_run(tmp_path):
    """GPU_CHECK_FAIL_STEP makes one of the selected steps (GPU_CHECK_STEPS: a bench step and the tests) fail: its
    line says so (rc 1, not ok, the tail of its output), the other step still runs and records its figures, the
    exit status is 1."""
    done, lines = gpu_check(tmp_path, GPU_CHECK_STEPS="bench_lora_packed test_pack*",
                            GPU_CHECK_FAIL_STEP="bench_lora_packed")
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert lines[0]["step"] == "env"
    assert sorted(line["step"] for line in lines[1:]) == ["bench_lora_packed", "test_packing"]
    failed, *others = sorted(lines[1:], key=lambda line: line["step"] != "bench_lora_packed")
    assert failed["status"] == "failed" and failed["rc"] == 1 and not failed["ok"] and not failed["timed_out"]
    assert "forced to fail" in failed["tail"] and "GPU_CHECK_FAIL_STEP" in failed["reason"]
    for line in [lines[0], *others]:
        assert line["ok"] and "figures" in line, line
    assert others[0]["figures"]["passed"] >= 1 and others[0]["figures"]["failures"] == 0
    assert "2 ok, 1 failed (bench_lora_packed), 0 skipped" in done.stdout  # env and test_packing


def test_bench_real_records_failing_children_and_goes_on(tmp_path):
    """bench_real.py's parent: children past --child-timeout are killed and recorded (not ok, timed out), the
    next one still runs, the JSON is complete, the exit status 1."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_real.py"), "--arch", "tiny", "--dir",
                           str(tmp_path / "weights"), "--data-root", str(REAL_DATA), "--no-load", "--modes", "lora",
                           "adapter", "--layouts", "packed", "--precisions", "fp32", "--child-timeout", "0.5",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["complete"] and figures["failures"] == 2
    assert set(figures["steps"]) == {"lora/fp32/packed", "adapter/fp32/packed"}
    for result in figures["steps"].values():
        assert not result["ok"] and result["timed_out"] and result["rc"] is None
    assert done.stdout.count("FAILED (timed out)") == 2
