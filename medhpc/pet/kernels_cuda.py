"""Joseph projector on the GPU (twins of :mod:`medhpc.pet.kernels_cpu`).

Same image model, TOF kernel and argument conventions as the CPU twin; the
launchers take numba device arrays (``origin_mm``/``voxel_mm`` may also be host
arrays) and run one thread per LOR in float32. Back-projections add into
``image`` with atomic adds. The plain Python kernels stay importable without a
GPU; :data:`PTX_SIGNATURES` lists them for ``numba.cuda.compile_ptx``.
"""

import math

import numpy as np
from numba import cuda

from medhpc.backend import launch_config_1d

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_HALF = np.float32(0.5)
_AXIS_TIE = np.float32(1.0 + 1e-5)  # kernels_cpu._AXIS_TIE


@cuda.jit(device=True, inline="always")
def _clip_axis(start, step, size, t_min, t_max):
    low = -_HALF
    high = np.float32(size) - _HALF
    if step == _F0:
        if start < low or start > high:
            return _F1, _F0
        return t_min, t_max
    t_low = (low - start) / step
    t_high = (high - start) / step
    if t_low > t_high:
        t_low, t_high = t_high, t_low
    return max(t_min, t_low), min(t_max, t_high)


@cuda.jit(device=True, inline="always")
def _ray(xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz):
    """Per-LOR constants of the slab walk: ``kernels_cpu._ray`` without ``hit``, float32."""
    x0 = (xstart[lor, 0] - origin_mm[0]) / voxel_mm[0]
    y0 = (xstart[lor, 1] - origin_mm[1]) / voxel_mm[1]
    z0 = (xstart[lor, 2] - origin_mm[2]) / voxel_mm[2]
    dx_mm = xend[lor, 0] - xstart[lor, 0]
    dy_mm = xend[lor, 1] - xstart[lor, 1]
    dz_mm = xend[lor, 2] - xstart[lor, 2]
    dx, dy, dz = dx_mm / voxel_mm[0], dy_mm / voxel_mm[1], dz_mm / voxel_mm[2]

    t_min, t_max = _clip_axis(x0, dx, nx, _F0, _F1)
    t_min, t_max = _clip_axis(y0, dy, ny, t_min, t_max)
    t_min, t_max = _clip_axis(z0, dz, nz, t_min, t_max)
    length_mm = math.sqrt(dx_mm * dx_mm + dy_mm * dy_mm + dz_mm * dz_mm)
    hit = t_max > t_min and length_mm > _F0

    ax, ay, az = abs(dx) * _AXIS_TIE, abs(dy), abs(dz)  # near-ties: kernels_cpu._ray
    if ax >= ay and ax >= az:
        size_p, stride_p, start_p, step_p = nx, np.int64(1), x0, dx
        size_a, stride_a, start_a, step_a = ny, nx, y0, dy
        size_b, stride_b, start_b, step_b = nz, nx * ny, z0, dz
    elif ay * _AXIS_TIE >= az:
        size_p, stride_p, start_p, step_p = ny, nx, y0, dy
        size_a, stride_a, start_a, step_a = nx, np.int64(1), x0, dx
        size_b, stride_b, start_b, step_b = nz, nx * ny, z0, dz
    else:
        size_p, stride_p, start_p, step_p = nz, nx * ny, z0, dz
        size_a, stride_a, start_a, step_a = nx, np.int64(1), x0, dx
        size_b, stride_b, start_b, step_b = ny, nx, y0, dy

    first = np.int64(0)
    last = np.int64(-1)
    inv_step_p = _F0
    if hit:
        q_a = start_p + t_min * step_p
        q_b = start_p + t_max * step_p
        first = max(np.int64(math.floor(min(q_a, q_b) + _HALF)), np.int64(0))
        last = min(np.int64(math.floor(max(q_a, q_b) + _HALF)), size_p - 1)
        inv_step_p = _F1 / step_p
    return (first, last, stride_p, stride_a, stride_b, size_a, size_b,
            start_p, inv_step_p, _HALF * abs(inv_step_p), start_a, step_a, start_b, step_b,
            t_min, t_max, length_mm)


