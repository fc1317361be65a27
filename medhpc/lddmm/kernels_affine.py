"""Kernels of the affine start (:mod:`medhpc.lddmm.affine`); CPU only.

The affine start runs on one rank on the host and costs a small part of an LDDMM level,
so these kernels have no CUDA twin. They are serial (one thread) and accumulate in
float64 in sample order, so the same inputs give the same sums bit for bit.

Layouts: images are float32 ``(nz, ny, nx)``; a *value-gradient* volume is float32
``(nz, ny, nx, 4)`` holding the image and its gradient in world mm ``(x, y, z)`` at every
voxel; sample offsets are float64 ``(n, 3)`` fixed world positions ``(x, y, z)`` in mm
relative to the centre of the transform; a *point map* is a float64 ``(3, 4)`` matrix taking
``(offset, 1)`` to a moving voxel position ``(x, y, z)``.

The Jacobian of a sampled moving value ``m`` with respect to the 12 affine parameters
``a = (A.ravel(), t)`` of ``q = A h + c + t`` is ``J = (g_x h, g_y h, g_z h, g)``, with
``g`` the world gradient at ``q`` and ``h`` the offset.
"""

import math

import numba
import numpy as np

from medhpc.lddmm.parzen import bin_position as _bin_position
from medhpc.lddmm.parzen import bspline3 as _bspline3


@numba.njit(cache=True)
def block_mean(image, fz, fy, fx, out):
    """``out[k, j, i]``: mean of ``image`` over the block of ``fz x fy x fx`` voxels at
    ``(k fz, j fy, i fx)``; ``out`` has ``n // f`` voxels per axis (partial blocks dropped)."""
    oz, oy, ox = out.shape
    scale = 1.0 / (fz * fy * fx)
    for k in range(oz):
        for j in range(oy):
            for i in range(ox):
                total = 0.0
                for dz in range(fz):
                    for dy in range(fy):
                        for dx in range(fx):
                            total += image[k * fz + dz, j * fy + dy, i * fx + dx]
                out[k, j, i] = total * scale


@numba.njit(cache=True)
def smooth_axis(source, axis, out):
    """``[1, 2, 1] / 4`` along ``axis`` (0: z, 1: y, 2: x), replicated edges."""
    nz, ny, nx = source.shape
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                if axis == 0:
                    low = source[max(z - 1, 0), y, x]
                    high = source[min(z + 1, nz - 1), y, x]
                elif axis == 1:
                    low = source[z, max(y - 1, 0), x]
                    high = source[z, min(y + 1, ny - 1), x]
                else:
                    low = source[z, y, max(x - 1, 0)]
                    high = source[z, y, min(x + 1, nx - 1)]
                out[z, y, x] = 0.25 * low + 0.5 * source[z, y, x] + 0.25 * high


@numba.njit(cache=True)
def value_gradient(image, to_world, out):
    """Fill ``out (nz, ny, nx, 4)`` with the image and its world gradient.

    The voxel gradient ``(d/dx, d/dy, d/dz)`` is by central differences (one-sided at the
    ends) and ``to_world`` (float64 3x3) turns it into mm^-1: ``grad_world = to_world @
    grad_voxel`` (the transpose of the world-to-voxel matrix).
    """
    nz, ny, nx = image.shape
    for z in range(nz):
        z0, z1 = max(z - 1, 0), min(z + 1, nz - 1)
        sz = 1.0 / (z1 - z0) if z1 > z0 else 0.0
        for y in range(ny):
            y0, y1 = max(y - 1, 0), min(y + 1, ny - 1)
            sy = 1.0 / (y1 - y0) if y1 > y0 else 0.0
            for x in range(nx):
                x0, x1 = max(x - 1, 0), min(x + 1, nx - 1)
                sx = 1.0 / (x1 - x0) if x1 > x0 else 0.0
                gx = (image[z, y, x1] - image[z, y, x0]) * sx
                gy = (image[z, y1, x] - image[z, y0, x]) * sy
                gz = (image[z1, y, x] - image[z0, y, x]) * sz
                out[z, y, x, 0] = image[z, y, x]
                for a in range(3):
                    out[z, y, x, 1 + a] = (to_world[a, 0] * gx + to_world[a, 1] * gy
                                           + to_world[a, 2] * gz)


