"""Flows of a time-varying velocity by semi-Lagrangian steps, on z-slabs.

With ``T`` time points ``t_i = i / T`` and ``v_i`` held constant on ``[t_i, t_{i+1})``:

- towards time 0: ``phi_{i+1,0}(x) = phi_{i,0}(x - dt v_i(x))``, ``phi_{0,0} = id``,
  and the deformed template ``J0_i = I0 o phi_{i,0}``;
- towards time 1: ``phi_{i,1}(x) = phi_{i+1,1}(x + dt v_i(x))``, ``phi_{T,1} = id``,
  the deformed target ``J1_i = I1 o phi_{i,1}`` and ``|D phi_{i,1}|``.

Maps are kept as displacements ``u = phi - id`` in voxels with halos; every step
composes locally after one halo exchange. Each time step is split into the same
number of substeps on every rank (the largest velocity over all ranks decides),
so departure points never leave a slab and its halos.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medhpc.lddmm.grid import LevelGrid, substeps
from medhpc.parallel.comm import World
from medhpc.parallel.geometry import block_range
from medhpc.parallel.slabs import exchange_halos, fetch_planes

J0_HALO = 1
WINDOW_MARGIN = 4


class ImageWindow:
    """A fixed image spread over the ranks by owned planes, and the planes a warp reaches.

    Each rank keeps its owned planes and, beside them, a window ``[z0, z0 + planes)``
    of the whole image that grows (collectively, with ``WINDOW_MARGIN`` planes to
    spare) when a map reaches further in z: no rank holds the whole image.

    Parameters
    ----------
    world : World
    owned : numpy.ndarray
        This rank's planes ``(owned, ny, nx)`` of the ``(nz, ny, nx)`` image.
    nz : int
    """

    def __init__(self, world: World, owned: np.ndarray, nz: int):
        self.world = world
        self.owned = np.ascontiguousarray(owned, np.float32)
        self.nz = int(nz)
        self.owned_range = block_range(self.nz, world.size, world.rank)
        self.z0 = self.owned_range[0]
        self.planes = self.owned

    @classmethod
    def whole(cls, world: World, image: np.ndarray) -> "ImageWindow":
        """The window of a whole image every rank holds (tests, one-rank callers)."""
        start, stop = block_range(image.shape[0], world.size, world.rank)
        return cls(world, image[start:stop], image.shape[0])

    def reach(self, grid: LevelGrid, displacement: np.ndarray, out_halo: int) -> tuple:
        """Planes ``[lo, hi)`` that sampling at ``x + u(x)`` on the output planes needs."""
        first = max(grid.z_first - out_halo, 0)
        last = min(grid.z_first + grid.owned + out_halo, grid.shape[0])
        if last <= first:
            return self.z0, self.z0
        rows = displacement[0, first - grid.z_first + grid.halo:last - grid.z_first + grid.halo]
        lowest = first + float(rows.min()) if rows.size else first
        highest = last - 1 + float(rows.max()) if rows.size else last - 1
        lo = int(np.floor(min(max(lowest, 0.0), self.nz - 1)))
        hi = int(np.floor(min(max(highest, 0.0), self.nz - 1))) + 2
        return max(0, min(lo, self.nz - 2)), min(self.nz, hi)

    def planes_for(self, grid: LevelGrid, displacement: np.ndarray, out_halo: int) -> tuple:
        """``(planes, z0)`` holding every plane the warp reaches (collective)."""
        lo, hi = self.reach(grid, displacement, out_halo)
        held = (self.z0, self.z0 + self.planes.shape[0])
        if self.world.any(lo < held[0] or hi > held[1]):
            lo = max(0, min(lo - WINDOW_MARGIN, held[0]))
            hi = min(self.nz, max(hi + WINDOW_MARGIN, held[1]))
            self.planes = fetch_planes(self.world, self.owned, self.nz, lo, hi)
            self.z0 = lo
        return self.planes, self.z0


@dataclass
class ForwardFlow:
    """What the flow towards time 0 leaves: ``J0_i`` for i = 0..T and ``phi_{1,0} - id``."""

    template: list
    displacement: np.ndarray
    substeps: int


class Flows:
    """Forward and backward sweeps of one level on this rank's slab.

    Parameters
    ----------
    world : World
    grid : LevelGrid
    kernels : module
        :mod:`medhpc.lddmm.kernels_cpu` or its CUDA twin.
    timesteps : int
    max_step_voxels : float
        Longest departure of one substep (the halo holds it).
    stage : callable
        ``stage(name, kind)`` context manager of the run's timer.
    """

    def __init__(self, world: World, grid: LevelGrid, kernels, timesteps: int,
                 max_step_voxels: float, stage):
        self.world = world
        self.grid = grid
        self.kernels = kernels
        self.timesteps = timesteps
        self.dt = 1.0 / timesteps
        self.max_step_voxels = max_step_voxels
        self.stage = stage

    # -- pieces ---------------------------------------------------------------------------
    def substeps_for(self, velocity: list) -> int:
        """Substeps per time step for this velocity (one all-reduce)."""
        local = max((float(np.max(np.abs(v))) if v.size else 0.0) for v in velocity)
        with self.stage("max velocity", "comm"):
            speed = self.world.max(local)
        return substeps(speed, self.timesteps, self.max_step_voxels)

    def _exchange(self, displacement: np.ndarray) -> None:
        with self.stage("halo exchange", "comm"):
            exchange_halos(self.world, displacement, self.grid.slab, "zero")

    def _step(self, displacement, scratch, velocity_i, scale, steps, done: int = 0):
        """Compose the substeps ``done .. steps - 1`` of ``scale / steps`` each; return
        (map, scratch)."""
        grid = self.grid
        for _ in range(done, steps):
            with self.stage("compose maps", "kernel"):
                self.kernels.compose_displacement(displacement, velocity_i, scale / steps,
                                                  grid.halo, grid.z_first, grid.shape[0], scratch)
            displacement, scratch = scratch, displacement
            self._exchange(displacement)
        return displacement, scratch

    def warp(self, image, displacement: np.ndarray, out_halo: int) -> np.ndarray:
        """``image o (id + displacement)`` on the owned planes plus ``out_halo`` ghosts.

        ``image`` is an :class:`ImageWindow` (collective) or the whole image.
        """
        grid = self.grid
        if isinstance(image, ImageWindow):
            with self.stage("image windows", "comm"):
                planes, z0 = image.planes_for(grid, displacement, out_halo)
        else:
            planes, z0 = image, 0
        out = np.zeros(grid.haloed_shape(halo=out_halo), np.float32)
        with self.stage("warp images", "kernel"):
            self.kernels.warp_image(planes, z0, grid.shape[0], displacement, grid.halo,
                                    grid.z_first, out, out_halo)
        return out

    def zero_map(self) -> np.ndarray:
        return np.zeros(self.grid.haloed_shape(3), np.float32)

    # -- sweeps ---------------------------------------------------------------------------
    def towards_template(self, velocity: list, template_image: np.ndarray) -> ForwardFlow:
        """Flow to time 0: ``J0_i`` at every time point and the displacement of ``phi_{1,0}``."""
        steps = self.substeps_for(velocity)
        displacement, scratch = self.zero_map(), self.zero_map()
        warped = [self.warp(template_image, displacement, J0_HALO)]
        for velocity_i in velocity:
            displacement, scratch = self._step(displacement, scratch, velocity_i, -self.dt, steps)
            warped.append(self.warp(template_image, displacement, J0_HALO))
        return ForwardFlow(template=warped, displacement=displacement, substeps=steps)

    def backward_forces(self, velocity: list, target_image: np.ndarray, forward: ForwardFlow,
                        coefficients) -> tuple[list, np.ndarray]:
        """Flow to time 1 and the force ``|D phi_{i,1}| r_i grad J0_i`` at every time point.

        ``coefficients`` = ``(a, c, d)`` of ``r_i = a J0_i + c J1_i + d``. Returns the
        forces (owned planes) and the displacement of ``phi_{0,1}``.
        """
        grid = self.grid
        steps = forward.substeps
        displacement, scratch = self.zero_map(), self.zero_map()
        gradient = np.empty(grid.owned_shape(3), np.float32)
        determinant = np.empty(grid.owned_shape(), np.float32)
        forces = [None] * self.timesteps
        weight_j0, weight_j1, offset = (float(c) for c in coefficients)
        for i in reversed(range(self.timesteps)):
            displacement, scratch = self._step(displacement, scratch, velocity[i], self.dt, steps)
            target = self.warp(target_image, displacement, 0)
            with self.stage("gradient terms", "kernel"):
                self.kernels.jacobian_determinant(displacement, grid.halo, grid.z_first,
                                                  grid.shape[0], determinant)
                self.kernels.image_gradient(forward.template[i], J0_HALO, grid.z_first,
                                            grid.shape[0], gradient)
                force = np.empty(grid.owned_shape(3), np.float32)
                self.kernels.similarity_force(gradient, forward.template[i], J0_HALO, target,
                                              determinant, weight_j0, weight_j1, offset, force)
            forces[i] = force
        return forces, displacement

    def exponential(self, velocity: np.ndarray, scale: float = 1.0) -> np.ndarray:
        """Displacement of ``exp(scale v)`` for a stationary velocity (halos filled).

        The flow of ``scale v`` over unit time as ``n`` compositions of ``id + scale v / n``,
        with ``n`` chosen so that one step moves at most ``max_step_voxels``.
        """
        local = float(np.max(np.abs(velocity))) if velocity.size else 0.0
        with self.stage("max velocity", "comm"):
            speed = self.world.max(local) * abs(scale)
        steps = substeps(speed, 1, self.max_step_voxels)
        displacement, scratch = self.zero_map(), self.zero_map()
        grid = self.grid
        # the first substep from the identity is the step itself, s v + 0(x + s v): the same
        # float64 product rounded to float32 as the composition, without its interpolation
        with self.stage("compose maps", "kernel"):
            np.multiply(velocity, scale / steps, dtype=np.float64, casting="unsafe",
                        out=displacement[:, grid.halo:grid.halo + grid.owned])
        self._exchange(displacement)
        return self._step(displacement, scratch, velocity, scale, steps, done=1)[0]

    def inverse_map(self, velocity: list) -> np.ndarray:
        """Displacement of ``phi_{0,1}`` (the flow to time 1 from time 0), halos filled."""
        steps = self.substeps_for(velocity)
        displacement, scratch = self.zero_map(), self.zero_map()
        for i in reversed(range(self.timesteps)):
            displacement, scratch = self._step(displacement, scratch, velocity[i], self.dt, steps)
        return displacement

    def determinant(self, displacement: np.ndarray) -> np.ndarray:
        """``det(D phi)`` on the owned planes of the map ``id + displacement``."""
        grid = self.grid
        out = np.empty(grid.owned_shape(), np.float32)
        with self.stage("jacobian determinant", "kernel"):
            self.kernels.jacobian_determinant(displacement, grid.halo, grid.z_first,
                                              grid.shape[0], out)
        return out
