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
    run) by a Gaussian-weighted local linear fit: away from the ends of the run
    (the whole window inside) this is exactly the Gaussian-weighted mean; near the
    ends the fitted line keeps a steadily drifting (oblique) trajectory straight
    instead of bending it towards the middle, while still averaging out each
    section's own distortion (mirroring the run would leave the end point
    unsmoothed, or bend it).
    """
    n, count, _ = positions.shape
    smoothed = np.full(positions.shape, np.nan)
    if sigma <= 0:
        return np.where(valid[..., None], positions, np.nan)
    for k in range(n):
        index = np.flatnonzero(valid[k])
        if index.size == 0:
            continue
        first, last = index[0], index[-1]
        smoothed[k, first:last + 1] = local_linear(positions[k, first:last + 1], sigma)
    return smoothed


def local_linear(run: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian-weighted local linear regression of ``run`` (L, 2) at each of its samples."""
    length = len(run)
    if length < 3:
        return run.astype(np.float64)
    z = np.arange(length, dtype=np.float64)
    offset = z[None, :] - z[:, None]                     # (at, from)
    weight = np.exp(-0.5 * (offset / sigma) ** 2)
    weight[np.abs(offset) > 4 * sigma] = 0.0
    s0, s1, s2 = (np.sum(weight * offset ** p, axis=1) for p in (0, 1, 2))
    t0 = weight @ run
    t1 = (weight * offset) @ run
    determinant = s0 * s2 - s1 * s1
    safe = determinant > 1e-12 * np.maximum(s0 * s2, 1e-300)
    fitted = np.where(safe[:, None], (s2[:, None] * t0 - s1[:, None] * t1)
                      / np.where(safe, determinant, 1.0)[:, None], t0 / s0[:, None])
    return fitted


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