@numba.njit(cache=True)
def sample_moving(volume, mask, use_mask, point_map, offsets, values, gradients, valid):
    """Trilinear value and world gradient of a value-gradient ``volume`` at the moving
    voxel ``point_map @ (offset, 1)`` of every sample.

    A sample is valid (``valid[i] = 1``) when its point lies inside the grid (``0 <= x <=
    nx - 1`` on every axis) and, with ``use_mask``, none of its 8 neighbours is zero in
    ``mask`` (uint8, the grid's shape); ``values`` and ``gradients (n, 3)`` are zero
    elsewhere.
    """
    nz, ny, nx = volume.shape[0], volume.shape[1], volume.shape[2]
    for i in range(offsets.shape[0]):
        hx, hy, hz = offsets[i, 0], offsets[i, 1], offsets[i, 2]
        px = point_map[0, 0] * hx + point_map[0, 1] * hy + point_map[0, 2] * hz + point_map[0, 3]
        py = point_map[1, 0] * hx + point_map[1, 1] * hy + point_map[1, 2] * hz + point_map[1, 3]
        pz = point_map[2, 0] * hx + point_map[2, 1] * hy + point_map[2, 2] * hz + point_map[2, 3]
        values[i] = 0.0
        gradients[i, 0] = 0.0
        gradients[i, 1] = 0.0
        gradients[i, 2] = 0.0
        valid[i] = 0
        if not (0.0 <= px <= nx - 1 and 0.0 <= py <= ny - 1 and 0.0 <= pz <= nz - 1):
            continue
        x0 = min(int(px), max(nx - 2, 0))
        y0 = min(int(py), max(ny - 2, 0))
        z0 = min(int(pz), max(nz - 2, 0))
        x1, y1, z1 = min(x0 + 1, nx - 1), min(y0 + 1, ny - 1), min(z0 + 1, nz - 1)
        if use_mask and (mask[z0, y0, x0] == 0 or mask[z0, y0, x1] == 0
                         or mask[z0, y1, x0] == 0 or mask[z0, y1, x1] == 0
                         or mask[z1, y0, x0] == 0 or mask[z1, y0, x1] == 0
                         or mask[z1, y1, x0] == 0 or mask[z1, y1, x1] == 0):
            continue
        wx, wy, wz = px - x0, py - y0, pz - z0
        for c in range(4):
            c00 = volume[z0, y0, x0, c] * (1.0 - wx) + volume[z0, y0, x1, c] * wx
            c01 = volume[z0, y1, x0, c] * (1.0 - wx) + volume[z0, y1, x1, c] * wx
            c10 = volume[z1, y0, x0, c] * (1.0 - wx) + volume[z1, y0, x1, c] * wx
            c11 = volume[z1, y1, x0, c] * (1.0 - wx) + volume[z1, y1, x1, c] * wx
            v = (c00 * (1.0 - wy) + c01 * wy) * (1.0 - wz) + (c10 * (1.0 - wy) + c11 * wy) * wz
            if c == 0:
                values[i] = v
            else:
                gradients[i, c - 1] = v
        valid[i] = 1


@numba.njit(inline="always")
def _jacobian(gradients, offsets, i, row):
    """The 12 derivatives of sample ``i``'s moving value (see the module notes)."""
    for a in range(3):
        g = gradients[i, a]
        for b in range(3):
            row[3 * a + b] = g * offsets[i, b]
        row[9 + a] = g


@numba.njit(cache=True)
def moment_sums(fixed, values, gradients, valid, offsets, scalars, first, second):
    """Sums over the valid samples for SSD and NCC and their Gauss-Newton terms.

    ``scalars (6,)``: count, sum f, sum f^2, sum m, sum m^2, sum f m; ``first (3, 12)``:
    sum J, sum f J, sum m J; ``second (12, 12)``: sum J J^T. All are overwritten.
    """
    scalars[:] = 0.0
    first[:, :] = 0.0
    second[:, :] = 0.0
    row = np.empty(12)
    for i in range(fixed.shape[0]):
        if valid[i] == 0:
            continue
        f = fixed[i]
        m = values[i]
        scalars[0] += 1.0
        scalars[1] += f
        scalars[2] += f * f
        scalars[3] += m
        scalars[4] += m * m
        scalars[5] += f * m
        _jacobian(gradients, offsets, i, row)
        for p in range(12):
            jp = row[p]
            first[0, p] += jp
            first[1, p] += f * jp
            first[2, p] += m * jp
            for q in range(p, 12):
                second[p, q] += jp * row[q]
    for p in range(12):
        for q in range(p):
            second[p, q] = second[q, p]


