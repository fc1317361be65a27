"""Symmetric registration with a stationary velocity: one pyramid level on z-slabs.

The map from the fixed grid to the moving image is ``phi = exp(v)`` with a stationary
velocity ``v`` (voxels of the level). Both images are pulled half-way, the moving one
by ``exp(v / 2)`` and the fixed one by ``exp(-v / 2)``, and compared in that middle
space by local correlation (window of ``2 radius + 1`` voxels). An update ``w`` of the
middle space moves the moving side by ``+w`` and the fixed side by ``-w``; to first order
``exp(v / 2) o exp(w) = exp(v / 2 + w)``, so ``v`` takes ``2 w``. Each iteration:

1. ``exp(+v / 2)``, ``exp(-v / 2)`` by semi-Lagrangian steps; both images warped;
2. window sums, local correlation and the force ``dm grad m - df grad f``;
3. the force smoothed by a Gaussian (``fluid`` sigma) and scaled so that its longest
   vector is ``update_voxels`` (proportionally less when the longest is below
   ``FORCE_FLOOR_PER_VOXEL * update_voxels``, a correlation gain per voxel moved that only
   noise gives; it also caps the step per unit force below where the restoring force of a
   small misalignment would overshoot, so images that already agree stay put);
4. ``v <- G_diffusion * (v + 2 w)``.

With ``metric`` ``mi`` step 2 is global mutual information instead: a Parzen joint
histogram of the two middle-space images (``bins`` cubic B-spline bins over [0, 1],
:mod:`medhpc.lddmm.parzen`) per rank over its owned planes, summed by one all-reduce, then
per voxel ``dm grad m - df grad f`` with ``dm``, ``df`` the derivatives of ``N MI`` (``N``
the histogram's total weight, so the force per voxel has the scale of the correlation's)
with respect to the voxel's two intensities. Steps 3 and 4 are the same for both metrics.

The energy of an iteration (``ENERGY``) is ``1 - mean local correlation`` for lncc and
``-MI`` in nats for mi, measured before the iteration's update. A level ends after its
iterations, or when the energy fell by less than ``tolerance`` of itself over the last
``PATIENCE`` iterations. Every operation is a kernel on owned planes after a halo
exchange (the histogram after its all-reduce), so slabs give the one-rank result; the
maps ``exp(v)`` and ``exp(-v)`` are the forward and inverse outputs.
"""

from __future__ import annotations

import math

import numpy as np

from medhpc.lddmm.flows import Flows, ImageWindow
from medhpc.lddmm.grid import LevelGrid
from medhpc.lddmm.parzen import mutual_information
from medhpc.parallel.comm import World
from medhpc.parallel.slabs import exchange_halos

PATIENCE = 5
FORCE_FLOOR_PER_VOXEL = 5e-3
CORRELATION_EPSILON = 1e-5
GAUSSIAN_TRUNCATE = 3.0
#: What the energy of each metric is (the history's ``energy`` and the progress line).
ENERGY = {"lncc": "1 - mean local correlation", "mi": "-MI, nats"}


def gaussian_taps(sigma_voxels: float) -> np.ndarray:
    """Normalised Gaussian taps out to ``GAUSSIAN_TRUNCATE`` sigma (one tap when sigma is 0)."""
    if sigma_voxels <= 0:
        return np.ones(1)
    radius = int(math.ceil(GAUSSIAN_TRUNCATE * sigma_voxels))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / sigma_voxels) ** 2)
    return taps / taps.sum()


def level_sigmas_voxels(settings, spacing_mm: float) -> tuple[float, float]:
    """Fluid and diffusion sigmas in voxels of a level of ``spacing_mm``.

    The sigmas are physical (mm) where the grid resolves them; on coarse levels they
    never fall below ``sigma_floor_voxels`` times ``(1, 1/2)`` (fluid, diffusion).
    """
    floor = settings.sigma_floor_voxels
    return (max(settings.fluid_sigma_mm / spacing_mm, floor),
            max(settings.diffusion_sigma_mm / spacing_mm, 0.5 * floor))


def level_halo(settings, spacing_mm: float) -> int:
    """Ghost planes one level needs: the map step, the window and both Gaussians."""
    fluid, diffusion = level_sigmas_voxels(settings, spacing_mm)
    widest = max(len(gaussian_taps(fluid)), len(gaussian_taps(diffusion))) // 2
    return max(int(math.ceil(settings.max_step_voxels)) + 1, settings.radius, widest)


