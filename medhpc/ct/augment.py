"""Random spatial and intensity augmentation of training patches.

A patch is drawn as one affine map from patch voxels to case voxels (crop,
flips, rotation, scaling) plus an optional smooth elastic displacement, then
resampled by the ``warp_image`` / ``warp_labels`` kernels (CPU or CUDA twins),
and finally its contrast and brightness are jittered. All randomness comes from
the generator passed in, so a patch is a function of its stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AugmentSettings:
    """Ranges and probabilities of the augmentations (nnU-Net-like defaults)."""

    rotation_deg: float = 15.0
    rotation_probability: float = 0.2
    scale_range: tuple = (0.85, 1.25)
    scale_probability: float = 0.2
    flip_probability: float = 0.5
    elastic_probability: float = 0.1
    elastic_voxels: float = 2.0
    elastic_grid: int = 4
    contrast_range: tuple = (0.9, 1.1)
    brightness: float = 0.1
    intensity_probability: float = 0.15
    noise_sigma: float = 0.1
    noise_probability: float = 0.1

    @classmethod
    def none(cls) -> "AugmentSettings":
        """Settings that crop only (validation, tests)."""
        return cls(rotation_probability=0.0, scale_probability=0.0, flip_probability=0.0,
                   elastic_probability=0.0, intensity_probability=0.0, noise_probability=0.0)


def rotation_matrix(angles_rad) -> np.ndarray:
    """Rotation about the z, y and x axes (applied in that order) in ``(z, y, x)`` coordinates."""
    a, b, c = angles_rad
    rz = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


@dataclass
class PatchTransform:
    """Where a patch reads the case: ``case = matrix @ patch_voxel + offset + displacement``."""

    matrix: np.ndarray  # (3, 3) float32
    offset: np.ndarray  # (3,) float32
    displacement: np.ndarray  # (3, gz, gy, gx) float32
    contrast: float = 1.0
    brightness: float = 0.0
    noise_sigma: float = 0.0

    @classmethod
    def crop(cls, centre_zyx, patch_shape) -> "PatchTransform":
        """A plain crop of ``patch_shape`` centred on ``centre_zyx``."""
        return cls.around(centre_zyx, patch_shape, np.eye(3))

    @classmethod
    def around(cls, centre_zyx, patch_shape, linear, displacement=None, **intensity):
        patch_centre = (np.asarray(patch_shape, dtype=np.float64) - 1) / 2
        offset = np.asarray(centre_zyx, dtype=np.float64) - linear @ patch_centre
        if displacement is None:
            displacement = np.zeros((3, 1, 1, 1), dtype=np.float32)
        return cls(np.ascontiguousarray(linear, dtype=np.float32),
                   offset.astype(np.float32), displacement, **intensity)


def draw_transform(rng: np.random.Generator, centre_zyx, patch_shape,
                   settings: AugmentSettings) -> PatchTransform:
    """Draw a random augmentation of the patch centred on ``centre_zyx``."""
    linear = np.eye(3)
    if rng.random() < settings.rotation_probability:
        limit = np.deg2rad(settings.rotation_deg)
        linear = rotation_matrix(rng.uniform(-limit, limit, 3)) @ linear
    if rng.random() < settings.scale_probability:
        linear = linear * rng.uniform(*settings.scale_range)
    flips = np.where(rng.random(3) < settings.flip_probability, -1.0, 1.0)
    linear = linear @ np.diag(flips)
    displacement = None
    if rng.random() < settings.elastic_probability:
        grid = settings.elastic_grid
        displacement = rng.normal(0.0, settings.elastic_voxels,
                                  (3, grid, grid, grid)).astype(np.float32)
    contrast, brightness = 1.0, 0.0
    if rng.random() < settings.intensity_probability:
        contrast = float(rng.uniform(*settings.contrast_range))
        brightness = float(rng.uniform(-settings.brightness, settings.brightness))
    noise = settings.noise_sigma if rng.random() < settings.noise_probability else 0.0
    return PatchTransform.around(centre_zyx, patch_shape, linear, displacement,
                                 contrast=contrast, brightness=brightness, noise_sigma=noise)


def extract_patch(kernels, image, labels, transform: PatchTransform, patch_shape, fill: float,
                  rng: np.random.Generator | None = None):
    """Resample one (image, labels) patch from a case with ``transform``.

    ``kernels`` is :mod:`medhpc.ct.augment_cpu` or its CUDA twin; ``image`` is
    the case, already normalised; ``labels`` may be None. Returns host arrays.
    """
    out_image = np.empty(patch_shape, dtype=np.float32)
    kernels.warp_image(image, transform.matrix, transform.offset, transform.displacement,
                       np.float32(fill), out_image)
    if transform.contrast != 1.0 or transform.brightness != 0.0:
        kernels.scale_shift(out_image, np.float32(transform.contrast),
                            np.float32(transform.brightness))
    if transform.noise_sigma > 0 and rng is not None:
        out_image += rng.normal(0.0, transform.noise_sigma, patch_shape).astype(np.float32)
    out_labels = None
    if labels is not None:
        out_labels = np.empty(patch_shape, dtype=np.uint8)
        kernels.warp_labels(labels, transform.matrix, transform.offset, transform.displacement,
                            out_labels)
    return out_image, out_labels
