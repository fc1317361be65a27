"""Image filters on the GPU (twins of :mod:`medhpc.filters.kernels_cpu`)."""

from numba import cuda

from medhpc.backend import launch_config_1d


def _convolve_axis(source, weights, axis, out):
    index = cuda.grid(1)
    nz, ny, nx = source.shape
    if index >= nz * ny * nx:
        return
    z = index // (ny * nx)
    y = (index // nx) % ny
    x = index % nx
    radius = weights.shape[0] // 2
    total = 0.0
    for k in range(-radius, radius + 1):
        zz, yy, xx = z, y, x
        if axis == 0:
            zz = z + k
        elif axis == 1:
            yy = y + k
        else:
            xx = x + k
        if 0 <= zz < nz and 0 <= yy < ny and 0 <= xx < nx:
            total += weights[k + radius] * source[zz, yy, xx]
    out[z, y, x] = total


convolve_axis_kernel = cuda.jit(_convolve_axis)

PTX_SIGNATURES = {
    "convolve_axis": (_convolve_axis, "(float32[:, :, ::1], float32[::1], int64, float32[:, :, ::1])"),
}


def convolve_axis(source, weights, axis, out):
    """Convolve a 3-D device array along ``axis`` (zero boundary) into ``out``."""
    blocks, threads = launch_config_1d(source.size)
    convolve_axis_kernel[blocks, threads](source, weights, axis, out)
