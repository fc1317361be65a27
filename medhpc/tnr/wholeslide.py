"""Whole-slide warping for tnr-register: output tiles, the input regions they need, the memory plan.

The warp runs output tile by output tile (``--tile`` pixels square). For each
tile the section's warp gives the input coordinates of its pixels; only their
bounding box (plus :data:`INTERPOLATION_MARGIN` pixels for the bicubic kernel)
is read from the input, and the tile is resampled from that region with the
coordinates shifted into it. Where the box would be larger than
:func:`region_cap_pixels` (a strongly rotated or stretched tile), the tile is
split into quarters until each part's box fits, so the region read per step is
bounded by a number fixed by the plan, never by the warp. Resampling a region
with shifted coordinates gives the same values as resampling the whole image:
boxes are clipped to the image, so the kernels' edge handling sees the same
image edges.

:func:`memory_plan` is the per-rank memory estimate printed by ``--dry-run``
and written to the JSON log beside the measured peak resident memory of every rank
(:func:`medhpc.runtime.timing.peak_memory_mb`).
"""

from __future__ import annotations

import math

import numpy as np

from medhpc.io.pyramid import pyramid_layout, tile_write_bytes
from medhpc.io.wholeslide import BAND_BYTES

INTERPOLATION_MARGIN = 3       # input pixels beyond the box that bicubic resampling reads
MIN_SPLIT_SIDE = 32            # tiles are not split below this side
REGION_CAP_FACTOR = 4          # a region holds at most this many tile areas
RUNTIME_BASE_BYTES = 400 << 20  # interpreter, numpy/numba/scipy/zarr/tifffile, MPI (measured)


def output_tiles(shape, tile: int):
    """``(rows, columns)`` slices of the ``tile``-square tiles of a ``(y, x)`` image."""
    ny, nx = shape
    for top in range(0, ny, tile):
        for left in range(0, nx, tile):
            yield slice(top, min(ny, top + tile)), slice(left, min(nx, left + tile))


def region_cap_pixels(tile: int) -> int:
    """The most input pixels one region read may hold (a plan constant)."""
    return REGION_CAP_FACTOR * tile * tile


def source_boxes(coord_y: np.ndarray, coord_x: np.ndarray, image_shape, cap_pixels: int,
                 margin: int = INTERPOLATION_MARGIN):
    """Parts of an output tile and the input box each needs.

    Yields ``(part, box)``: ``part`` is a ``(rows, columns)`` pair of slices of the
    tile; ``box`` is ``(rows, columns)`` of the input (clipped to ``image_shape``)
    holding every coordinate of the part plus ``margin``, or None when they all
    lie outside the image. Parts whose box holds more than ``cap_pixels`` are split
    into quarters (down to :data:`MIN_SPLIT_SIDE`).
    """
    stack = [(slice(0, coord_y.shape[0]), slice(0, coord_y.shape[1]))]
    ny, nx = image_shape
    while stack:
        part = stack.pop()
        ys, xs = coord_y[part], coord_x[part]
        y0 = max(0, int(math.floor(float(ys.min()))) - margin)
        y1 = min(ny, int(math.ceil(float(ys.max()))) + margin + 1)
        x0 = max(0, int(math.floor(float(xs.min()))) - margin)
        x1 = min(nx, int(math.ceil(float(xs.max()))) + margin + 1)
        if y1 <= y0 or x1 <= x0:
            yield part, None
            continue
        rows, columns = part
        height, width = rows.stop - rows.start, columns.stop - columns.start
        if (y1 - y0) * (x1 - x0) > cap_pixels and max(height, width) > MIN_SPLIT_SIDE:
            mid_y, mid_x = rows.start + height // 2, columns.start + width // 2
            halves_y = [rows] if height <= MIN_SPLIT_SIDE else [slice(rows.start, mid_y),
                                                                 slice(mid_y, rows.stop)]
            halves_x = [columns] if width <= MIN_SPLIT_SIDE else [slice(columns.start, mid_x),
                                                                   slice(mid_x, columns.stop)]
            stack.extend((r, c) for r in halves_y for c in halves_x)
            continue
        yield part, (slice(y0, y1), slice(x0, x1))


