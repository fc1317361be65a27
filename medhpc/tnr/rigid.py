"""Rigid pre-alignment of neighbouring sections and its chaining from the centre section.

Transforms are 3 x 3 matrices acting on homogeneous pixel coordinates
``(y, x, 1)``. ``estimate_rigid(fixed, moving)`` returns ``T`` with
``fixed(p) ~ moving(T p)``, for any rotation and for sections laid on the slide
face down (mirrored):

1. coarse search on copies at most :data:`COARSE_SIDE` px wide: rotations about
   the image centre every :data:`COARSE_STEP_DEG` degrees over the whole circle
   (or within ``max_angle_deg``), both faces; the translation of each from the
   peak of the phase correlation, scored by the peak's height;
2. the best few candidates refined on copies at most :data:`REFINE_SIDE` px wide
   (rotations every degree around them, then Gauss-Newton on the sum of squared
   differences of the two normalised images over angle and translation, coarse
   to fine);
3. the candidate with the highest normalised cross-correlation of the overlap wins.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
from scipy import ndimage

from medhpc.tnr.preprocess import downsample

COARSE_SIDE = 64
REFINE_SIDE = 256
COARSE_STEP_DEG = 6.0
CANDIDATES = 3
MIRROR_MARGIN = 0.05  # a mirrored fit must beat the best unmirrored one by this much NCC
GAUSS_NEWTON_ITERATIONS = 12
FLIP = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]])  # x -> -x


def rotation_about(angle_rad: float, centre, translation=(0.0, 0.0)) -> np.ndarray:
    """``p -> R (p - centre) + centre + translation`` as a 3 x 3 matrix on (y, x, 1)."""
    cos, sin = np.cos(angle_rad), np.sin(angle_rad)
    rotation = np.array([[cos, -sin], [sin, cos]])
    matrix = np.eye(3)
    matrix[:2, :2] = rotation
    matrix[:2, 2] = np.asarray(centre) - rotation @ np.asarray(centre) + np.asarray(translation)
    return matrix


def mirror_about(centre) -> np.ndarray:
    """The mirror image ``x -> 2 c_x - x`` (a section laid face down) as a 3 x 3 matrix."""
    matrix = FLIP.copy()
    matrix[1, 2] = 2.0 * float(np.asarray(centre)[1])
    return matrix


def apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Transform (N, 2) points (y, x)."""
    return points @ matrix[:2, :2].T + matrix[:2, 2]


def resample(image: np.ndarray, matrix: np.ndarray, order: int = 1) -> np.ndarray:
    """``out(p) = image(matrix p)`` (zero outside)."""
    return ndimage.affine_transform(image, matrix[:2, :2], offset=matrix[:2, 2],
                                    output_shape=image.shape, order=order, mode="constant",
                                    cval=0.0).astype(np.float32)


def is_mirrored(matrix: np.ndarray) -> bool:
    """True if the transform turns the section over (negative determinant)."""
    return bool(np.linalg.det(matrix[:2, :2]) < 0)


def rotation_angle(matrix: np.ndarray) -> float:
    """The rotation angle (radians) of a rigid 3 x 3 matrix (after undoing a mirror)."""
    linear = matrix[:2, :2] @ FLIP[:2, :2] if is_mirrored(matrix) else matrix[:2, :2]
    return float(np.arctan2(linear[1, 0], linear[0, 0]))


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
        if axis == 0:
            before, after = correlation[(index - 1) % shape[0], ix], correlation[(index + 1) % shape[0], ix]
        else:
            before, after = correlation[iy, (index - 1) % shape[1]], correlation[iy, (index + 1) % shape[1]]
        centre = correlation[iy, ix]
        curvature = before - 2 * centre + after
        fraction = 0.5 * (before - after) / curvature if curvature < 0 else 0.0
        value = index + float(np.clip(fraction, -0.5, 0.5))
        shift.append(value - axis_size if value > axis_size / 2 else value)
    return float(correlation[iy, ix]), np.array(shift)


class _Level:
    """Both images at one coarse level and the change of pixel units to the working level."""

    def __init__(self, fixed: np.ndarray, moving: np.ndarray, side: int):
        self.factor = max(1, int(np.ceil(max(fixed.shape) / side)))
        self.fixed = downsample(fixed, self.factor)
        self.moving = downsample(moving, self.factor)
        self.centre = 0.5 * (np.array(self.fixed.shape) - 1)
        half = (self.factor - 1) / 2.0
        scale = np.diag([self.factor, self.factor, 1.0])
        self.to_working = _translation([half, half]) @ scale
        self.from_working = np.linalg.inv(self.to_working)

    def matrix(self, angle_deg: float, mirrored: bool, shift) -> np.ndarray:
        """Coarse-pixel transform: shift, mirror (optional), rotate about the centre."""
        turn = rotation_about(np.deg2rad(angle_deg), self.centre)
        if mirrored:
            turn = turn @ mirror_about(self.centre)
        return turn @ _translation(shift)

    def working(self, coarse_matrix: np.ndarray) -> np.ndarray:
        return self.to_working @ coarse_matrix @ self.from_working

    def coarse(self, working_matrix: np.ndarray) -> np.ndarray:
        return self.from_working @ working_matrix @ self.to_working


def _search(level: _Level, angles, mirrored: bool):
    """(height, angle, matrix) of the phase-correlation peak at each angle."""
    shape = tuple(2 * n for n in level.fixed.shape)
    fixed_spectrum = scipy.fft.rfft2(level.fixed, s=shape, workers=1)
    results = []
    for angle in angles:
        turned = resample(level.moving, level.matrix(angle, mirrored, (0.0, 0.0)))
        height, shift = _phase_correlation(fixed_spectrum, turned, shape)
        results.append((height, float(angle), level.matrix(angle, mirrored, shift)))
    return results