@numba.njit(cache=True)
def joint_histogram(fixed_bins, values, valid, low, high, joint):
    """Parzen joint histogram ``joint (bins, bins)`` (rows: fixed bins) of the valid samples.

    The fixed value of a sample falls in one bin (``fixed_bins``, int); the moving value
    ``m``, clamped to ``[low, high]``, sits at the continuous bin ``u = 1 + (bins - 3) (m -
    low) / (high - low)`` and is spread over its four neighbours by a cubic B-spline.
    ``joint`` is overwritten, unnormalised; returns the number of valid samples.
    """
    bins = joint.shape[0]
    joint[:, :] = 0.0
    du_dm = (bins - 3) / (high - low)
    count = 0
    for i in range(fixed_bins.shape[0]):
        if valid[i] == 0:
            continue
        count += 1
        u, _ = _bin_position(values[i], low, high, du_dm)
        start = int(math.floor(u)) - 1
        for k in range(max(start, 0), min(start + 4, bins)):
            joint[fixed_bins[i], k] += _bspline3(k - u)[0]
    return count


@numba.njit(cache=True)
def information_sums(fixed_bins, values, gradients, valid, offsets, low, high, log_ratio,
                     first, second):
    """Gradient and Gauss-Newton sums of mutual information over the valid samples.

    With ``L = log_ratio (bins, bins)``, ``log p(i, k) / p_M(k)`` of the joint histogram
    (zero on empty bins; a term constant along a row, such as ``-log p_F(i)``, adds
    nothing to the sums), and ``u`` as in :func:`joint_histogram`, every sample adds
    ``a J`` to ``first (12,)`` and ``max(-b, 0) J J^T`` to ``second (12, 12)``, where
    ``a = du/dm sum_k B'(k - u) L(i, k)`` and ``b = (du/dm)^2 sum_k B''(k - u) L(i, k)``.
    Both are overwritten.
    """
    bins = log_ratio.shape[0]
    first[:] = 0.0
    second[:, :] = 0.0
    du_dm = (bins - 3) / (high - low)
    row = np.empty(12)
    for i in range(fixed_bins.shape[0]):
        if valid[i] == 0:
            continue
        u, slope = _bin_position(values[i], low, high, du_dm)
        if slope == 0.0:
            continue
        start = int(math.floor(u)) - 1
        fb = fixed_bins[i]
        a = 0.0
        b = 0.0
        for k in range(max(start, 0), min(start + 4, bins)):
            _, d1, d2 = _bspline3(k - u)
            a += d1 * log_ratio[fb, k]
            b += d2 * log_ratio[fb, k]
        a *= slope
        b = -b * slope * slope
        _jacobian(gradients, offsets, i, row)
        for p in range(12):
            first[p] += a * row[p]
        if b > 0.0:
            for p in range(12):
                bp = b * row[p]
                for q in range(p, 12):
                    second[p, q] += bp * row[q]
    for p in range(12):
        for q in range(p):
            second[p, q] = second[q, p]


@numba.njit(inline="always")
def _catmull_rom(t):
    """Weights of the four neighbours ``-1, 0, 1, 2`` at fraction ``t`` (Catmull-Rom)."""
    t2 = t * t
    t3 = t2 * t
    return (0.5 * (-t3 + 2.0 * t2 - t), 0.5 * (3.0 * t3 - 5.0 * t2 + 2.0),
            0.5 * (-3.0 * t3 + 4.0 * t2 + t), 0.5 * (t3 - t2))


@numba.njit(parallel=True, cache=True)
def sample_points_cubic(image, points, fill, out):
    """Catmull-Rom cubic samples of ``image`` at voxel positions ``points (3, n)`` (z, y, x).

    Interpolating (no prefilter), a sharper kernel than trilinear; neighbours beyond the
    volume repeat its edge, points more than half a voxel outside get ``fill``.
    """
    nz, ny, nx = image.shape
    for i in numba.prange(points.shape[1]):
        pz, py, px = points[0, i], points[1, i], points[2, i]
        if (pz < -0.5 or pz > nz - 0.5 or py < -0.5 or py > ny - 0.5
                or px < -0.5 or px > nx - 0.5):
            out[i] = fill
            continue
        z0, y0, x0 = int(math.floor(pz)), int(math.floor(py)), int(math.floor(px))
        wz = _catmull_rom(pz - z0)
        wy = _catmull_rom(py - y0)
        wx = _catmull_rom(px - x0)
        total = 0.0
        for a in range(4):
            zz = min(max(z0 - 1 + a, 0), nz - 1)
            for b in range(4):
                yy = min(max(y0 - 1 + b, 0), ny - 1)
                row = 0.0
                for c in range(4):
                    xx = min(max(x0 - 1 + c, 0), nx - 1)
                    row += wx[c] * image[zz, yy, xx]
                total += wz[a] * wy[b] * row
        out[i] = total
