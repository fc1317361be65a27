"""LDDMM kernels on the GPU (twins of :mod:`medhpc.lddmm.kernels_cpu`, same signatures).

One thread per output voxel, float32 arithmetic. The launchers take numba device
arrays (scalars as Python numbers); layouts and conventions are those of the CPU twin.
"""

import math

from numba import cuda, float32, float64

from medhpc.backend import launch_config_1d
from medhpc.lddmm import parzen


@cuda.jit(device=True, inline=True)
def _corner(position, n):
    if position < float32(0.0):
        position = float32(0.0)
    elif position > float32(n - 1):
        position = float32(n - 1)
    lower = int(position)
    if lower > n - 2:
        lower = max(n - 2, 0)
    upper = min(lower + 1, n - 1)
    return lower, upper, position - float32(lower)


@cuda.jit(device=True, inline=True)
def _blend(f, z0, z1, wz, y0, y1, wy, x0, x1, wx):
    one = float32(1.0)
    c00 = f[z0, y0, x0] * (one - wx) + f[z0, y0, x1] * wx
    c01 = f[z0, y1, x0] * (one - wx) + f[z0, y1, x1] * wx
    c10 = f[z1, y0, x0] * (one - wx) + f[z1, y0, x1] * wx
    c11 = f[z1, y1, x0] * (one - wx) + f[z1, y1, x1] * wx
    return (c00 * (one - wy) + c01 * wy) * (one - wz) + (c10 * (one - wy) + c11 * wy) * wz


@cuda.jit(device=True, inline=True)
def _blend_component(f, c, z0, z1, wz, y0, y1, wy, x0, x1, wx):
    one = float32(1.0)
    c00 = f[c, z0, y0, x0] * (one - wx) + f[c, z0, y0, x1] * wx
    c01 = f[c, z0, y1, x0] * (one - wx) + f[c, z0, y1, x1] * wx
    c10 = f[c, z1, y0, x0] * (one - wx) + f[c, z1, y0, x1] * wx
    c11 = f[c, z1, y1, x0] * (one - wx) + f[c, z1, y1, x1] * wx
    return (c00 * (one - wy) + c01 * wy) * (one - wz) + (c10 * (one - wy) + c11 * wy) * wz


@cuda.jit(device=True, inline=True)
def _difference(f, c, index, n, step_z, step_y, step_x, z, y, x):
    if n == 1:
        return float32(0.0)
    if index == 0:
        return f[c, z + step_z, y + step_y, x + step_x] - f[c, z, y, x]
    if index == n - 1:
        return f[c, z, y, x] - f[c, z - step_z, y - step_y, x - step_x]
    return float32(0.5) * (f[c, z + step_z, y + step_y, x + step_x]
                           - f[c, z - step_z, y - step_y, x - step_x])


@cuda.jit(device=True, inline=True)
def _difference_3d(f, index, n, step_z, step_y, step_x, z, y, x):
    if n == 1:
        return float32(0.0)
    if index == 0:
        return f[z + step_z, y + step_y, x + step_x] - f[z, y, x]
    if index == n - 1:
        return f[z, y, x] - f[z - step_z, y - step_y, x - step_x]
    return float32(0.5) * (f[z + step_z, y + step_y, x + step_x]
                           - f[z - step_z, y - step_y, x - step_x])