@cuda.jit(device=True, inline="always")
def _axis_weights(coord, size, stride):
    coord = min(max(coord, _F0), np.float32(size - 1))
    index = min(np.int64(coord), max(size - 2, np.int64(0)))
    return index * stride, stride if size > 1 else np.int64(0), coord - np.float32(index)


@cuda.jit(device=True, inline="always")
def _slab_sample(ray, plane):
    """(weight_t, t_mid, base, next_a, next_b, frac_a, frac_b) of slab ``plane``."""
    (_, _, stride_p, stride_a, stride_b, size_a, size_b,
     start_p, inv_step_p, half_dt, start_a, step_a, start_b, step_b, t_min, t_max, _) = ray
    t_centre = (np.float32(plane) - start_p) * inv_step_p
    t_low = max(t_centre - half_dt, t_min)
    t_high = min(t_centre + half_dt, t_max)
    t_mid = _HALF * (t_low + t_high)
    offset_a, next_a, frac_a = _axis_weights(start_a + t_mid * step_a, size_a, stride_a)
    offset_b, next_b, frac_b = _axis_weights(start_b + t_mid * step_b, size_b, stride_b)
    return (t_high - t_low, t_mid, plane * stride_p + offset_a + offset_b,
            next_a, next_b, frac_a, frac_b)


@cuda.jit(device=True, inline="always")
def _bilinear(flat, base, next_a, next_b, frac_a, frac_b):
    low = (_F1 - frac_a) * flat[base] + frac_a * flat[base + next_a]
    high = (_F1 - frac_a) * flat[base + next_b] + frac_a * flat[base + next_a + next_b]
    return (_F1 - frac_b) * low + frac_b * high


@cuda.jit(device=True, inline="always")
def _scatter(flat, base, next_a, next_b, frac_a, frac_b, weight):
    w_low = (_F1 - frac_b) * weight
    w_high = frac_b * weight
    cuda.atomic.add(flat, base, (_F1 - frac_a) * w_low)
    cuda.atomic.add(flat, base + next_a, frac_a * w_low)
    cuda.atomic.add(flat, base + next_b, (_F1 - frac_a) * w_high)
    cuda.atomic.add(flat, base + next_a + next_b, frac_a * w_high)


@cuda.jit(device=True, inline="always")
def _lor_kernel(tof_sigma_mm, tof_offset_mm, cutoff_sqrt2, lor):
    """(1 / (sigma sqrt 2), reach_mm, offset_mm) of LOR ``lor`` (length-1 arrays: shared)."""
    sigma_mm = tof_sigma_mm[lor if tof_sigma_mm.shape[0] > 1 else 0]
    offset_mm = tof_offset_mm[lor if tof_offset_mm.shape[0] > 1 else 0]
    inv_sigma_sqrt2 = _F1 / (sigma_mm * np.float32(math.sqrt(2.0)))
    return inv_sigma_sqrt2, cutoff_sqrt2 / inv_sigma_sqrt2, offset_mm


@cuda.jit(device=True, inline="always")
def _tof_range(centre_mm, ntof, tof_bin_mm, reach_mm):
    middle = _HALF * np.float32(ntof - 1)
    first = np.int64(math.floor((centre_mm - reach_mm) / tof_bin_mm + middle - _HALF))
    last = np.int64(math.floor((centre_mm + reach_mm) / tof_bin_mm + middle + _HALF))
    return max(first, np.int64(0)), min(last, ntof - 1), middle


@cuda.jit(device=True, inline="always")
def _tof_edge_cdf(edge_mm, centre_mm, inv_sigma_sqrt2, cutoff_sqrt2):
    return math.erf(min(max((edge_mm - centre_mm) * inv_sigma_sqrt2, -cutoff_sqrt2),
                        cutoff_sqrt2))


def _forward(flat, nx, ny, nz, xstart, xend, origin_mm, voxel_mm, out):
    lor = np.int64(cuda.grid(1))
    if lor >= xstart.shape[0]:
        return
    ray = _ray(xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz)
    total = _F0
    for plane in range(ray[0], ray[1] + 1):
        weight_t, _, base, next_a, next_b, frac_a, frac_b = _slab_sample(ray, plane)
        if weight_t > _F0:
            total += weight_t * _bilinear(flat, base, next_a, next_b, frac_a, frac_b)
    out[lor] = total * ray[16]


