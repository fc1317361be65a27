"""Pairwise displacement fields, trajectories through the stack, and their smoothing along z.

Positions are (y, x) in each section's own working-level pixels. A pair field
``D`` of sections (a, b) is sampled on the grid nodes of section a:
``x_b = x_a + D(x_a)``. Trajectories start on a grid in the reference
(centre) section and are chained section by section in both directions; the
backward step inverts the field by fixed-point iteration. Sections that could
not be matched (blank, damaged) are bridged: their positions are interpolated
along z between the neighbouring matched sections.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medhpc.tnr import rigid
from medhpc.tnr.matching import Matches, grid_axes

INVERSE_ITERATIONS = 20
FILL_SIGMA_NODES = 1.5


@dataclass
class PairField:
    """Displacement from section a to section b on a's grid nodes."""

    a: int
    b: int
    ys: np.ndarray            # (gy,) node rows
    xs: np.ndarray            # (gx,) node columns
    displacement: np.ndarray  # (gy, gx, 2)

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        """Displacement at (N, 2) positions (bilinear, constant beyond the outer nodes)."""
        rows = _fractional_index(self.ys, positions[:, 0])
        cols = _fractional_index(self.xs, positions[:, 1])
        return np.stack([ndimage.map_coordinates(self.displacement[..., c], [rows, cols],
                                                 order=1, mode="nearest")
                         for c in range(2)], axis=1)

    def forward(self, positions: np.ndarray) -> np.ndarray:
        return positions + self(positions)

    def backward(self, positions: np.ndarray) -> np.ndarray:
        """Positions in a whose forward image is ``positions`` in b."""
        estimate = positions.copy()
        for _ in range(INVERSE_ITERATIONS):
            estimate = positions - self(estimate)
        return estimate


def _fractional_index(nodes: np.ndarray, values: np.ndarray) -> np.ndarray:
    if len(nodes) == 1:
        return np.zeros_like(values)
    return (values - nodes[0]) / (nodes[1] - nodes[0])


def pair_field(a: int, b: int, shape, grid: int, matches: Matches,
               transform: np.ndarray) -> PairField:
    """The dense-on-grid displacement a -> b from accepted matches and the rigid transform.

    Accepted offsets are spread to the other nodes by normalised Gaussian
    convolution on the grid; far from any match the rigid transform alone remains.
    """
    ys, xs = grid_axes(shape, grid)
    offsets = np.zeros((len(ys), len(xs), 2))
    weight = np.zeros((len(ys), len(xs)))
    accepted = matches.accepted
    if np.any(accepted):
        rows = np.clip(np.round(_fractional_index(ys, matches.points[accepted, 0])).astype(int),
                       0, len(ys) - 1)
        cols = np.clip(np.round(_fractional_index(xs, matches.points[accepted, 1])).astype(int),
                       0, len(xs) - 1)
        offsets[rows, cols] = matches.offsets[accepted]
        weight[rows, cols] = 1.0
        spread = ndimage.gaussian_filter(weight, FILL_SIGMA_NODES, mode="nearest")
        filled = np.stack([ndimage.gaussian_filter(offsets[..., c] * weight, FILL_SIGMA_NODES,
                                                   mode="nearest") for c in range(2)], axis=-1)
        filled /= np.maximum(spread, 1e-12)[..., None]
        # Far from matches the spread weight vanishes: fade towards the rigid transform.
        confidence = np.clip(spread / 0.05, 0.0, 1.0)[..., None]
        offsets = np.where(weight[..., None] > 0, offsets, filled * confidence)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    nodes = np.stack([yy.ravel(), xx.ravel()], axis=1)
    matched = rigid.apply(transform, nodes + offsets.reshape(-1, 2))
    return PairField(a, b, ys, xs, (matched - nodes).reshape(len(ys), len(xs), 2))


def seed_points(shape, grid: int, tissue_nodes: np.ndarray | None = None) -> np.ndarray:
    """Trajectory seeds: the grid nodes of the reference section, those in tissue if at least
    three are (``tissue_nodes`` is a bool (gy, gx) array on the same grid)."""
    ys, xs = grid_axes(shape, grid)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    points = np.stack([yy.ravel(), xx.ravel()], axis=1)
    if tissue_nodes is not None and np.count_nonzero(tissue_nodes) >= 3:
        points = points[tissue_nodes.ravel()]
    return points


