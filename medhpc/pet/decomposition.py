"""Who reconstructs what: the three ways pet-recon spreads work over ranks.

Pure functions of the data layout and the world size; no communication.

- ``views``: fully 3-D data. Each subset's views are split in blocks over the
  ranks; the image is replicated and back projections are summed (one
  all-reduce per sub-iteration). Ranks without views in a subset add zeros.
- ``planes``: 2-D multi-slice data. The 3-D sinogram is rebinned (single-slice
  rebinning) into ``2 * rings - 1`` transaxial planes; each rank reconstructs
  its block of image planes from its own planes, with no communication.
- ``frames``: dynamic data. Whole frames go to ranks from a dynamic queue.
"""

from __future__ import annotations

import numpy as np

from medhpc.errors import InputError
from medhpc.parallel.geometry import block_range
from medhpc.pet.scanner import subset_views

MODES = ("views", "planes", "frames", "auto")
BYTES_PER_FLOAT = 4
BYTES_PER_LOR_ENDPOINTS = 24


def choose_mode(requested: str, frames: int, ranks: int) -> str:
    """Resolve ``--decomp auto``: frames when every rank gets a frame, else views."""
    if requested not in MODES:
        raise InputError(f"--decomp {requested!r}: expected one of {', '.join(MODES)}")
    if requested == "frames" and frames < 2:
        raise InputError("--decomp frames needs a dynamic sinogram (more than one frame)")
    if requested != "auto":
        return requested
    return "frames" if frames >= ranks and frames > 1 else "views"


def views_of_rank(n_views: int, n_subsets: int, size: int, rank: int) -> list[np.ndarray]:
    """This rank's views in every subset (a block of each subset's views)."""
    shares = []
    for subset in range(n_subsets):
        views = subset_views(n_views, n_subsets, subset)
        start, stop = block_range(len(views), size, rank)
        shares.append(views[start:stop])
    return shares


def rebinned_planes(rings: int) -> int:
    """Transaxial planes after single-slice rebinning: one per ring sum r1 + r2."""
    return 2 * rings - 1


def planes_of_rank(rings: int, size: int, rank: int) -> tuple[int, int]:
    """This rank's block ``[start, stop)`` of rebinned planes (= image planes)."""
    return block_range(rebinned_planes(rings), size, rank)


def frames_of_rank(frames: int, size: int, rank: int) -> range:
    """Frames a rank would take in a static block split (the plan's estimate)."""
    start, stop = block_range(frames, size, rank)
    return range(start, stop)


def memory_per_rank(scanner, image_shape, mode: str, size: int, rank: int, tof_bins: int,
                    n_subsets: int) -> dict:
    """Estimate a rank's bytes: measurements, LOR end points, images.

    Counts prompts, additive, ratio and projection (``tof_bins`` values per LOR),
    the multiplicative factor and end points per LOR, and the images held
    (estimate, back projection, one sensitivity per subset).
    """
    n_radial, n_views, n_planes = scanner.sinogram_shape[:3]
    voxels = int(np.prod(image_shape))
    if mode == "views":
        views = sum(len(v) for v in views_of_rank(n_views, n_subsets, size, rank))
        lors = n_radial * views * n_planes
    elif mode == "planes":
        start, stop = planes_of_rank(scanner.rings, size, rank)
        lors = n_radial * n_views * (stop - start)
        voxels = voxels // max(1, image_shape[0]) * (stop - start)
    else:  # frames: one whole frame at a time
        lors = n_radial * n_views * n_planes
    measurement_bytes = lors * (4 * tof_bins * BYTES_PER_FLOAT + BYTES_PER_FLOAT
                                + BYTES_PER_LOR_ENDPOINTS)
    image_bytes = voxels * BYTES_PER_FLOAT * (3 + n_subsets)
    return {"lors": int(lors), "measurement_bytes": int(measurement_bytes),
            "image_bytes": int(image_bytes), "total_bytes": int(measurement_bytes + image_bytes)}
