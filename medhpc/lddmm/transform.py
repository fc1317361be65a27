"""Transforms between the fixed and moving spaces: resampling, ``transform.h5``, lddmm-apply.

Registration runs on the fixed grid (voxel index ``y``, affine ``A_F``) with the moving
image resampled there: ``M_F(y) = M(A_M^-1 A_F y)``. The result is two displacements on
the fixed grid, in voxels, components ``(z, y, x)``:

- ``forward``: ``phi_{1,0}(y) = y + u(y)``; the warped moving image is
  ``M(A_M^-1 A_F phi_{1,0}(y))``, on the fixed grid;
- ``inverse``: ``phi_{0,1}(y) = y + w(y)``; an image ``X`` in fixed space warped to the
  moving space is, at moving voxel ``q`` with ``y = A_F^-1 A_M q``,
  ``X(A_X^-1 A_F phi_{0,1}(y))``, on the moving grid.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medhpc.errors import InputError
from medhpc.io.geometry import ImageGeometry
from medhpc.lddmm import kernels_cpu

INTERPOLATIONS = ("linear", "nearest", "label")
FORMAT = "medhpc-lddmm-transform"


def _voxel_to_voxel(source: ImageGeometry, target: ImageGeometry) -> np.ndarray:
    """4x4 matrix taking ``source`` voxel ``(x, y, z, 1)`` to ``target`` voxel coordinates."""
    return np.linalg.inv(target.affine) @ source.affine


def map_points(points_zyx: np.ndarray, source: ImageGeometry, target: ImageGeometry) -> np.ndarray:
    """Voxel positions ``(3, ...)`` (z, y, x) of ``source`` as positions in ``target``'s grid."""
    matrix = _voxel_to_voxel(source, target)
    xyz = points_zyx[::-1].reshape(3, -1).astype(np.float64)
    moved = matrix[:3, :3] @ xyz + matrix[:3, 3:4]
    return moved[::-1].reshape(points_zyx.shape).astype(np.float32)


def sample(image: np.ndarray, points_zyx: np.ndarray, interpolation: str = "linear",
           fill: float = 0.0) -> np.ndarray:
    """Sample ``image`` at voxel positions ``(3, ...)``; ``label`` keeps label values.

    ``label`` interpolates each label's indicator linearly and keeps the most likely
    label at every point, so labels stay labels and boundaries stay smooth.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation {interpolation!r}: expected one of {INTERPOLATIONS}")
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
             interpolation: str = "linear") -> np.ndarray:
    """``image`` on another grid, through world space (zero outside the image)."""
    points = map_points(np.indices(grid.shape, dtype=np.float32), grid, image_geometry)
    return sample(image, points, interpolation)


def compose_error_voxels(forward: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """``|phi_{1,0}(phi_{0,1}(y)) - y|`` in voxels at every voxel of the grid."""
    identity = np.indices(forward.shape[1:], dtype=np.float32)
    moved = identity + inverse
    residual = inverse + sample_field(forward, moved)
    return np.sqrt(np.sum(residual * residual, axis=0))


# -- transform.h5 ---------------------------------------------------------------------------
def write_transform(path, forward: np.ndarray, inverse: np.ndarray, fixed: ImageGeometry,
                    moving: ImageGeometry, settings: dict, velocity: np.ndarray | None = None,
                    overwrite: bool = False) -> None:
    """Write both displacements (and optionally the velocity fields) with both geometries."""
    import json

    import h5py

    from medhpc.io.atomic import atomic_path

    with atomic_path(path, overwrite=overwrite) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["settings"] = json.dumps(settings)
            f.attrs["components"] = "z, y, x in voxels of the fixed grid"
            f.create_dataset("forward_displacement_vox", data=forward, compression="gzip",
                             compression_opts=1)
            f.create_dataset("inverse_displacement_vox", data=inverse, compression="gzip",
                             compression_opts=1)
            if velocity is not None:
                f.create_dataset("velocity_vox", data=velocity, compression="gzip",
                                 compression_opts=1)
            for name, geometry in (("fixed", fixed), ("moving", moving)):
                group = f.create_group(name)
                for key, value in geometry.to_attrs().items():
                    group.attrs[key] = value


def read_transform(path) -> dict:
    """The displacements and geometries of a ``transform.h5`` (one-line error when unusable)."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: transform file not found; expected lddmm's transform.h5")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                raise InputError(f"{path}: not an lddmm transform (format attribute "
                                 f"{f.attrs.get('format')!r}); expected {FORMAT}")
            return {"forward": f["forward_displacement_vox"][()],
                    "inverse": f["inverse_displacement_vox"][()],
                    "fixed": ImageGeometry.from_attrs(f["fixed"].attrs),
                    "moving": ImageGeometry.from_attrs(f["moving"].attrs)}
    except OSError as exc:
        raise InputError(f"{path}: unreadable HDF5 ({exc}); expected lddmm's "
                         f"transform.h5") from None


def apply_transform(transform: dict, image: np.ndarray, image_geometry: ImageGeometry,
                    interpolation: str = "linear", inverse: bool = False):
    """Warp ``image``: moving space to fixed (default) or fixed to moving (``inverse``).

    Returns the warped image and its geometry (the fixed grid, or the moving grid).
    """
    fixed, moving = transform["fixed"], transform["moving"]
    if not inverse:
        points = np.indices(fixed.shape, dtype=np.float32) + transform["forward"]
        return sample(image, map_points(points, fixed, image_geometry), interpolation), fixed
    on_fixed = map_points(np.indices(moving.shape, dtype=np.float32), moving, fixed)
    points = on_fixed + sample_field(transform["inverse"], on_fixed)
    return sample(image, map_points(points, fixed, image_geometry), interpolation), moving
