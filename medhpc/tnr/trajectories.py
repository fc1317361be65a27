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
import scipy.fft
from scipy import ndimage

from medhpc.tnr import rigid
from medhpc.tnr.matching import Matches, grid_axes

INVERSE_ITERATIONS = 20
FILL_SIGMA_NODES = 1.5
PLACEMENT_ITERATIONS = 15
DRIFT_RATIOS = np.concatenate([[0.0], np.logspace(-5, 5, 101)])
DRIFT_EVIDENCE = 6.63   # chi-square, 1 degree of freedom, 1 % level
END_WIDENINGS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)   # window widths tried at the ends of a run


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
                       seeds: np.ndarray, shape, leaves=()) -> tuple[np.ndarray, np.ndarray]:
    """Follow the seeds through every section.

    Parameters
    ----------
    fields : dict
        ``{(a, b): PairField}`` for consecutive entries of ``matched`` and, for every
        leaf, the pair with its neighbour towards the reference.
    matched : list of int
        Sections of the chain, ascending; the others are leaves or bridged.
    count : int
        Number of sections.
    reference : int
        Section holding the seeds (an entry of ``matched``).
    leaves : iterable of int
        Sections outside the chain that still get positions, from their neighbour
        towards the reference (so that their own errors are not passed on).
        Other sections outside the chain get positions interpolated along z.

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
    leaves = set(leaves)
    placed = set(matched)
    for section in sorted(leaves, key=lambda s: (abs(s - reference), s)):
        towards = section - 1 if section > reference else section + 1
        key = (towards, section) if section > reference else (section, towards)
        if towards not in placed or key not in fields:
            continue
        field = fields[key]
        positions[:, section] = (field.forward(positions[:, towards]) if section > reference
                                 else field.backward(positions[:, towards]))
        placed.add(section)
    for section in range(count):
        if section in placed:
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
    # A trajectory ends where it leaves the image along the chain; a leaf only ends itself.
    along = inside.copy()
    leaf_sections = sorted(placed & leaves)
    along[:, leaf_sections] = True
    valid = np.empty_like(inside)
    valid[:, reference:] = np.logical_and.accumulate(along[:, reference:], axis=1)
    valid[:, :reference + 1] = np.logical_and.accumulate(
        along[:, :reference + 1][:, ::-1], axis=1)[:, ::-1]
    for section in leaf_sections:
        towards = section - 1 if section > reference else section + 1
        valid[:, section] = valid[:, towards] & inside[:, section]
    return positions, valid


def smooth_along_z(positions: np.ndarray, valid: np.ndarray, sigma: float,
                   weights: np.ndarray | None = None) -> np.ndarray:
    """Gaussian smoothing of every trajectory along z (sigma in sections).

    Each trajectory is smoothed over the sections where it is valid (a contiguous
    run) by a Gaussian-weighted local linear fit: away from the ends of the run
    (the whole window inside) this is exactly the Gaussian-weighted mean; near the
    ends the fitted line keeps a steadily drifting (oblique) trajectory straight
    instead of bending it towards the middle, while still averaging out each
    section's own distortion (mirroring the run would leave the end point
    unsmoothed, or bend it). A one-sided window averages fewer sections, so within
    ``2 sigma`` of a run's end the window may widen (:data:`END_WIDENINGS`): at each
    distance from the end, the widening with the least leave-one-section-out
    prediction error over all trajectories is used (a wider window averages more
    sections' own distortion away but bends with the anatomy). ``weights`` (count,)
    lowers the say of doubtful sections, (N, count) of single trajectories in them.
    """
    n, count, _ = positions.shape
    weights = np.ones(count) if weights is None else np.asarray(weights, np.float64)
    if weights.ndim == 1:
        weights = np.broadcast_to(weights, (n, count))
    smoothed = np.full(positions.shape, np.nan)
    if sigma <= 0:
        return np.where(valid[..., None], positions, np.nan)
    reach = int(np.ceil(2 * sigma))
    kernels: dict = {}
    fits, errors = [], np.zeros((len(END_WIDENINGS), reach))
    for k in range(n):
        index = np.flatnonzero(valid[k])
        if index.size == 0:
            fits.append(None)
            continue
        first, last = int(index[0]), int(index[-1]) + 1
        own = weights[k, first:last]
        key = (first, last, own.tobytes())
        if key not in kernels:
            kernels[key] = [local_linear_kernel(last - first, sigma * widening, own)
                            for widening in END_WIDENINGS]
        run = positions[k, first:last]
        fitted = [kernel @ run for kernel in kernels[key]]
        fits.append((first, last, fitted))
        length = last - first
        if length < 3:
            continue
        distance = np.minimum(np.arange(length), np.arange(length)[::-1])
        near = distance < reach
        for w, (kernel, fit) in enumerate(zip(kernels[key], fitted)):
            diagonal = np.clip(np.diag(kernel), None, 1.0 - 1e-6)
            left_out = (fit - diagonal[:, None] * run) / (1.0 - diagonal[:, None])
            miss = own * np.sum((run - left_out) ** 2, axis=1)
            np.add.at(errors[w], distance[near], miss[near])
    widening_at = np.zeros(reach, int)
    for d in range(reach):
        if errors[:, d].any():
            widening_at[d] = int(np.argmin(errors[:, d]))
    for k, fit in enumerate(fits):
        if fit is None:
            continue
        first, last, fitted = fit
        length = last - first
        distance = np.minimum(np.arange(length), np.arange(length)[::-1])
        choice = np.where(distance < reach, widening_at[np.minimum(distance, reach - 1)], 0)
        smoothed[k, first:last] = np.stack(fitted)[choice, np.arange(length)]
    return smoothed


def local_linear_kernel(length: int, sigma: float,
                        weights: np.ndarray | None = None) -> np.ndarray:
    """The (length, length) matrix of Gaussian-weighted local linear regression at each
    sample of a run (``weights`` (length,) multiply the Gaussian of each sample)."""
    if length < 3:
        return np.eye(length)
    z = np.arange(length, dtype=np.float64)
    offset = z[None, :] - z[:, None]                     # (at, from)
    weight = np.exp(-0.5 * (offset / sigma) ** 2)
    weight[np.abs(offset) > 4 * sigma] = 0.0
    if weights is not None:
        weight = weight * np.asarray(weights, np.float64)[None, :]
    s0, s1, s2 = (np.sum(weight * offset ** p, axis=1) for p in (0, 1, 2))
    determinant = s0 * s2 - s1 * s1
    safe = determinant > 1e-12 * np.maximum(s0 * s2, 1e-300)
    return np.where(safe[:, None],
                    weight * (s2[:, None] - s1[:, None] * offset)
                    / np.where(safe, determinant, 1.0)[:, None],
                    weight / s0[:, None])


def local_linear(run: np.ndarray, sigma: float, weights: np.ndarray | None = None) -> np.ndarray:
    """Gaussian-weighted local linear regression of ``run`` (L, 2) at each of its samples
    (``weights`` (L,) multiply the Gaussian of each sample)."""
    return local_linear_kernel(len(run), sigma, weights) @ run.astype(np.float64)


def straight(positions: np.ndarray, valid: np.ndarray, reference: int) -> np.ndarray:
    """Targets of pairwise registration: every trajectory straight at its reference position."""
    target = np.repeat(positions[:, reference:reference + 1], positions.shape[1], axis=1)
    return np.where(valid[..., None], target, np.nan)


def procrustes(source: np.ndarray, target: np.ndarray, mirrored: bool, centre) -> np.ndarray:
    """Rigid ``A`` (3 x 3) minimising ``sum |A source - target|^2``; ``A`` turns the plane over
    (a mirror about ``centre``'s column) if and only if ``mirrored``."""
    mirror = rigid.mirror_about(centre) if mirrored else np.eye(3)
    turned = rigid.apply(mirror, source)
    mean_source, mean_target = turned.mean(axis=0), target.mean(axis=0)
    u, _, vt = np.linalg.svd((turned - mean_source).T @ (target - mean_target))
    rotation = vt.T @ u.T
    if np.linalg.det(rotation) < 0:
        vt[-1] *= -1
        rotation = vt.T @ u.T
    matrix = np.eye(3)
    matrix[:2, :2] = rotation
    matrix[:2, 2] = mean_target - rotation @ mean_source
    return matrix @ mirror


def fit_affine(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Affine ``A`` (3 x 3) minimising ``sum |A source - target|^2`` (least squares)."""
    design = np.column_stack([source, np.ones(len(source))])
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    matrix = np.eye(3)
    matrix[:2, :2] = solution[:2].T
    matrix[:2, 2] = solution[2]
    return matrix


def remove_placement(observed: np.ndarray, valid: np.ndarray, initial: np.ndarray,
                     weights: np.ndarray, centre, model: str = "rigid",
                     iterations: int = PLACEMENT_ITERATIONS) -> np.ndarray:
    """Each section's rigid placement, estimated jointly over the stack.

    Generalised Procrustes analysis of the trajectories: the placement ``A_i``
    (common frame -> section pixels; rigid, or affine with ``model="affine"``, which
    also takes each section's cutting compression and stretch) of every section and
    the mean position
    ``m_k`` of every trajectory in the common frame minimise
    ``sum_i w_i sum_k |A_i m_k - x_k(i)|^2`` over the valid points, starting from
    ``initial`` (the rigid chain). Unlike the chain, no section's placement error is
    passed on to the next. Sections with fewer than 3 valid points keep ``initial``.

    Returns
    -------
    (count, 3, 3) placements, mirrored exactly where ``initial`` is.
    """
    n, count, _ = observed.shape
    placement = np.array(initial, np.float64)
    mirrored = [rigid.is_mirrored(m) for m in placement]
    usable = [np.count_nonzero(valid[:, i]) >= 3 for i in range(count)]
    weights = np.asarray(weights, np.float64)
    for _ in range(iterations):
        frame = np.zeros((n, 2))
        total = np.zeros(n)
        for i in range(count):
            if not usable[i]:
                continue
            rows = valid[:, i]
            frame[rows] += weights[i] * rigid.apply(np.linalg.inv(placement[i]), observed[rows, i])
            total[rows] += weights[i]
        known = total > 0
        mean = frame[known] / total[known, None]
        change = 0.0
        for i in range(count):
            rows = valid[known, i]
            if not usable[i] or np.count_nonzero(rows) < 3:
                continue
            if model == "affine" and np.count_nonzero(rows) >= 6:
                fitted = fit_affine(mean[rows], observed[known][rows, i])
            else:
                fitted = procrustes(mean[rows], observed[known][rows, i], mirrored[i], centre)
            change = max(change, float(np.abs(fitted - placement[i])[:2].max()))
            placement[i] = fitted
        if change < 1e-4:
            break
    return placement


def placement_parameters(placement: np.ndarray, centre) -> np.ndarray:
    """(count, 3): rotation (rad) and the translation (y, x) of ``centre`` of each placement."""
    centre = np.asarray(centre, np.float64)
    rows = []
    for matrix in placement:
        moved = rigid.apply(matrix, centre[None])[0] - centre
        rows.append([rigid.rotation_angle(matrix), moved[0], moved[1]])
    return np.array(rows)


def smooth_drift(series: np.ndarray) -> tuple[np.ndarray, float]:
    """The smooth part of per-section series (count, m): empirical-Bayes random-walk smoothing.

    Each column is modelled as a random walk along z (the anatomy's slow drift,
    variance ``r s^2`` per section) plus independent per-section noise (the random
    placement, variance ``s^2``). In the cosine basis the walk has variance
    ``r s^2 / lambda_j`` (``lambda_j = 4 sin^2(pi j / 2n)``); the ratio ``r`` is the
    one that maximises the marginal likelihood of all columns together, and the
    posterior mean of the walk is returned. Pure placement noise gives ``r = 0``:
    the series' mean alone; a slow drift much larger than the noise is kept.

    Returns
    -------
    drift : (count, m)
    ratio : float
        The chosen ``r``.
    """
    count = series.shape[0]
    if count < 4:
        return np.repeat(series.mean(axis=0, keepdims=True), count, axis=0), 0.0
    coefficients = scipy.fft.dct(series, type=2, norm="ortho", axis=0)
    eigen = 4.0 * np.sin(np.pi * np.arange(count) / (2.0 * count)) ** 2
    data = coefficients[1:] ** 2
    best, best_ratio, no_drift = -np.inf, 0.0, None
    for ratio in DRIFT_RATIOS:
        variance = 1.0 + ratio / eigen[1:]
        scale = float(np.mean(data / variance[:, None]))
        if scale <= 0:
            break
        likelihood = -0.5 * series.shape[1] * float(np.sum(np.log(scale * variance)))
        if ratio == 0.0:
            no_drift = likelihood
        if likelihood > best:
            best, best_ratio = likelihood, float(ratio)
    # keep a drift only where the data demand it (likelihood-ratio test, 1 % level): with
    # few sections the maximum alone often mistakes placement noise for drift
    if no_drift is not None and 2.0 * (best - no_drift) < DRIFT_EVIDENCE:
        best_ratio = 0.0
    shrink = np.zeros(count)
    shrink[0] = 1.0
    prior = best_ratio / eigen[1:]
    shrink[1:] = prior / (1.0 + prior)
    return scipy.fft.idct(coefficients * shrink[:, None], type=2, norm="ortho", axis=0), best_ratio


def placement_free_frame(observed: np.ndarray, valid: np.ndarray, initial: np.ndarray,
                         weights: np.ndarray, shape, model: str = "affine") -> dict:
    """Trajectories in a frame where each section's random placement is undone.

    The placements (rigid or affine) come from :func:`remove_placement`; their
    parameter series along z (rotation or linear part, and the translation of the
    image centre) are split by :func:`smooth_drift` into a slow drift (kept: the
    anatomy may turn, move or grow steadily through the stack) and the rest
    (removed). Returns the frame positions (N, count, 2), the placements, the drift
    transforms and the chosen drift ratio.
    """
    centre = 0.5 * (np.asarray(shape, np.float64) - 1)
    placement = remove_placement(observed, valid, initial, weights, centre, model)
    radius = 0.25 * float(np.mean(shape))
    count = observed.shape[1]
    drift_matrices = np.empty_like(placement)
    if model == "affine":
        # polar decomposition L = R(angle) S: rotation, stretch (S, symmetric) and the
        # translation have drifts and noise of their own sizes, so each is split apart
        angles, stretches, moves = [], [], []
        for matrix in placement:
            linear = matrix[:2, :2] @ rigid.FLIP[:2, :2] if rigid.is_mirrored(matrix) \
                else matrix[:2, :2]
            u, singular, vt = np.linalg.svd(linear)
            rotation = u @ vt
            stretch = vt.T @ np.diag(singular) @ vt
            angles.append(np.arctan2(rotation[1, 0], rotation[0, 0]))
            stretches.append([stretch[0, 0] - 1, stretch[1, 1] - 1, stretch[0, 1]])
            moves.append(rigid.apply(matrix, centre[None])[0] - centre)
        angle_drift, angle_ratio = smooth_drift(np.unwrap(np.array(angles))[:, None] * radius)
        stretch_drift, stretch_ratio = smooth_drift(np.array(stretches) * radius)
        move_drift, move_ratio = smooth_drift(np.array(moves))
        ratio = {"rotation": angle_ratio, "stretch": stretch_ratio, "translation": move_ratio}
        for i in range(count):
            cos, sin = np.cos(angle_drift[i, 0] / radius), np.sin(angle_drift[i, 0] / radius)
            sxx, syy, sxy = stretch_drift[i] / radius
            linear = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1 + sxx, sxy],
                                                                     [sxy, 1 + syy]])
            drift_matrices[i] = np.eye(3)
            drift_matrices[i][:2, :2] = linear
            drift_matrices[i][:2, 2] = centre - linear @ centre + move_drift[i]
    else:
        parameters = placement_parameters(placement, centre)
        angles = np.unwrap(parameters[:, 0])
        drift, pooled = smooth_drift(np.column_stack([angles * radius, parameters[:, 1:]]))
        ratio = {"rotation and translation": pooled}
        for i in range(count):
            drift_matrices[i] = rigid.rotation_about(drift[i, 0] / radius, centre, drift[i, 1:])
    frame = np.full(observed.shape, np.nan)
    for i in range(count):
        to_frame = drift_matrices[i] @ np.linalg.inv(placement[i])
        rows = valid[:, i]
        frame[rows, i] = rigid.apply(to_frame, observed[rows, i])
    return {"frame": frame, "placement": placement, "drift": drift_matrices,
            "drift_ratio": ratio}
