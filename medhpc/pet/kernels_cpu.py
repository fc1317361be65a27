"""Joseph projector on the CPU (twins of :mod:`medhpc.pet.kernels_cuda`).

Image arrays are float32 ``[z, y, x]``, C-order; ``origin_mm`` is the (x, y, z)
centre of voxel [0, 0, 0] and ``voxel_mm`` the voxel size along (x, y, z).
``xstart``/``xend`` are (n, 3) float32 LOR end points (x, y, z) in mm.

Image model: each LOR is clipped exactly to the image box. Along the principal
axis (the one the LOR crosses most voxels of) the box is cut into one slab per
plane; the part of the LOR inside slab ``i`` is sampled at its midpoint with
weight its length in mm, and the sample reads plane ``i`` by bilinear
interpolation in the two other axes, constant in the outer half voxel. Inside
the box this is Joseph's method; at the box faces it gives exact chords.

TOF: bin ``k`` is centred at signed distance ``(k - (ntof - 1) / 2) * tof_bin_mm``
from the LOR midpoint (towards ``xend``); the TOF kernel of LOR ``i`` is a Gaussian of
``tof_sigma_mm[i]`` centred ``tof_offset_mm[i]`` beyond the sample (one value for all
LORs when the arrays have length 1), truncated at ``tof_cutoff_sigmas`` and
renormalised, so the bins of a LOR sum to its non-TOF projection wherever they cover
the kernel. The CPU twin reads erf from a table (error below 3e-7); the CUDA twin calls
``math.erf``.

Forward kernels overwrite ``out``; back-projections add into ``image``. The
back-projections give each thread its own image buffer (numba has no atomics),
so they need ``threads x image`` extra memory.
"""

import math

import numba
import numpy as np

