"""Similarity terms ``D(J, I)`` between the deformed template ``J`` and the target ``I``.

Each term gives its value and its derivative with respect to ``J`` at every voxel,
``r = dD/dJ``. For SSD and global NCC the derivative is affine in the two images,
``r = a J + c I + d`` with scalars shared by all ranks, so it pulls back along the
flow as ``a J0_t + c J1_t + d`` without moving any image between ranks.

- ``ssd``: ``D = sum (J - I)^2 / sigma^2``;
- ``ncc``: ``D = n (1 - rho) / sigma^2`` with ``rho`` the correlation coefficient
  over all ``n`` voxels (so ``sigma`` weighs it like a per-voxel SSD).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medhpc.parallel.comm import World

METRICS = ("ssd", "ncc")


@dataclass(frozen=True)
class SimilarityValue:
    """The term's value and the coefficients ``(a, c, d)`` of its derivative."""

    value: float
    coefficients: tuple


def _local_sums(warped: np.ndarray, target: np.ndarray, metric: str) -> np.ndarray:
    j = warped.astype(np.float64).ravel()
    i = target.astype(np.float64).ravel()
    if metric == "ssd":
        return np.array([np.dot(j - i, j - i)])
    return np.array([j.size, j.sum(), i.sum(), np.dot(j, j), np.dot(i, i), np.dot(j, i)])


def evaluate(world: World, warped: np.ndarray, target: np.ndarray, metric: str,
             sigma: float) -> SimilarityValue:
    """Value and derivative coefficients over all ranks (one all-reduce).

    Parameters
    ----------
    warped, target : numpy.ndarray
        This rank's owned planes of ``J`` and ``I``.
    metric : {"ssd", "ncc"}
    sigma : float
    """
    sums = world.allreduce_(_local_sums(warped, target, metric), "sum")
    weight = 1.0 / (sigma * sigma)
    if metric == "ssd":
        return SimilarityValue(weight * float(sums[0]), (2.0 * weight, -2.0 * weight, 0.0))
    if metric != "ncc":
        raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
    n, sum_j, sum_i, sum_jj, sum_ii, sum_ji = (float(s) for s in sums)
    mean_j, mean_i = sum_j / n, sum_i / n
    norm_j = max(sum_jj - n * mean_j * mean_j, 1e-12)
    norm_i = max(sum_ii - n * mean_i * mean_i, 1e-12)
    cross = sum_ji - n * mean_j * mean_i
    rho = cross / np.sqrt(norm_j * norm_i)
    scale = n * weight
    a = scale * rho / norm_j
    c = -scale / np.sqrt(norm_j * norm_i)
    d = -a * mean_j - c * mean_i
    return SimilarityValue(scale * (1.0 - rho), (a, c, d))
