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
from medhpc.parallel.slabs import exchange_halos

J0_HALO = 1


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

    def _step(self, displacement, scratch, velocity_i, scale, steps):
        """Compose ``steps`` substeps of ``scale / steps`` each; return (map, scratch)."""
        grid = self.grid
        for _ in range(steps):
            with self.stage("compose maps", "kernel"):
                self.kernels.compose_displacement(displacement, velocity_i, scale / steps,
                                                  grid.halo, grid.z_first, grid.shape[0], scratch)
            displacement, scratch = scratch, displacement
            self._exchange(displacement)
        return displacement, scratch

    def warp(self, image: np.ndarray, displacement: np.ndarray, out_halo: int) -> np.ndarray:
        """``image o (id + displacement)`` on the owned planes plus ``out_halo`` ghosts."""
        grid = self.grid
        out = np.zeros(grid.haloed_shape(halo=out_halo), np.float32)
        with self.stage("warp images", "kernel"):
            self.kernels.warp_image(image, displacement, grid.halo, grid.z_first, out, out_halo)
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
        return self._step(displacement, scratch, velocity, scale, steps)[0]

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