def _compose_displacement(u, v, scale, halo, z_first, nz_global, out):
    index = cuda.grid(1)
    owned, ny, nx = v.shape[1], v.shape[2], v.shape[3]
    if index >= owned * ny * nx:
        return
    zo = index // (ny * nx)
    y = (index // nx) % ny
    x = index % nx
    local_nz = u.shape[1]
    z_low = max(0, halo - z_first)
    z_high = min(local_nz - 1, halo + nz_global - 1 - z_first)
    zl = zo + halo
    dz = scale * v[0, zo, y, x]
    dy = scale * v[1, zo, y, x]
    dx = scale * v[2, zo, y, x]
    pz = min(max(float32(zl) + dz, float32(z_low)), float32(z_high)) - float32(z_low)
    z0, z1, wz = _corner(pz, z_high - z_low + 1)
    y0, y1, wy = _corner(float32(y) + dy, ny)
    x0, x1, wx = _corner(float32(x) + dx, nx)
    z0 += z_low
    z1 += z_low
    out[0, zl, y, x] = dz + _blend_component(u, 0, z0, z1, wz, y0, y1, wy, x0, x1, wx)
    out[1, zl, y, x] = dy + _blend_component(u, 1, z0, z1, wz, y0, y1, wy, x0, x1, wx)
    out[2, zl, y, x] = dx + _blend_component(u, 2, z0, z1, wz, y0, y1, wy, x0, x1, wx)


def _warp_image(image, image_z0, nz_global, u, halo, z_first, out, out_halo):
    index = cuda.grid(1)
    nk, ny, nx = out.shape
    if index >= nk * ny * nx:
        return
    k = index // (ny * nx)
    y = (index // nx) % ny
    x = index % nx
    zg = z_first - out_halo + k
    if zg < 0 or zg >= nz_global:
        return
    zl = k - out_halo + halo
    z0, z1, wz = _corner(float32(zg) + u[0, zl, y, x], nz_global)
    y0, y1, wy = _corner(float32(y) + u[1, zl, y, x], ny)
    x0, x1, wx = _corner(float32(x) + u[2, zl, y, x], nx)
    out[k, y, x] = _blend(image, z0 - image_z0, z1 - image_z0, wz, y0, y1, wy, x0, x1, wx)


def _image_gradient(image, image_halo, z_first, nz_global, out):
    index = cuda.grid(1)
    owned, ny, nx = out.shape[1], out.shape[2], out.shape[3]
    if index >= owned * ny * nx:
        return
    zo = index // (ny * nx)
    y = (index // nx) % ny
    x = index % nx
    k = zo + image_halo
    zg = z_first + zo
    out[0, zo, y, x] = _difference_3d(image, zg, nz_global, 1, 0, 0, k, y, x)
    out[1, zo, y, x] = _difference_3d(image, y, ny, 0, 1, 0, k, y, x)
    out[2, zo, y, x] = _difference_3d(image, x, nx, 0, 0, 1, k, y, x)


def _jacobian_determinant(u, halo, z_first, nz_global, out):
    index = cuda.grid(1)
    owned, ny, nx = out.shape
    if index >= owned * ny * nx:
        return
    zo = index // (ny * nx)
    y = (index // nx) % ny
    x = index % nx
    k = zo + halo
    zg = z_first + zo
    one = float32(1.0)
    a00 = one + _difference(u, 0, zg, nz_global, 1, 0, 0, k, y, x)
    a01 = _difference(u, 0, y, ny, 0, 1, 0, k, y, x)
    a02 = _difference(u, 0, x, nx, 0, 0, 1, k, y, x)
    a10 = _difference(u, 1, zg, nz_global, 1, 0, 0, k, y, x)
    a11 = one + _difference(u, 1, y, ny, 0, 1, 0, k, y, x)
    a12 = _difference(u, 1, x, nx, 0, 0, 1, k, y, x)
    a20 = _difference(u, 2, zg, nz_global, 1, 0, 0, k, y, x)
    a21 = _difference(u, 2, y, ny, 0, 1, 0, k, y, x)
    a22 = one + _difference(u, 2, x, nx, 0, 0, 1, k, y, x)
    out[zo, y, x] = (a00 * (a11 * a22 - a12 * a21) - a01 * (a10 * a22 - a12 * a20)
                     + a02 * (a10 * a21 - a11 * a20))


def _similarity_force(gradient, j0, j0_halo, j1, determinant, weight_j0, weight_j1, offset, out):
    index = cuda.grid(1)
    owned, ny, nx = j1.shape
    if index >= owned * ny * nx:
        return
    zo = index // (ny * nx)
    y = (index // nx) % ny
    x = index % nx
    r = determinant[zo, y, x] * (weight_j0 * j0[zo + j0_halo, y, x] + weight_j1 * j1[zo, y, x]
                                 + offset)
    out[0, zo, y, x] = r * gradient[0, zo, y, x]
    out[1, zo, y, x] = r * gradient[1, zo, y, x]
    out[2, zo, y, x] = r * gradient[2, zo, y, x]


def _sample_points(image, points, nearest, fill, out):
    i = cuda.grid(1)
    if i >= points.shape[1]:
        return
    nz, ny, nx = image.shape
    pz = points[0, i]
    py = points[1, i]
    px = points[2, i]
    half = float32(0.5)
    if (pz < -half or pz > float32(nz) - half or py < -half or py > float32(ny) - half
            or px < -half or px > float32(nx) - half):
        out[i] = fill
        return
    if nearest == 1:
        iz = min(max(int(math.floor(pz + half)), 0), nz - 1)
        iy = min(max(int(math.floor(py + half)), 0), ny - 1)
        ix = min(max(int(math.floor(px + half)), 0), nx - 1)
        out[i] = image[iz, iy, ix]
    else:
        z0, z1, wz = _corner(pz, nz)
        y0, y1, wy = _corner(py, ny)
        x0, x1, wx = _corner(px, nx)
        out[i] = _blend(image, z0, z1, wz, y0, y1, wy, x0, x1, wx)


def _filter_axis(field, axis, weights, out):
    index = cuda.grid(1)
    channels, planes, ny, nx = field.shape
    if index >= channels * planes * ny * nx:
        return
    c = index // (planes * ny * nx)
    z = (index // (ny * nx)) % planes
    y = (index // nx) % ny
    x = index % nx
    radius = (weights.shape[0] - 1) // 2
    total = 0.0
    for k in range(-radius, radius + 1):
        if axis == 2:
            yy = y + k
            if 0 <= yy < ny:
                total += weights[k + radius] * field[c, z, yy, x]
        else:
            xx = x + k
            if 0 <= xx < nx:
                total += weights[k + radius] * field[c, z, y, xx]
    out[c, z, y, x] = total


def _filter_z(field, halo, z_first, nz_global, weights, out):
    index = cuda.grid(1)
    channels, owned, ny, nx = out.shape
    if index >= channels * owned * ny * nx:
        return
    c = index // (owned * ny * nx)
    zo = (index // (ny * nx)) % owned
    y = (index // nx) % ny
    x = index % nx
    radius = (weights.shape[0] - 1) // 2
    low = max(-radius, -(z_first + zo))
    high = min(radius, nz_global - 1 - (z_first + zo))
    total = 0.0
    for k in range(low, high + 1):
        total += weights[k + radius] * field[c, zo + halo + k, y, x]
    out[c, zo, y, x] = total


def _window_sums(moving, fixed, image_halo, z_first, nz_global, radius, scratch, out):
    index = cuda.grid(1)
    owned, ny, nx = out.shape[1], out.shape[2], out.shape[3]
    if index >= owned * ny * nx:
        return
    zo = index // (ny * nx)
    y = (index // nx) % ny
    x = index % nx
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    s4 = 0.0
    low = max(-radius, -(z_first + zo))
    high = min(radius, nz_global - 1 - (z_first + zo))
    for k in range(low, high + 1):
        z = zo + image_halo + k
        for yy in range(max(0, y - radius), min(ny, y + radius + 1)):
            for xx in range(max(0, x - radius), min(nx, x + radius + 1)):
                m = float64(moving[z, yy, xx])
                f = float64(fixed[z, yy, xx])
                s0 += m
                s1 += f
                s2 += m * m
                s3 += f * f
                s4 += m * f
    out[0, zo, y, x] = s0
    out[1, zo, y, x] = s1
    out[2, zo, y, x] = s2
    out[3, zo, y, x] = s3
    out[4, zo, y, x] = s4


def _correlation_force(sums, moving, fixed, image_halo, z_first, nz_global, count, epsilon,
                       out, correlation):
    index = cuda.grid(1)
    owned, ny, nx = correlation.shape
    if index >= owned * ny * nx:
        return
    zo = index // (ny * nx)
    y = (index // nx) % ny
    x = index % nx
    k = zo + image_halo
    zg = z_first + zo
    mean_m = sums[0, zo, y, x] / count
    mean_f = sums[1, zo, y, x] / count
    var_m = sums[2, zo, y, x] - mean_m * sums[0, zo, y, x] + epsilon
    var_f = sums[3, zo, y, x] - mean_f * sums[1, zo, y, x] + epsilon
    cross = sums[4, zo, y, x] - mean_m * sums[1, zo, y, x]
    product = var_m * var_f
    correlation[zo, y, x] = cross * cross / product
    centred_m = moving[k, y, x] - mean_m
    centred_f = fixed[k, y, x] - mean_f
    scale = 2.0 * cross / product
    d_moving = scale * (centred_f - cross / var_m * centred_m)
    d_fixed = scale * (centred_m - cross / var_f * centred_f)
    out[0, zo, y, x] = (d_moving * _difference_3d(moving, zg, nz_global, 1, 0, 0, k, y, x)
                        - d_fixed * _difference_3d(fixed, zg, nz_global, 1, 0, 0, k, y, x))
    out[1, zo, y, x] = (d_moving * _difference_3d(moving, y, ny, 0, 1, 0, k, y, x)
                        - d_fixed * _difference_3d(fixed, y, ny, 0, 1, 0, k, y, x))
    out[2, zo, y, x] = (d_moving * _difference_3d(moving, x, nx, 0, 0, 1, k, y, x)
                        - d_fixed * _difference_3d(fixed, x, nx, 0, 0, 1, k, y, x))


#: Largest histogram the CUDA joint histogram holds in a block's shared memory (32 KiB).
HISTOGRAM_MAX_BINS = 64
_HISTOGRAM_CELLS = HISTOGRAM_MAX_BINS * HISTOGRAM_MAX_BINS
HISTOGRAM_THREADS = 256
HISTOGRAM_BLOCKS = 512

_bspline3 = cuda.jit(device=True, inline=True)(parzen.bspline3_source)
_bin_position = cuda.jit(device=True, inline=True)(parzen.bin_position_source)


def _clear_histogram(out):
    index = cuda.grid(1)
    bins = out.shape[1]
    if index < out.shape[0] * bins:
        out[index // bins, index % bins] = 0.0


def _joint_histogram(moving, fixed, image_halo, weight, out):
    # every block bins a share of the voxels into shared memory, then adds its filled
    # bins to ``out`` (cleared before): two atomic additions per voxel tap in all
    local = cuda.shared.array(_HISTOGRAM_CELLS, float64)
    bins = out.shape[0]
    cells = bins * bins
    for i in range(cuda.threadIdx.x, cells, cuda.blockDim.x):
        local[i] = 0.0
    cuda.syncthreads()
    owned, ny, nx = weight.shape
    du_dm = float64(bins - 3)
    for index in range(cuda.grid(1), owned * ny * nx, cuda.gridsize(1)):
        zo = index // (ny * nx)
        y = (index // nx) % ny
        x = index % nx
        w = float64(weight[zo, y, x])
        if w == 0.0:
            continue
        k = zo + image_halo
        u_m, _ = _bin_position(float64(moving[k, y, x]), 0.0, 1.0, du_dm)
        u_f, _ = _bin_position(float64(fixed[k, y, x]), 0.0, 1.0, du_dm)
        a0 = int(math.floor(u_m)) - 1
        b0 = int(math.floor(u_f)) - 1
        for a in range(a0, min(a0 + 4, bins)):
            wa = w * _bspline3(a - u_m)[0]
            for b in range(b0, min(b0 + 4, bins)):
                cuda.atomic.add(local, a * bins + b, wa * _bspline3(b - u_f)[0])
    cuda.syncthreads()
    for i in range(cuda.threadIdx.x, cells, cuda.blockDim.x):
        if local[i] != 0.0:
            cuda.atomic.add(out, (i // bins, i % bins), local[i])


def _mi_force(moving, fixed, image_halo, z_first, nz_global, log_ratio, out):
    index = cuda.grid(1)
    owned, ny, nx = out.shape[1], out.shape[2], out.shape[3]
    if index >= owned * ny * nx:
        return
    zo = index // (ny * nx)
    y = (index // nx) % ny
    x = index % nx
    k = zo + image_halo
    zg = z_first + zo
    bins = log_ratio.shape[0]
    du_dm = float64(bins - 3)
    u_m, slope_m = _bin_position(float64(moving[k, y, x]), 0.0, 1.0, du_dm)
    u_f, slope_f = _bin_position(float64(fixed[k, y, x]), 0.0, 1.0, du_dm)
    a0 = int(math.floor(u_m)) - 1
    b0 = int(math.floor(u_f)) - 1
    sum_m = 0.0
    sum_f = 0.0
    for a in range(a0, min(a0 + 4, bins)):
        value_a, slope_a, _ = _bspline3(a - u_m)
        for b in range(b0, min(b0 + 4, bins)):
            value_b, slope_b, _ = _bspline3(b - u_f)
            ratio = log_ratio[a, b]
            sum_m += ratio * slope_a * value_b
            sum_f += ratio * value_a * slope_b
    d_moving = -slope_m * sum_m
    d_fixed = -slope_f * sum_f
    out[0, zo, y, x] = (d_moving * _difference_3d(moving, zg, nz_global, 1, 0, 0, k, y, x)
                        - d_fixed * _difference_3d(fixed, zg, nz_global, 1, 0, 0, k, y, x))
    out[1, zo, y, x] = (d_moving * _difference_3d(moving, y, ny, 0, 1, 0, k, y, x)
                        - d_fixed * _difference_3d(fixed, y, ny, 0, 1, 0, k, y, x))
    out[2, zo, y, x] = (d_moving * _difference_3d(moving, x, nx, 0, 0, 1, k, y, x)
                        - d_fixed * _difference_3d(fixed, x, nx, 0, 0, 1, k, y, x))


compose_displacement_kernel = cuda.jit(_compose_displacement)
warp_image_kernel = cuda.jit(_warp_image)
image_gradient_kernel = cuda.jit(_image_gradient)
jacobian_determinant_kernel = cuda.jit(_jacobian_determinant)
similarity_force_kernel = cuda.jit(_similarity_force)
sample_points_kernel = cuda.jit(_sample_points)
filter_axis_kernel = cuda.jit(_filter_axis)
filter_z_kernel = cuda.jit(_filter_z)
window_sums_kernel = cuda.jit(_window_sums)
correlation_force_kernel = cuda.jit(_correlation_force)
clear_histogram_kernel = cuda.jit(_clear_histogram)
joint_histogram_kernel = cuda.jit(_joint_histogram)
mi_force_kernel = cuda.jit(_mi_force)

_F3 = "float32[:, :, ::1]"
_F4 = "float32[:, :, :, ::1]"
_D4 = "float64[:, :, :, ::1]"
PTX_SIGNATURES = {
    "compose_displacement": (_compose_displacement,
                             f"({_F4}, {_F4}, float32, int64, int64, int64, {_F4})"),
    "warp_image": (_warp_image, f"({_F3}, int64, int64, {_F4}, int64, int64, {_F3}, int64)"),
    "image_gradient": (_image_gradient, f"({_F3}, int64, int64, int64, {_F4})"),
    "jacobian_determinant": (_jacobian_determinant, f"({_F4}, int64, int64, int64, {_F3})"),
    "similarity_force": (_similarity_force,
                         f"({_F4}, {_F3}, int64, {_F3}, {_F3}, float32, float32, float32, {_F4})"),
    "sample_points": (_sample_points,
                      "(float32[:, :, ::1], float32[:, ::1], int64, float32, float32[::1])"),
    "filter_axis": (_filter_axis, f"({_F4}, int64, float64[::1], {_F4})"),
    "filter_z": (_filter_z, f"({_F4}, int64, int64, int64, float64[::1], {_F4})"),
    "window_sums": (_window_sums, f"({_F3}, {_F3}, int64, int64, int64, int64, {_D4}, {_D4})"),
    "correlation_force": (_correlation_force,
                          f"({_D4}, {_F3}, {_F3}, int64, int64, int64, float64, float64, "
                          f"{_F4}, {_F3})"),
    "clear_histogram": (_clear_histogram, "(float64[:, ::1],)"),
    "joint_histogram": (_joint_histogram, f"({_F3}, {_F3}, int64, {_F3}, float64[:, ::1])"),
    "mi_force": (_mi_force, f"({_F3}, {_F3}, int64, int64, int64, float64[:, ::1], {_F4})"),
}


def _launch(kernel, items, *args):
    blocks, threads = launch_config_1d(items)
    kernel[blocks, threads](*args)


#: Kernels that write more than ``out`` (what :class:`~medhpc.backend.HostStaged`
#: copies back).
WRITTEN = {"correlation_force": ("out", "correlation")}


def compose_displacement(u, v, scale, halo, z_first, nz_global, out):
    """One semi-Lagrangian step of a map (see the CPU twin)."""
    _launch(compose_displacement_kernel, v.shape[1] * v.shape[2] * v.shape[3], u, v,
            float32(scale), halo, z_first, nz_global, out)


def warp_image(image, image_z0, nz_global, u, halo, z_first, out, out_halo):
    """``out(x) = image(x + u(x))`` (see the CPU twin)."""
    _launch(warp_image_kernel, out.size, image, image_z0, nz_global, u, halo, z_first, out,
            out_halo)


def image_gradient(image, image_halo, z_first, nz_global, out):
    """Gradient in voxels of an image slab (see the CPU twin)."""
    _launch(image_gradient_kernel, out.size // 3, image, image_halo, z_first, nz_global, out)


def jacobian_determinant(u, halo, z_first, nz_global, out):
    """``det(I + Du)`` on the owned planes (see the CPU twin)."""
    _launch(jacobian_determinant_kernel, out.size, u, halo, z_first, nz_global, out)


def similarity_force(gradient, j0, j0_halo, j1, determinant, weight_j0, weight_j1, offset, out):
    """``|D phi| (a J0 + c J1 + d) grad J0`` (see the CPU twin)."""
    _launch(similarity_force_kernel, j1.size, gradient, j0, j0_halo, j1, determinant,
            float32(weight_j0), float32(weight_j1), float32(offset), out)


def sample_points(image, points, nearest, fill, out):
    """Trilinear or nearest samples at voxel positions (see the CPU twin)."""
    _launch(sample_points_kernel, points.shape[1], image, points, nearest, float32(fill), out)


def filter_axis(field, axis, weights, out):
    """Convolve every plane along y or x (see the CPU twin)."""
    _launch(filter_axis_kernel, out.size, field, axis, weights, out)


def filter_planes(field, weights, out):
    """Convolve every plane along y, then x (see the CPU twin; two launches here)."""
    along_y = cuda.device_array(out.shape, out.dtype)
    filter_axis(field, 2, weights, along_y)
    filter_axis(along_y, 3, weights, out)


def filter_z(field, halo, z_first, nz_global, weights, out):
    """Convolve along z onto the owned planes (see the CPU twin)."""
    _launch(filter_z_kernel, out.size, field, halo, z_first, nz_global, weights, out)


def window_sums(moving, fixed, image_halo, z_first, nz_global, radius, scratch, out):
    """Window sums of m, f, m^2, f^2, m f (see the CPU twin; ``scratch`` is unused here)."""
    _launch(window_sums_kernel, out.size // 5, moving, fixed, image_halo, z_first, nz_global,
            radius, scratch, out)


def correlation_force(sums, moving, fixed, image_halo, z_first, nz_global, count, epsilon,
                      out, correlation):
    """Local correlation and the symmetric force (see the CPU twin)."""
    _launch(correlation_force_kernel, correlation.size, sums, moving, fixed, image_halo,
            z_first, nz_global, float64(count), float64(epsilon), out, correlation)


def joint_histogram(moving, fixed, image_halo, weight, out):
    """Parzen joint histogram over the owned planes (see the CPU twin; float64 atomics,
    at most ``HISTOGRAM_MAX_BINS`` bins)."""
    bins = out.shape[0]
    if bins > HISTOGRAM_MAX_BINS:
        raise ValueError(f"joint_histogram: {bins} bins; the CUDA kernel holds at most "
                         f"{HISTOGRAM_MAX_BINS}")
    _launch(clear_histogram_kernel, bins * bins, out)
    blocks = min(launch_config_1d(weight.size, HISTOGRAM_THREADS)[0], HISTOGRAM_BLOCKS)
    joint_histogram_kernel[blocks, HISTOGRAM_THREADS](moving, fixed, image_halo, weight, out)


def mi_force(moving, fixed, image_halo, z_first, nz_global, log_ratio, out):
    """The symmetric mutual-information force (see the CPU twin)."""
    _launch(mi_force_kernel, out.size // 3, moving, fixed, image_halo, z_first, nz_global,
            log_ratio, out)
