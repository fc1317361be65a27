"""The affine start of ``medhpc lddmm``: a rigid, then affine, alignment in world space.

:func:`register_affine` finds the 4x4 matrix ``T`` (:attr:`AffineResult.matrix`) taking
fixed world RAS mm points to moving world RAS mm points, so that the moving image
resampled onto the fixed grid is ``M_F(y) = M(A_M^-1 T A_F y)`` (``y`` a fixed voxel
``(x, y, z, 1)``, ``A_F`` and ``A_M`` the affines). It is pure compute: the caller runs it
on one rank and broadcasts the matrix.

1. Checks: finite images, not constant (inside their masks), overlapping in world space;
   one-line :class:`InputError` otherwise.
2. Levels at about 8, 4 and 2 mm: each image is averaged over blocks of whole voxels,
   ``round(level / spacing)`` (at least 1) per axis, so no level is finer than the image;
   levels that come out equal are merged. All but the finest are smoothed by ``[1, 2, 1] /
   4`` along each axis. The moving level keeps its value and world gradient per voxel.
3. Samples: the fixed level's voxel centres inside ``fixed_mask``, at most ``samples`` of
   them (a random subset drawn with a fixed seed beyond that). A sample counts while it
   maps inside the moving grid and its interpolation (value and gradient) reads no voxel
   where ``moving_mask == 0``. Levels of a masked image average and smooth inside the
   mask only.
4. Transform: ``q = A (p - c) + c + t`` with ``c`` the centre of the fixed image (the
   centroid of ``fixed_mask`` with a mask). Rigid: ``A = exp([w]x) A0``, a rotation vector
   composed on the left at every step (about ``c + t``, where the fixed centre lands), and
   ``t``; affine: the 9 entries of ``A`` and ``t``. The optimiser sees every parameter in
   mm: a rotation angle or a matrix entry times ``rho``, the samples' RMS distance from
   ``c``.
5. Start: the identity (the headers' own placement), unless the translation that aligns
   the intensity-weighted centres of mass scores better on the coarsest level while
   keeping at least half the identity's overlap.
6. Levenberg-Marquardt on every level, coarse to fine: the rigid stage over all levels,
   then (``mode="affine"``) the affine stage over all levels. A step solves ``(H + lambda
   diag H) d = -g`` in the scaled parameters, is capped at twice the level spacing, is kept
   when it lowers the cost (lambda / 4) and refused otherwise (lambda x 8). A level ends when
   a step is shorter than ``tolerance`` level voxels, after ``iterations`` evaluations, or
   when no step lowers the cost.

Metrics (``g`` the cost's gradient, ``H`` its Gauss-Newton matrix, both from one pass over
the samples: the moving value, its world gradient, and the Jacobian ``(g_x h, g_y h, g_z
h, g)`` of the point in the 12 affine parameters):

- ``ncc``: global normalised cross-correlation; cost ``1 - NCC = |m~ - f~|^2 / 2`` with
  ``f~``, ``m~`` the centred, unit-norm samples, so ``H`` is exact Gauss-Newton. Blind to
  intensity scale and offset, and tolerant of a smooth bias field.
- ``mi``: Mattes mutual information, ``bins`` bins, fixed values binned, moving values
  spread by a cubic B-spline Parzen window (between their 0.1st and 99.9th percentiles);
  cost ``-MI``, exact gradient. ``H`` keeps the part of the exact Hessian that comes from
  the window's second derivative, ``sum_i max(-b_i, 0) J_i J_i^T`` with ``b_i = u'^2 sum_k
  B''(k - u_i) log p(i, k) / p_M(k)``, clipped to its convex part; the histogram terms
  ``dp dp^T / p - dp_M dp_M^T / p_M`` (indefinite together with it) and the image Hessian
  are left out. Two passes: the histogram, then the sums.
- ``ssd``: mean squared difference (same intensity scale only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medhpc.errors import InputError
from medhpc.io.geometry import ImageGeometry
from medhpc.lddmm import kernels_affine as kernels
from medhpc.lddmm.parzen import mutual_information

MODES = ("rigid", "affine")
METRICS = ("ncc", "mi", "ssd")
LEVELS_MM = (8.0, 4.0, 2.0)
SAMPLES = 32768
BINS = 32
ITERATIONS = 40
TOLERANCE = 0.005
MIN_SAMPLES = 64
START_IDENTITY, START_CENTRES = "identity", "centres of mass"


@dataclass(frozen=True)
class AffineResult:
    """What :func:`register_affine` found.

    Attributes
    ----------
    matrix : ndarray (4, 4)
        Fixed world RAS mm to moving world RAS mm.
    mode, metric : str
    metric_before, metric_after : float
        The similarity (NCC, MI in nats, or mean squared difference) on the finest level's
        samples, for the headers alone (identity) and for ``matrix``.
    start : str
        ``"identity"`` or ``"centres of mass"``.
    stages : tuple of str
        ``("rigid",)`` or ``("rigid", "affine")``.
    iterations : dict
        Evaluations per level (coarsest first) for every stage.
    levels_mm : tuple
        Voxel size ``(x, y, z)`` of the fixed image at every level.
    samples : tuple of int
        Fixed samples per level.
    """

    matrix: np.ndarray
    mode: str
    metric: str
    metric_before: float
    metric_after: float
    start: str
    stages: tuple
    iterations: dict
    levels_mm: tuple
    samples: tuple

    def record(self) -> dict:
        """A JSON-ready summary (for ``log.json``)."""
        return {"matrix": np.asarray(self.matrix).tolist(), "mode": self.mode,
                "metric": self.metric, "metric_before": float(self.metric_before),
                "metric_after": float(self.metric_after), "start": self.start,
                "stages": list(self.stages),
                "iterations": {k: list(v) for k, v in self.iterations.items()},
                "levels_mm": [list(v) for v in self.levels_mm], "samples": list(self.samples)}


# -- matrices -------------------------------------------------------------------------------
def voxel_matrix(matrix, fixed_geometry: ImageGeometry, moving_geometry: ImageGeometry):
    """``A_M^-1 T A_F``: fixed voxel ``(x, y, z, 1)`` to moving voxel ``(x, y, z, 1)``."""
    return np.linalg.inv(moving_geometry.affine) @ np.asarray(matrix) @ fixed_geometry.affine


def resample_to_fixed(moving, moving_geometry: ImageGeometry, fixed_geometry: ImageGeometry,
                      matrix, interpolation: str = "linear") -> np.ndarray:
    """``M_F(y) = M(A_M^-1 T A_F y)`` on the fixed grid (zero outside the moving image)."""
    from medhpc.lddmm.transform import sample

    to_moving = voxel_matrix(matrix, fixed_geometry, moving_geometry)
    xyz = np.indices(fixed_geometry.shape, dtype=np.float64)[::-1].reshape(3, -1)
    points = to_moving[:3, :3] @ xyz + to_moving[:3, 3:]
    return sample(moving, points[::-1].reshape((3,) + fixed_geometry.shape), interpolation)


def grid_corners_mm(geometry: ImageGeometry) -> np.ndarray:
    """World positions ``(8, 3)`` of the centres of a grid's corner voxels."""
    nz, ny, nx = geometry.shape
    corners = np.array([[x, y, z] for z in (0, nz - 1) for y in (0, ny - 1) for x in (0, nx - 1)],
                       np.float64)
    return geometry.voxel_to_world(corners)


