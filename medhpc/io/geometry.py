"""Physical geometry of a volume: grid shape and the voxel-to-world affine.

Arrays are indexed ``[z, y, x]``; the affine follows NIfTI and maps the voxel
index ``(x, y, z, 1)`` (note the order) to world coordinates in mm. Spacing and
origin are therefore given in ``(x, y, z)`` order as well.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Attribute names used when a geometry is stored on an HDF5 dataset.
ATTR_AFFINE = "affine"
ATTR_SHAPE = "shape_zyx"
ATTR_SPACING = "spacing_mm"
ATTR_ORIGIN = "origin_mm"
GEOMETRY_ATTRS = (ATTR_AFFINE, ATTR_SHAPE, ATTR_SPACING, ATTR_ORIGIN)


def _format_number(value: float) -> str:
    return str(round(float(value), 4))


@dataclass(frozen=True, eq=False)
class ImageGeometry:
    """A voxel grid placed in world space.

    Parameters
    ----------
    shape : tuple of int
        Grid size ``(z, y, x)``, the last three axes of the array.
    affine : array_like, shape (4, 4)
        Maps the voxel index ``(x, y, z, 1)`` to world mm (NIfTI convention).
    """

    shape: tuple
    affine: np.ndarray

    def __post_init__(self):
        shape = tuple(int(n) for n in self.shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"geometry shape must be 3 positive sizes (z, y, x), got {shape}")
        affine = np.array(self.affine, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
        if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
            raise ValueError("affine is singular: voxel axes do not span 3-D space")
        affine.setflags(write=False)
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "affine", affine)

    @classmethod
    def from_spacing(cls, shape, spacing_mm=1.0, origin_mm=None) -> "ImageGeometry":
        """Build an axis-aligned geometry.

        Parameters
        ----------
        shape : tuple of int
            Grid size ``(z, y, x)``.
        spacing_mm : float or sequence of 3 floats
            Voxel size ``(x, y, z)`` in mm; a scalar means isotropic.
        origin_mm : sequence of 3 floats, optional
            World position ``(x, y, z)`` of voxel ``[0, 0, 0]``; by default the
            volume is centred on the world origin.
        """
        shape = tuple(int(n) for n in shape)
        spacing = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
        if np.any(spacing <= 0):
            raise ValueError(f"spacing must be positive, got {tuple(spacing)} mm")
        if origin_mm is None:
            counts_xyz = np.array(shape[::-1], dtype=np.float64)
            origin = -(counts_xyz - 1) / 2 * spacing
        else:
            origin = np.asarray(origin_mm, dtype=np.float64).reshape(3)
        affine = np.eye(4)
        affine[:3, :3] = np.diag(spacing)
        affine[:3, 3] = origin
        return cls(shape, affine)

    @property
    def spacing_mm(self) -> tuple:
        """Voxel size ``(x, y, z)`` in mm (lengths of the affine's columns)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def origin_mm(self) -> tuple:
        """World position ``(x, y, z)`` in mm of voxel ``[0, 0, 0]``."""
        return tuple(float(v) for v in self.affine[:3, 3])

    def voxel_to_world(self, index_xyz) -> np.ndarray:
        """Map voxel indices ``(..., 3)`` in ``(x, y, z)`` order to world mm."""
        index = np.asarray(index_xyz, dtype=np.float64)
        return index @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_voxel(self, points_mm) -> np.ndarray:
        """Map world points ``(..., 3)`` in mm to fractional voxel indices ``(x, y, z)``."""
        points = np.asarray(points_mm, dtype=np.float64)
        inverse = np.linalg.inv(self.affine)
        return points @ inverse[:3, :3].T + inverse[:3, 3]

    def slab(self, z_start: int, z_stop: int) -> "ImageGeometry":
        """Return the geometry of planes ``[z_start, z_stop)`` of this grid."""
        if not 0 <= z_start < z_stop <= self.shape[0]:
            raise ValueError(f"slab [{z_start}, {z_stop}) outside 0..{self.shape[0]} planes")
        affine = self.affine.copy()
        affine[:3, 3] = self.voxel_to_world([0, 0, z_start])
        return ImageGeometry((z_stop - z_start,) + self.shape[1:], affine)

    def same_grid(self, other: "ImageGeometry", tol: float = 1e-4) -> bool:
        """Return True if ``other`` has the same shape and an affine equal within ``tol`` mm."""
        return self.shape == other.shape and bool(
            np.allclose(self.affine, other.affine, rtol=0.0, atol=tol))

    def describe(self) -> str:
        """Return ``"64x64x32 at 2.0 mm"``: size and spacing, both in ``x*y*z`` order."""
        size = "x".join(str(n) for n in self.shape[::-1])
        spacing = [_format_number(v) for v in self.spacing_mm]
        if len(set(spacing)) == 1:
            return f"{size} at {spacing[0]} mm"
        return f"{size} at {'x'.join(spacing)} mm"

    def to_attrs(self) -> dict:
        """Return HDF5-storable attributes; :meth:`from_attrs` reads them back."""
        return {
            ATTR_AFFINE: np.array(self.affine),
            ATTR_SHAPE: np.array(self.shape, dtype=np.int64),
            ATTR_SPACING: np.array(self.spacing_mm),
            ATTR_ORIGIN: np.array(self.origin_mm),
        }

    @classmethod
    def from_attrs(cls, attrs, shape=None) -> "ImageGeometry":
        """Build a geometry from attributes written by :meth:`to_attrs`.

        Parameters
        ----------
        attrs : mapping
            Attributes, for instance ``h5py.Dataset.attrs``.
        shape : tuple of int, optional
            Grid size ``(z, y, x)``; taken from ``attrs`` when not given.

        Without an ``affine`` attribute the grid is axis-aligned, using
        ``spacing_mm`` and ``origin_mm`` where present (default 1 mm, centred).
        """
        if shape is None:
            if ATTR_SHAPE not in attrs:
                raise KeyError(f"no '{ATTR_SHAPE}' attribute and no shape given")
            shape = tuple(int(n) for n in np.asarray(attrs[ATTR_SHAPE]))
        if ATTR_AFFINE in attrs:
            return cls(shape, np.asarray(attrs[ATTR_AFFINE], dtype=np.float64))
        spacing = attrs[ATTR_SPACING] if ATTR_SPACING in attrs else 1.0
        origin = attrs[ATTR_ORIGIN] if ATTR_ORIGIN in attrs else None
        return cls.from_spacing(shape, spacing, origin)

    def __eq__(self, other):
        if not isinstance(other, ImageGeometry):
            return NotImplemented
        return self.shape == other.shape and np.array_equal(self.affine, other.affine)

    def __hash__(self):
        return hash((self.shape, self.affine.tobytes()))

    def __repr__(self):
        return (f"ImageGeometry(shape={self.shape}, spacing_mm={self.spacing_mm}, "
                f"origin_mm={self.origin_mm})")
