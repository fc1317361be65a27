"""Sums over this rank's voxels in float64 (host arrays; the all-reduce is the caller's).

Plain compiled loops: NumPy's dot goes through a threaded BLAS whose start-up costs
more than the sum itself on these sizes.
"""

import numba
import numpy as np


@numba.njit(cache=True)
def _inner(a, b):
    total = 0.0
    for k in range(a.size):
        total += np.float64(a[k]) * np.float64(b[k])
    return total


@numba.njit(cache=True)
def _moments(j, i):
    out = np.zeros(6)
    out[0] = j.size
    for k in range(j.size):
        a = np.float64(j[k])
        b = np.float64(i[k])
        out[1] += a
        out[2] += b
        out[3] += a * a
        out[4] += b * b
        out[5] += a * b
    return out


@numba.njit(cache=True)
def _squared_distance(j, i):
    total = 0.0
    for k in range(j.size):
        d = np.float64(j[k]) - np.float64(i[k])
        total += d * d
    return total


def inner(a: np.ndarray, b: np.ndarray) -> float:
    """``sum(a * b)`` in float64."""
    return float(_inner(np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)))


def moments(j: np.ndarray, i: np.ndarray) -> np.ndarray:
    """``[n, sum j, sum i, sum j^2, sum i^2, sum j i]`` in float64."""
    return _moments(np.ascontiguousarray(j).reshape(-1), np.ascontiguousarray(i).reshape(-1))


def squared_distance(j: np.ndarray, i: np.ndarray) -> float:
    """``sum((j - i)^2)`` in float64."""
    return float(_squared_distance(np.ascontiguousarray(j).reshape(-1),
                                   np.ascontiguousarray(i).reshape(-1)))