def _back(values, nx, ny, nz, xstart, xend, origin_mm, voxel_mm, flat):
    lor = np.int64(cuda.grid(1))
    if lor >= xstart.shape[0]:
        return
    ray = _ray(xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz)
    value_mm = values[lor] * ray[16]
    if value_mm == _F0:
        return
    for plane in range(ray[0], ray[1] + 1):
        weight_t, _, base, next_a, next_b, frac_a, frac_b = _slab_sample(ray, plane)
        if weight_t > _F0:
            _scatter(flat, base, next_a, next_b, frac_a, frac_b, weight_t * value_mm)


def _forward_tof(flat, nx, ny, nz, xstart, xend, origin_mm, voxel_mm, tof_bin_mm,
                 tof_sigma_mm, tof_offset_mm, cutoff_sqrt2, norm, out):
    lor = np.int64(cuda.grid(1))
    if lor >= xstart.shape[0]:
        return
    ntof = np.int64(out.shape[1])
    for k in range(ntof):
        out[lor, k] = _F0
    inv_sigma_sqrt2, reach_mm, offset_mm = _lor_kernel(tof_sigma_mm, tof_offset_mm,
                                                       cutoff_sqrt2, lor)
    ray = _ray(xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz)
    length_mm = ray[16]
    for plane in range(ray[0], ray[1] + 1):
        weight_t, t_mid, base, next_a, next_b, frac_a, frac_b = _slab_sample(ray, plane)
        if weight_t > _F0:
            sample = (weight_t * length_mm * norm
                      * _bilinear(flat, base, next_a, next_b, frac_a, frac_b))
            centre_mm = (t_mid - _HALF) * length_mm + offset_mm
            first, last, middle = _tof_range(centre_mm, ntof, tof_bin_mm, reach_mm)
            cdf_low = _tof_edge_cdf((np.float32(first) - middle - _HALF) * tof_bin_mm,
                                    centre_mm, inv_sigma_sqrt2, cutoff_sqrt2)
            for k in range(first, last + 1):
                cdf_high = _tof_edge_cdf((np.float32(k) - middle + _HALF) * tof_bin_mm,
                                         centre_mm, inv_sigma_sqrt2, cutoff_sqrt2)
                out[lor, k] += sample * (cdf_high - cdf_low)
                cdf_low = cdf_high


def _back_tof(values, nx, ny, nz, xstart, xend, origin_mm, voxel_mm, tof_bin_mm,
              tof_sigma_mm, tof_offset_mm, cutoff_sqrt2, norm, flat):
    lor = np.int64(cuda.grid(1))
    if lor >= xstart.shape[0]:
        return
    ntof = np.int64(values.shape[1])
    inv_sigma_sqrt2, reach_mm, offset_mm = _lor_kernel(tof_sigma_mm, tof_offset_mm,
                                                       cutoff_sqrt2, lor)
    ray = _ray(xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz)
    length_mm = ray[16]
    for plane in range(ray[0], ray[1] + 1):
        weight_t, t_mid, base, next_a, next_b, frac_a, frac_b = _slab_sample(ray, plane)
        if weight_t > _F0:
            centre_mm = (t_mid - _HALF) * length_mm + offset_mm
            first, last, middle = _tof_range(centre_mm, ntof, tof_bin_mm, reach_mm)
            cdf_low = _tof_edge_cdf((np.float32(first) - middle - _HALF) * tof_bin_mm,
                                    centre_mm, inv_sigma_sqrt2, cutoff_sqrt2)
            tof_sum = _F0
            for k in range(first, last + 1):
                cdf_high = _tof_edge_cdf((np.float32(k) - middle + _HALF) * tof_bin_mm,
                                         centre_mm, inv_sigma_sqrt2, cutoff_sqrt2)
                tof_sum += values[lor, k] * (cdf_high - cdf_low)
                cdf_low = cdf_high
            if tof_sum != _F0:
                _scatter(flat, base, next_a, next_b, frac_a, frac_b,
                         weight_t * length_mm * norm * tof_sum)


