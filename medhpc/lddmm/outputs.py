"""lddmm's outputs from the ranks' slabs: no rank holds a whole map or image.

Every rank derives its owned planes of each output (the warped moving image, the
Jacobian determinant, both maps as ITK displacement fields, the inverse-consistency
residual); rank 0 writes each file as the blocks arrive in z order
(:func:`~medhpc.parallel.slabs.stream_to_root`), so it holds one other rank's block at a
time. The planes a rank samples from elsewhere (the moving image, the forward map) come
as a window of planes (:func:`~medhpc.parallel.slabs.fetch_planes`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medhpc.io.geometry import ImageGeometry
from medhpc.io.nifti import NiftiStream
from medhpc.lddmm import itk
from medhpc.lddmm import transform as transforms
from medhpc.parallel.comm import World
from medhpc.parallel.slabs import fetch_planes, stream_to_root

WARPED, JACOBIAN, TRANSFORM = "warped.nii.gz", "jacobian.nii.gz", "transform.h5"
BLOCK_VOXELS = transforms.RESAMPLE_BLOCK_VOXELS  # points mapped at a time
OUTPUT_NAMES = (WARPED, TRANSFORM, *itk.ITK_OUTPUT_NAMES, JACOBIAN)


def fixed_voxels(z_first: int, planes: int, plane_shape) -> np.ndarray:
    """Voxel positions ``(3, planes, ny, nx)`` (z, y, x) of planes ``z_first ..``."""
    points = np.indices((planes,) + tuple(plane_shape), dtype=np.float32)
    points[0] += np.float32(z_first)
    return points


def window_for(points_z: np.ndarray, nz: int) -> tuple[int, int]:
    """Planes ``[lo, hi)`` that trilinear sampling at z positions ``points_z`` reads."""
    if points_z.size == 0:
        return 0, 0
    lowest = min(max(float(np.nanmin(points_z)), 0.0), nz - 1.0)
    highest = min(max(float(np.nanmax(points_z)), 0.0), nz - 1.0)
    return max(0, min(int(np.floor(lowest)), nz - 2)), min(nz, int(np.floor(highest)) + 2)


def sample_window(world: World, owned: np.ndarray, nz: int, points: np.ndarray,
                  interpolation: str = "linear", clamp: bool = False) -> np.ndarray:
    """Sample a z-first volume spread over the ranks at voxel positions ``points``.

    Collective. ``clamp`` clamps positions to the volume first (as
    :func:`~medhpc.lddmm.transform.sample_field`); otherwise points beyond it get 0. The
    positions are shifted by a whole number of planes, which is exact in floating point,
    so the samples are those of the whole volume bit for bit.
    """
    points = np.array(points, np.float32)
    if clamp:
        limits = (nz,) + tuple(owned.shape[1:])
        for axis in range(3):
            np.clip(points[axis], 0, limits[axis] - 1, out=points[axis])
    lo, hi = window_for(points[0], nz)
    planes = fetch_planes(world, owned, nz, lo, hi)
    if points[0].size == 0:
        return np.zeros(points.shape[1:], np.float32)
    points[0] -= np.float32(lo)
    return transforms.sample(planes, points, interpolation)


def plane_blocks(planes: int, plane_voxels: int) -> list[tuple[int, int]]:
    """Consecutive blocks of about ``BLOCK_VOXELS`` voxels that cover ``planes`` planes."""
    size = max(1, BLOCK_VOXELS // max(plane_voxels, 1))
    return [(start, min(planes, start + size)) for start in range(0, planes, size)]


def warped_planes(world: World, forward: np.ndarray, z_first: int, fixed: ImageGeometry,
                  moving: ImageGeometry, moving_owned: np.ndarray,
                  affine_world: np.ndarray | None) -> np.ndarray:
    """This rank's planes of the moving image warped onto the fixed grid (collective).

    The moving positions are mapped block by block twice (once for the window of moving
    planes, once to sample), so no full-slab float64 scratch is held.
    """
    world_affine = transforms._unless_identity(affine_world)
    planes, plane = forward.shape[1], tuple(fixed.shape[1:])
    blocks = plane_blocks(planes, int(np.prod(plane)))

    def on_moving(start, stop):
        points = fixed_voxels(z_first + start, stop - start, plane) + forward[:, start:stop]
        return transforms.map_points(points, fixed, moving, world_affine)

    nz = moving.shape[0]
    reaches = [window_for(on_moving(start, stop)[0], nz) for start, stop in blocks]
    lo = min((r[0] for r in reaches if r[1] > r[0]), default=0)
    hi = max((r[1] for r in reaches if r[1] > r[0]), default=0)
    window = fetch_planes(world, moving_owned, nz, lo, hi)
    out = np.zeros((planes,) + plane, np.float32)
    for start, stop in blocks:
        points = on_moving(start, stop)
        points[0] -= np.float32(lo)
        out[start:stop] = transforms.sample(window, points)
    return out


def consistency_planes(world: World, forward: np.ndarray, inverse: np.ndarray,
                       z_first: int, nz: int) -> np.ndarray:
    """``|phi_{1,0}(phi_{0,1}(y)) - y|`` in voxels on this rank's planes (collective)."""
    moved = fixed_voxels(z_first, inverse.shape[1], inverse.shape[2:]) + inverse
    residual = inverse.copy()
    for component in range(3):
        residual[component] += sample_window(world, forward[component], nz, moved, clamp=True)
    return np.sqrt(np.sum(residual * residual, axis=0))


