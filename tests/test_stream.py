"""Proteome-scale prediction (stream.py, inference.py, inputs.py, outputs.py, plots.py) on the tiny run:
streamed outputs equal one-chunk outputs byte for byte, ensembles, torchrun, GFF3, plots, bad input."""
import io
import json
import subprocess
import sys
import time

import numpy as np
from conftest import ROOT
from helpers import OUTPUTS, check_failure, predict_all, probs_of, proteome, records_of, run, write_fasta

import inference
import stream
import vocab


# --------------------------------------------------------------------------- streaming
def test_small_chunks_equal_one_chunk(tmp_path, ckpts, fasta, capsys):
    """Chunks of 1 and of 7 proteins, token budgets that make one batch of everything, one window per
    batch (96 tokens: the tiny model's 64-residue windows are 96 wide) and at most 2 proteins."""
    whole = predict_all(capsys, tmp_path / "whole", [ckpts["a"]], fasta, "--chunk-size", 1000, "--max-tokens", 100000,
                        jsonl=True)
    for chunk, extra in [(1, []), (7, ["--max-tokens", 96, "--batch-size", 2])]:
        streamed = predict_all(capsys, tmp_path / f"c{chunk}", [ckpts["a"]], fasta, "--chunk-size", chunk, *extra,
                               jsonl=chunk == 7)
        assert streamed.keys() <= whole.keys() and set(OUTPUTS) <= streamed.keys()
        for name in streamed:
            assert streamed[name] == whole[name], (chunk, name)
    records = records_of(tmp_path / "whole" / "out.json")
    assert [r["id"] for r in records] == [i for i, _ in proteome()]  # input order
    assert any(r["predicted"] != ["Other"] for r in records)  # something to write in the GFF3
    lines = (tmp_path / "whole" / "out.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == records  # JSON Lines: the same records, one per line
    z = np.load(tmp_path / "whole" / "emb.npz")
    assert sorted(z.files) == ["ids", "pooled", "projection"]
    assert z["ids"].tolist() == [r["id"] for r in records]
    assert z["pooled"].shape == (len(records), 32) and z["projection"].shape == (len(records), 8)
    assert z["pooled"].dtype == np.float32


def test_torchrun_two_processes_write_the_same_files(tmp_path, ckpts, fasta, capsys):
    """2 gloo processes (one thread each under torchrun) against 1 process, a 2-checkpoint ensemble."""
    one = predict_all(capsys, tmp_path / "one", [ckpts["a"], ckpts["b"]], fasta, "--chunk-size", 6, "--max-tokens", 200)
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ROOT / "predict.py",
           "--checkpoint", ckpts["a"], ckpts["b"], "--fasta", fasta, "--device", "cpu", "--chunk-size", 6,
           "--max-tokens", 200, "--out", two / "out.json", "--tsv", two / "out.tsv", "--gff3", two / "out.gff3",
           "--embeddings", two / "emb.npz"]
    done = subprocess.run([str(a) for a in cmd], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in two.iterdir()) == sorted(OUTPUTS)  # no temporary files
    for name in OUTPUTS:
        assert (two / name).read_bytes() == one[name], name


def test_unreadable_checkpoint(tmp_path, ckpts, fasta, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], junk, "--fasta", fasta], str(junk), "not a readable")


def test_failure_midway_leaves_nothing(tmp_path, ckpts, fasta, capsys, monkeypatch):
    calls, original = [], inference.run_ensemble

    def failing(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        return original(*args)

    monkeypatch.setattr(inference, "run_ensemble", failing)
    check_failure(capsys, tmp_path, ["--checkpoint", ckpts["a"], "--fasta", fasta, "--max-tokens", 100],
                  "disk full")
    assert len(calls) == 3


def test_sigterm_midway_leaves_nothing(tmp_path, ckpts):
    """SIGTERM (a batch system's time limit; torchrun stopping the other ranks) removes the temporary
    outputs as any error does, and exits 128 + 15."""
    rng = np.random.default_rng(9)
    big = write_fasta(tmp_path / "big.fa", [(f"p{i}", "".join(rng.choice(list(vocab.RESIDUES[:20]), size=300)))
                                            for i in range(20000)])
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, str(ROOT / "predict.py"), "--checkpoint", str(ckpts["a"]), "--fasta",
                             str(big), "--out", str(out / "p.jsonl"), "--tsv", str(out / "p.tsv"), "--chunk-size", "50"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    for _ in range(600):  # until the staged outputs exist (predicting has begun)
        if list(out.glob(".*.tmp")) or proc.poll() is not None:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "predict.py ended before it could be stopped"
    proc.terminate()
    assert proc.wait(timeout=60) == 143
    assert list(out.iterdir()) == []


def test_bf16_flag_end_to_end(tmp_path, ckpts, fasta, capsys):
    out32, out16 = tmp_path / "fp32.json", tmp_path / "bf16.json"
    for precision, out in (("fp32", out32), ("bf16", out16)):
        code, err = run(capsys, "--checkpoint", ckpts["a"], "--fasta", fasta, "--out", out, "--device", "cpu",
                        "--precision", precision)
        assert code == 0, err
    assert np.abs(probs_of(records_of(out32)) - probs_of(records_of(out16))).max() <= 0.01


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_log_lines_without_a_terminal():
    clock, text = FakeClock(), io.StringIO()
    progress = stream.Progress(100, stream=text, interval=30.0, clock=clock)
    progress.add_work(100, 1000)  # one chunk of everything
    for step in (10, 10, 10):  # t = 10, 20, 30 s: 30 s since the start only at the third
        clock.now += 10
        progress.update(step, 10 * step)
    clock.now += 5
    progress.update(20, 200)  # 35 s: 5 s after the last line
    clock.now += 5
    progress.close()
    lines = text.getvalue().splitlines()
    assert lines == ["predict: 30/100 proteins, 30% of the work (tokens), 1.0 proteins/s, about 70 s left",
                     "predict: 50 proteins in 40.0 s (1.2 proteins/s)"]


def test_progress_estimates_the_time_left_from_tokens():
    """Proteins run shortest first: after 20 s, 40 of a chunk's 50 proteins are done but only 200 of its 1000
    tokens; the other 50 proteins (not read yet) are reckoned at the chunk's 20 tokens per protein. Work: 10% of
    2000 tokens, so 180 s left (from proteins it would have been 30 s). Then the second chunk, read at 500
    tokens, corrects the total to 1500."""
    clock, text = FakeClock(), io.StringIO()
    progress = stream.Progress(100, stream=text, interval=10.0, clock=clock)
    progress.add_work(50, 1000)
    assert progress.total_tokens() == 2000 and progress.fraction() == 0
    clock.now += 20
    progress.update(40, 200)
    assert progress.fraction() == 0.1 and progress.seconds_left(clock.now) == 180
    assert text.getvalue().splitlines() == [
        "predict: 40/100 proteins, 10% of the work (tokens), 2.0 proteins/s, about 180 s left"]
    progress.update(10, 800)
    progress.add_work(50, 500)
    assert progress.total_tokens() == 1500 and progress.fraction() == 1000 / 1500
    progress.update(50, 500)
    assert progress.fraction() == 1 and progress.seconds_left(clock.now) == 0