def _back_tof_summed(values, nx, ny, nz, xstart, xend, origin_mm, voxel_mm, ntof, tof_bin_mm,
                     tof_sigma_mm, tof_offset_mm, cutoff_sqrt2, norm, flat):
    lor = np.int64(cuda.grid(1))
    if lor >= xstart.shape[0]:
        return
    ray = _ray(xstart, xend, lor, origin_mm, voxel_mm, nx, ny, nz)
    length_mm = ray[16]
    value_mm = values[lor] * length_mm * norm
    if value_mm == _F0:
        return
    inv_sigma_sqrt2, reach_mm, offset_mm = _lor_kernel(tof_sigma_mm, tof_offset_mm,
                                                       cutoff_sqrt2, lor)
    full_mm = _HALF * np.float32(ntof) * tof_bin_mm - reach_mm
    for plane in range(ray[0], ray[1] + 1):
        weight_t, t_mid, base, next_a, next_b, frac_a, frac_b = _slab_sample(ray, plane)
        if weight_t > _F0:
            centre_mm = (t_mid - _HALF) * length_mm + offset_mm
            if abs(centre_mm) <= full_mm:  # the bins hold the whole truncated kernel
                coverage = _F1 / norm
            else:  # the bins' sum telescopes to the outer edges of the bins reached
                first, last, middle = _tof_range(centre_mm, ntof, tof_bin_mm, reach_mm)
                coverage = _F0
                if last >= first:
                    coverage = (_tof_edge_cdf((np.float32(last) - middle + _HALF) * tof_bin_mm,
                                              centre_mm, inv_sigma_sqrt2, cutoff_sqrt2)
                                - _tof_edge_cdf((np.float32(first) - middle - _HALF)
                                                * tof_bin_mm, centre_mm, inv_sigma_sqrt2,
                                                cutoff_sqrt2))
            _scatter(flat, base, next_a, next_b, frac_a, frac_b, weight_t * value_mm * coverage)


def _sum_members(values, first, out):
    index = cuda.grid(1)
    rows, planes, bins = out.shape
    if index >= rows * planes * bins:
        return
    row = index // (planes * bins)
    plane = index // bins % planes
    k = index % bins
    total = _F0
    for member in range(first[plane], first[plane + 1]):
        total += values[row, member, k]
    out[row, plane, k] = total


def _repeat_members(values, plane_of, out):
    index = cuda.grid(1)
    rows, members, bins = out.shape
    if index >= rows * members * bins:
        return
    row = index // (members * bins)
    member = index // bins % members
    k = index % bins
    out[row, member, k] = values[row, plane_of[member], k]


_forward_kernel = cuda.jit(_forward)
_back_kernel = cuda.jit(_back)
_forward_tof_kernel = cuda.jit(_forward_tof)
_back_tof_kernel = cuda.jit(_back_tof)
_back_tof_summed_kernel = cuda.jit(_back_tof_summed)
_sum_members_kernel = cuda.jit(_sum_members)
_repeat_members_kernel = cuda.jit(_repeat_members)

_COMMON = "int64, int64, int64, float32[:, ::1], float32[:, ::1], float32[::1], float32[::1]"
_TOF = "float32, float32[::1], float32[::1], float32, float32"
PTX_SIGNATURES = {
    "joseph_forward": (_forward, f"void(float32[::1], {_COMMON}, float32[::1])"),
    "joseph_back": (_back, f"void(float32[::1], {_COMMON}, float32[::1])"),
    "joseph_forward_tof": (_forward_tof,
                           f"void(float32[::1], {_COMMON}, {_TOF}, float32[:, ::1])"),
    "joseph_back_tof": (_back_tof, f"void(float32[:, ::1], {_COMMON}, {_TOF}, float32[::1])"),
    "joseph_back_tof_summed": (_back_tof_summed,
                               f"void(float32[::1], {_COMMON}, int64, {_TOF}, float32[::1])"),
    "sum_members": (_sum_members, "void(float32[:, :, ::1], int64[::1], float32[:, :, ::1])"),
    "repeat_members": (_repeat_members,
                       "void(float32[:, :, ::1], int64[::1], float32[:, :, ::1])"),
}


def _on_device(array):
    if isinstance(array, np.ndarray):
        return cuda.to_device(np.ascontiguousarray(array, dtype=np.float32))
    return array