class SymmetricOptimiser:
    """Registers ``moving`` to ``fixed`` on one level's grid (see the module notes).

    Parameters
    ----------
    world : World
    grid : LevelGrid
    kernels : module
    settings : Settings
    moving, fixed : ImageWindow or numpy.ndarray
        Both images on this level's grid: windows over the ranks' planes, or whole.
    stage : callable
    level : int
    """

    def __init__(self, world: World, grid: LevelGrid, kernels, settings, moving, fixed, stage,
                 level: int = 0):
        self.world = world
        self.grid = grid
        self.kernels = kernels
        self.settings = settings
        self.moving = _window(world, moving)
        self.fixed = _window(world, fixed)
        self.stage = stage
        self.level = level
        self.flows = Flows(world, grid, kernels, 1, settings.max_step_voxels, stage)
        fluid, diffusion = level_sigmas_voxels(settings, min(grid.spacing_zyx_mm))
        self.fluid_taps = gaussian_taps(fluid)
        self.diffusion_taps = gaussian_taps(diffusion)
        self.voxels = float(np.prod(grid.shape))
        self.masks = None
        self.last_step_voxels = 0.0

    def set_masks(self, fixed_mask, moving_mask) -> None:
        """Weights on this level's grid (windows or whole); the force is kept only where
        both are set."""
        self.masks = (_window(self.world, fixed_mask), _window(self.world, moving_mask))

    # -- pieces ---------------------------------------------------------------------------
    def zero_velocity(self) -> list:
        return [np.zeros(self.grid.owned_shape(3), np.float32)]

    def regularity(self, velocity: list) -> float:
        return 0.0

    def smooth(self, field: np.ndarray, taps: np.ndarray) -> np.ndarray:
        """Gaussian of an owned ``(c, owned, ny, nx)`` field, zero beyond the volume."""
        if len(taps) == 1:
            return field
        grid, kernels = self.grid, self.kernels
        halo = grid.halo
        haloed = np.zeros((field.shape[0], grid.owned + 2 * halo) + grid.plane, np.float32)
        with self.stage("smoothing", "kernel"):
            kernels.filter_planes(field, taps, haloed[:, halo:halo + grid.owned])
        with self.stage("halo exchange", "comm"):
            exchange_halos(self.world, haloed, grid.slab, "zero")
        out = np.empty(field.shape, np.float32)
        with self.stage("smoothing", "kernel"):
            kernels.filter_z(haloed, halo, grid.z_first, grid.shape[0], taps, out)
        return out

    def middle_images(self, velocity: np.ndarray, ghosts: int | None = None):
        """Both images in the middle space, with ``ghosts`` ghost planes each (``radius``
        when None), and the product of both masks there (owned planes; None without
        masks)."""
        radius = self.settings.radius if ghosts is None else ghosts
        towards_moving = self.flows.exponential(velocity, 0.5)
        towards_fixed = self.flows.exponential(velocity, -0.5)
        weight = None
        if self.masks is not None:
            fixed_mask, moving_mask = self.masks
            weight = (self.flows.warp(fixed_mask, towards_fixed, 0)
                      * self.flows.warp(moving_mask, towards_moving, 0))
        return (self.flows.warp(self.moving, towards_moving, radius),
                self.flows.warp(self.fixed, towards_fixed, radius), weight)

    def force(self, velocity: np.ndarray) -> tuple[np.ndarray, float]:
        """The metric's force on the owned planes and the energy (``ENERGY``) before it."""
        if self.settings.metric == "mi":
            return self.information_force(velocity)
        force, correlation = self.correlation_force(velocity)
        return force, 1.0 - correlation

    def correlation_force(self, velocity: np.ndarray) -> tuple[np.ndarray, float]:
        """The local-correlation force on the owned planes and the mean correlation."""
        grid, kernels, radius = self.grid, self.kernels, self.settings.radius
        moving, fixed, weight = self.middle_images(velocity)
        with self.stage("local correlation", "kernel"):
            scratch = np.empty((5,) + moving.shape, np.float64)
            sums = np.empty((5,) + grid.owned_shape(), np.float64)
            kernels.window_sums(moving, fixed, radius, grid.z_first, grid.shape[0], radius,
                                scratch, sums)
            force = np.empty(grid.owned_shape(3), np.float32)
            correlation = np.empty(grid.owned_shape(), np.float32)
            kernels.correlation_force(sums, moving, fixed, radius, grid.z_first, grid.shape[0],
                                      float((2 * radius + 1) ** 3), CORRELATION_EPSILON,
                                      force, correlation)
        voxels = self.voxels
        if weight is not None:
            force *= weight
            correlation *= weight
            with self.stage("reductions", "comm"):
                voxels = max(self.world.sum(float(np.sum(weight, dtype=np.float64))), 1.0)
        with self.stage("reductions", "comm"):
            mean = self.world.sum(float(np.sum(correlation, dtype=np.float64))) / voxels
        return force, mean

    def joint_histogram(self, moving: np.ndarray, fixed: np.ndarray, weight) -> np.ndarray:
        """The Parzen joint histogram of both middle-space images (one ghost plane each)
        over the whole volume: this rank's owned planes, then one all-reduce."""
        bins = self.settings.bins
        if weight is None:
            weight = np.ones(self.grid.owned_shape(), np.float32)
        joint = np.empty((bins, bins), np.float64)
        with self.stage("mutual information", "kernel"):
            self.kernels.joint_histogram(moving, fixed, 1, weight, joint)
        with self.stage("reductions", "comm"):
            self.world.allreduce_(joint, "sum")
        return joint

    def information_force(self, velocity: np.ndarray) -> tuple[np.ndarray, float]:
        """The mutual-information force on the owned planes and ``-MI`` (nats)."""
        grid = self.grid
        moving, fixed, weight = self.middle_images(velocity, 1)
        information, log_ratio = mutual_information(self.joint_histogram(moving, fixed, weight))
        force = np.empty(grid.owned_shape(3), np.float32)
        with self.stage("mutual information", "kernel"):
            self.kernels.mi_force(moving, fixed, 1, grid.z_first, grid.shape[0], log_ratio,
                                  force)
        if weight is not None:
            force *= weight
        return force, -information

    def update(self, velocity: np.ndarray, force: np.ndarray) -> np.ndarray:
        """``G_diffusion * (v + 2 w)`` with ``w`` the smoothed, scaled force."""
        smoothed = self.smooth(force, self.fluid_taps)
        local = float(np.sqrt(np.max(np.sum(smoothed * smoothed, axis=0)))) if smoothed.size \
            else 0.0
        with self.stage("reductions", "comm"):
            longest = self.world.max(local)
        if longest <= 0:
            return velocity
        floor = FORCE_FLOOR_PER_VOXEL * self.settings.update_step_voxels
        scale = 2.0 * self.settings.update_step_voxels / max(longest, floor)
        self.last_step_voxels = 0.5 * scale * longest
        return self.smooth(velocity + np.float32(scale) * smoothed, self.diffusion_taps)

    # -- iteration ------------------------------------------------------------------------
    def run(self, state, iterations: int, after_iteration=None, progress=None):
        """Iterate from ``state`` (velocity ``[v]``) up to ``iterations``; return the state."""
        velocity = state.velocity[0]
        while state.iteration < iterations and not state.stopped:
            if converged(state.history, self.settings.tolerance):
                state.stopped = "converged"
                break
            force, energy = self.force(velocity)
            if not state.history:
                state.history.append(self._entry(0, energy))
            velocity = self.update(velocity, force)
            del force  # not alive beside the next iteration's
            state.velocity = [velocity]
            state.iteration += 1
            state.history.append(self._entry(state.iteration, energy))
            if progress is not None:
                progress(f"level {self.level} iteration {state.iteration}/{iterations}: "
                         f"energy {energy:.5f} ({ENERGY[self.settings.metric]}), "
                         f"step {self.last_step_voxels:.3g} voxels")
            if after_iteration is not None:
                after_iteration(state)
        return state, None

    def final_maps(self, velocity: list) -> tuple[np.ndarray, np.ndarray]:
        """Displacements of ``exp(v)`` (forward) and ``exp(-v)`` (inverse), halos filled."""
        with self.stage("maps", "kernel"):
            return (self.flows.exponential(velocity[0], 1.0),
                    self.flows.exponential(velocity[0], -1.0))

    def _entry(self, iteration: int, energy: float) -> dict:
        return {"level": self.level, "iteration": iteration, "energy": float(energy),
                "similarity": float(energy), "regularity": 0.0,
                "step": float(self.settings.update_step_voxels), "substeps": 0,
                "gradient_norm": float("nan")}


def _window(world: World, image) -> ImageWindow:
    if isinstance(image, ImageWindow):
        return image
    return ImageWindow.whole(world, np.ascontiguousarray(image, np.float32))


def converged(history: list, tolerance: float) -> bool:
    """True when the energy fell by less than ``tolerance`` of itself over ``PATIENCE``
    iterations (the energy of an iteration is measured before its update)."""
    if len(history) <= PATIENCE or tolerance <= 0:
        return False
    before, after = history[-PATIENCE - 1]["energy"], history[-1]["energy"]
    return (before - after) <= tolerance * abs(before)