_JIT = dict(cache=True, fastmath=False, nogil=True)
# erf on [-4, 4] for the TOF kernel (read by linear interpolation)
_ERF_RANGE = 4.0
_ERF_POINTS = 8192
_ERF_SCALE = (_ERF_POINTS - 1) / (2.0 * _ERF_RANGE)
_ERF_TABLE = np.array([math.erf(-_ERF_RANGE + k / _ERF_SCALE) for k in range(_ERF_POINTS + 1)])
#: Principal-axis ties within this relative margin go to the earlier axis (x, then y).
_AXIS_TIE = 1.0 + 1e-5
_MISS = (False, 0, -1, 0, 0, 0, 0, 0,
         0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@numba.njit(**_JIT)
def _clip_axis(start, step, size, t_min, t_max):
    """Narrow [t_min, t_max] to where ``start + t * step`` lies in [-0.5, size - 0.5]."""
    low, high = -0.5, size - 0.5
    if step == 0.0:
        if start < low or start > high:
            return 1.0, 0.0
        return t_min, t_max
    t_low = (low - start) / step
    t_high = (high - start) / step
    if t_low > t_high:
        t_low, t_high = t_high, t_low
    return max(t_min, t_low), min(t_max, t_high)


@numba.njit(**_JIT)
def _ray(xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz):
    """Per-LOR constants of the slab walk, in voxel-index units.

    Returns (hit, first_plane, last_plane, stride_p, stride_a, stride_b, size_a,
    size_b, start_p, inv_step_p, half_dt, start_a, step_a, start_b, step_b, t_min,
    t_max, length_mm); ``p`` is the principal axis, ``a`` and ``b`` the other two.
    """
    x0 = (np.float64(xstart[lor, 0]) - origin_mm[0]) / voxel_mm[0]
    y0 = (np.float64(xstart[lor, 1]) - origin_mm[1]) / voxel_mm[1]
    z0 = (np.float64(xstart[lor, 2]) - origin_mm[2]) / voxel_mm[2]
    dx_mm = np.float64(xend[lor, 0]) - np.float64(xstart[lor, 0])
    dy_mm = np.float64(xend[lor, 1]) - np.float64(xstart[lor, 1])
    dz_mm = np.float64(xend[lor, 2]) - np.float64(xstart[lor, 2])
    dx, dy, dz = dx_mm / voxel_mm[0], dy_mm / voxel_mm[1], dz_mm / voxel_mm[2]

    t_min, t_max = _clip_axis(x0, dx, nx, 0.0, 1.0)
    t_min, t_max = _clip_axis(y0, dy, ny, t_min, t_max)
    t_min, t_max = _clip_axis(z0, dz, nz, t_min, t_max)
    length_mm = math.sqrt(dx_mm * dx_mm + dy_mm * dy_mm + dz_mm * dz_mm)
    if not (t_max > t_min and length_mm > 0.0):
        return _MISS

    # near-ties go to the earlier axis, so a LOR moved along itself (list-mode TOF
    # events, float32 end points) keeps its principal axis
    ax, ay, az = abs(dx) * _AXIS_TIE, abs(dy), abs(dz)
    if ax >= ay and ax >= az:
        size_p, stride_p, start_p, step_p = nx, 1, x0, dx
        size_a, stride_a, start_a, step_a = ny, nx, y0, dy
        size_b, stride_b, start_b, step_b = nz, nx * ny, z0, dz
    elif ay * _AXIS_TIE >= az:
        size_p, stride_p, start_p, step_p = ny, nx, y0, dy
        size_a, stride_a, start_a, step_a = nx, 1, x0, dx
        size_b, stride_b, start_b, step_b = nz, nx * ny, z0, dz
    else:
        size_p, stride_p, start_p, step_p = nz, nx * ny, z0, dz
        size_a, stride_a, start_a, step_a = nx, 1, x0, dx
        size_b, stride_b, start_b, step_b = ny, nx, y0, dy

    q_a = start_p + t_min * step_p
    q_b = start_p + t_max * step_p
    first = max(int(math.floor(min(q_a, q_b) + 0.5)), 0)
    last = min(int(math.floor(max(q_a, q_b) + 0.5)), size_p - 1)
    inv_step_p = 1.0 / step_p
    return (True, first, last, stride_p, stride_a, stride_b, size_a, size_b,
            start_p, inv_step_p, 0.5 * abs(inv_step_p), start_a, step_a, start_b, step_b,
            t_min, t_max, length_mm)


@numba.njit(inline='always', **_JIT)
def _axis_weights(coord, size, stride):
    """Lower neighbour offset, upper neighbour step and fraction for a clamped linear read."""
    coord = min(max(coord, 0.0), size - 1.0)
    index = min(int(coord), max(size - 2, 0))
    return index * stride, stride if size > 1 else 0, coord - index


@numba.njit(inline='always', **_JIT)
def _end_sample(ray, plane):
    """Sample of an end slab: (weight_t, t_mid, base, next_a, next_b, frac_a, frac_b).

    ``weight_t`` is the slab's share of the clipped LOR parameter (times
    length_mm: mm); it is <= 0 where the slab misses the clipped LOR.
    """
    (_, _, _, stride_p, stride_a, stride_b, size_a, size_b,
     start_p, inv_step_p, half_dt, start_a, step_a, start_b, step_b, t_min, t_max, _) = ray
    t_centre = (plane - start_p) * inv_step_p
    t_low = max(t_centre - half_dt, t_min)
    t_high = min(t_centre + half_dt, t_max)
    t_mid = 0.5 * (t_low + t_high)
    offset_a, next_a, frac_a = _axis_weights(start_a + t_mid * step_a, size_a, stride_a)
    offset_b, next_b, frac_b = _axis_weights(start_b + t_mid * step_b, size_b, stride_b)
    return (t_high - t_low, t_mid, np.uint64(plane * stride_p + offset_a + offset_b),
            np.uint64(next_a), np.uint64(next_b), frac_a, frac_b)


@numba.njit(inline='always', **_JIT)
def _inner_line(ray):
    """(a0, a_per_plane, b0, b_per_plane): transverse coordinates at the plane centres.

    Slabs strictly between the first and the last lie wholly on the clipped LOR:
    their sample is the plane centre and their weight_t is ``2 * half_dt``.
    """
    start_p, inv_step_p = ray[8], ray[9]
    a_per_plane, b_per_plane = ray[12] * inv_step_p, ray[14] * inv_step_p
    return (ray[11] - start_p * a_per_plane, a_per_plane,
            ray[13] - start_p * b_per_plane, b_per_plane)


@numba.njit(inline='always', **_JIT)
def _inner_sample(ray, line, plane):
    """(base, next_a, next_b, frac_a, frac_b) at the centre of plane ``plane``."""
    offset_a, next_a, frac_a = _axis_weights(line[0] + plane * line[1], ray[6], ray[4])
    offset_b, next_b, frac_b = _axis_weights(line[2] + plane * line[3], ray[7], ray[5])
    return (np.uint64(plane * ray[3] + offset_a + offset_b), np.uint64(next_a), np.uint64(next_b),
            frac_a, frac_b)


@numba.njit(inline='always', **_JIT)
def _interior_planes(start, per_plane, size, low, high):
    """Planes ``p`` in [low, high] where ``start + p * per_plane`` lies in [0, size - 1.001].

    There the clamped read of :func:`_axis_weights` is a plain ``int``/fraction
    split, so the inner loop can skip the clamping.
    """
    top = size - 1.001
    if per_plane == 0.0:
        return (low, high) if 0.0 <= start <= top else (high + 1, high)
    first = (0.0 - start) / per_plane
    last = (top - start) / per_plane
    if first > last:
        first, last = last, first
    return max(low, int(math.ceil(first))), min(high, int(math.floor(last)))


@numba.njit(inline='always', **_JIT)
def _inner_segments(ray, line, first, last):
    """Split the inner planes (first, last) into clamped / interior / clamped ranges.

    Returns (interior_low, interior_high): planes first+1 .. interior_low-1 and
    interior_high+1 .. last-1 need clamped reads, the rest do not. Without an
    interior, (last, last - 1): the first range then covers every inner plane.
    """
    low, high = first + 1, last - 1
    low_a, high_a = _interior_planes(line[0], line[1], ray[6], low, high)
    low_b, high_b = _interior_planes(line[2], line[3], ray[7], low, high)
    interior_low, interior_high = max(low_a, low_b), min(high_a, high_b)
    if interior_low > interior_high:
        return high + 1, high
    return interior_low, interior_high


@numba.njit(inline='always', **_JIT)
def _interior_sample(ray, line, plane):
    """(base, frac_a, frac_b) at the centre of an interior plane (no clamping needed)."""
    a = line[0] + plane * line[1]
    b = line[2] + plane * line[3]
    index_a, index_b = int(a), int(b)
    # unsigned: numba then skips its negative-index wraparound test on every read
    base = np.uint64(plane * ray[3] + index_a * ray[4] + index_b * ray[5])
    return base, a - index_a, b - index_b


@numba.njit(inline='always', **_JIT)
def _interior_bilinear(flat, base, stride_a, stride_b, frac_a, frac_b):
    """:func:`_bilinear` inside the image (both neighbours exist; unsigned offsets)."""
    low = flat[base] + frac_a * (flat[base + stride_a] - flat[base])
    high = flat[base + stride_b] + frac_a * (flat[base + stride_a + stride_b]
                                             - flat[base + stride_b])
    return low + frac_b * (high - low)


@numba.njit(inline='always', **_JIT)
def _bilinear(flat, base, next_a, next_b, frac_a, frac_b):
    low = (1.0 - frac_a) * flat[base] + frac_a * flat[base + next_a]
    high = (1.0 - frac_a) * flat[base + next_b] + frac_a * flat[base + next_a + next_b]
    return (1.0 - frac_b) * low + frac_b * high


@numba.njit(inline='always', **_JIT)
def _scatter(flat, base, next_a, next_b, frac_a, frac_b, weight):
    w_low, w_high = (1.0 - frac_b) * weight, frac_b * weight
    flat[base] += (1.0 - frac_a) * w_low
    flat[base + next_a] += frac_a * w_low
    flat[base + next_b] += (1.0 - frac_a) * w_high
    flat[base + next_a + next_b] += frac_a * w_high


@numba.njit(inline='always', **_JIT)
def _ends(ray):
    """The end slabs of a LOR: none (miss), its only slab, or the first and the last."""
    first, last = ray[1], ray[2]
    return first, last, (0 if last < first else 1 if last == first else 2)


@numba.njit(inline='always', **_JIT)
def _ray_integral(flat, xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz):
    ray = _ray(xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz)
    first, last, end_count = _ends(ray)
    total = 0.0
    for end in range(end_count):
        weight_t, _, base, next_a, next_b, frac_a, frac_b = _end_sample(
            ray, first if end == 0 else last)
        if weight_t > 0.0:
            total += weight_t * _bilinear(flat, base, next_a, next_b, frac_a, frac_b)
    line = _inner_line(ray)
    interior_low, interior_high = _inner_segments(ray, line, first, last)
    inner = 0.0
    for plane in range(first + 1, interior_low):
        base, next_a, next_b, frac_a, frac_b = _inner_sample(ray, line, plane)
        inner += _bilinear(flat, base, next_a, next_b, frac_a, frac_b)
    stride_a, stride_b = np.uint64(ray[4]), np.uint64(ray[5])
    for plane in range(interior_low, interior_high + 1):
        base, frac_a, frac_b = _interior_sample(ray, line, plane)
        inner += _interior_bilinear(flat, base, stride_a, stride_b, frac_a, frac_b)
    for plane in range(interior_high + 1, last):
        base, next_a, next_b, frac_a, frac_b = _inner_sample(ray, line, plane)
        inner += _bilinear(flat, base, next_a, next_b, frac_a, frac_b)
    return (total + 2.0 * ray[10] * inner) * ray[17]


@numba.njit(inline='always', **_JIT)
def _ray_scatter(flat, value, xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz):
    ray = _ray(xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz)
    first, last, end_count = _ends(ray)
    value_mm = value * ray[17]
    for end in range(end_count):
        weight_t, _, base, next_a, next_b, frac_a, frac_b = _end_sample(
            ray, first if end == 0 else last)
        if weight_t > 0.0:
            _scatter(flat, base, next_a, next_b, frac_a, frac_b, weight_t * value_mm)
    line = _inner_line(ray)
    inner_mm = 2.0 * ray[10] * value_mm
    interior_low, interior_high = _inner_segments(ray, line, first, last)
    for plane in range(first + 1, interior_low):
        base, next_a, next_b, frac_a, frac_b = _inner_sample(ray, line, plane)
        _scatter(flat, base, next_a, next_b, frac_a, frac_b, inner_mm)
    stride_a, stride_b = np.uint64(ray[4]), np.uint64(ray[5])
    for plane in range(interior_low, interior_high + 1):
        base, frac_a, frac_b = _interior_sample(ray, line, plane)
        _scatter(flat, base, stride_a, stride_b, frac_a, frac_b, inner_mm)
    for plane in range(interior_high + 1, last):
        base, next_a, next_b, frac_a, frac_b = _inner_sample(ray, line, plane)
        _scatter(flat, base, next_a, next_b, frac_a, frac_b, inner_mm)


# fields of the TOF constants tuple (:func:`_tof_constants`)
(_INV_BIN, _PER_MM, _PER_BIN, _REACH_MM, _NORM, _LOW_POSITION, _HIGH_POSITION, _EDGE0_POSITION,
 _WIDTH, _EDGE_ERF, _OFFSET_MM, _FIRST_SHIFT) = range(12)


@numba.njit(inline='always', **_JIT)
def _table_erf(position):
    """erf read from :data:`_ERF_TABLE` at table ``position`` = (x + 4) x ``_ERF_SCALE``.

    Linear interpolation (error below 3e-7, twice as fast as ``math.erf`` here); beyond
    +-4 erf is 1 to 2e-8.
    """
    # through int64: numba's float -> uint64 conversion is several instructions
    index = np.uint64(np.int64(position))
    fraction = position - np.int64(index)
    low = _ERF_TABLE[index]
    return low + fraction * (_ERF_TABLE[index + np.uint64(1)] - low)


@numba.njit(inline='always', **_JIT)
def _erf_at(position, tof):
    """:func:`_table_erf` with the position clipped at the kernel's cutoff."""
    return _table_erf(min(max(position, tof[_LOW_POSITION]), tof[_HIGH_POSITION]))


@numba.njit(**_JIT)
def _tof_constants(tof_bin_mm, tof_sigma_mm, tof_cutoff_sigmas, ntof):
    """The TOF constants of a kernel ``tof_sigma_mm`` wide, indexed by the ``_TOF`` fields.

    Positions are erf-table positions; ``width`` bins from the first one a sample's kernel
    reaches hold all of it; ``edge erf`` is erf at the cutoff, and ``norm`` = 1 / (2 edge
    erf) renormalises the truncated Gaussian.
    """
    sigma_mm, cutoff = np.float64(tof_sigma_mm), np.float64(tof_cutoff_sigmas)
    bin_mm = np.float64(tof_bin_mm)
    limit = min(cutoff / math.sqrt(2.0), _ERF_RANGE)
    per_mm = _ERF_SCALE / (sigma_mm * math.sqrt(2.0))
    high_position = (_ERF_RANGE + limit) * _ERF_SCALE
    edge = _table_erf(high_position)
    return (1.0 / bin_mm, per_mm, bin_mm * per_mm, cutoff * sigma_mm, 0.5 / edge,
            (_ERF_RANGE - limit) * _ERF_SCALE, high_position,
            _ERF_RANGE * _ERF_SCALE - (0.5 * ntof) * bin_mm * per_mm,
            np.float64(math.floor(2.0 * cutoff * sigma_mm / bin_mm) + 2), edge, 0.0,
            0.5 * (ntof - 1) + 0.5)


@numba.njit(inline='always', **_JIT)
def _lor_tof(tof_bin_mm, tof_sigma_mm, tof_offset_mm, tof_cutoff_sigmas, ntof, lor, shared):
    """The TOF constants of LOR ``lor``: ``shared`` unless it has its own width or offset."""
    offset = np.float64(tof_offset_mm[lor if tof_offset_mm.shape[0] > 1 else 0])
    if tof_sigma_mm.shape[0] > 1:
        tof = _tof_constants(tof_bin_mm, tof_sigma_mm[lor], tof_cutoff_sigmas, ntof)
    else:
        tof = shared
    return (tof[0], tof[1], tof[2], tof[3], tof[4], tof[5], tof[6], tof[7], tof[8], tof[9],
            offset, tof[11])


@numba.njit(inline='always', **_JIT)
def _tof_window(distance_mm, ntof, tof):
    """(first bin, its low edge's table position, kernel centre) for a sample at
    ``distance_mm``; ``first`` may lie outside [0, ntof)."""
    centre = distance_mm + tof[_OFFSET_MM]
    first = np.int64(math.floor((centre - tof[_REACH_MM]) * tof[_INV_BIN] + tof[_FIRST_SHIFT]))
    position = tof[_EDGE0_POSITION] + first * tof[_PER_BIN] - centre * tof[_PER_MM]
    return first, position


@numba.njit(inline='always', **_JIT)
def _tof_spread(padded, sample, distance_mm, ntof, tof):
    """padded[k + width] += sample x (TOF weight of bin k for a sample at ``distance_mm``).

    The ``width`` bins from ``first`` hold the whole kernel: the low edge of the first and
    the high edge of the last lie beyond the cutoff (erf = -+ the edge value), so only the
    inner edges read the table. ``padded`` has ``width`` spare bins on each side.
    """
    width = np.int64(tof[_WIDTH])
    first, position = _tof_window(distance_mm, ntof, tof)
    if first + width <= 0 or first >= ntof:
        return
    scaled = sample * tof[_NORM]
    step = tof[_PER_BIN]
    low = -tof[_EDGE_ERF]
    base = np.uint64(first + width)
    for j in range(np.uint64(width - 1)):
        position += step
        high = _erf_at(position, tof)
        padded[base + j] += scaled * (high - low)
        low = high
    padded[base + np.uint64(width - 1)] += scaled * (tof[_EDGE_ERF] - low)


@numba.njit(inline='always', **_JIT)
def _tof_gather(padded, distance_mm, ntof, tof):
    """Sum over k of padded[k + width] x (TOF weight of bin k for a sample at ``distance_mm``).

    By parts: sum_k v_k (E_k+1 - E_k) = E (v_first + v_last) + sum over the inner edges j of
    E_j (v_j-1 - v_j), with E the erf at the outer edges (as in :func:`_tof_spread`).
    """
    width = np.int64(tof[_WIDTH])
    first, position = _tof_window(distance_mm, ntof, tof)
    if first + width <= 0 or first >= ntof:
        return 0.0
    step = tof[_PER_BIN]
    base = np.uint64(first + width)
    total = tof[_EDGE_ERF] * (padded[base] + padded[base + np.uint64(width - 1)])
    for j in range(np.uint64(1), np.uint64(width)):
        position += step
        total += _erf_at(position, tof) * (padded[base + j - np.uint64(1)] - padded[base + j])
    return total * tof[_NORM]


@numba.njit(inline='always', **_JIT)
def _tof_coverage(distance_mm, ntof, tof):
    """Sum over the bins of the TOF weights of a sample at ``distance_mm``: 1 where the
    bins hold the whole truncated kernel, else the weights telescoped to the outer edges
    of the bins it reaches."""
    width = np.int64(tof[_WIDTH])
    first, position = _tof_window(distance_mm, ntof, tof)
    if first >= 0 and first + width <= ntof:
        return 1.0
    if first + width <= 0 or first >= ntof:
        return 0.0
    low = max(first, 0)
    high = min(first + width, ntof)
    return tof[_NORM] * (_erf_at(position + (high - first) * tof[_PER_BIN], tof)
                         - _erf_at(position + (low - first) * tof[_PER_BIN], tof))


@numba.njit(inline='always', **_JIT)
def _sample_distances(ray):
    """(distance0, per_plane): plane p's sample lies distance0 + p x per_plane mm from the
    LOR midpoint, towards xend (inner planes)."""
    start_p, inv_step_p, length_mm = ray[8], ray[9], ray[17]
    return -(start_p * inv_step_p + 0.5) * length_mm, inv_step_p * length_mm


@numba.njit(inline='always', **_JIT)
def _ray_scatter_every_bin(flat, value, xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz,
                           tof, ntof):
    ray = _ray(xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz)
    first, last, end_count = _ends(ray)
    length_mm = ray[17]
    for end in range(end_count):
        weight_t, t_mid, base, next_a, next_b, frac_a, frac_b = _end_sample(
            ray, first if end == 0 else last)
        if weight_t > 0.0:
            weight = (weight_t * length_mm * value
                      * _tof_coverage((t_mid - 0.5) * length_mm, ntof, tof))
            _scatter(flat, base, next_a, next_b, frac_a, frac_b, weight)
    line = _inner_line(ray)
    inner_mm = 2.0 * ray[10] * length_mm
    distance0, per_plane = _sample_distances(ray)
    for plane in range(first + 1, last):
        weight = inner_mm * value * _tof_coverage(distance0 + plane * per_plane, ntof, tof)
        base, next_a, next_b, frac_a, frac_b = _inner_sample(ray, line, plane)
        _scatter(flat, base, next_a, next_b, frac_a, frac_b, weight)


@numba.njit(inline='always', **_JIT)
def _ray_integral_tof(flat, xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz, tof, out_row,
                      padded):
    ntof = out_row.shape[0]
    padded[:] = 0.0
    ray = _ray(xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz)
    first, last, end_count = _ends(ray)
    length_mm = ray[17]
    for end in range(end_count):
        weight_t, t_mid, base, next_a, next_b, frac_a, frac_b = _end_sample(
            ray, first if end == 0 else last)
        if weight_t > 0.0:
            sample = weight_t * length_mm * _bilinear(flat, base, next_a, next_b, frac_a, frac_b)
            _tof_spread(padded, sample, (t_mid - 0.5) * length_mm, ntof, tof)
    line = _inner_line(ray)
    inner_mm = 2.0 * ray[10] * length_mm
    distance0, per_plane = _sample_distances(ray)
    interior_low, interior_high = _inner_segments(ray, line, first, last)
    for plane in range(first + 1, interior_low):
        base, next_a, next_b, frac_a, frac_b = _inner_sample(ray, line, plane)
        sample = inner_mm * _bilinear(flat, base, next_a, next_b, frac_a, frac_b)
        _tof_spread(padded, sample, distance0 + plane * per_plane, ntof, tof)
    stride_a, stride_b = np.uint64(ray[4]), np.uint64(ray[5])
    for plane in range(interior_low, interior_high + 1):
        base, frac_a, frac_b = _interior_sample(ray, line, plane)
        sample = inner_mm * _interior_bilinear(flat, base, stride_a, stride_b, frac_a, frac_b)
        _tof_spread(padded, sample, distance0 + plane * per_plane, ntof, tof)
    for plane in range(interior_high + 1, last):
        base, next_a, next_b, frac_a, frac_b = _inner_sample(ray, line, plane)
        sample = inner_mm * _bilinear(flat, base, next_a, next_b, frac_a, frac_b)
        _tof_spread(padded, sample, distance0 + plane * per_plane, ntof, tof)
    width = np.int64(tof[_WIDTH])
    for k in range(ntof):
        out_row[k] = padded[k + width]


@numba.njit(inline='always', **_JIT)
def _ray_scatter_tof(flat, values_row, xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz, tof,
                     padded):
    ntof = values_row.shape[0]
    width = np.int64(tof[_WIDTH])
    padded[:] = 0.0
    for k in range(ntof):
        padded[k + width] = values_row[k]
    ray = _ray(xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz)
    first, last, end_count = _ends(ray)
    length_mm = ray[17]
    for end in range(end_count):
        weight_t, t_mid, base, next_a, next_b, frac_a, frac_b = _end_sample(
            ray, first if end == 0 else last)
        if weight_t > 0.0:
            weight = weight_t * length_mm * _tof_gather(padded, (t_mid - 0.5) * length_mm, ntof,
                                                        tof)
            _scatter(flat, base, next_a, next_b, frac_a, frac_b, weight)
    line = _inner_line(ray)
    inner_mm = 2.0 * ray[10] * length_mm
    distance0, per_plane = _sample_distances(ray)
    interior_low, interior_high = _inner_segments(ray, line, first, last)
    for plane in range(first + 1, interior_low):
        weight = inner_mm * _tof_gather(padded, distance0 + plane * per_plane, ntof, tof)
        base, next_a, next_b, frac_a, frac_b = _inner_sample(ray, line, plane)
        _scatter(flat, base, next_a, next_b, frac_a, frac_b, weight)
    stride_a, stride_b = np.uint64(ray[4]), np.uint64(ray[5])
    for plane in range(interior_low, interior_high + 1):
        weight = inner_mm * _tof_gather(padded, distance0 + plane * per_plane, ntof, tof)
        base, frac_a, frac_b = _interior_sample(ray, line, plane)
        w_low, w_high = (1.0 - frac_b) * weight, frac_b * weight
        flat[base] += (1.0 - frac_a) * w_low
        flat[base + stride_a] += frac_a * w_low
        flat[base + stride_b] += (1.0 - frac_a) * w_high
        flat[base + stride_a + stride_b] += frac_a * w_high
    for plane in range(interior_high + 1, last):
        weight = inner_mm * _tof_gather(padded, distance0 + plane * per_plane, ntof, tof)
        base, next_a, next_b, frac_a, frac_b = _inner_sample(ray, line, plane)
        _scatter(flat, base, next_a, next_b, frac_a, frac_b, weight)


@numba.njit(**_JIT)
def _geometry(image, origin_mm, voxel_mm):
    nz, ny, nx = image.shape
    origin = (np.float64(origin_mm[0]), np.float64(origin_mm[1]), np.float64(origin_mm[2]))
    voxel = (np.float64(voxel_mm[0]), np.float64(voxel_mm[1]), np.float64(voxel_mm[2]))
    return origin, voxel, nx, ny, nz


@numba.njit(parallel=True, **_JIT)
def _add_buffers(buffers, image):
    """image += sum of the per-thread buffers (rows of ``buffers``, flat images)."""
    if buffers.shape[0] == 0:
        return
    flat = image.reshape(image.size)
    for index in numba.prange(flat.shape[0]):
        total = 0.0
        for block in range(buffers.shape[0]):
            total += buffers[block, index]
        flat[index] += total


@numba.njit(**_JIT)
def _block_range(block, blocks, n):
    return block * n // blocks, (block + 1) * n // blocks


@numba.njit(parallel=True, **_JIT)
def joseph_forward(image, xstart, xend, origin_mm, voxel_mm, out):
    """out[i] = line integral (value x mm) of ``image`` along LOR i."""
    origin, voxel, nx, ny, nz = _geometry(image, origin_mm, voxel_mm)
    flat = image.reshape(image.size)
    for lor in numba.prange(xstart.shape[0]):
        out[lor] = _ray_integral(flat, xstart, xend, lor, origin, voxel, nx, ny, nz)


def joseph_back(values, xstart, xend, origin_mm, voxel_mm, image):
    """image += A^T values, the exact adjoint of :func:`joseph_forward`."""
    buffers = _back(values, xstart, xend, origin_mm, voxel_mm, image,
                    _buffer_count(xstart.shape[0]))
    _add_buffers(buffers, image)


def _buffer_count(n_lors):
    """One image buffer per thread; none (scatter into the image) with one thread."""
    return max(min(numba.get_num_threads(), n_lors), 1)


@numba.njit(parallel=True, **_JIT)
def _back(values, xstart, xend, origin_mm, voxel_mm, image, blocks):
    origin, voxel, nx, ny, nz = _geometry(image, origin_mm, voxel_mm)
    flat = image.reshape(image.size)
    n = np.int64(xstart.shape[0])
    buffers = np.zeros((blocks if blocks > 1 else 0, flat.shape[0]), dtype=np.float32)
    for block in numba.prange(blocks):
        first, stop = _block_range(block, blocks, n)
        buffer = buffers[block] if blocks > 1 else flat
        for lor in range(first, stop):
            _ray_scatter(buffer, values[lor], xstart, xend, lor, origin, voxel, nx, ny, nz)
    return buffers


@numba.njit(**_JIT)
def _padded_size(ntof, tof_bin_mm, tof_sigma_mm, tof_cutoff_sigmas):
    """Length of a TOF row with room for the widest kernel on both sides."""
    widest = np.float64(tof_sigma_mm.max())
    return ntof + 2 * np.int64(_tof_constants(tof_bin_mm, widest, tof_cutoff_sigmas,
                                              ntof)[_WIDTH]) + 1


def joseph_forward_tof(image, xstart, xend, origin_mm, voxel_mm, tof_bin_mm, tof_sigma_mm,
                       tof_offset_mm, tof_cutoff_sigmas, out):
    """out[i, k] = TOF-weighted line integral of ``image`` along LOR i in TOF bin k.

    ``tof_sigma_mm`` and ``tof_offset_mm`` hold one kernel width and centre offset per LOR,
    or one for all (length 1).
    """
    blocks = min(xstart.shape[0], 64 * numba.get_num_threads())
    _forward_tof(image, xstart, xend, origin_mm, voxel_mm, tof_bin_mm, tof_sigma_mm,
                 tof_offset_mm, tof_cutoff_sigmas, out, blocks)


@numba.njit(parallel=True, **_JIT)
def _forward_tof(image, xstart, xend, origin_mm, voxel_mm, tof_bin_mm, tof_sigma_mm,
                 tof_offset_mm, tof_cutoff_sigmas, out, blocks):
    origin, voxel, nx, ny, nz = _geometry(image, origin_mm, voxel_mm)
    flat = image.reshape(image.size)
    ntof = out.shape[1]
    shared = _tof_constants(tof_bin_mm, tof_sigma_mm[0], tof_cutoff_sigmas, ntof)
    size = _padded_size(ntof, tof_bin_mm, tof_sigma_mm, tof_cutoff_sigmas)
    n = np.int64(xstart.shape[0])
    for block in numba.prange(blocks):
        padded = np.empty(size)
        start, stop = _block_range(block, blocks, n)
        for lor in range(start, stop):
            tof = _lor_tof(tof_bin_mm, tof_sigma_mm, tof_offset_mm, tof_cutoff_sigmas, ntof, lor,
                           shared)
            _ray_integral_tof(flat, xstart, xend, lor, origin, voxel, nx, ny, nz, tof, out[lor],
                              padded)


def joseph_back_tof(values, xstart, xend, origin_mm, voxel_mm, tof_bin_mm, tof_sigma_mm,
                    tof_offset_mm, tof_cutoff_sigmas, image):
    """image += A^T values for (n, ntof) ``values``: adjoint of :func:`joseph_forward_tof`."""
    buffers = _back_tof(values, xstart, xend, origin_mm, voxel_mm, tof_bin_mm, tof_sigma_mm,
                        tof_offset_mm, tof_cutoff_sigmas, image, _buffer_count(xstart.shape[0]))
    _add_buffers(buffers, image)


@numba.njit(parallel=True, **_JIT)
def _back_tof(values, xstart, xend, origin_mm, voxel_mm, tof_bin_mm, tof_sigma_mm,
              tof_offset_mm, tof_cutoff_sigmas, image, blocks):
    origin, voxel, nx, ny, nz = _geometry(image, origin_mm, voxel_mm)
    flat = image.reshape(image.size)
    ntof = values.shape[1]
    shared = _tof_constants(tof_bin_mm, tof_sigma_mm[0], tof_cutoff_sigmas, ntof)
    size = _padded_size(ntof, tof_bin_mm, tof_sigma_mm, tof_cutoff_sigmas)
    n = np.int64(xstart.shape[0])
    buffers = np.zeros((blocks if blocks > 1 else 0, flat.shape[0]), dtype=np.float32)
    for block in numba.prange(blocks):
        padded = np.empty(size)
        first, stop = _block_range(block, blocks, n)
        buffer = buffers[block] if blocks > 1 else flat
        for lor in range(first, stop):
            tof = _lor_tof(tof_bin_mm, tof_sigma_mm, tof_offset_mm, tof_cutoff_sigmas, ntof, lor,
                           shared)
            _ray_scatter_tof(buffer, values[lor], xstart, xend, lor, origin, voxel, nx, ny, nz,
                             tof, padded)
    return buffers


def joseph_back_tof_summed(values, xstart, xend, origin_mm, voxel_mm, tof_bins, tof_bin_mm,
                           tof_sigma_mm, tof_offset_mm, tof_cutoff_sigmas, image):
    """image += sum over the TOF bins of A_k^T values, for one value per LOR (n,): the TOF
    back projection of ``values`` repeated in every bin (a TOF sensitivity image) at the
    cost of a non-TOF back projection."""
    buffers = _back_tof_summed(values, xstart, xend, origin_mm, voxel_mm, tof_bins,
                               tof_bin_mm, tof_sigma_mm, tof_offset_mm, tof_cutoff_sigmas, image,
                               _buffer_count(xstart.shape[0]))
    _add_buffers(buffers, image)


@numba.njit(parallel=True, **_JIT)
def _back_tof_summed(values, xstart, xend, origin_mm, voxel_mm, tof_bins, tof_bin_mm,
                     tof_sigma_mm, tof_offset_mm, tof_cutoff_sigmas, image, blocks):
    origin, voxel, nx, ny, nz = _geometry(image, origin_mm, voxel_mm)
    flat = image.reshape(image.size)
    ntof = np.int64(tof_bins)
    shared = _tof_constants(tof_bin_mm, tof_sigma_mm[0], tof_cutoff_sigmas, ntof)
    n = np.int64(xstart.shape[0])
    buffers = np.zeros((blocks if blocks > 1 else 0, flat.shape[0]), dtype=np.float32)
    for block in numba.prange(blocks):
        first, stop = _block_range(block, blocks, n)
        buffer = buffers[block] if blocks > 1 else flat
        for lor in range(first, stop):
            tof = _lor_tof(tof_bin_mm, tof_sigma_mm, tof_offset_mm, tof_cutoff_sigmas, ntof, lor,
                           shared)
            _ray_scatter_every_bin(buffer, values[lor], xstart, xend, lor, origin, voxel, nx,
                                   ny, nz, tof, ntof)
    return buffers


@numba.njit(parallel=True, **_JIT)
def sum_members(values, first, out):
    """out[r, p, k] = sum of values[r, j, k] over plane p's members ``first[p] <= j <
    first[p + 1]``: ring-pair projections summed into span > 1 planes."""
    planes = out.shape[1]
    for row in numba.prange(out.shape[0]):
        for plane in range(planes):
            for k in range(out.shape[2]):
                total = np.float32(0.0)
                for member in range(first[plane], first[plane + 1]):
                    total += values[row, member, k]
                out[row, plane, k] = total


@numba.njit(parallel=True, **_JIT)
def repeat_members(values, plane_of, out):
    """out[r, j, k] = values[r, plane_of[j], k]: the adjoint of :func:`sum_members`."""
    for row in numba.prange(out.shape[0]):
        for member in range(out.shape[1]):
            plane = plane_of[member]
            for k in range(out.shape[2]):
                out[row, member, k] = values[row, plane, k]
