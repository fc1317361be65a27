"""The metric of the velocity space V: ``L = (-alpha Lap + gamma)^power``, ``K = (L^T L)^-1``.

``Lap`` is the 7-point finite-difference Laplacian with periodic ends, on a grid of
spacing ``h`` mm per axis. Its eigenvalues on Fourier mode ``k`` are
``-sum_d (2 - 2 cos(2 pi k_d / n_d)) / h_d^2``, so the multipliers below make ``K``
the exact inverse of the finite-difference ``L^T L`` (not a continuous approximation).
Fields are z-slabs; the FFT is the distributed one of :mod:`medhpc.parallel.fft`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medhpc.parallel.comm import World
from medhpc.parallel.fft import apply_fourier_multiplier, fourier_frequencies_local


@dataclass(frozen=True)
class Metric:
    """Parameters of ``L = (-alpha Lap + gamma)^power`` (``alpha`` in mm^2)."""

    alpha: float
    gamma: float
    power: int

    def operator_eigenvalues(self, kz, ky, kx, shape, spacing_zyx_mm) -> np.ndarray:
        """Eigenvalues of ``L`` on the Fourier modes ``(kz, ky, kx)`` (broadcast arrays)."""
        laplacian = np.zeros(np.broadcast_shapes(kz.shape, ky.shape, kx.shape))
        for k, n, h in zip((kz, ky, kx), shape, spacing_zyx_mm):
            laplacian = laplacian + (2.0 - 2.0 * np.cos(2.0 * np.pi * k / n)) / (h * h)
        return (self.alpha * laplacian + self.gamma) ** self.power


def multiplier_on_block(world: World, shape, spacing_zyx_mm, metric: Metric,
                        inverse: bool = False) -> np.ndarray:
    """The multiplier of ``K`` (or ``K^-1``) on this rank's block of the spectrum."""
    kz, ky, kx = fourier_frequencies_local(world, shape)
    eigenvalue = metric.operator_eigenvalues(kz, ky, kx, shape, spacing_zyx_mm) ** 2
    return (eigenvalue if inverse else 1.0 / eigenvalue).astype(np.float32)


def smooth(world: World, field: np.ndarray, shape, spacing_zyx_mm, metric: Metric,
           inverse: bool = False) -> np.ndarray:
    """Apply ``K`` (or ``K^-1 = L^T L`` with ``inverse``) to a z-slab vector field.

    Parameters
    ----------
    world : World
    field : numpy.ndarray
        Owned planes ``(3, owned, ny, nx)`` (or one component ``(owned, ny, nx)``).
    shape : tuple of int
        Global ``(nz, ny, nx)``.
    spacing_zyx_mm : tuple of float
    metric : Metric
    inverse : bool

    Returns
    -------
    numpy.ndarray
        A new array like ``field``.
    """
    multiplier = multiplier_on_block(world, shape, spacing_zyx_mm, metric, inverse)
    return apply_fourier_multiplier(world, np.ascontiguousarray(field), shape,
                                    lambda kz, ky, kx: multiplier)


def apply_operator_directly(field: np.ndarray, spacing_zyx_mm, metric: Metric,
                            times: int = 1) -> np.ndarray:
    """Apply ``L`` ``times`` times to a whole periodic field with the finite-difference stencil.

    The reference that :func:`smooth` must invert (used by the tests and for checks).
    """
    result = np.asarray(field, dtype=np.float64)
    axes = range(result.ndim - 3, result.ndim)
    for _ in range(times * metric.power):
        laplacian = np.zeros_like(result)
        for axis, h in zip(axes, spacing_zyx_mm):
            laplacian += (np.roll(result, 1, axis) - 2 * result
                          + np.roll(result, -1, axis)) / (h * h)
        result = -metric.alpha * laplacian + metric.gamma * result
    return result
