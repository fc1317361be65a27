"""TNR kernels on the GPU (twins of :mod:`medhpc.tnr.kernels_cpu`).

``zncc_scores`` correlates directly: one thread per (template, offset), the
template staged through shared memory in tiles of ``TILE x TILE`` pixels. Every
thread accumulates the five sums of the Pearson correlation in float32 on data
shifted by one of its own pixels (the template's and the window's centre
values), which keeps the differences well conditioned. ``remap`` runs one thread
per output pixel. Launchers take numba device arrays (host arrays are copied).
"""

import math

import numpy as np
from numba import cuda

from medhpc.backend import launch_config_1d

TILE = 32
OFFSETS_PER_BLOCK = 256
FLAT_VARIANCE = np.float32(1e-10)

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)


def _zncc(templates, windows, out):
    patch = cuda.blockIdx.y
    offset = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    span_y, span_x = out.shape[1], out.shape[2]
    p = templates.shape[1]
    w = windows.shape[1]
    tile = cuda.shared.array((TILE, TILE), np.float32)
    active = offset < span_y * span_x
    dy = offset // span_x if active else 0
    dx = offset % span_x if active else 0
    shift_t = templates[patch, p // 2, p // 2]
    shift_w = windows[patch, w // 2, w // 2]
    sum_t = _F0
    sum_tt = _F0
    sum_w = _F0
    sum_ww = _F0
    sum_tw = _F0
    for ty0 in range(0, p, TILE):
        for tx0 in range(0, p, TILE):
            cuda.syncthreads()
            for k in range(cuda.threadIdx.x, TILE * TILE, cuda.blockDim.x):
                ky = ty0 + k // TILE
                kx = tx0 + k % TILE
                value = _F0
                if ky < p and kx < p:
                    value = templates[patch, ky, kx] - shift_t
                tile[k // TILE, k % TILE] = value
            cuda.syncthreads()
            if active:
                rows = min(TILE, p - ty0)
                cols = min(TILE, p - tx0)
                for j in range(rows):
                    for i in range(cols):
                        t = tile[j, i]
                        v = windows[patch, dy + ty0 + j, dx + tx0 + i] - shift_w
                        sum_t += t
                        sum_tt += t * t
                        sum_w += v
                        sum_ww += v * v
                        sum_tw += t * v
    if active:
        n = np.float32(p * p)
        variance_t = sum_tt - sum_t * sum_t / n
        variance_w = sum_ww - sum_w * sum_w / n
        score = _F0
        if variance_t > FLAT_VARIANCE * n and variance_w > FLAT_VARIANCE * n:
            score = (sum_tw - sum_t * sum_w / n) / math.sqrt(variance_t * variance_w)
        out[patch, dy, dx] = score


@cuda.jit(device=True, inline="always")
def _cubic_weight(t):
    t = abs(t)
    if t < _F1:
        return (np.float32(1.5) * t - np.float32(2.5)) * t * t + _F1
    if t < np.float32(2.0):
        return ((np.float32(-0.5) * t + np.float32(2.5)) * t - np.float32(4.0)) * t + np.float32(2.0)
    return _F0


def _remap(image, coord_y, coord_x, order, fill, out):
    index = cuda.grid(1)
    oy, ox = out.shape
    if index >= oy * ox:
        return
    row = index // ox
    col = index % ox
    ny, nx = image.shape
    y = coord_y[row, col]
    x = coord_x[row, col]
    half = np.float32(0.5)
    if not (-half <= y <= np.float32(ny) - half and -half <= x <= np.float32(nx) - half):
        out[row, col] = fill
        return
    y = min(max(y, _F0), np.float32(ny - 1))
    x = min(max(x, _F0), np.float32(nx - 1))
    y0 = int(math.floor(y))
    x0 = int(math.floor(x))
    fy = y - np.float32(y0)
    fx = x - np.float32(x0)
    if order == 1:
        y1 = min(y0 + 1, ny - 1)
        x1 = min(x0 + 1, nx - 1)
        top = (_F1 - fx) * image[y0, x0] + fx * image[y0, x1]
        bottom = (_F1 - fx) * image[y1, x0] + fx * image[y1, x1]
        out[row, col] = (_F1 - fy) * top + fy * bottom
        return
    total = _F0
    for j in range(-1, 3):
        wy = _cubic_weight(fy - np.float32(j))
        yy = min(max(y0 + j, 0), ny - 1)
        line = _F0
        for i in range(-1, 3):
            xx = min(max(x0 + i, 0), nx - 1)
            line += _cubic_weight(fx - np.float32(i)) * image[yy, xx]
        total += wy * line
    out[row, col] = total


_zncc_kernel = cuda.jit(_zncc)
_remap_kernel = cuda.jit(_remap)

#: The kernels compute in float32: :class:`~medhpc.backend.HostStaged` casts host arrays.
HOST_DTYPE = np.float32

PTX_SIGNATURES = {
    "zncc_scores": (_zncc, "void(float32[:, :, ::1], float32[:, :, ::1], float32[:, :, ::1])"),
    "remap": (_remap, "void(float32[:, ::1], float32[:, ::1], float32[:, ::1], int64, float32, "
                      "float32[:, ::1])"),
}


def _on_device(array):
    if isinstance(array, np.ndarray):
        return cuda.to_device(np.ascontiguousarray(array, dtype=np.float32))
    return array


def zncc_scores(templates, windows, out):
    """Zero-mean NCC of every template at every position inside its window (see the CPU twin)."""
    batch = templates.shape[0]
    if batch == 0:
        return
    offsets = out.shape[1] * out.shape[2]
    blocks = (offsets + OFFSETS_PER_BLOCK - 1) // OFFSETS_PER_BLOCK
    _zncc_kernel[(blocks, batch), OFFSETS_PER_BLOCK](_on_device(templates), _on_device(windows),
                                                    out)


def remap(image, coord_y, coord_x, order, fill, out):
    """Sample ``image`` at (coord_y, coord_x) into ``out`` (see the CPU twin)."""
    blocks, threads = launch_config_1d(out.shape[0] * out.shape[1])
    _remap_kernel[blocks, threads](_on_device(image), _on_device(coord_y), _on_device(coord_x),
                                   int(order), np.float32(fill), out)
