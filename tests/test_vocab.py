"""The vocabulary (vocab.py): ESM-2's alphabet against fair-esm's, tokenisation, windows."""
import helpers
import numpy as np
import pytest

import vocab


@pytest.mark.parametrize("length", [1, 50, 1022, 1023, 1500, 2500, 5400])
def test_windows_cover_every_residue_with_overlap(length):
    starts = vocab.window_starts(length, 1022, 200)
    ends = [min(s + 1022, length) for s in starts]
    assert starts[0] == 0 and ends[-1] == length
    covered = np.zeros(length, int)
    for s, e in zip(starts, ends):
        covered[s:e] += 1
    assert covered.min() >= 1
    for (s1, e1), s2 in zip(zip(starts, ends), starts[1:]):
        assert e1 - s2 >= 200  # consecutive windows share at least the overlap
        assert e1 - s1 == 1022


def test_stitch_average_is_mean_over_windows():
    length, W = 10, 6
    starts = vocab.window_starts(length, W, 2)  # [0, 4]
    values = np.stack([np.arange(s, s + W, dtype=float) * 0 + k for k, s in enumerate(starts)])
    out = helpers.stitch_average(values, starts, length)
    expected = [0, 0, 0, 0, 0.5, 0.5, 1, 1, 1, 1]
    assert out.tolist() == expected
