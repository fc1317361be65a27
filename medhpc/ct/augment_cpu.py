"""Patch extraction and augmentation kernels on the CPU (twins of :mod:`medhpc.ct.augment_cuda`).

A patch is resampled from a whole case in one pass: output voxel ``p = (z, y, x)``
reads the case at ``matrix @ p + offset`` (voxels, ``z, y, x`` order) plus, for
elastic deformation, a displacement (voxels) interpolated trilinearly from a
coarse grid ``displacement[3, gz, gy, gx]`` spanning the patch. Cropping,
flips, rotations and scaling are all in ``matrix`` and ``offset``; a
``displacement`` with a single grid point per axis and zero values is the
identity. Images are interpolated trilinearly (``fill`` outside the case),
labels take the nearest voxel (0 outside).
"""

import math

import numba


@numba.njit(inline="always")
def _displacement_at(displacement, axis, pz, py, px):
    """Trilinear sample of ``displacement[axis]`` at grid coordinates (pz, py, px)."""
    gz, gy, gx = displacement.shape[1], displacement.shape[2], displacement.shape[3]
    z0 = min(int(math.floor(pz)), gz - 1)
    y0 = min(int(math.floor(py)), gy - 1)
    x0 = min(int(math.floor(px)), gx - 1)
    z1, y1, x1 = min(z0 + 1, gz - 1), min(y0 + 1, gy - 1), min(x0 + 1, gx - 1)
    fz, fy, fx = pz - z0, py - y0, px - x0
    c00 = displacement[axis, z0, y0, x0] * (1 - fx) + displacement[axis, z0, y0, x1] * fx
    c01 = displacement[axis, z0, y1, x0] * (1 - fx) + displacement[axis, z0, y1, x1] * fx
    c10 = displacement[axis, z1, y0, x0] * (1 - fx) + displacement[axis, z1, y0, x1] * fx
    c11 = displacement[axis, z1, y1, x0] * (1 - fx) + displacement[axis, z1, y1, x1] * fx
    return (c00 * (1 - fy) + c01 * fy) * (1 - fz) + (c10 * (1 - fy) + c11 * fy) * fz


@numba.njit(inline="always")
def _source_point(matrix, offset, displacement, z, y, x, nz, ny, nx):
    """Case coordinates (z, y, x) in voxels that output voxel (z, y, x) reads."""
    sz = matrix[0, 0] * z + matrix[0, 1] * y + matrix[0, 2] * x + offset[0]
    sy = matrix[1, 0] * z + matrix[1, 1] * y + matrix[1, 2] * x + offset[1]
    sx = matrix[2, 0] * z + matrix[2, 1] * y + matrix[2, 2] * x + offset[2]
    gz, gy, gx = displacement.shape[1], displacement.shape[2], displacement.shape[3]
    if gz * gy * gx > 1:
        pz = z * (gz - 1) / max(nz - 1, 1)
        py = y * (gy - 1) / max(ny - 1, 1)
        px = x * (gx - 1) / max(nx - 1, 1)
        sz += _displacement_at(displacement, 0, pz, py, px)
        sy += _displacement_at(displacement, 1, pz, py, px)
        sx += _displacement_at(displacement, 2, pz, py, px)
    return sz, sy, sx


@numba.njit(inline="always")
def _trilinear(source, sz, sy, sx, fill):
    nz, ny, nx = source.shape
    z0, y0, x0 = int(math.floor(sz)), int(math.floor(sy)), int(math.floor(sx))
    fz, fy, fx = sz - z0, sy - y0, sx - x0
    total = 0.0
    for dz in range(2):
        wz = fz if dz else 1.0 - fz
        zz = z0 + dz
        for dy in range(2):
            wy = fy if dy else 1.0 - fy
            yy = y0 + dy
            for dx in range(2):
                wx = fx if dx else 1.0 - fx
                xx = x0 + dx
                if 0 <= zz < nz and 0 <= yy < ny and 0 <= xx < nx:
                    value = source[zz, yy, xx]
                else:
                    value = fill
                total += wz * wy * wx * value
    return total


@numba.njit(parallel=True, cache=True)
def warp_image(source, matrix, offset, displacement, fill, out):
    """out[p] = source(matrix @ p + offset + displacement(p)), trilinear, ``fill`` outside."""
    nz, ny, nx = out.shape
    for z in numba.prange(nz):
        for y in range(ny):
            for x in range(nx):
                sz, sy, sx = _source_point(matrix, offset, displacement, z, y, x, nz, ny, nx)
                out[z, y, x] = _trilinear(source, sz, sy, sx, fill)


@numba.njit(parallel=True, cache=True)
def warp_labels(source, matrix, offset, displacement, out):
    """out[p] = source at the nearest voxel of matrix @ p + offset + displacement(p); 0 outside."""
    nz, ny, nx = out.shape
    mz, my, mx = source.shape
    for z in numba.prange(nz):
        for y in range(ny):
            for x in range(nx):
                sz, sy, sx = _source_point(matrix, offset, displacement, z, y, x, nz, ny, nx)
                iz = int(math.floor(sz + 0.5))
                iy = int(math.floor(sy + 0.5))
                ix = int(math.floor(sx + 0.5))
                if 0 <= iz < mz and 0 <= iy < my and 0 <= ix < mx:
                    out[z, y, x] = source[iz, iy, ix]
                else:
                    out[z, y, x] = 0


@numba.njit(parallel=True, cache=True)
def normalise_hu(source, low, high, mean, std, out):
    """out = (clip(source, low, high) - mean) / std."""
    flat_in = source.reshape(-1)
    flat_out = out.reshape(-1)
    for i in numba.prange(flat_in.shape[0]):
        value = min(max(flat_in[i], low), high)
        flat_out[i] = (value - mean) / std


@numba.njit(parallel=True, cache=True)
def scale_shift(image, scale, shift):
    """image = image * scale + shift, in place (contrast and brightness augmentation)."""
    flat = image.reshape(-1)
    for i in numba.prange(flat.shape[0]):
        flat[i] = flat[i] * scale + shift

