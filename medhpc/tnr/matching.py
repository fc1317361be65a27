"""Patch matching between neighbouring sections and the rejection of doubtful matches.

A regular grid of ``P x P`` patches inside the tissue of section i is searched
for in a ``+/-R`` window of section i+1 (already rigidly pre-aligned) by
zero-mean NCC. The peak is refined to sub-pixel by a parabola per axis. A match
is kept only if

- its NCC is at least ``min_ncc``;
- the best other local maximum (farther than ``PEAK_EXCLUSION_PX``) is below
  ``max_second_ratio`` times the peak (not ambiguous);
- the peak is not an edge: ``trace^2 / det`` of its Hessian is below
  ``(r + 1)^2 / r`` with ``r = max_curvature_ratio``;
- it is not on the border of the search window;
- its displacement agrees with the median of its accepted neighbours within
  ``max_deviation_px`` (local consistency).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medhpc.tnr.settings import MatchSettings

PEAK_EXCLUSION_PX = 3
MIN_TISSUE_IN_PATCH = 0.5

ACCEPTED, LOW_NCC, AMBIGUOUS, EDGE_LIKE, AT_BORDER, INCONSISTENT = range(6)
STATUS_NAMES = ("accepted", "low_ncc", "ambiguous", "edge_like", "at_search_border",
                "inconsistent")


@dataclass
class Matches:
    """Matches of one section pair at the grid points of the fixed section.

    ``offsets`` are (dy, dx) from each point to its match in the pre-aligned
    moving section; ``status`` holds one of the codes above (only the grid points
    that carried a textured tissue patch are listed).
    """

    points: np.ndarray    # (K, 2) y, x
    offsets: np.ndarray   # (K, 2)
    ncc: np.ndarray       # (K,)
    status: np.ndarray    # (K,) int8

    @property
    def accepted(self) -> np.ndarray:
        return self.status == ACCEPTED

    def counts(self) -> dict:
        return {name: int(np.count_nonzero(self.status == code))
                for code, name in enumerate(STATUS_NAMES)}


def grid_axes(shape, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid node positions along y and x: every ``grid`` pixels, centred in the image."""
    axes = []
    for n in shape:
        count = max(1, int(n // grid))
        first = 0.5 * (n - (count - 1) * grid) - 0.5
        axes.append(first + grid * np.arange(count))
    return axes[0], axes[1]


def grid_points(shape, grid: int) -> np.ndarray:
    """All grid nodes as (N, 2) integer (y, x), row by row."""
    ys, xs = grid_axes(shape, grid)
    yy, xx = np.meshgrid(np.round(ys), np.round(xs), indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.int64)


def textured_patches(image: np.ndarray, mask: np.ndarray, points: np.ndarray, patch: int,
                     min_texture: float) -> np.ndarray:
    """Which points carry a patch mostly in tissue with enough structure.

    Structure is the smaller eigenvalue of the patch's mean structure tensor
    (square root, in the normalised image's units per pixel), which is small for
    flat patches and for patches crossed by a single straight edge.
    """
    half = patch // 2
    gy, gx = np.gradient(image)
    tensor = [ndimage.uniform_filter(a, patch) for a in (gy * gy, gx * gx, gy * gx)]
    coverage = ndimage.uniform_filter(mask.astype(np.float32), patch)
    ny, nx = image.shape
    keep = np.zeros(len(points), bool)
    for k, (y, x) in enumerate(points):
        if y - half < 0 or x - half < 0 or y + patch - half > ny or x + patch - half > nx:
            continue
        if coverage[y, x] < MIN_TISSUE_IN_PATCH:
            continue
        syy, sxx, sxy = (t[y, x] for t in tensor)
        smaller = 0.5 * (syy + sxx) - np.sqrt(0.25 * (syy - sxx) ** 2 + sxy * sxy)
        keep[k] = np.sqrt(max(smaller, 0.0)) >= min_texture
    return keep


def cut_patches(fixed: np.ndarray, moving: np.ndarray, points: np.ndarray, patch: int,
                search: int) -> tuple[np.ndarray, np.ndarray]:
    """Templates ``(K, P, P)`` from ``fixed`` and windows ``(K, P + 2R, P + 2R)`` from
    ``moving`` (zero outside it), centred on ``points``."""
    half = patch // 2
    size = patch + 2 * search
    padded = np.pad(moving, search + patch, mode="constant")
    templates = np.empty((len(points), patch, patch), np.float32)
    windows = np.empty((len(points), size, size), np.float32)
    for k, (y, x) in enumerate(points):
        templates[k] = fixed[y - half: y - half + patch, x - half: x - half + patch]
        top, left = y - half - search + search + patch, x - half - search + search + patch
        windows[k] = padded[top: top + size, left: left + size]
    return templates, windows


def analyse_peaks(scores: np.ndarray, settings: MatchSettings):
    """Sub-pixel offsets (dy, dx), peak NCC and status of every score map ``(K, S, S)``."""
    count, span, _ = scores.shape
    radius = (span - 1) // 2
    offsets = np.zeros((count, 2))
    peak = np.zeros(count)
    status = np.full(count, ACCEPTED, np.int8)
    local_max = scores == ndimage.maximum_filter(scores, size=(1, 3, 3), mode="nearest")
    limit = (settings.max_curvature_ratio + 1) ** 2 / settings.max_curvature_ratio
    yy, xx = np.mgrid[0:span, 0:span]
    for k in range(count):
        score = scores[k]
        iy, ix = np.unravel_index(int(np.argmax(score)), score.shape)
        peak[k] = score[iy, ix]
        if peak[k] < settings.min_ncc:
            status[k] = LOW_NCC
            continue
        if iy in (0, span - 1) or ix in (0, span - 1):
            status[k] = AT_BORDER
            continue
        far = (yy - iy) ** 2 + (xx - ix) ** 2 > PEAK_EXCLUSION_PX ** 2
        others = score[local_max[k] & far]
        if others.size and others.max() > settings.max_second_ratio * peak[k]:
            status[k] = AMBIGUOUS
            continue
        centre = float(score[iy, ix])
        dyy = score[iy + 1, ix] - 2 * centre + score[iy - 1, ix]
        dxx = score[iy, ix + 1] - 2 * centre + score[iy, ix - 1]
        dxy = 0.25 * (score[iy + 1, ix + 1] - score[iy + 1, ix - 1]
                      - score[iy - 1, ix + 1] + score[iy - 1, ix - 1])
        det = dyy * dxx - dxy * dxy
        if det <= 0 or (dyy + dxx) ** 2 / det > limit:
            status[k] = EDGE_LIKE
            continue
        offsets[k, 0] = iy - radius + _parabola_vertex(score[iy - 1, ix], centre, score[iy + 1, ix])
        offsets[k, 1] = ix - radius + _parabola_vertex(score[iy, ix - 1], centre, score[iy, ix + 1])
    return offsets, peak, status


def _parabola_vertex(before: float, centre: float, after: float) -> float:
    curvature = before - 2.0 * centre + after
    if curvature >= 0:
        return 0.0
    return float(np.clip(0.5 * (before - after) / curvature, -0.5, 0.5))


def reject_inconsistent(points: np.ndarray, offsets: np.ndarray, status: np.ndarray,
                        grid: int, max_deviation_px: float) -> np.ndarray:
    """Mark accepted matches that differ from their accepted neighbours' median."""
    status = status.copy()
    accepted = np.flatnonzero(status == ACCEPTED)
    if accepted.size < 3:
        return status
    position = points[accepted].astype(np.float64)
    distance = np.sqrt(((position[:, None, :] - position[None, :, :]) ** 2).sum(axis=2))
    neighbours = (distance <= 1.5 * grid + 0.5) & (distance > 0)
    for row, index in enumerate(accepted):
        around = accepted[neighbours[row]]
        if around.size < 2:
            continue
        median = np.median(offsets[around], axis=0)
        if np.hypot(*(offsets[index] - median)) > max_deviation_px:
            status[index] = INCONSISTENT
    return status


def match_sections(fixed: np.ndarray, fixed_mask: np.ndarray, moving_aligned: np.ndarray,
                   settings: MatchSettings, zncc_scores) -> Matches:
    """Match the textured tissue patches of ``fixed`` in ``moving_aligned``.

    ``zncc_scores`` is the kernel launcher (CPU or CUDA twin, host arrays in and out).
    """
    points = grid_points(fixed.shape, settings.grid)
    points = points[textured_patches(fixed, fixed_mask, points, settings.patch,
                                     settings.min_texture)]
    span = 2 * settings.search + 1
    if len(points) == 0:
        empty = np.zeros((0, 2))
        return Matches(points.reshape(0, 2), empty, np.zeros(0), np.zeros(0, np.int8))
    templates, windows = cut_patches(fixed, moving_aligned, points, settings.patch,
                                     settings.search)
    scores = np.zeros((len(points), span, span), np.float32)
    zncc_scores(templates, windows, scores)
    offsets, peak, status = analyse_peaks(scores, settings)
    status = reject_inconsistent(points, offsets, status, settings.grid,
                                 settings.max_deviation_px)
    return Matches(points, offsets, peak, status)
