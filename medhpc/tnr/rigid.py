"""Rigid pre-alignment of neighbouring sections and its chaining from the centre section.

Transforms are 3 x 3 matrices acting on homogeneous pixel coordinates
``(y, x, 1)``. ``estimate_rigid(fixed, moving)`` returns ``T`` with
``fixed(p) ~ moving(T p)``: it tries rotations about the image centre on a
coarse copy of both images and takes the translation of each from the peak of
the phase correlation; the angle with the sharpest peak wins, refined by a finer
angle search around it.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
from scipy import ndimage

from medhpc.tnr.preprocess import downsample

COARSE_SIDE = 128


def rotation_about(angle_rad: float, centre, translation=(0.0, 0.0)) -> np.ndarray:
    """``p -> R (p - centre) + centre + translation`` as a 3 x 3 matrix on (y, x, 1)."""
    cos, sin = np.cos(angle_rad), np.sin(angle_rad)
    rotation = np.array([[cos, -sin], [sin, cos]])
    matrix = np.eye(3)
    matrix[:2, :2] = rotation
    matrix[:2, 2] = np.asarray(centre) - rotation @ np.asarray(centre) + np.asarray(translation)
    return matrix


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Transform (N, 2) points (y, x)."""
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def resample(image: np.ndarray, matrix: np.ndarray, order: int = 1) -> np.ndarray:
    """``out(p) = image(matrix p)`` (zero outside)."""
    return ndimage.affine_transform(image, matrix[:2, :2], offset=matrix[:2, 2],
                                    output_shape=image.shape, order=order, mode="constant",
                                    cval=0.0).astype(np.float32)


def _phase_correlation(fixed_spectrum: np.ndarray, moving: np.ndarray, shape):
    """(peak height, (dy, dx)) with ``fixed(p) ~ moving(p + d)``."""
    spectrum = scipy.fft.rfft2(moving, s=shape, workers=1)
    cross = spectrum * np.conj(fixed_spectrum)
    cross /= np.maximum(np.abs(cross), 1e-12)
    correlation = scipy.fft.irfft2(cross, s=shape, workers=1)
    correlation = ndimage.gaussian_filter(correlation, 1.0, mode="wrap")
    iy, ix = np.unravel_index(int(np.argmax(correlation)), correlation.shape)
    shift = []
    for index, axis_size, axis in ((iy, shape[0], 0), (ix, shape[1], 1)):
        before = correlation[(index - 1) % shape[0], ix] if axis == 0 else correlation[iy, (index - 1) % shape[1]]
        after = correlation[(index + 1) % shape[0], ix] if axis == 0 else correlation[iy, (index + 1) % shape[1]]
        centre = correlation[iy, ix]
        curvature = before - 2 * centre + after
        fraction = 0.5 * (before - after) / curvature if curvature < 0 else 0.0
        value = index + float(np.clip(fraction, -0.5, 0.5))
        shift.append(value - axis_size if value > axis_size / 2 else value)
    return float(correlation[iy, ix]), np.array(shift)


def estimate_rigid(fixed: np.ndarray, moving: np.ndarray, max_angle_deg: float = 10.0,
                   step_deg: float = 2.0) -> np.ndarray:
    """Rigid transform ``T`` (3 x 3, on (y, x, 1)) with ``fixed(p) ~ moving(T p)``."""
    factor = max(1, int(np.ceil(max(fixed.shape) / COARSE_SIDE)))
    coarse_fixed = downsample(fixed, factor)
    coarse_moving = downsample(moving, factor)
    shape = tuple(2 * n for n in coarse_fixed.shape)
    fixed_spectrum = scipy.fft.rfft2(coarse_fixed, s=shape, workers=1)
    centre = 0.5 * (np.array(coarse_fixed.shape) - 1)

    def score(angle_deg):
        rotated = resample(coarse_moving, rotation_about(np.deg2rad(angle_deg), centre))
        height, shift = _phase_correlation(fixed_spectrum, rotated, shape)
        return height, shift

    angles = np.arange(-max_angle_deg, max_angle_deg + 0.5 * step_deg, step_deg)
    results = [score(a) for a in angles]
    best = int(np.argmax([height for height, _ in results]))
    fine = angles[best] + np.arange(-0.75, 0.76, 0.25) * step_deg  # 0.5 deg steps
    fine_results = [score(a) for a in fine]
    best_fine = int(np.argmax([height for height, _ in fine_results]))
    angle = np.deg2rad(fine[best_fine])
    shift = fine_results[best_fine][1]
    # In coarse pixels: moving_coarse(R (p + shift - c) + c); back to full pixels.
    coarse = rotation_about(angle, centre) @ _translation(shift)
    scale = np.diag([factor, factor, 1.0])
    half = (factor - 1) / 2.0
    to_coarse = np.linalg.inv(scale) @ _translation(-np.array([half, half]))
    from_coarse = _translation(np.array([half, half])) @ scale
    return from_coarse @ coarse @ to_coarse


def _translation(shift) -> np.ndarray:
    matrix = np.eye(3)
    matrix[:2, 2] = shift
    return matrix


def chain_from_centre(pair_transforms: dict, sections: list[int], centre: int) -> dict:
    """Transforms from the centre section's frame to every section's own pixels.

    ``pair_transforms[(a, b)]`` maps section a's pixels to section b's, for
    consecutive entries ``a, b`` of ``sections`` (ascending). Returns
    ``{section: A}`` with ``A[centre] = I`` and ``A[b] = T(a, b) A[a]``.
    """
    chained = {centre: np.eye(3)}
    position = sections.index(centre)
    for a, b in zip(sections[position:], sections[position + 1:]):
        chained[b] = pair_transforms[(a, b)] @ chained[a]
    for a, b in zip(reversed(sections[:position]), reversed(sections[1:position + 1])):
        chained[a] = np.linalg.inv(pair_transforms[(a, b)]) @ chained[b]
    return chained


def rotation_angle(matrix: np.ndarray) -> float:
    """The rotation angle (radians) of a rigid 3 x 3 matrix."""
    return float(np.arctan2(matrix[1, 0], matrix[0, 0]))
