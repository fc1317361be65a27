"""Pure geometry of one pyramid level split into z-slabs (no communication).

Every rank holds the owned planes of the velocity fields and of the gradient
terms, the maps with ``halo`` ghost planes, and both images whole. The halo
covers the trilinear stencil plus the longest departure of one semi-Lagrangian
substep (``max_step_voxels``), so :func:`substeps` decides how finely each time
step is split from the largest velocity over all ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from medhpc.errors import InputError
from medhpc.parallel.geometry import Slab, block_range, slab

FLOAT_BYTES = 4


def halo_for(max_step_voxels: float, settings=None) -> int:
    """Ghost planes for departures up to ``max_step_voxels`` plus the trilinear stencil
    (at least the local-correlation window radius when ``settings`` asks for lncc)."""
    halo = int(math.ceil(max_step_voxels)) + 1
    if settings is not None and settings.metric == "lncc":
        halo = max(halo, settings.radius)
    return halo


def substeps(max_speed_voxels: float, timesteps: int, max_step_voxels: float) -> int:
    """Substeps per time step so that one substep moves at most ``max_step_voxels``."""
    travel = max_speed_voxels / timesteps
    return max(1, int(math.ceil(travel / max_step_voxels - 1e-9)))


@dataclass(frozen=True)
class LevelGrid:
    """One rank's share of a level: global shape, spacing and the slab with halos."""

    shape: tuple
    spacing_zyx_mm: tuple
    slab: Slab

    @classmethod
    def build(cls, shape, spacing_zyx_mm, size: int, rank: int, halo: int) -> "LevelGrid":
        return cls(tuple(int(n) for n in shape), tuple(float(h) for h in spacing_zyx_mm),
                   slab(int(shape[0]), size, rank, halo))

    @property
    def owned(self) -> int:
        return self.slab.owned

    @property
    def halo(self) -> int:
        return self.slab.halo

    @property
    def z_first(self) -> int:
        return self.slab.start

    @property
    def plane(self) -> tuple:
        return self.shape[1:]

    def owned_shape(self, channels: int | None = None) -> tuple:
        base = (self.owned,) + self.plane
        return base if channels is None else (channels,) + base

    def haloed_shape(self, channels: int | None = None, halo: int | None = None) -> tuple:
        halo = self.halo if halo is None else halo
        base = (self.owned + 2 * halo,) + self.plane
        return base if channels is None else (channels,) + base


def check_split(shapes, size: int, halo) -> None:
    """Raise :class:`InputError` unless every level gives each rank at least ``halo`` planes
    (one halo for all levels, or one per level)."""
    halos = list(halo) if isinstance(halo, (list, tuple)) else [halo] * len(shapes)
    for level, (shape, halo) in enumerate(zip(shapes, halos)):
        if shape[0] < size * max(1, halo):
            raise InputError(
                f"pyramid level {level} has {shape[0]} z planes: {size} ranks need at least "
                f"{max(1, halo)} planes each (halo {halo}); use fewer --levels, fewer ranks or "
                f"--decomp none")


def memory_per_rank(shape, settings, size: int, rank: int, halo: int) -> dict:
    """Bytes this rank holds at the finest level, by kind of array.

    ``beg``: velocities, trial velocities and smoothed forces (3 x 3T owned fields),
    the warped template at every time point (T + 1 scalars with one ghost plane), two
    maps with halos and their scratch copy (3 x 3 fields), gradient, force, determinant
    and pulled-back target (8 owned scalars), both whole images.

    ``symmetric``: velocity, its update and the smoothed force (3 x 3 owned), the two
    half-way maps and a scratch map (3 x 3 haloed), the smoothing buffer (3 haloed),
    both warped images with ``radius`` ghosts, the window sums and their scratch (5 + 5
    float64 fields), force and correlation (4 owned), both whole images (and masks).
    """
    nz, ny, nx = shape
    start, stop = block_range(nz, size, rank)
    plane = ny * nx * FLOAT_BYTES
    owned = (stop - start) * plane
    haloed = ((stop - start) + 2 * halo) * plane
    if getattr(settings, "method", "beg") == "beg":
        timesteps = settings.timesteps
        fields = {
            "velocity_and_updates": 9 * timesteps * owned,
            "warped_template": (timesteps + 1) * (owned + 2 * plane),
            "maps_with_halos": 9 * haloed,
            "scratch": 8 * owned,
            "images_whole": 2 * nz * plane,
        }
    else:
        windowed = ((stop - start) + 2 * settings.radius) * plane
        fields = {
            "velocity_and_updates": 9 * owned,
            "maps_with_halos": 12 * haloed,
            "warped_images": 2 * windowed,
            "window_sums": 2 * 5 * owned + 2 * 5 * windowed,
            "scratch": 4 * owned,
            "images_whole": 2 * nz * plane,
        }
    fields["total"] = sum(fields.values())
    return fields
