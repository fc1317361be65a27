"""Parzen-window joint histograms and mutual information: the pieces every MI kernel shares.

An intensity ``m`` clamped to ``[low, high]`` sits at the continuous bin
``u = 1 + (bins - 3) (m - low) / (high - low)`` and is spread over the four bins around
it by the cubic B-spline ``B``; the outermost bins stay as padding, so every voxel adds
exactly its weight to a histogram (``sum_k B(k - u) = 1``) and the weights' derivative
sums to zero (``sum_k B'(k - u) = 0``).

The scalar functions are plain Python so that the CPU kernels (``numba.njit``) and the
CUDA kernels (``numba.cuda.jit(device=True)``) compile the same source: ``bspline3`` and
``bin_position`` are the CPU versions, ``*_source`` the functions themselves.
:func:`mutual_information` works on the small histogram on the host.
"""

from __future__ import annotations

import numba
import numpy as np


def bspline3_source(x):
    """Cubic B-spline and its first and second derivatives at ``x``."""
    a = abs(x)
    if a < 1.0:
        return 2.0 / 3.0 - a * a + 0.5 * a * a * a, -2.0 * x + 1.5 * x * a, -2.0 + 3.0 * a
    if a < 2.0:
        r = 2.0 - a
        return r * r * r / 6.0, (-0.5 * r * r if x > 0 else 0.5 * r * r), r
    return 0.0, 0.0, 0.0


def bin_position_source(value, low, high, du_dm):
    """Continuous bin ``u`` of ``value`` and ``du/dm`` (zero where ``value`` is clamped)."""
    if value <= low:
        return 1.0, 0.0
    if value >= high:
        return 1.0 + (high - low) * du_dm, 0.0
    return 1.0 + (value - low) * du_dm, du_dm


bspline3 = numba.njit(inline="always")(bspline3_source)
bin_position = numba.njit(inline="always")(bin_position_source)


def mutual_information(joint: np.ndarray) -> tuple[float, np.ndarray]:
    """Mutual information (nats) of a joint histogram and ``log p(a, b) / (p(a) p(b))``.

    Parameters
    ----------
    joint : float64 (bins, bins)
        Unnormalised counts (or weights); rows and columns are the two images' bins.

    Returns
    -------
    information : float
        ``sum p log(p / (p_a p_b))`` over the filled bins; 0 for an empty histogram.
    log_ratio : float64 (bins, bins)
        ``log(p / (p_a p_b))`` on the filled bins, 0 on the empty ones: with the Parzen
        window's derivative it gives the derivative of the information with respect to
        one voxel's intensity.
    """
    total = float(np.sum(joint))
    log_ratio = np.zeros(joint.shape)
    if not total > 0:
        return 0.0, log_ratio
    p = joint / total
    rows, columns = p.sum(axis=1), p.sum(axis=0)
    filled = p > 0
    outer = np.outer(rows, columns)
    log_ratio[filled] = np.log(p[filled] / outer[filled])
    return float(np.sum(p[filled] * log_ratio[filled])), log_ratio