def corner_error_mm(matrix, reference, geometry: ImageGeometry) -> float:
    """The largest distance between where ``matrix`` and ``reference`` put the corners of
    ``geometry``'s grid."""
    corners = np.c_[grid_corners_mm(geometry), np.ones(8)]
    moved = corners @ (np.asarray(matrix) - np.asarray(reference))[:3].T
    return float(np.max(np.linalg.norm(moved, axis=1)))


def _rotation(vector) -> np.ndarray:
    """Rodrigues: the rotation by ``|vector|`` rad about ``vector``."""
    angle = float(np.linalg.norm(vector))
    if angle < 1e-15:
        return np.eye(3)
    k = np.asarray(vector, np.float64) / angle
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * cross @ cross


_GENERATORS = [np.array(m, np.float64) for m in (
    [[0, 0, 0], [0, 0, -1], [0, 1, 0]], [[0, 0, 1], [0, 0, 0], [-1, 0, 0]],
    [[0, -1, 0], [1, 0, 0], [0, 0, 0]])]


class _Rigid:
    """Rotation vector (composed on the left) and translation, 6 parameters in mm."""

    stage = "rigid"

    def __init__(self, radius_mm: float):
        self.radius = radius_mm

    def jacobian(self, matrix: np.ndarray) -> np.ndarray:
        d = np.zeros((12, 6))
        for k, generator in enumerate(_GENERATORS):
            d[:9, k] = (generator @ matrix).ravel() / self.radius
        d[9:, 3:] = np.eye(3)
        return d

    def step(self, matrix, translation, step):
        return _rotation(step[:3] / self.radius) @ matrix, translation + step[3:]


