"""Transforms between the fixed and moving spaces: resampling, ``transform.h5``, lddmm-apply.

Registration runs on the fixed grid (voxel index ``y``, affine ``A_F``) with the moving
image resampled there through an affine ``T`` of world space (RAS mm, fixed -> moving;
the identity when there is no affine stage): ``M_F(y) = M(A_M^-1 T A_F y)``. The result is
two displacements on the fixed grid, in voxels, components ``(z, y, x)``:

- ``forward``: ``phi_{1,0}(y) = y + u(y)``; the fixed voxel ``y`` corresponds to the moving
  world point ``P(y) = T A_F phi_{1,0}(y)`` and the warped moving image is
  ``M(A_M^-1 P(y))``, on the fixed grid;
- ``inverse``: ``phi_{0,1}(y) = y + w(y)``; an image ``X`` in fixed space warped to the
  moving space is, at moving voxel ``q`` with ``y = A_F^-1 T^-1 A_M q``,
  ``X(A_X^-1 A_F phi_{0,1}(y))``, on the moving grid.

``T`` is stored in ``transform.h5`` as ``affine_world_ras`` (absent: identity).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from medhpc.errors import InputError
from medhpc.io.geometry import ImageGeometry
from medhpc.lddmm import kernels_cpu

INTERPOLATIONS = ("linear", "nearest", "label", "cubic")
RESAMPLE_BLOCK_VOXELS = 1 << 20  # points mapped at a time: bounds the float64 scratch
FORMAT = "medhpc-lddmm-transform"


def _voxel_to_voxel(source: ImageGeometry, target: ImageGeometry,
                    world: np.ndarray | None = None) -> np.ndarray:
    """4x4 matrix taking ``source`` voxel ``(x, y, z, 1)`` to ``target`` voxel coordinates,
    through ``world`` (4x4, source world mm -> target world mm; None: the same world)."""
    placed = source.affine if world is None else np.asarray(world, np.float64) @ source.affine
    return np.linalg.inv(target.affine) @ placed


def map_points(points_zyx: np.ndarray, source: ImageGeometry, target: ImageGeometry,
               world: np.ndarray | None = None) -> np.ndarray:
    """Voxel positions ``(3, ...)`` (z, y, x) of ``source`` as positions in ``target``'s grid.

    ``world`` (4x4, RAS mm) maps ``source``'s world points to ``target``'s world points
    (for instance the affine ``T`` from fixed to moving); None means they share one world.
    """
    matrix = _voxel_to_voxel(source, target, world)
    xyz = points_zyx[::-1].astype(np.float64)
    # element by element (not a matrix product), so a block of points maps bit for bit as
    # it does inside the whole grid
    moved = [matrix[i, 0] * xyz[0] + matrix[i, 1] * xyz[1] + matrix[i, 2] * xyz[2]
             + matrix[i, 3] for i in (2, 1, 0)]
    return np.stack(moved).astype(np.float32)


def sample(image: np.ndarray, points_zyx: np.ndarray, interpolation: str = "linear",
           fill: float = 0.0) -> np.ndarray:
    """Sample ``image`` at voxel positions ``(3, ...)``; ``label`` keeps label values.

    ``label`` interpolates each label's indicator linearly and keeps the most likely
    label at every point, so labels stay labels and boundaries stay smooth. ``cubic`` is
    Catmull-Rom (it blurs less than trilinear: used where a warp samples the result again).
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r}: expected one of {INTERPOLATIONS}")
    if interpolation == "cubic":
        from medhpc.lddmm.kernels_affine import sample_points_cubic

        flat = np.ascontiguousarray(points_zyx.reshape(3, -1), np.float32)
        out = np.empty(flat.shape[1], np.float32)
        sample_points_cubic(np.ascontiguousarray(image, np.float32), flat, fill, out)
        return out.reshape(points_zyx.shape[1:])
    flat = np.ascontiguousarray(points_zyx.reshape(3, -1), np.float32)
    shape = points_zyx.shape[1:]
    if interpolation == "label":
        values = np.unique(image)
        best = np.full(flat.shape[1], -1.0, np.float32)
        labels = np.zeros(flat.shape[1], image.dtype)
        score = np.empty(flat.shape[1], np.float32)
        for value in values:
            indicator = (image == value).astype(np.float32)
            kernels_cpu.sample_points(indicator, flat, 0, 1.0 if value == 0 else 0.0, score)
            better = score > best
            labels[better] = value
            best[better] = score[better]
        return labels.reshape(shape)
    out = np.empty(flat.shape[1], np.float32)
    kernels_cpu.sample_points(np.ascontiguousarray(image, np.float32), flat,
                              1 if interpolation == "nearest" else 0, fill, out)
    result = out.reshape(shape)
    return result.astype(image.dtype) if interpolation == "nearest" else result


