"""Helpers shared by the tests: independent reference computations and small input builders."""
import numpy as np


def stitch_average(window_values: np.ndarray, starts, length: int) -> np.ndarray:
    """Reference stitching: average per-residue values of overlapping windows, [n_windows, W, ...] ->
    [length, ...], written as plain loops (the model's stitch_windows does it with index_add)."""
    total = np.zeros((length,) + window_values.shape[2:], dtype=np.float64)
    count = np.zeros(length)
    for values, s in zip(window_values, starts):
        n = min(values.shape[0], length - s)
        total[s:s + n] += values[:n]
        count[s:s + n] += 1
    return total / count.reshape((-1,) + (1,) * (total.ndim - 1))
