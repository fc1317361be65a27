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


PLANNED_REACH_MM = 10.0  # how far (z, mm) the plan lets a map reach beyond its slab
WINDOW_MARGIN_PLANES = 4  # flows.WINDOW_MARGIN: spare planes a window fetches


def memory_per_rank(shape, settings, size: int, rank: int, halo: int,
                    spacing_z_mm: float = 1.0, masked: bool = False, levels=None) -> dict:
    """Bytes of this rank's arrays at its peak (the finest level), by kind of array.

    ``beg``: velocities, trial velocities and smoothed forces (3 x 3T owned fields),
    the warped template at every time point (T + 1 scalars with one ghost plane), two
    maps with halos and their scratch copy (3 x 3 fields), gradient, force, determinant
    and pulled-back target (8 owned scalars), both whole images of the level.

    ``symmetric``: the peak is the local correlation of an iteration: the velocity and
    the force (3 + 3 owned), both images pulled to the middle space with ``radius``
    ghosts (2 windowed), the window sums and their scratch (5 owned + 5 windowed float64)
    and the correlation (1 owned); beside them every level's owned planes of both images
    (and of both masks, with the mask product) and the finest level's image windows:
    owned planes plus, on each side, a map's reach (``PLANNED_REACH_MM``) and the
    window margin. ``levels``: the pyramid's shapes (default: ``shape`` alone).
    """
    nz, ny, nx = shape
    start, stop = block_range(nz, size, rank)
    owned_planes = stop - start
    plane = ny * nx * FLOAT_BYTES
    owned = owned_planes * plane
    haloed = (owned_planes + 2 * halo) * plane
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
        windowed = (owned_planes + 2 * settings.radius) * plane
        level_planes = 0
        for level_shape in (levels or [shape]):
            level_start, level_stop = block_range(level_shape[0], size, rank)
            level_planes += (level_stop - level_start) * level_shape[1] * level_shape[2]
        reach = int(math.ceil(PLANNED_REACH_MM / spacing_z_mm)) + 1 + WINDOW_MARGIN_PLANES
        window = min(nz, owned_planes + 2 * reach) * plane
        images = 2 if not masked else 4
        fields = {
            "velocity_and_force": 6 * owned,
            "middle_images": 2 * windowed,
            "window_sums": 2 * 5 * owned + 2 * 5 * windowed,
            "correlation": owned + (owned if masked else 0),
            "image_planes": images * level_planes * FLOAT_BYTES,
            "image_windows": images * window,
        }
    fields["total"] = sum(fields.values())
    return fields


def preparation_bytes(fixed_shape, moving_shape) -> int:
    """Rank 0's arrays while it reads, normalises and resamples the inputs, before they
    are handed out: about five fixed-grid and three moving-grid float32 volumes."""
    voxels = lambda shape: int(shape[0]) * int(shape[1]) * int(shape[2])  # noqa: E731
    return FLOAT_BYTES * (5 * voxels(fixed_shape) + 3 * voxels(moving_shape))