def sample_field(field: np.ndarray, points_zyx: np.ndarray) -> np.ndarray:
    """Trilinear samples of every component of ``field (c, nz, ny, nx)`` at ``points``
    (clamped to the grid)."""
    shape = field.shape[1:]
    clamped = np.stack([np.clip(points_zyx[i], 0, shape[i] - 1) for i in range(3)])
    return np.stack([sample(np.ascontiguousarray(component), clamped) for component in field])


def resample(image: np.ndarray, image_geometry: ImageGeometry, grid: ImageGeometry,
             interpolation: str = "linear", world: np.ndarray | None = None) -> np.ndarray:
    """``image`` on another grid, through world space (zero outside the image).

    ``world`` (4x4, RAS mm) maps a world point of ``grid`` to the image's world point; the
    moving image on the fixed grid is ``resample(M, A_M, fixed, world=T)``,
    ``M(A_M^-1 T A_F y)``. None (or the identity) means one shared world.
    """
    world = _unless_identity(world)
    nz, ny, nx = grid.shape
    block = max(1, RESAMPLE_BLOCK_VOXELS // max(ny * nx, 1))
    out = None
    for start in range(0, nz, block):
        stop = min(nz, start + block)
        points = np.indices((stop - start, ny, nx), dtype=np.float32)
        points[0] += np.float32(start)
        values = sample(image, map_points(points, grid, image_geometry, world), interpolation)
        if out is None:
            out = np.empty(grid.shape, values.dtype)
        out[start:stop] = values
    return out


def compose_error_voxels(forward: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """``|phi_{1,0}(phi_{0,1}(y)) - y|`` in voxels at every voxel of the grid."""
    identity = np.indices(forward.shape[1:], dtype=np.float32)
    moved = identity + inverse
    residual = inverse + sample_field(forward, moved)
    return np.sqrt(np.sum(residual * residual, axis=0))


# -- the affine of world space ------------------------------------------------------------
IDENTITY = np.eye(4)
IDENTITY.setflags(write=False)


def _unless_identity(world) -> np.ndarray | None:
    """``world`` as a 4x4 float64 matrix, or None when it is absent or exactly the identity
    (so that the identity takes the very same arithmetic as no affine at all)."""
    if world is None:
        return None
    world = np.asarray(world, np.float64)
    return None if np.array_equal(world, IDENTITY) else world


def check_affine_world(matrix, source="affine_world_ras") -> np.ndarray:
    """``matrix`` as a 4x4 float64 world affine (RAS mm); :class:`InputError` naming
    ``source`` when it is not finite, not ``[.., .., .., ..; 0 0 0 1]`` or not invertible."""
    try:
        matrix = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{source}: not a numeric matrix; expected a 4x4 world affine "
                         f"(RAS mm, fixed -> moving)") from None
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise InputError(f"{source}: a {'x'.join(map(str, matrix.shape))} matrix"
                         f"{'' if np.all(np.isfinite(matrix)) else ' with non-finite values'};"
                         f" expected a finite 4x4 world affine (RAS mm, fixed -> moving)")
    if not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0], rtol=0.0, atol=1e-9):
        raise InputError(f"{source}: last row {matrix[3].tolist()}; expected 0 0 0 1 "
                         f"(an affine, not a projective matrix)")
    if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise InputError(f"{source}: the matrix is singular; expected an invertible affine")
    matrix[3] = (0.0, 0.0, 0.0, 1.0)
    return matrix


def affine_world(transform: dict) -> np.ndarray:
    """The world affine ``T`` (4x4, RAS mm, fixed -> moving) of a transform (identity when
    the transform has none)."""
    world = transform.get("affine_world")
    return IDENTITY.copy() if world is None else np.array(world, np.float64)


