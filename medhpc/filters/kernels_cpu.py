"""Image filters on the CPU (twins of :mod:`medhpc.filters.kernels_cuda`)."""

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def convolve_axis(source, weights, axis, out):
    """Convolve a 3-D ``source`` with odd-length ``weights`` along ``axis`` into ``out``.

    Zero boundary; the operator is symmetric for symmetric weights, so it is
    its own adjoint.
    """
    nz, ny, nx = source.shape
    radius = weights.shape[0] // 2
    for z_index in numba.prange(nz):
        z = np.int64(z_index)
        for y in range(ny):
            for x in range(nx):
                total = 0.0
                for k in range(-radius, radius + 1):
                    if axis == 0:
                        zz, yy, xx = z + k, y, x
                    elif axis == 1:
                        zz, yy, xx = z, y + k, x
                    else:
                        zz, yy, xx = z, y, x + k
                    if 0 <= zz < nz and 0 <= yy < ny and 0 <= xx < nx:
                        total += weights[k + radius] * source[zz, yy, xx]
                out[z, y, x] = total