def output_bytes(shape, velocity_fields: int = 0) -> int:
    """About the bytes a registration's files take on disk (uncompressed: an upper bound):
    warped image and Jacobian, forward and inverse displacements in ``transform.h5`` and
    as ITK fields, and ``velocity_fields`` saved velocities."""
    voxels = int(np.prod(shape))
    volumes = 2 + 3 * 2 + 3 * 2 + 3 * velocity_fields
    return 4 * voxels * volumes + 2**20


class RootFile:
    """A writer opened on rank 0 only; a failure to open or close it is raised on every rank.

    ``make()`` builds the writer (a context manager) on rank 0; entering yields it there
    and None elsewhere.
    """

    def __init__(self, world: World, make):
        self.world, self.make, self.writer = world, make, None

    def __enter__(self):
        def open_writer():
            if self.world.is_root:
                self.writer = self.make()
                return self.writer.__enter__()
            return None

        return self.world.agree_all(open_writer)

    def __exit__(self, kind, error, trace) -> bool:
        if kind is not None:  # a failure inside the block, agreed by the stream
            return self.writer.__exit__(kind, error, trace) if self.writer is not None else False

        def close():
            if self.writer is not None:
                self.writer.__exit__(None, None, None)

        self.world.agree_all(close)  # a failed close (a full disk) is raised on every rank
        return False


def stream_blocks(world: World, writer, blocks, nz: int) -> None:
    """Hand this rank's blocks of planes (``(planes, ny, nx)`` each, in file order) to
    ``writer.write`` on rank 0 (collective; ``writer`` is None elsewhere)."""
    for block in blocks:
        consume = None if writer is None else (lambda start, stop, planes: writer.write(planes))
        stream_to_root(world, np.asarray(block, np.float32), nz, consume)


def write_outputs(world: World, out: Path, maps: dict, geometries: dict, settings: dict,
                  velocity: list | None, overwrite: bool) -> None:
    """Every file of a registration from the ranks' owned planes (collective).

    ``maps``: this rank's owned planes of ``forward``, ``inverse`` (3, planes, ny, nx),
    ``warped`` and ``determinant`` (planes, ny, nx); ``geometries``: ``fixed``,
    ``moving`` and ``affine_world``; ``velocity``: owned velocity fields or None.
    """
    fixed = geometries["fixed"]
    nz = fixed.shape[0]
    for name, key in ((WARPED, "warped"), (JACOBIAN, "determinant")):
        with RootFile(world, lambda name=name: NiftiStream(
                out / name, fixed.shape[::-1], np.float32, fixed.affine, overwrite)) as stream:
            stream_blocks(world, stream, [maps[key]], nz)
    fields = 0 if velocity is None else len(velocity)
    with RootFile(world, lambda: transforms.TransformWriter(
            out / TRANSFORM, fixed, geometries["moving"], settings, geometries["affine_world"],
            fields, overwrite)) as writer:
        blocks = [("forward", c, maps["forward"][c]) for c in range(3)]
        blocks += [("inverse", c, maps["inverse"][c]) for c in range(3)]
        for field, owned in enumerate(velocity or []):
            blocks += [("velocity", (field, c), owned[c]) for c in range(3)]
        for name, index, block in blocks:
            consume = None
            if writer is not None:
                consume = (lambda start, stop, planes, name=name, index=index:
                           writer.write(name, index, start, stop, planes))
            stream_to_root(world, np.asarray(block, np.float32), nz, consume)
    for name, key in ((itk.FORWARD_WARP, "forward"), (itk.INVERSE_WARP, "inverse")):
        with RootFile(world, lambda name=name: itk.displacement_field_stream(
                out / name, fixed, overwrite)) as stream:
            stream_blocks(world, stream, list(itk.field_vectors(maps[key], fixed)), nz)
    world.agree(lambda: itk.write_affine_text(out / itk.AFFINE_TEXT, transforms.affine_world(
        {"affine_world": geometries["affine_world"]}), overwrite))