# -- transform.h5 ---------------------------------------------------------------------------
def write_transform(path, forward: np.ndarray, inverse: np.ndarray, fixed: ImageGeometry,
                    moving: ImageGeometry, settings: dict, velocity: np.ndarray | None = None,
                    overwrite: bool = False, affine_world: np.ndarray | None = None) -> None:
    """Write both displacements (and optionally the velocity fields) with both geometries.

    ``affine_world`` (4x4, world RAS mm, fixed -> moving; None: identity) is stored as
    ``affine_world_ras``: the fixed voxel ``y`` maps to the moving world point
    ``affine_world @ A_F @ (y + u(y))``.
    """
    fields = 0 if velocity is None else velocity.shape[0]
    with TransformWriter(path, fixed, moving, settings, affine_world, fields,
                         overwrite) as writer:
        nz = fixed.shape[0]
        for component in range(3):
            writer.write("forward", component, 0, nz, forward[component])
            writer.write("inverse", component, 0, nz, inverse[component])
        for field in range(fields):
            for component in range(3):
                writer.write("velocity", (field, component), 0, nz, velocity[field, component])


class TransformWriter:
    """``transform.h5`` filled block of planes by block of planes, atomically.

    Datasets ``forward_displacement_vox`` and ``inverse_displacement_vox``
    ``(3, nz, ny, nx)`` float32 (uncompressed: noisy float fields barely shrink and gzip
    costs a second at 1 mm), optionally ``velocity_vox`` ``(fields, 3, nz, ny, nx)``
    (gzip 1), ``affine_world_ras`` and the ``fixed``/``moving`` geometry groups. The file
    appears under ``path`` only when the block ends without an error.
    """

    NAMES = {"forward": "forward_displacement_vox", "inverse": "inverse_displacement_vox",
             "velocity": "velocity_vox"}

    def __init__(self, path, fixed: ImageGeometry, moving: ImageGeometry, settings: dict,
                 affine_world: np.ndarray | None = None, velocity_fields: int = 0,
                 overwrite: bool = False):
        self.path = Path(path)
        self.fixed, self.moving = fixed, moving
        self.settings = settings
        self.world = IDENTITY if affine_world is None else check_affine_world(affine_world)
        self.velocity_fields = int(velocity_fields)
        self.overwrite = overwrite

    def __enter__(self) -> "TransformWriter":
        import json

        import h5py

        from medhpc.io.atomic import atomic_path

        self._atomic = atomic_path(self.path, overwrite=self.overwrite)
        tmp = self._atomic.__enter__()
        try:
            self._file = f = h5py.File(tmp, "w")
            f.attrs["format"] = FORMAT
            f.attrs["settings"] = json.dumps(self.settings)
            f.attrs["components"] = "z, y, x in voxels of the fixed grid"
            shape = (3,) + tuple(self.fixed.shape)
            f.create_dataset(self.NAMES["forward"], shape=shape, dtype=np.float32)
            f.create_dataset(self.NAMES["inverse"], shape=shape, dtype=np.float32)
            f.create_dataset("affine_world_ras", data=np.array(self.world, np.float64))
            f["affine_world_ras"].attrs["description"] = (
                "4x4, world RAS mm of the fixed image -> world RAS mm of the moving image, "
                "applied after the displacement: P(y) = affine_world_ras A_F (y + u(y))")
            if self.velocity_fields:
                nz, ny, nx = self.fixed.shape
                f.create_dataset(self.NAMES["velocity"], shape=(self.velocity_fields,) + shape,
                                 dtype=np.float32, chunks=(1, 1, min(nz, 8), ny, nx),
                                 compression="gzip", compression_opts=1)
            for name, geometry in (("fixed", self.fixed), ("moving", self.moving)):
                group = f.create_group(name)
                for key, value in geometry.to_attrs().items():
                    group.attrs[key] = value
        except BaseException:
            self._abandon()
            raise
        return self

    def write(self, name: str, component, start: int, stop: int, block: np.ndarray) -> None:
        """Planes ``[start, stop)`` of one component (``(field, component)`` for the
        velocity) of ``name`` (forward, inverse or velocity)."""
        index = component if isinstance(component, tuple) else (component,)
        self._file[self.NAMES[name]][index + (slice(start, stop),)] = block

    def _abandon(self) -> None:
        import sys

        file, self._file = getattr(self, "_file", None), None
        if file is not None:
            with contextlib.suppress(Exception):  # a failed write (full disk) fails it too
                file.close()
        self._atomic.__exit__(*sys.exc_info())

    def __exit__(self, kind, error, trace) -> bool:
        try:
            self._file.close()
        except BaseException:
            self._abandon()
            raise
        self._atomic.__exit__(kind, error, trace)
        return False


