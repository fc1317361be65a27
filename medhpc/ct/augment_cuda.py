"""Patch extraction and augmentation kernels on the GPU (twins of :mod:`medhpc.ct.augment_cpu`).

Same launchers and arguments as the CPU module; arrays are device arrays (or
host arrays, copied). One thread per output voxel.
"""

import math

from numba import cuda

from medhpc.backend import launch_config_1d


@cuda.jit(device=True, inline=True)
def _displacement_at(displacement, axis, pz, py, px):
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


@cuda.jit(device=True, inline=True)
def _source_point(matrix, offset, displacement, z, y, x, nz, ny, nx):
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


@cuda.jit(device=True, inline=True)
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


def _warp_image(source, matrix, offset, displacement, fill, out):
    index = cuda.grid(1)
    nz, ny, nx = out.shape
    if index >= nz * ny * nx:
        return
    z = index // (ny * nx)
    y = (index // nx) % ny
    x = index % nx
    sz, sy, sx = _source_point(matrix, offset, displacement, z, y, x, nz, ny, nx)
    out[z, y, x] = _trilinear(source, sz, sy, sx, fill)


def _warp_labels(source, matrix, offset, displacement, out):
    index = cuda.grid(1)
    nz, ny, nx = out.shape
    if index >= nz * ny * nx:
        return
    z = index // (ny * nx)
    y = (index // nx) % ny
    x = index % nx
    mz, my, mx = source.shape
    sz, sy, sx = _source_point(matrix, offset, displacement, z, y, x, nz, ny, nx)
    iz = int(math.floor(sz + 0.5))
    iy = int(math.floor(sy + 0.5))
    ix = int(math.floor(sx + 0.5))
    if 0 <= iz < mz and 0 <= iy < my and 0 <= ix < mx:
        out[z, y, x] = source[iz, iy, ix]
    else:
        out[z, y, x] = 0


def _normalise_hu(source, low, high, mean, std, out):
    i = cuda.grid(1)
    if i < source.shape[0]:
        value = min(max(source[i], low), high)
        out[i] = (value - mean) / std


def _scale_shift(image, scale, shift):
    i = cuda.grid(1)
    if i < image.shape[0]:
        image[i] = image[i] * scale + shift


_VOLUME = "float32[:, :, ::1]"
_LABELS = "uint8[:, :, ::1]"
_MATRIX = "float32[:, ::1]"
_VECTOR = "float32[::1]"
_DISPLACEMENT = "float32[:, :, :, ::1]"
_FLAT = "float32[::1]"

PTX_SIGNATURES = {
    "warp_image": (_warp_image,
                   f"({_VOLUME}, {_MATRIX}, {_VECTOR}, {_DISPLACEMENT}, float32, {_VOLUME})"),
    "warp_labels": (_warp_labels, f"({_LABELS}, {_MATRIX}, {_VECTOR}, {_DISPLACEMENT}, {_LABELS})"),
    "normalise_hu": (_normalise_hu, f"({_FLAT}, float32, float32, float32, float32, {_FLAT})"),
    "scale_shift": (_scale_shift, f"({_FLAT}, float32, float32)"),
}

_warp_image_kernel = cuda.jit(_warp_image)
_warp_labels_kernel = cuda.jit(_warp_labels)
_normalise_hu_kernel = cuda.jit(_normalise_hu)
_scale_shift_kernel = cuda.jit(_scale_shift)


def _flat(array):
    return array.reshape(array.size)


def warp_image(source, matrix, offset, displacement, fill, out):
    """out[p] = source(matrix @ p + offset + displacement(p)), trilinear, ``fill`` outside."""
    blocks, threads = launch_config_1d(out.size)
    _warp_image_kernel[blocks, threads](source, matrix, offset, displacement, fill, out)


def warp_labels(source, matrix, offset, displacement, out):
    """out[p] = source at the nearest voxel of matrix @ p + offset + displacement(p); 0 outside."""
    blocks, threads = launch_config_1d(out.size)
    _warp_labels_kernel[blocks, threads](source, matrix, offset, displacement, out)


def normalise_hu(source, low, high, mean, std, out):
    """out = (clip(source, low, high) - mean) / std."""
    blocks, threads = launch_config_1d(source.size)
    _normalise_hu_kernel[blocks, threads](_flat(source), low, high, mean, std, _flat(out))


def scale_shift(image, scale, shift):
    """image = image * scale + shift, in place (contrast and brightness augmentation)."""
    blocks, threads = launch_config_1d(image.size)
    _scale_shift_kernel[blocks, threads](_flat(image), scale, shift)