def overlap_ncc(fixed: np.ndarray, moving: np.ndarray, matrix: np.ndarray) -> float:
    """Pearson correlation of ``fixed`` and ``moving(matrix p)`` where either has tissue."""
    warped = resample(moving, matrix)
    where = (fixed != 0) | (warped != 0)
    if np.count_nonzero(where) < 16:
        return -1.0
    a, b = fixed[where] - fixed[where].mean(), warped[where] - warped[where].mean()
    norm = np.sqrt(np.sum(a * a) * np.sum(b * b))
    return float(np.sum(a * b) / norm) if norm > 0 else -1.0


def refine_rigid(fixed: np.ndarray, moving: np.ndarray, matrix: np.ndarray,
                 iterations: int = GAUSS_NEWTON_ITERATIONS) -> np.ndarray:
    """Gauss-Newton on ``sum (moving(T p) - fixed(p))^2`` over T's angle and translation.

    ``matrix`` is the starting transform (a mirror in it is kept). Points where
    either image has tissue take part; a step that does not lower the cost is halved.
    """
    ny, nx = fixed.shape
    centre = 0.5 * (np.array(fixed.shape, float) - 1)
    near_tissue = ndimage.binary_dilation(fixed != 0, iterations=2)
    if np.count_nonzero(near_tissue) < 16:
        near_tissue = np.ones(fixed.shape, bool)
    points = np.argwhere(near_tissue).astype(np.float64)
    target = fixed[near_tissue].astype(np.float64)
    grad_y, grad_x = np.gradient(moving.astype(np.float64))
    base = matrix.copy()

    def evaluate(parameters):
        current = _increment(parameters, centre) @ base
        where = apply(current, points)
        inside = ((where[:, 0] >= 0) & (where[:, 0] <= ny - 1)
                  & (where[:, 1] >= 0) & (where[:, 1] <= nx - 1))
        values = ndimage.map_coordinates(moving, where.T, order=1, mode="constant", cval=0.0)
        use = inside & ((values != 0) | (target != 0))
        residual = (values - target)[use]
        return current, where, use, residual, float(np.mean(residual ** 2)) if residual.size else np.inf

    parameters = np.zeros(3)
    current, where, use, residual, cost = evaluate(parameters)
    for _ in range(iterations):
        if residual.size < 16:
            break
        at = where[use].T
        gy = ndimage.map_coordinates(grad_y, at, order=1, mode="constant")
        gx = ndimage.map_coordinates(grad_x, at, order=1, mode="constant")
        # d(where)/d(angle) of the rotation about the centre: a quarter turn of the arm
        arm = where[use] - centre - parameters[1:]
        jacobian = np.stack([gx * arm[:, 0] - gy * arm[:, 1], gy, gx], axis=1)
        normal = jacobian.T @ jacobian
        normal += 1e-6 * np.trace(normal) * np.eye(3)
        step = -np.linalg.solve(normal, jacobian.T @ residual)
        accepted = False
        for _ in range(5):
            trial = parameters + step
            t_current, t_where, t_use, t_residual, t_cost = evaluate(trial)
            if t_cost < cost:
                parameters, current, where, use, residual = trial, t_current, t_where, t_use, t_residual
                improvement = cost - t_cost
                cost = t_cost
                accepted = True
                break
            step *= 0.5
        if not accepted or improvement < 1e-6 * cost:
            break
    return current


def _increment(parameters, centre) -> np.ndarray:
    """Rotation by ``parameters[0]`` rad about ``centre`` and a shift, applied after a map."""
    return rotation_about(parameters[0], centre, parameters[1:])


def estimate_rigid(fixed: np.ndarray, moving: np.ndarray, max_angle_deg: float = 180.0,
                   mirror: bool = True) -> np.ndarray:
    """Rigid transform ``T`` (3 x 3, on (y, x, 1)) with ``fixed(p) ~ moving(T p)``.

    Parameters
    ----------
    fixed, moving : (y, x) float arrays
        Normalised working images (tissue non-zero, glass zero).
    max_angle_deg : float
        Largest rotation searched (180 covers the whole circle).
    mirror : bool
        Also search the mirrored moving section (laid face down).
    """
    coarse = _Level(fixed, moving, COARSE_SIDE)
    limit = min(float(max_angle_deg), 180.0)
    if limit >= 180.0:
        angles = np.arange(-180.0, 180.0, COARSE_STEP_DEG)
    else:
        angles = np.arange(-limit, limit + 0.5 * COARSE_STEP_DEG, min(COARSE_STEP_DEG, 2.0))
    results = _search(coarse, angles, False)
    if mirror:
        results += [(h, a, m) for h, a, m in _search(coarse, angles, True)]
    results.sort(key=lambda r: -r[0])
    middle = _Level(fixed, moving, 2 * COARSE_SIDE)
    best, best_score = None, -np.inf
    chosen = []
    for height, angle, matrix in results:
        if any(abs(((angle - a) + 180) % 360 - 180) < 2 * COARSE_STEP_DEG
               and is_mirrored(matrix) == m for a, m in chosen):
            continue
        chosen.append((angle, is_mirrored(matrix)))
        refined = refine_rigid(middle.fixed, middle.moving, middle.coarse(coarse.working(matrix)))
        score = overlap_ncc(middle.fixed, middle.moving, refined)
        if is_mirrored(refined):
            score -= MIRROR_MARGIN
        if score > best_score:
            best, best_score = refined, score
        if len(chosen) == CANDIDATES:
            break
    fine = _Level(fixed, moving, REFINE_SIDE)
    if fine.factor == middle.factor:
        return middle.working(best)
    return fine.working(refine_rigid(fine.fixed, fine.moving, fine.coarse(middle.working(best))))


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
