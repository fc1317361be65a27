"""Separable Gaussian filtering of 3-D images (resolution models, post-filters)."""

from __future__ import annotations

import math

import numpy as np

from medhpc import backend

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def gaussian_weights(sigma_voxels: float, truncate: float = 3.0) -> np.ndarray:
    """Normalised 1-D Gaussian weights (odd length) for ``sigma_voxels``."""
    if sigma_voxels <= 0:
        return np.ones(1, dtype=np.float32)
    radius = max(1, int(math.ceil(truncate * sigma_voxels)))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / sigma_voxels) ** 2)
    return (weights / weights.sum()).astype(np.float32)


class GaussianFilter:
    """An isotropic Gaussian of ``fwhm_mm`` on a grid of ``voxel_mm`` (x, y, z).

    The operator is symmetric (zero boundary, symmetric weights), so
    :meth:`apply` is also its adjoint. Arrays are ``[z, y, x]``, host or device.
    With ``transaxial_only`` the planes are filtered independently (2-D data).
    """

    def __init__(self, fwhm_mm: float, voxel_mm, device: str = "cpu",
                 transaxial_only: bool = False):
        self.fwhm_mm = float(fwhm_mm)
        self.device = device
        self.kernels = backend.kernels("medhpc.filters", device)
        sigma_mm = self.fwhm_mm / FWHM_PER_SIGMA
        voxel_x, voxel_y, voxel_z = (float(v) for v in voxel_mm)
        sigma_z = 0.0 if transaxial_only else sigma_mm / voxel_z
        # axis 0 is z, 1 is y, 2 is x
        self.weights = [backend.to_device(gaussian_weights(sigma), device)
                        for sigma in (sigma_z, sigma_mm / voxel_y, sigma_mm / voxel_x)]

    @property
    def active(self) -> bool:
        """False for a zero width (the identity)."""
        return self.fwhm_mm > 0

    def apply(self, image):
        """Return the filtered image (a new array; ``image`` is unchanged)."""
        if not self.active:
            return image
        first = backend.empty(image.shape, np.float32, self.device)
        second = backend.empty(image.shape, np.float32, self.device)
        self.kernels.convolve_axis(image, self.weights[0], 0, first)
        self.kernels.convolve_axis(first, self.weights[1], 1, second)
        self.kernels.convolve_axis(second, self.weights[2], 2, first)
        return first
