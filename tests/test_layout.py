"""The layout: prediction never imports the trainer; every module stays small enough to read."""
import subprocess
import sys

from conftest import ROOT


def test_prediction_imports_no_training_code():
    """predict's main imports stream, which imports inference: none of them loads train.py or what only training
    needs (one process suffices: what inference imports alone is a part of what stream imports)."""
    code = ("import predict, stream, sys; assert 'inference' in sys.modules; loaded = [m for m in "
            "('train', 'loss', 'cache', 'tblog', 'contrast', 'batching') if m in sys.modules]; assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_no_module_over_500_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in ROOT.glob("*.py")}
    assert sizes and not {name: n for name, n in sizes.items() if n > 500}