def _tof_constants(tof_bin_mm, tof_sigma_mm, tof_offset_mm, tof_cutoff_sigmas):
    """Launch arguments (bin_mm, sigma_mm, offset_mm, cutoff / sqrt 2, norm), float32.

    ``norm`` = 1 / (2 erf(cutoff / sqrt 2)) renormalises the truncated Gaussian.
    """
    cutoff_sqrt2 = tof_cutoff_sigmas / math.sqrt(2.0)
    return (np.float32(tof_bin_mm), _on_device(tof_sigma_mm), _on_device(tof_offset_mm),
            np.float32(cutoff_sqrt2), np.float32(0.5 / math.erf(cutoff_sqrt2)))


def _launch(kernel, n_lors, *args):
    if n_lors == 0:
        return
    blocks, threads = launch_config_1d(n_lors)
    kernel[blocks, threads](*args)


def joseph_forward(image, xstart, xend, origin_mm, voxel_mm, out):
    """out[i] = line integral (value x mm) of the device ``image`` along LOR i."""
    nz, ny, nx = image.shape
    _launch(_forward_kernel, xstart.shape[0], image.reshape(image.size), nx, ny, nz, xstart,
            xend, _on_device(origin_mm), _on_device(voxel_mm), out)


def joseph_back(values, xstart, xend, origin_mm, voxel_mm, image):
    """image += A^T values on the device (atomic adds)."""
    nz, ny, nx = image.shape
    _launch(_back_kernel, xstart.shape[0], values, nx, ny, nz, xstart, xend,
            _on_device(origin_mm), _on_device(voxel_mm), image.reshape(image.size))


def joseph_forward_tof(image, xstart, xend, origin_mm, voxel_mm, tof_bin_mm, tof_sigma_mm,
                       tof_offset_mm, tof_cutoff_sigmas, out):
    """out[i, k] = TOF-weighted line integral of the device ``image`` along LOR i, bin k.

    ``tof_sigma_mm``/``tof_offset_mm``: one kernel width and offset per LOR, or length 1.
    """
    nz, ny, nx = image.shape
    _launch(_forward_tof_kernel, xstart.shape[0], image.reshape(image.size), nx, ny, nz,
            xstart, xend, _on_device(origin_mm), _on_device(voxel_mm),
            *_tof_constants(tof_bin_mm, tof_sigma_mm, tof_offset_mm, tof_cutoff_sigmas), out)


def joseph_back_tof(values, xstart, xend, origin_mm, voxel_mm, tof_bin_mm, tof_sigma_mm,
                    tof_offset_mm, tof_cutoff_sigmas, image):
    """image += A^T values for (n, ntof) device ``values`` (atomic adds)."""
    nz, ny, nx = image.shape
    _launch(_back_tof_kernel, xstart.shape[0], values, nx, ny, nz, xstart, xend,
            _on_device(origin_mm), _on_device(voxel_mm),
            *_tof_constants(tof_bin_mm, tof_sigma_mm, tof_offset_mm, tof_cutoff_sigmas),
            image.reshape(image.size))


def joseph_back_tof_summed(values, xstart, xend, origin_mm, voxel_mm, tof_bins, tof_bin_mm,
                           tof_sigma_mm, tof_offset_mm, tof_cutoff_sigmas, image):
    """image += sum over the TOF bins of A_k^T values for (n,) device ``values`` (atomic adds)."""
    nz, ny, nx = image.shape
    _launch(_back_tof_summed_kernel, xstart.shape[0], values, nx, ny, nz, xstart, xend,
            _on_device(origin_mm), _on_device(voxel_mm), np.int64(tof_bins),
            *_tof_constants(tof_bin_mm, tof_sigma_mm, tof_offset_mm, tof_cutoff_sigmas),
            image.reshape(image.size))


def sum_members(values, first, out):
    """out[r, p, k] = sum over plane p's members of values[r, j, k] (device arrays)."""
    _launch(_sum_members_kernel, out.size, values, first, out)


def repeat_members(values, plane_of, out):
    """out[r, j, k] = values[r, plane_of[j], k] (device arrays)."""
    _launch(_repeat_members_kernel, out.size, values, plane_of, out)
