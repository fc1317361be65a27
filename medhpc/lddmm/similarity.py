"""Similarity terms ``D(J, I)`` between the deformed template ``J`` and the target ``I``.

Each term gives its value and its derivative with respect to ``J`` at every voxel,
``r = dD/dJ``. For SSD and global NCC the derivative is affine in the two images,
``r = a J + c I + d`` with scalars shared by all ranks, so it pulls back along the
flow as ``a J0_t + c J1_t + d`` without moving any image between ranks.

- ``ssd``: ``D = sum (J - I)^2 / sigma^2``;
- ``ncc``: ``D = n (1 - rho) / sigma^2`` with ``rho`` the correlation coefficient
  over all ``n`` voxels (so ``sigma`` weighs it like a per-voxel SSD);
- ``lncc``: ``D = sum_x (1 - cc_x) / sigma^2`` with ``cc_x`` the squared correlation
  in the cube of radius ``radius`` around ``x`` (clipped at the volume ends). Its exact
  derivative gathers, at each voxel, the terms of every window that holds it:
  ``-(I S_A - S_{A mean_I} - J S_{AB} + S_{AB mean_J}) / sigma^2`` with
  ``A = 2 cross / (var_J var_I)``, ``B = cross / var_J`` and ``S_q`` the box sum of ``q``.
  It is not affine in the images, so it is pulled back along the flow itself
  (:attr:`SimilarityValue.derivative`, gathered whole on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medhpc.lddmm.reductions import moments, squared_distance
from medhpc.parallel.comm import World

METRICS = ("ssd", "ncc", "lncc")
LNCC_EPSILON = 1e-3


@dataclass(frozen=True)
class SimilarityValue:
    """The term's value and the coefficients ``(a, c, d)`` of its derivative.

    For ``lncc``, ``derivative`` holds ``dD/dJ`` on this rank's owned planes and the
    coefficients ``(0, 1, 0)`` pick it once it is pulled back in place of ``J1``.
    """

    value: float
    coefficients: tuple
    derivative: np.ndarray | None = None


def _local_sums(warped: np.ndarray, target: np.ndarray, metric: str) -> np.ndarray:
    if metric == "ssd":
        return np.array([squared_distance(warped, target)])
    return moments(warped, target)


def box_sum(volume: np.ndarray, radius: int) -> np.ndarray:
    """Sums over cubes of ``2 radius + 1`` voxels of a slab with ``radius`` ghost planes.

    Returns the owned planes; y and x are zero-padded (out-of-volume voxels count 0).
    """
    result = np.asarray(volume, np.float64)
    owned = result.shape[0] - 2 * radius
    width = 2 * radius + 1
    zero = np.zeros((1,) + result.shape[1:])
    running = np.cumsum(np.concatenate([zero, result]), axis=0)
    result = running[width:width + owned] - running[:owned]
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (radius + 1, radius)
        running = np.cumsum(np.pad(result, pad), axis=axis)
        n = result.shape[axis]
        upper = np.take(running, np.arange(width, width + n), axis=axis)
        lower = np.take(running, np.arange(0, n), axis=axis)
        result = upper - lower
    return result


def local_correlation(world: World, warped: np.ndarray, target: np.ndarray, slab_,
                      radius: int, sigma: float) -> SimilarityValue:
    """The ``lncc`` term and its derivative on the owned planes (one halo exchange).

    ``warped`` and ``target`` hold the owned planes plus ``radius`` ghost planes each
    side, zero outside the volume; ``slab_`` is the rank's slab with ``radius`` halos.
    """
    from medhpc.parallel.slabs import exchange_halos

    inside = np.zeros(warped.shape)
    lower = max(0, radius - slab_.start)
    upper = min(warped.shape[0], radius + slab_.nz - slab_.start)
    inside[lower:upper] = 1.0
    j = np.asarray(warped, np.float64) * inside
    i = np.asarray(target, np.float64) * inside
    count = box_sum(inside, radius)
    count = np.maximum(count, 1.0)
    s_j, s_i = box_sum(j, radius), box_sum(i, radius)
    mean_j, mean_i = s_j / count, s_i / count
    var_j = box_sum(j * j, radius) - mean_j * s_j + LNCC_EPSILON
    var_i = box_sum(i * i, radius) - mean_i * s_i + LNCC_EPSILON
    cross = box_sum(j * i, radius) - mean_j * s_i
    correlation = cross * cross / (var_j * var_i)
    a = 2.0 * cross / (var_j * var_i)
    b = cross / var_j
    window_terms = np.zeros((4,) + warped.shape, np.float64)
    owned = slice(radius, radius + slab_.owned)
    window_terms[:, owned] = np.stack([a, a * mean_i, a * b, a * b * mean_j])
    exchange_halos(world, window_terms, slab_, "zero")
    sums = [box_sum(term, radius) for term in window_terms]
    weight = 1.0 / (sigma * sigma)
    j_owned, i_owned = j[owned], i[owned]
    derivative = -weight * (i_owned * sums[0] - sums[1] - j_owned * sums[2] + sums[3])
    value = world.allreduce_(np.array([np.sum(1.0 - correlation)]), "sum")
    return SimilarityValue(weight * float(value[0]), (0.0, 1.0, 0.0),
                           derivative.astype(np.float32))


def evaluate(world: World, warped: np.ndarray, target: np.ndarray, metric: str,
             sigma: float) -> SimilarityValue:
    """Value and derivative coefficients over all ranks (one all-reduce) for ssd and ncc.

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