def read_transform(path) -> dict:
    """The displacements, geometries and world affine (``affine_world``, identity in files
    written before there was one) of a ``transform.h5`` (one-line error when unusable)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: transform file not found; expected lddmm's transform.h5")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise InputError(f"{path}: not an lddmm transform (format attribute "
                                 f"{f.attrs.get('format')!r}); expected {FORMAT}")
            world = (check_affine_world(f["affine_world_ras"][()], f"{path}:affine_world_ras")
                     if "affine_world_ras" in f else IDENTITY.copy())
            return {"forward": f["forward_displacement_vox"][()],
                    "inverse": f["inverse_displacement_vox"][()],
                    "fixed": ImageGeometry.from_attrs(f["fixed"].attrs),
                    "moving": ImageGeometry.from_attrs(f["moving"].attrs),
                    "affine_world": world}
    except OSError as exc:
        raise InputError(f"{path}: unreadable HDF5 ({exc}); expected lddmm's "
                         f"transform.h5") from None


def apply_transform(transform: dict, image: np.ndarray, image_geometry: ImageGeometry,
                    interpolation: str = "linear", inverse: bool = False):
    """Warp ``image``: moving space to fixed (default) or fixed to moving (``inverse``).

    Returns the warped image and its geometry (the fixed grid, or the moving grid). The
    world affine ``T`` of the transform (``affine_world``) is applied after the forward
    displacement and, inverted, before the inverse one.
    """
    fixed, moving = transform["fixed"], transform["moving"]
    world = _unless_identity(transform.get("affine_world"))
    if not inverse:
        points = np.indices(fixed.shape, dtype=np.float32) + transform["forward"]
        return sample(image, map_points(points, fixed, image_geometry, world),
                      interpolation), fixed
    on_fixed = map_points(np.indices(moving.shape, dtype=np.float32), moving, fixed,
                          None if world is None else np.linalg.inv(world))
    points = on_fixed + sample_field(transform["inverse"], on_fixed)
    return sample(image, map_points(points, fixed, image_geometry), interpolation), moving


def map_world_points(transform: dict, points_ras: np.ndarray, inverse: bool = False):
    """Map world points ``(n, 3)`` (x, y, z RAS mm) through the transform.

    Forward: points of the fixed space to the moving space, ``T A_F (y + u(y))`` with
    ``y = A_F^-1 p`` and ``u`` interpolated trilinearly. ``inverse``: points of the moving
    space to the fixed space, ``A_F (y + w(y))`` with ``y = A_F^-1 T^-1 p``. Beyond the
    fixed grid the displacement of the nearest border voxel is used.

    Returns the mapped points ``(n, 3)`` and a mask of the points whose ``y`` lies inside
    the fixed grid (within half a voxel).
    """
    fixed = transform["fixed"]
    points = np.asarray(points_ras, np.float64).reshape(-1, 3)
    world = affine_world(transform)
    if inverse:
        inverted = np.linalg.inv(world)
        points = points @ inverted[:3, :3].T + inverted[:3, 3]
    voxels_xyz = fixed.world_to_voxel(points)
    voxels_zyx = np.ascontiguousarray(voxels_xyz[:, ::-1].T)
    extent = np.array(fixed.shape, np.float64)[:, None]
    inside = np.all((voxels_zyx >= -0.5) & (voxels_zyx <= extent - 0.5), axis=0)
    field = transform["inverse"] if inverse else transform["forward"]
    displacement = sample_field(field, voxels_zyx.astype(np.float32)).astype(np.float64)
    moved = fixed.voxel_to_world((voxels_zyx + displacement)[::-1].T)
    if not inverse:
        moved = moved @ world[:3, :3].T + world[:3, 3]
    return moved, inside
