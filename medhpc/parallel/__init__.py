"""Parallel building blocks: decomposition, the world communicator, slabs, FFT, work items.

Small and independent of any application: geometry is pure, every MPI call
goes through :class:`World`, and compute kernels never touch MPI.
``geometry.slabs`` (every rank's :class:`Slab`) is not re-exported: the name
is the :mod:`medhpc.parallel.slabs` module.
"""

from medhpc.parallel.comm import World, get_world
from medhpc.parallel.fft import (
    apply_fourier_multiplier,
    fourier_frequencies_local,
    irfftn_slabs,
    rfftn_slabs,
    spectrum_shape,
)
from medhpc.parallel.geometry import (
    Slab,
    block_counts,
    block_range,
    block_ranges,
    check_slab_split,
    cyclic_items,
    neighbours,
    owner_of,
    require_items_per_rank,
    slab,
)
from medhpc.parallel.slabs import (
    BOUNDARIES,
    allocate_slab,
    exchange_halos,
    gather_volume,
    parts_folder,
    read_slab_hdf5,
    scatter_volume,
    write_slabs_hdf5,
    z_axis_of,
)
from medhpc.parallel.work import SCHEDULES, map_items, static_items

__all__ = [
    "BOUNDARIES", "SCHEDULES", "Slab", "World", "allocate_slab", "apply_fourier_multiplier",
    "block_counts", "block_range", "block_ranges", "check_slab_split", "cyclic_items",
    "exchange_halos", "fourier_frequencies_local", "gather_volume", "get_world",
    "irfftn_slabs", "map_items", "neighbours", "owner_of", "parts_folder", "read_slab_hdf5",
    "require_items_per_rank", "rfftn_slabs", "scatter_volume", "slab",
    "spectrum_shape", "static_items", "write_slabs_hdf5", "z_axis_of",
]
