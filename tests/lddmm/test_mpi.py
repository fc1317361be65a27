"""One registration split into z-slabs equals the one-rank result (mpiexec -n 2, 3, 4)."""

import numpy as np
import pytest

from medhpc.lddmm import kernels_cpu
from medhpc.lddmm.flows import Flows
from medhpc.lddmm.grid import LevelGrid
from medhpc.lddmm.settings import Settings
from medhpc.parallel.comm import get_world
from tests.lddmm.conftest import no_stage, register, serial_world

TOLERANCE = dict(rtol=1e-4, atol=1e-4)
CASES = [Settings(method="beg", metric="ssd", levels=2, iterations=(6, 3), timesteps=3,
                  max_step_voxels=2.0),
         Settings(method="beg", metric="ncc", levels=2, iterations=(5, 3), timesteps=3),
         Settings(method="beg", metric="lncc", sigma=0.1, levels=1, iterations=(4,), timesteps=3,
                  radius=3),
         Settings(levels=2, iterations=(6, 4), radius=2, fluid_sigma_mm=1.0,
                  diffusion_sigma_mm=0.5, sigma_floor_voxels=1.0, tolerance=0.0),
         Settings(metric="mi", bins=16, levels=2, iterations=(6, 4), fluid_sigma_mm=1.0,
                  diffusion_sigma_mm=0.5, sigma_floor_voxels=1.0, tolerance=0.0)]


def owned(grid, field):
    return field[:, grid.halo:field.shape[1] - grid.halo]


def whole_on_root(world, compute):
    """Compute the one-rank reference on rank 0 only and share it."""
    return world.bcast(compute() if world.is_root else None)


@pytest.mark.mpi
@pytest.mark.parametrize("settings", CASES, ids=["beg-ssd", "beg-ncc", "beg-lncc", "symmetric",
                                                "symmetric-mi"])
def test_slabs_equal_one_rank(small_phantom, settings):
    world = get_world()
    fixed, moving = small_phantom["fixed"], small_phantom["moving"]
    split = register(fixed, moving, settings, world=world)

    def reference():
        result = register(fixed, moving, settings)
        return (owned(result.grid, result.forward), owned(result.grid, result.inverse),
                result.velocity, [e["energy"] for e in result.history])

    forward, inverse, velocity, energies = whole_on_root(world, reference)
    z0, z1 = split.grid.z_first, split.grid.z_first + split.grid.owned
    assert split.grid.owned * world.size <= fixed.shape[0] + world.size
    np.testing.assert_allclose(owned(split.grid, split.forward), forward[:, z0:z1], **TOLERANCE)
    np.testing.assert_allclose(owned(split.grid, split.inverse), inverse[:, z0:z1], **TOLERANCE)
    for v, w in zip(split.velocity, velocity):
        np.testing.assert_allclose(v, w[:, z0:z1], **TOLERANCE)
    np.testing.assert_allclose([e["energy"] for e in split.history], energies, rtol=1e-5)


@pytest.mark.mpi
def test_departures_beyond_the_halo_take_more_substeps(small_phantom):
    """A velocity that travels 3 voxels per time step with a 2-voxel substep limit is
    integrated in 2 substeps on every rank, and the split flow equals the whole one."""
    world = get_world()
    shape, timesteps = small_phantom["fixed"].shape, 2
    from medhpc.phantoms.lddmm import random_displacement

    whole_velocity = [random_displacement(shape, 6.0, seed) for seed in (3, 4)]

    def flow(world, grid):
        velocity = [np.ascontiguousarray(v[:, grid.z_first:grid.z_first + grid.owned])
                    for v in whole_velocity]
        flows = Flows(world, grid, kernels_cpu, timesteps, 2.0, no_stage)
        result = flows.towards_template(velocity, small_phantom["moving"])
        return flows, result

    grid = LevelGrid.build(shape, (1.0, 1.0, 1.0), world.size, world.rank, 3)
    flows, split = flow(world, grid)

    def reference():
        full = LevelGrid.build(shape, (1.0, 1.0, 1.0), 1, 0, 3)
        _, result = flow(serial_world(), full)
        return owned(full, result.displacement), result.template[-1][1:-1], result.substeps

    displacement, warped, steps = whole_on_root(world, reference)
    assert split.substeps == steps == 2
    z0, z1 = grid.z_first, grid.z_first + grid.owned
    np.testing.assert_allclose(owned(grid, split.displacement), displacement[:, z0:z1],
                               **TOLERANCE)
    np.testing.assert_allclose(split.template[-1][1:-1], warped[z0:z1], **TOLERANCE)


@pytest.mark.mpi
def test_image_windows_reach_planes_of_other_ranks(small_phantom):
    """A map that moves 6 planes in z reads planes owned by other ranks: the window's warp
    equals the warp of the whole image, and no rank holds the whole image."""
    from medhpc.lddmm.flows import ImageWindow

    world = get_world()
    image = small_phantom["moving"]
    shape = image.shape
    grid = LevelGrid.build(shape, (1.0, 1.0, 1.0), world.size, world.rank, 3)
    flows = Flows(world, grid, kernels_cpu, 1, 2.0, no_stage)
    displacement = flows.zero_map()
    z = np.arange(grid.z_first - grid.halo, grid.z_first + grid.owned + grid.halo)
    displacement[0] = (6.0 * np.cos(z / 3.0))[:, None, None]
    window = ImageWindow.whole(world, image)
    assert window.planes.shape[0] < shape[0] or world.size == 1
    split = flows.warp(window, displacement, 2)
    whole = flows.warp(image, displacement, 2)
    np.testing.assert_array_equal(split, whole)
    assert window.planes.shape[0] <= grid.owned + 2 * (2 + 6 + 2 + 4)