class _Affine:
    """The 9 matrix entries and the translation, 12 parameters in mm."""

    stage = "affine"

    def __init__(self, radius_mm: float):
        self.radius = radius_mm

    def jacobian(self, matrix: np.ndarray) -> np.ndarray:
        return np.diag(np.r_[np.full(9, 1.0 / self.radius), np.ones(3)])

    def step(self, matrix, translation, step):
        return matrix + step[:9].reshape(3, 3) / self.radius, translation + step[9:]


# -- levels ---------------------------------------------------------------------------------
@dataclass
class _Image:
    """One image at one level: values, optional mask, geometry."""

    values: np.ndarray
    mask: np.ndarray | None
    geometry: ImageGeometry


def _factors(geometry: ImageGeometry, level_mm: float) -> tuple:
    """Whole block sizes ``(x, y, z)`` that bring the grid nearest ``level_mm``, at least 1."""
    return tuple(max(1, int(round(level_mm / s))) for s in geometry.spacing_mm)


def _smoothed(values: np.ndarray) -> np.ndarray:
    first, second = np.empty_like(values), np.empty_like(values)
    kernels.smooth_axis(values, 0, first)
    kernels.smooth_axis(first, 1, second)
    kernels.smooth_axis(second, 2, first)
    return first


def _block_means(values: np.ndarray, factors_xyz: tuple) -> np.ndarray:
    fx, fy, fz = factors_xyz
    if factors_xyz == (1, 1, 1):
        return values
    nz, ny, nx = values.shape
    out = np.empty((nz // fz, ny // fy, nx // fx), np.float32)
    kernels.block_mean(values, fz, fy, fx, out)
    return out


def _downsampled(image: _Image, factors_xyz: tuple, smooth: bool) -> _Image:
    """Block means by ``factors_xyz`` (the trailing partial blocks dropped), smoothed if asked.

    With a mask, the means and the smoothing are normalised by the mask's own (values
    outside it never leak in), and a level voxel is in the mask when half its block is.
    """
    geometry = image.geometry
    if factors_xyz != (1, 1, 1):
        fx, fy, fz = factors_xyz
        blocks = np.eye(4)
        blocks[:3, :3] = np.diag([fx, fy, fz])
        blocks[:3, 3] = [(fx - 1) / 2, (fy - 1) / 2, (fz - 1) / 2]
        nz, ny, nx = geometry.shape
        geometry = ImageGeometry((nz // fz, ny // fy, nx // fx), geometry.affine @ blocks)
    if image.mask is None:
        values = _block_means(image.values, factors_xyz)
        return _Image(_smoothed(values) if smooth else values, None, geometry)
    weights = image.mask.astype(np.float32)
    share = _block_means(weights, factors_xyz)
    weighted = _block_means(np.where(image.mask, image.values, 0).astype(np.float32),
                            factors_xyz)
    spread = share
    if smooth:
        weighted, spread = _smoothed(weighted), _smoothed(share)
    values = np.divide(weighted, spread, out=np.zeros_like(weighted), where=spread > 0)
    return _Image(values, share >= 0.5, geometry)


def _eroded(mask: np.ndarray) -> np.ndarray:
    """``mask`` less its voxels with a face neighbour outside it (the grid's edge is inside)."""
    out = mask.copy()
    for axis in range(3):
        low = [slice(None)] * 3
        high = [slice(None)] * 3
        low[axis], high[axis] = slice(1, None), slice(None, -1)
        out[tuple(low)] &= mask[tuple(high)]
        out[tuple(high)] &= mask[tuple(low)]
    return out


@dataclass
class _Evaluation:
    """Cost (lower is better), its gradient and Gauss-Newton matrix in the 12 parameters,
    the similarity as reported and the samples that counted."""

    cost: float
    similarity: float
    gradient: np.ndarray = field(repr=False)
    hessian: np.ndarray = field(repr=False)
    count: int


def _unusable(count: int) -> _Evaluation:
    return _Evaluation(np.inf, np.nan, np.zeros(12), np.zeros((12, 12)), count)


class _Level:
    """Samples of the fixed image and the moving value-gradient volume at one level."""

    def __init__(self, fixed: _Image, moving: _Image, centre: np.ndarray, metric: str,
                 samples: int, bins: int, seed: int):
        self.metric = metric
        self.spacing_mm = fixed.geometry.spacing_mm
        self.centre = centre
        candidates = (np.flatnonzero(fixed.mask) if fixed.mask is not None
                      else np.arange(fixed.values.size))
        if candidates.size > samples:
            rng = np.random.default_rng(seed)
            candidates = np.sort(rng.choice(candidates, size=samples, replace=False))
        z, y, x = np.unravel_index(candidates, fixed.values.shape)
        world = fixed.geometry.voxel_to_world(np.stack([x, y, z], axis=1))
        self.offsets = np.ascontiguousarray(world - centre)
        self.fixed_values = fixed.values.reshape(-1)[candidates].astype(np.float64)
        self.positions_mm = world
        self.moving_geometry = moving.geometry
        self.to_voxel = np.linalg.inv(moving.geometry.affine)
        self.volume = np.empty(moving.values.shape + (4,), np.float32)
        kernels.value_gradient(moving.values, np.ascontiguousarray(self.to_voxel[:3, :3].T),
                               self.volume)
        self.use_mask = moving.mask is not None
        # a sample counts when its 8 neighbours and theirs (the gradient's) are in the mask
        self.mask = (_eroded(moving.mask).astype(np.uint8) if self.use_mask
                     else np.zeros((1, 1, 1), np.uint8))
        n = len(candidates)
        self.values = np.empty(n)
        self.gradients = np.empty((n, 3))
        self.valid = np.empty(n, np.uint8)
        if metric == "mi":
            self.bins = bins
            inside = moving.values[moving.mask] if self.use_mask else moving.values
            self.low, self.high = (float(v) for v in np.percentile(inside, [0.1, 99.9]))
            if not self.high > self.low:
                self.low, self.high = float(inside.min()), float(inside.max())
            f_low, f_high = np.percentile(self.fixed_values, [0.1, 99.9])
            if not f_high > f_low:
                f_low, f_high = self.fixed_values.min(), self.fixed_values.max()
            scaled = (self.fixed_values - f_low) / max(f_high - f_low, 1e-30) * bins
            self.fixed_bins = np.clip(np.floor(scaled), 0, bins - 1).astype(np.int64)
            self.joint = np.empty((bins, bins))
            self.first, self.second = np.empty(12), np.empty((12, 12))
        else:
            self.scalars = np.empty(6)
            self.first, self.second = np.empty((3, 12)), np.empty((12, 12))

    @property
    def size(self) -> int:
        return len(self.fixed_values)

    def evaluate(self, matrix: np.ndarray, translation: np.ndarray) -> _Evaluation:
        """The metric with ``q = matrix (p - c) + c + translation``."""
        to_moving = np.eye(4)
        to_moving[:3, :3] = matrix
        to_moving[:3, 3] = self.centre + translation
        point_map = np.ascontiguousarray((self.to_voxel @ to_moving)[:3])
        kernels.sample_moving(self.volume, self.mask, self.use_mask, point_map, self.offsets,
                              self.values, self.gradients, self.valid)
        if self.metric == "mi":
            return self._mutual_information()
        kernels.moment_sums(self.fixed_values, self.values, self.gradients, self.valid,
                            self.offsets, self.scalars, self.first, self.second)
        return self._moments()

    def _moments(self) -> _Evaluation:
        n, sum_f, sum_ff, sum_m, sum_mm, sum_fm = self.scalars
        count = int(n)
        if count < MIN_SAMPLES:
            return _unusable(count)
        sum_j, sum_fj, sum_mj = self.first
        if self.metric == "ssd":
            mean_square = (sum_mm - 2.0 * sum_fm + sum_ff) / n
            return _Evaluation(0.5 * mean_square, mean_square, (sum_mj - sum_fj) / n,
                               self.second / n, count)
        mean_f, mean_m = sum_f / n, sum_m / n
        var_f, var_m = sum_ff - n * mean_f ** 2, sum_mm - n * mean_m ** 2
        if var_f <= 1e-12 * max(sum_ff, 1e-300) or var_m <= 1e-12 * max(sum_mm, 1e-300):
            return _unusable(count)
        sd_f, sd_m = np.sqrt(var_f), np.sqrt(var_m)
        ncc = (sum_fm - n * mean_f * mean_m) / (sd_f * sd_m)
        centred_m = (sum_mj - mean_m * sum_j) / sd_m          # Jc^T m~
        centred_f = (sum_fj - mean_f * sum_j) / sd_f          # Jc^T f~
        gradient = (ncc * centred_m - centred_f) / sd_m
        hessian = (self.second - np.outer(sum_j, sum_j) / n
                   - np.outer(centred_m, centred_m)) / var_m
        return _Evaluation(1.0 - ncc, float(ncc), gradient, hessian, count)

    def _mutual_information(self) -> _Evaluation:
        count = kernels.joint_histogram(self.fixed_bins, self.values, self.valid, self.low,
                                        self.high, self.joint)
        if count < MIN_SAMPLES:
            return _unusable(count)
        # log p / (p_F p_M): its -log p_F(i) part is constant along a row, so the window's
        # derivatives (summing to zero along a row) leave it out of the sums
        information, log_ratio = mutual_information(self.joint)
        kernels.information_sums(self.fixed_bins, self.values, self.gradients, self.valid,
                                 self.offsets, self.low, self.high, log_ratio, self.first,
                                 self.second)
        # d(-MI)/da = -sum dp log(p / p_M), dp from the window's derivative: +a J / n
        return _Evaluation(-information, information, self.first / count,
                           self.second / count, count)


# -- the registration -----------------------------------------------------------------------
def _checked(name: str, image, geometry: ImageGeometry, mask) -> _Image:
    image = np.asarray(image)
    if image.shape != tuple(geometry.shape):
        raise InputError(f"{name} image: shape {image.shape} differs from its geometry's "
                         f"{tuple(geometry.shape)}; expected the (z, y, x) array of that grid")
    values = np.ascontiguousarray(image, np.float32)
    if not np.all(np.isfinite(values)):
        raise InputError(f"{name} image: NaN or infinite values; expected finite intensities")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != values.shape:
            raise InputError(f"{name} mask: shape {mask.shape} differs from the image's "
                             f"{values.shape}; expected a mask on the image's grid")
        mask = mask != 0
        if not mask.any():
            raise InputError(f"{name} mask: no voxel is set; expected a mask of the region "
                             f"to register")
    inside = values[mask] if mask is not None else values
    low, high = float(inside.min()), float(inside.max())
    if not high > low:
        where = " inside its mask" if mask is not None else ""
        raise InputError(f"{name} image: constant ({low:g} everywhere{where}), nothing to "
                         f"register; expected an image with structure")
    return _Image(values, mask, geometry)


def _levels(fixed: _Image, moving: _Image, levels_mm) -> list[tuple]:
    """Block factors ``(fixed, moving)`` per level, coarsest first, repeats merged."""
    chosen = []
    for level_mm in levels_mm:
        pair = (_factors(fixed.geometry, level_mm), _factors(moving.geometry, level_mm))
        small = min(n // f for n, f in zip(fixed.geometry.shape[::-1], pair[0]))
        if small < 4 or min(n // f for n, f in zip(moving.geometry.shape[::-1], pair[1])) < 4:
            continue
        if not chosen or chosen[-1][0] != pair[0]:
            chosen.append(pair)
    if not chosen:
        chosen.append(((1, 1, 1), (1, 1, 1)))
    return chosen


def _centre_of_mass(image: _Image) -> np.ndarray:
    """Intensity-weighted centre (world mm) of ``image - its minimum`` inside its mask."""
    inside = image.values[image.mask] if image.mask is not None else image.values
    weights = image.values.astype(np.float64) - float(inside.min())
    if image.mask is not None:
        weights = weights * image.mask
    total = weights.sum()
    if not total > 0:
        return image.geometry.voxel_to_world((np.array(image.geometry.shape[::-1]) - 1) / 2)
    z, y, x = (np.arange(n, dtype=np.float64) for n in weights.shape)
    index = np.array([np.sum(weights.sum(axis=(0, 1)) * x), np.sum(weights.sum(axis=(0, 2)) * y),
                      np.sum(weights.sum(axis=(1, 2)) * z)]) / total
    return image.geometry.voxel_to_world(index)


def _optimise(level: _Level, model, matrix, translation, iterations: int, tolerance: float):
    """Levenberg-Marquardt on one level; returns the matrix, translation, evaluation, count."""
    current = level.evaluate(matrix, translation)
    evaluations = 1
    damping = 1e-3
    cap = 2.0 * max(level.spacing_mm)
    shortest = tolerance * min(level.spacing_mm)
    while evaluations < iterations and np.isfinite(current.cost):
        d = model.jacobian(matrix)
        gradient = d.T @ current.gradient
        hessian = d.T @ current.hessian @ d
        hessian = 0.5 * (hessian + hessian.T)
        diagonal = np.maximum(np.diag(hessian), 1e-12 * max(np.trace(hessian), 1e-300))
        try:
            step = -np.linalg.solve(hessian + damping * np.diag(diagonal), gradient)
        except np.linalg.LinAlgError:
            step = -gradient / diagonal
        length = float(np.linalg.norm(step))
        if length > cap:
            step *= cap / length
            length = cap
        trial_matrix, trial_translation = model.step(matrix, translation, step)
        trial = level.evaluate(trial_matrix, trial_translation)
        evaluations += 1
        if trial.cost < current.cost:
            matrix, translation, current = trial_matrix, trial_translation, trial
            damping = max(damping / 4.0, 1e-7)
        else:
            damping *= 8.0
            if damping > 1e6:
                break
        if length < shortest:
            break
    return matrix, translation, current, evaluations


def _world_matrix(matrix, translation, centre) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = centre + translation - matrix @ centre
    return out


def register_affine(fixed, fixed_geometry: ImageGeometry, moving, moving_geometry: ImageGeometry,
                    mode: str = "affine", metric: str = "ncc", fixed_mask=None, moving_mask=None,
                    levels=None, progress=None, *, samples: int = SAMPLES, bins: int = BINS,
                    iterations: int = ITERATIONS, tolerance: float = TOLERANCE,
                    seed: int = 0) -> AffineResult:
    """Align ``moving`` to ``fixed`` rigidly, then affinely, in world space (see module notes).

    Parameters
    ----------
    fixed, moving : array_like (z, y, x)
        The images on their own grids.
    fixed_geometry, moving_geometry : ImageGeometry
    mode : {"affine", "rigid"}
        ``rigid``: 6 degrees of freedom; ``affine``: rigid first, then 12.
    metric : {"ncc", "mi", "ssd"}
    fixed_mask, moving_mask : array_like, optional
        Non-zero where the image counts; fixed samples are drawn inside ``fixed_mask``,
        samples that land where ``moving_mask`` is zero are left out.
    levels : sequence of float, optional
        Level spacings in mm, coarsest first [8, 4, 2]; none finer than each image.
    progress : callable, optional
        Called with one line per level and stage.
    samples : int
        Most fixed samples per level.
    bins : int
        Histogram bins (``mi``).
    iterations : int
        Most metric evaluations per level and stage.
    tolerance : float
        A level ends on a step shorter than this many level voxels (at ``rho``).
    seed : int
        Seed of the sample subsets (the result is deterministic for a given seed).

    Returns
    -------
    AffineResult

    Raises
    ------
    InputError
        Unknown mode or metric, non-finite or constant images, empty masks, images that do
        not overlap in world space.
    """
    if mode not in MODES:
        raise InputError(f"affine mode {mode!r}: expected one of {', '.join(MODES)}")
    if metric not in METRICS:
        raise InputError(f"affine metric {metric!r}: expected one of {', '.join(METRICS)}")
    levels_mm = tuple(float(v) for v in (LEVELS_MM if levels is None else levels))
    if not levels_mm or min(levels_mm) <= 0:
        raise InputError(f"affine levels {levels_mm}: expected positive spacings in mm, "
                         f"coarsest first")
    fixed_image = _checked("fixed", fixed, fixed_geometry, fixed_mask)
    moving_image = _checked("moving", moving, moving_geometry, moving_mask)
    plan = _levels(fixed_image, moving_image, levels_mm)

    pyramid = []
    for index, (fixed_factors, moving_factors) in enumerate(plan):
        smooth = index < len(plan) - 1
        pyramid.append((_downsampled(fixed_image, fixed_factors, smooth),
                        _downsampled(moving_image, moving_factors, smooth)))
    if fixed_image.mask is not None:
        z, y, x = np.nonzero(fixed_image.mask)
        centre = fixed_geometry.voxel_to_world(np.stack([x, y, z], 1).mean(axis=0))
    else:
        centre = fixed_geometry.voxel_to_world((np.array(fixed_geometry.shape[::-1]) - 1) / 2)
    built = [_Level(f, m, centre, metric, samples, bins, seed + i)
             for i, (f, m) in enumerate(pyramid)]
    radius = float(np.sqrt(np.mean(np.sum(built[-1].offsets ** 2, axis=1))))
    radius = max(radius, max(fixed_geometry.spacing_mm))

    # the start: identity, or the centres of mass aligned
    coarsest = built[0]
    identity = np.eye(3)
    at_identity = coarsest.evaluate(identity, np.zeros(3))
    if at_identity.count == 0:
        raise InputError("moving image: does not overlap the fixed image in world space (no "
                         "fixed voxel maps inside it); expected images of the same anatomy")
    shift = _centre_of_mass(pyramid[0][1]) - _centre_of_mass(pyramid[0][0])
    at_centres = coarsest.evaluate(identity, shift)
    start = START_IDENTITY
    translation = np.zeros(3)
    if at_centres.cost < at_identity.cost and at_centres.count >= 0.5 * at_identity.count:
        start, translation = START_CENTRES, shift
    if not np.isfinite(min(at_identity.cost, at_centres.cost)):
        raise InputError(f"moving image: overlaps the fixed image on only "
                         f"{max(at_identity.count, at_centres.count)} of {coarsest.size} samples "
                         f"at {_mm(coarsest.spacing_mm)}; expected images of the same anatomy")
    if progress is not None:
        progress(f"affine start: {start} ({metric} {at_identity.similarity:.4g} at the "
                 f"identity, {at_centres.similarity:.4g} with the centres of mass aligned)")

    matrix = identity
    stages = ("rigid",) if mode == "rigid" else ("rigid", "affine")
    counts = {}
    for stage in stages:
        model = _Rigid(radius) if stage == "rigid" else _Affine(radius)
        counts[stage] = []
        for level in built:
            before = level.evaluate(matrix, translation).similarity if progress else None
            matrix, translation, reached, used = _optimise(level, model, matrix, translation,
                                                           iterations, tolerance)
            counts[stage].append(used)
            if progress is not None:
                progress(f"affine start, {stage} stage at {_mm(level.spacing_mm)} "
                         f"({level.size} samples): {used} evaluations, {metric} {before:.5g} "
                         f"-> {reached.similarity:.5g}")
    finest = built[-1]
    result = _world_matrix(matrix, translation, centre)
    return AffineResult(
        matrix=result, mode=mode, metric=metric,
        metric_before=finest.evaluate(identity, np.zeros(3)).similarity,
        metric_after=finest.evaluate(matrix, translation).similarity, start=start,
        stages=stages, iterations={k: tuple(v) for k, v in counts.items()},
        levels_mm=tuple(level.spacing_mm for level in built),
        samples=tuple(level.size for level in built))


def _mm(spacing) -> str:
    values = sorted({round(float(v), 2) for v in spacing})
    return f"{values[0]:g} mm" if len(values) == 1 else "x".join(f"{v:g}" for v in spacing) + " mm"
