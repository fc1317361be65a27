"""The LOR geometry file: end points of every sinogram bin, for other tools."""

from __future__ import annotations

import json

import h5py
import numpy as np

from medhpc.io.atomic import atomic_path
from medhpc.pet.scanner import ScannerGeometry, lor_endpoints, plane_members, scanner_to_dict

VIEWS_PER_WRITE = 8


def write_geometry_file(path, scanner: ScannerGeometry, overwrite: bool = False) -> None:
    """Write ``xstart``/``xend`` (radial x view x ring pair x 3, mm), the ring pairs
    (``plane_ring_pairs``) of the planes (plane ``p`` sums pairs ``plane_first_pair[p]`` to
    ``plane_first_pair[p + 1] - 1``; one each at span 1) and the scanner description;
    views are generated and written in blocks."""
    pairs, plane_first_pair = plane_members(scanner)
    shape = (scanner.n_radial, scanner.n_views, len(pairs), 3)
    with atomic_path(path, overwrite=overwrite) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs["format"] = "medhpc-lor-geometry"
            h5.attrs["scanner"] = json.dumps(scanner_to_dict(scanner))
            h5.attrs["units"] = "mm"
            h5.attrs["order"] = "radial, view, ring pair, (x, y, z)"
            chunks = (shape[0], min(VIEWS_PER_WRITE, shape[1]), min(16, shape[2]), 3)
            starts = h5.create_dataset("xstart", shape, np.float32, chunks=chunks,
                                       compression="gzip", compression_opts=1)
            ends = h5.create_dataset("xend", shape, np.float32, chunks=chunks,
                                     compression="gzip", compression_opts=1)
            h5.create_dataset("plane_ring_pairs", data=pairs)
            h5.create_dataset("plane_first_pair", data=plane_first_pair)
            for first in range(0, scanner.n_views, VIEWS_PER_WRITE):
                views = slice(first, min(first + VIEWS_PER_WRITE, scanner.n_views))
                starts[:, views], ends[:, views] = lor_endpoints(scanner, views=views)
