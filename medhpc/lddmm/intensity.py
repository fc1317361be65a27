"""Intensity scaling of the inputs: robust percentiles, histogram matching, min-max.

Registration compares images whose ranges differ (scanner, bias field, contrast agent);
every method here maps an image to about ``[0, 1]`` so that one set of settings serves all.
"""

from __future__ import annotations

import numpy as np

from medhpc.errors import InputError

NORMALISATIONS = ("percentile", "histogram", "minmax")
LOW_PERCENTILE, HIGH_PERCENTILE = 0.5, 99.5
HISTOGRAM_QUANTILES = 256


def _foreground(image: np.ndarray) -> np.ndarray:
    """Voxels above the image's minimum (the background of most scans sits at it)."""
    values = image[image > image.min()]
    return values if values.size else image.reshape(-1)


def percentile_scaled(path, image: np.ndarray) -> np.ndarray:
    """``image`` with the 0.5 and 99.5 percentiles of its foreground at 0 and 1, clipped."""
    image = np.asarray(image, np.float32)
    foreground = _foreground(image)
    low, high = np.percentile(foreground, [LOW_PERCENTILE, HIGH_PERCENTILE])
    if not high > low:
        low, high = float(image.min()), float(image.max())
    if not high > low:
        raise InputError(f"{path}: the image is constant ({low:g} everywhere), nothing to "
                         f"register; expected an image with structure")
    return np.clip((image - low) / (high - low), 0.0, 1.0).astype(np.float32)


def minmax_scaled(path, image: np.ndarray) -> np.ndarray:
    """``image`` with its minimum at 0 and its maximum at 1."""
    image = np.asarray(image, np.float32)
    low, high = float(np.min(image)), float(np.max(image))
    if not high > low:
        raise InputError(f"{path}: the image is constant ({low:g} everywhere), nothing to "
                         f"register; expected an image with structure")
    return ((image - low) / (high - low)).astype(np.float32)


def matched_histogram(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``image`` mapped so that its foreground quantiles equal ``reference``'s
    (piecewise linear between ``HISTOGRAM_QUANTILES`` quantiles; background stays 0)."""
    levels = np.linspace(0.0, 100.0, HISTOGRAM_QUANTILES)
    source = np.percentile(_foreground(image), levels)
    target = np.percentile(_foreground(reference), levels)
    source, keep = np.unique(source, return_index=True)
    mapped = np.interp(image, source, target[keep])
    return np.where(image > image.min(), mapped, 0.0).astype(np.float32)


def normalised_pair(fixed, moving, method: str, fixed_path, moving_path):
    """Both images scaled by ``method`` (one of :data:`NORMALISATIONS`)."""
    if method not in NORMALISATIONS:
        raise InputError(f"--normalise {method}: expected one of {', '.join(NORMALISATIONS)}")
    if method == "minmax":
        return minmax_scaled(fixed_path, fixed), minmax_scaled(moving_path, moving)
    fixed = percentile_scaled(fixed_path, fixed)
    moving = percentile_scaled(moving_path, moving)
    if method == "histogram":
        moving = matched_histogram(moving, fixed)
    return fixed, moving
