"""Stain-robust working images and tissue masks.

Every stain becomes one channel in which tissue is bright and glass is dark:

- ``gray``: 1 - luminance (8-bit inputs scaled to [0, 1]);
- ``od``: optical density, the mean of -log10(I / I0) over the colour channels;
- ``hematoxylin``: the hematoxylin density from colour deconvolution with the
  Ruifrok-Johnston H&E-DAB stain vectors (the nuclear stain shared by H&E and
  most IHC stains).

The working image is then normalised inside the tissue (zero median, unit
interquartile spread), so that sections of different stains or staining
strength compare by structure, not by brightness.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medhpc.tnr.settings import STAINS

# Ruifrok & Johnston (2001), rows: hematoxylin, eosin, DAB (optical density per RGB channel).
_HED_VECTORS = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _HED_VECTORS / np.linalg.norm(_HED_VECTORS, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)
_OD_FLOOR = 1.0 / 255.0
# Tissue intensity quantiles (percent) recorded per section for the output's normalisation.
QUANTILES = (1.0, 5.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0, 99.0)


@dataclass
class WorkingSection:
    """One section ready for matching: the normalised image, its tissue mask and statistics."""

    image: np.ndarray          # float32 [y, x], tissue bright
    mask: np.ndarray           # bool [y, x]
    tissue_fraction: float
    mean_colour: tuple         # mean input intensity per channel inside the tissue (0-1 scale)
    texture: float             # median local standard deviation inside the tissue
    od_direction: tuple = ()   # unit mean optical-density vector in the tissue (the stain mix)
    quantiles: tuple = ()      # per channel, tissue intensity at QUANTILES (0-1 scale)


def intensity_scale(dtype) -> float:
    """The value of full intensity for an input dtype (255 for uint8, 1 for floats)."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max)
    return 1.0


def stain_channel(section: np.ndarray, stain: str) -> np.ndarray:
    """The stain-robust channel of a section ``[y, x]`` or ``[y, x, c]`` (tissue bright)."""
    if stain not in STAINS:
        raise ValueError(f"stain {stain!r}: expected one of {', '.join(STAINS)}")
    scale = intensity_scale(section.dtype)
    values = np.asarray(section, dtype=np.float32) / np.float32(scale)
    if values.ndim == 3:
        values = values[..., :3]
    if stain == "gray":
        if values.ndim == 3:
            values = values @ np.array([0.299, 0.587, 0.114], np.float32)
        return (1.0 - values).astype(np.float32)
    density = -np.log10(np.clip(values, _OD_FLOOR, 1.0))
    if stain == "od" or values.ndim == 2:
        return (density if density.ndim == 2 else density.mean(axis=2)).astype(np.float32)
    return (density @ _HED_FROM_RGB.astype(np.float32))[..., 0].astype(np.float32)


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor x factor`` blocks (the trailing partial block is dropped)."""
    if factor == 1:
        return image
    ny, nx = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    trimmed = image[:ny, :nx]
    shape = (ny // factor, factor, nx // factor, factor) + trimmed.shape[2:]
    return trimmed.reshape(shape).mean(axis=(1, 3), dtype=np.float32)


def tissue_mask(channel: np.ndarray, smoothing_px: float = 2.0) -> np.ndarray:
    """Tissue where the smoothed channel is above Otsu's threshold, holes filled."""
    smooth = ndimage.gaussian_filter(channel, smoothing_px)
    threshold = otsu_threshold(smooth)
    mask = smooth > threshold
    mask = ndimage.binary_opening(mask, iterations=1)
    return ndimage.binary_fill_holes(mask)


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of an array (between-class variance maximised)."""
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return high
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    centres = 0.5 * (edges[:-1] + edges[1:])
    weight = np.cumsum(counts).astype(np.float64)
    total = weight[-1]
    mean = np.cumsum(counts * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mean[-1] * weight / total - mean) ** 2 / (weight * (total - weight))
    between[~np.isfinite(between)] = 0.0
    return float(centres[int(np.argmax(between))])


def prepare_section(section: np.ndarray, stain: str, factor: int) -> WorkingSection:
    """Working-level channel, tissue mask and statistics of one input section."""
    scale = intensity_scale(section.dtype)
    colour = downsample(np.asarray(section, np.float32) / np.float32(scale), factor)
    channel = stain_channel(colour, stain)  # at the working level: block means of intensity
    # tissue against glass by its total optical density (every stain absorbs; a stain
    # channel alone would leave out tissue that takes up little of that stain)
    mask = tissue_mask(channel if stain == "gray" else stain_channel(colour, "od"))
    if colour.ndim == 2:
        colour = colour[..., np.newaxis]
    if mask.sum() < 16:
        return WorkingSection(np.zeros_like(channel), mask, float(mask.mean()),
                              tuple(float(v) for v in colour.reshape(-1, colour.shape[-1]).mean(0)),
                              0.0)
    inside = channel[mask]
    low, median, high = np.percentile(inside, [25, 50, 75])
    spread = max(float(high - low), 1e-6)
    image = np.where(mask, (channel - median) / spread, 0.0).astype(np.float32)
    mean = ndimage.uniform_filter(image, 5)
    local_std = np.sqrt(np.maximum(ndimage.uniform_filter(image * image, 5) - mean * mean, 0))
    tissue_colour = colour[mask]
    density = -np.log10(np.clip(tissue_colour, _OD_FLOOR, 1.0)).mean(axis=0)
    direction = density / max(float(np.linalg.norm(density)), 1e-12)
    quantiles = np.percentile(tissue_colour, QUANTILES, axis=0).T
    return WorkingSection(image=image, mask=mask, tissue_fraction=float(mask.mean()),
                          mean_colour=tuple(float(v) for v in tissue_colour.mean(axis=0)),
                          texture=float(np.median(local_std[mask]) * spread),
                          od_direction=tuple(float(v) for v in direction),
                          quantiles=tuple(tuple(float(v) for v in row) for row in quantiles))