def warp_tile_channels(region: np.ndarray, coord_y: np.ndarray, coord_x: np.ndarray,
                       origin, remap, order: int, fill: float, out: np.ndarray) -> None:
    """Resample every channel of an input ``region`` (``[y, x]`` or ``[y, x, c]`` whose
    pixel (0, 0) is input pixel ``origin``) at ``(coord_y, coord_x)`` into ``out``
    (``(c, y, x)`` float32), channel by channel."""
    local_y = np.ascontiguousarray(coord_y - np.float32(origin[0]), np.float32)
    local_x = np.ascontiguousarray(coord_x - np.float32(origin[1]), np.float32)
    part = np.empty(local_y.shape, np.float32)
    for channel in range(out.shape[0]):
        values = region if region.ndim == 2 else region[..., channel]
        plane = np.ascontiguousarray(values, np.float32)
        remap(plane, local_y, local_x, order, fill, part)
        out[channel] = part


def warp_tile(coord_y: np.ndarray, coord_x: np.ndarray, regions, source_shape, cap: int,
              remap, order: int, fill: float, channels: int, stage) -> np.ndarray:
    """One output tile ``(channels, y, x)`` float32 resampled at ``(coord_y, coord_x)``,
    reading only the regions its parts need (:func:`source_boxes`); ``regions(rows,
    columns)`` reads the source, ``stage`` is the run's timing context."""
    tile = np.full((channels,) + coord_y.shape, fill, np.float32)
    for part, box in source_boxes(coord_y, coord_x, source_shape, cap):
        if box is None:
            continue
        with stage("read sections", "io"):
            region = regions(*box)
        with stage("warp", "kernel"):
            warp_tile_channels(region, coord_y[part], coord_x[part],
                               (box[0].start, box[1].start), remap, order, fill,
                               tile[(slice(None),) + part])
    return tile


def memory_plan(working_shape, output_shape, channels: int, dtype, tile: int,
                sections_warped: int, full_res: bool, pyramid: bool, fields: bool,
                input_tile_bytes: int = 0) -> dict:
    """Per-rank memory estimate in bytes (a pure function of the plan).

    Parameters
    ----------
    working_shape, output_shape : (int, int)
    channels : int
    dtype : numpy dtype of the input
    tile : int
        Output tile side.
    sections_warped : int
        Sections this rank warps.
    full_res : bool
    pyramid : bool
        The output is a pyramidal OME-Zarr/OME-TIFF written tile by tile (else the
        rank holds its sections at the output resolution for HDF5/TIFF/NIfTI).
    fields : bool
        ``--fields`` (dense displacements of the rank's sections are held).
    input_tile_bytes : int
        Bytes of one decoded input tile (zarr decodes whole tiles).

    Returns
    -------
    dict
        Bytes per component and ``total_bytes`` (including :data:`RUNTIME_BASE_BYTES`).
    """
    itemsize = np.dtype(dtype).itemsize
    working = int(np.prod(working_shape))
    output = int(np.prod(output_shape))
    tile_pixels = tile * tile
    cap = region_cap_pixels(tile)
    # matching: 3 cached working sections (image + mask), one being prepared (colour,
    # channel, smoothing, masks, statistics), the rigid copy and the band being read
    matching = working * (3 * 5 + 4 * channels + 40 + 8) + min(BAND_BYTES, output * channels
                                                              * itemsize)
    # warping one tile: the float32 tile, its coordinates, a part buffer, the region read
    # (input type), one float32 plane of it, and decoded input tiles at its border
    warp_tile = (tile_pixels * (4 * channels + 8 + 8 + 4)
                 + cap * (channels * itemsize + 4) + 4 * input_tile_bytes)
    source_section = 0 if full_res else working * 4 * channels
    if not full_res:
        warp_tile = tile_pixels * (4 * channels + 8 + 8 + 4) + cap * 4
    qc = working * 4 * (channels + 2)
    held_output = 0 if pyramid else sections_warped * output * channels * itemsize
    if full_res and not pyramid:
        source_section = output * channels * itemsize  # non-pyramid outputs read sections whole
    write = tile_write_bytes(pyramid_layout((1,) + tuple(output_shape), channels, dtype, tile)) \
        if pyramid else 0
    displacement = sections_warped * working * 8 if fields else 0
    components = {"runtime_base_bytes": RUNTIME_BASE_BYTES, "matching_bytes": int(matching),
                  "section_source_bytes": int(source_section), "warp_tile_bytes": int(warp_tile),
                  "qc_bytes": int(qc), "held_output_bytes": int(held_output),
                  "tile_write_bytes": int(write), "displacement_bytes": int(displacement)}
    peak_phase = max(matching, source_section + warp_tile + qc + write)
    total = RUNTIME_BASE_BYTES + held_output + displacement + peak_phase
    return {**components, "total_bytes": int(total), "region_cap_pixels": cap,
            "tile": tile}