def chain_trajectories(fields: dict, matched: list[int], count: int, reference: int,
                       seeds: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """Follow the seeds through every section.

    Parameters
    ----------
    fields : dict
        ``{(a, b): PairField}`` for consecutive entries of ``matched``.
    matched : list of int
        Sections that take part in matching, ascending; the others are bridged.
    count : int
        Number of sections.
    reference : int
        Section holding the seeds (an entry of ``matched``).

    Returns
    -------
    positions : (N, count, 2)
    valid : (N, count) bool
        False once a trajectory has left the image.
    """
    n = len(seeds)
    positions = np.full((n, count, 2), np.nan)
    positions[:, reference] = seeds
    where = matched.index(reference)
    for a, b in zip(matched[where:], matched[where + 1:]):
        positions[:, b] = fields[(a, b)].forward(positions[:, a])
    for a, b in zip(reversed(matched[:where]), reversed(matched[1:where + 1])):
        positions[:, a] = fields[(a, b)].backward(positions[:, b])
    for section in range(count):
        if section in matched:
            continue
        below = max((m for m in matched if m < section), default=None)
        above = min((m for m in matched if m > section), default=None)
        if below is None or above is None:
            positions[:, section] = positions[:, above if below is None else below]
        else:
            t = (section - below) / (above - below)
            positions[:, section] = (1 - t) * positions[:, below] + t * positions[:, above]
    inside = ((positions[..., 0] >= 0) & (positions[..., 0] <= shape[0] - 1)
              & (positions[..., 1] >= 0) & (positions[..., 1] <= shape[1] - 1))
    valid = np.logical_and.accumulate(inside[:, reference:], axis=1)
    valid_before = np.logical_and.accumulate(inside[:, :reference + 1][:, ::-1], axis=1)[:, ::-1]
    return positions, np.concatenate([valid_before[:, :-1], valid], axis=1)


def smooth_along_z(positions: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing of every trajectory along z (sigma in sections).

    Each trajectory is smoothed over the sections where it is valid (a contiguous
    run); beyond its ends it is continued by point reflection about the end
    position (``x[-k] = 2 x[0] - x[k]``), so that a trajectory drifting steadily
    (oblique anatomy) is not bent towards the middle near the stack ends.
    """
    n, count, _ = positions.shape
    smoothed = np.full_like(positions, np.nan, dtype=np.float64)
    if sigma <= 0:
        return np.where(valid[..., None], positions, np.nan)
    radius = int(np.ceil(4 * sigma))
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    for k in range(n):
        index = np.flatnonzero(valid[k])
        if index.size == 0:
            continue
        first, last = index[0], index[-1]
        run = positions[k, first:last + 1].astype(np.float64)
        if len(run) == 1:
            smoothed[k, first] = run[0]
            continue
        padded = _odd_extension(run, radius)
        smoothed[k, first:last + 1] = ndimage.convolve1d(padded, kernel, axis=0,
                                                         mode="nearest")[radius:-radius]
    return smoothed


def _odd_extension(run: np.ndarray, radius: int) -> np.ndarray:
    """``run`` continued by ``radius`` samples on each side by point reflection."""
    padded = run
    while padded.shape[0] < len(run) + 2 * radius:
        need_before = min(radius - (padded.shape[0] - len(run)) // 2, len(padded) - 1)
        before = 2 * padded[0] - padded[1:need_before + 1][::-1]
        after = 2 * padded[-1] - padded[-need_before - 1:-1][::-1]
        padded = np.concatenate([before, padded, after])
    extra = (padded.shape[0] - len(run)) // 2 - radius
    return padded[extra: padded.shape[0] - extra] if extra > 0 else padded


def straight(positions: np.ndarray, valid: np.ndarray, reference: int) -> np.ndarray:
    """Targets of pairwise registration: every trajectory straight at its reference position."""
    target = np.repeat(positions[:, reference:reference + 1], positions.shape[1], axis=1)
    return np.where(valid[..., None], target, np.nan)


def derotate(positions: np.ndarray, angles: np.ndarray, centre) -> np.ndarray:
    """Rotate each section's positions by minus its chained rotation about ``centre``.

    Sections may lie rotated on the slide at any angle; averaging positions of
    differently rotated sections would shrink trajectories, so smoothing works in a
    frame where each section's rotation is undone (translations stay, curvature of
    the anatomy along z included).
    """
    out = np.empty_like(positions)
    for section, angle in enumerate(angles):
        undo = rigid.rotation_about(-angle, centre)
        out[:, section] = rigid.apply(undo, positions[:, section])
    return out


def rerotate(positions: np.ndarray, angles: np.ndarray, centre) -> np.ndarray:
    """Inverse of :func:`derotate`."""
    return derotate(positions, -np.asarray(angles), centre)
