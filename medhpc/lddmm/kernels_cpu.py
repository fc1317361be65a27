"""LDDMM kernels on the CPU (twins of :mod:`medhpc.lddmm.kernels_cuda`, same signatures).

Layouts (float32, C order, one rank's z-slab of a global ``(nz, ny, nx)`` grid whose
first owned plane is global plane ``z_first``):

- *owned* arrays hold the ``owned`` planes of the slab: velocities ``(3, owned, ny, nx)``,
  forces, gradients, Jacobian determinants;
- *haloed* arrays hold ``halo`` ghost planes on each side as well (``owned + 2 halo``
  planes), e.g. the displacement ``u`` of a map ``phi(x) = x + u(x)``;
- whole images ``(nz, ny, nx)`` are held by every rank.

Vector components are ordered ``(z, y, x)`` and measured in voxels. Points outside the
volume are clamped to it (replicated edges). Kernels never communicate.
"""

import math

import numba
import numpy as np

from medhpc.lddmm.parzen import bin_position, bspline3


@numba.njit(inline="always")
def _corner(position, n):
    """Clamp ``position`` to ``[0, n - 1]``; return the lower index, upper index, weight."""
    if position < 0.0:
        position = 0.0
    elif position > n - 1:
        position = n - 1
    lower = int(position)
    if lower > n - 2:
        lower = max(n - 2, 0)
    upper = min(lower + 1, n - 1)
    return lower, upper, position - lower


@numba.njit(inline="always")
def _blend(f, z0, z1, wz, y0, y1, wy, x0, x1, wx):
    c00 = f[z0, y0, x0] * (1.0 - wx) + f[z0, y0, x1] * wx
    c01 = f[z0, y1, x0] * (1.0 - wx) + f[z0, y1, x1] * wx
    c10 = f[z1, y0, x0] * (1.0 - wx) + f[z1, y0, x1] * wx
    c11 = f[z1, y1, x0] * (1.0 - wx) + f[z1, y1, x1] * wx
    return (c00 * (1.0 - wy) + c01 * wy) * (1.0 - wz) + (c10 * (1.0 - wy) + c11 * wy) * wz


@numba.njit(inline="always")
def _difference(f, k, index, n, step_z, step_y, step_x, z, y, x):
    """Central difference along one axis at local ``(z, y, x)``; one-sided at the volume ends.

    ``index`` is the global position along that axis and ``n`` the global length.
    """
    if n == 1:
        return 0.0
    if index == 0:
        return f[k, z + step_z, y + step_y, x + step_x] - f[k, z, y, x]
    if index == n - 1:
        return f[k, z, y, x] - f[k, z - step_z, y - step_y, x - step_x]
    return 0.5 * (f[k, z + step_z, y + step_y, x + step_x]
                  - f[k, z - step_z, y - step_y, x - step_x])


@numba.njit(inline="always")
def _gradients(m4, f4, k, zg, nz_global, y, ny, x, nx):
    """Gradients of both images (``(1, planes, ny, nx)`` views) at local ``(k, y, x)``, global
    plane ``zg``: ``(gm_z, gm_y, gm_x, gf_z, gf_y, gf_x)`` by :func:`_difference`."""
    return (_difference(m4, 0, zg, nz_global, 1, 0, 0, k, y, x),
            _difference(m4, 0, y, ny, 0, 1, 0, k, y, x),
            _difference(m4, 0, x, nx, 0, 0, 1, k, y, x),
            _difference(f4, 0, zg, nz_global, 1, 0, 0, k, y, x),
            _difference(f4, 0, y, ny, 0, 1, 0, k, y, x),
            _difference(f4, 0, x, nx, 0, 0, 1, k, y, x))


@numba.njit(parallel=True, cache=True)
def compose_displacement(u, v, scale, halo, z_first, nz_global, out):
    """One semi-Lagrangian step of a map: ``out(x) = s v(x) + u(x + s v(x))`` (owned planes).

    Parameters
    ----------
    u : float32 (3, owned + 2 halo, ny, nx)
        Displacement of the map so far, halos filled.
    v : float32 (3, owned, ny, nx)
        Velocity in voxels per unit time.
    scale : float
        Signed time step ``s`` (``-dt`` for the flow to time 0, ``+dt`` towards time 1).
    halo, z_first, nz_global : int
        Ghost planes of ``u``, global index of the first owned plane, global plane count.
    out : float32 like ``u``
        Owned planes are written; ghost planes are left alone.
    """
    _, local_nz, ny, nx = u.shape
    owned = v.shape[1]
    z_low = max(0, halo - z_first)
    z_high = min(local_nz - 1, halo + nz_global - 1 - z_first)
    u_z, u_y, u_x = u[0], u[1], u[2]
    for zo in numba.prange(owned):
        zl = zo + halo
        for y in range(ny):
            for x in range(nx):
                dz = scale * v[0, zo, y, x]
                dy = scale * v[1, zo, y, x]
                dx = scale * v[2, zo, y, x]
                pz = min(max(zl + dz, z_low), z_high) - z_low
                z0, z1, wz = _corner(pz, z_high - z_low + 1)
                y0, y1, wy = _corner(y + dy, ny)
                x0, x1, wx = _corner(x + dx, nx)
                z0 += z_low
                z1 += z_low
                out[0, zl, y, x] = dz + _blend(u_z, z0, z1, wz, y0, y1, wy, x0, x1, wx)
                out[1, zl, y, x] = dy + _blend(u_y, z0, z1, wz, y0, y1, wy, x0, x1, wx)
                out[2, zl, y, x] = dx + _blend(u_x, z0, z1, wz, y0, y1, wy, x0, x1, wx)


@numba.njit(parallel=True, cache=True)
def warp_image(image, image_z0, nz_global, u, halo, z_first, out, out_halo):
    """Sample an image at ``x + u(x)``: ``out(x) = image(x + u(x))`` (trilinear).

    Parameters
    ----------
    image : float32 (planes, ny, nx)
        Planes ``image_z0 ..`` of the image: the whole image (``image_z0 = 0``) or a
        window holding every plane the lookups reach (positions are clamped to the
        volume ``[0, nz_global - 1]`` first).
    image_z0, nz_global : int
    u : float32 (3, owned + 2 halo, ny, nx)
        Displacement in voxels, halos filled where ``out_halo > 0``.
    halo, z_first : int
    out : float32 (owned + 2 out_halo, ny, nx)
        Planes inside the volume are written (``out_halo <= halo`` ghost planes too).
    out_halo : int
    """
    ny, nx = image.shape[1], image.shape[2]
    for k in numba.prange(out.shape[0]):
        zg = z_first - out_halo + k
        if zg < 0 or zg >= nz_global:
            continue
        zl = k - out_halo + halo
        for y in range(ny):
            for x in range(nx):
                z0, z1, wz = _corner(zg + u[0, zl, y, x], nz_global)
                y0, y1, wy = _corner(y + u[1, zl, y, x], ny)
                x0, x1, wx = _corner(x + u[2, zl, y, x], nx)
                out[k, y, x] = _blend(image, z0 - image_z0, z1 - image_z0, wz, y0, y1, wy,
                                      x0, x1, wx)


@numba.njit(parallel=True, cache=True)
def image_gradient(image, image_halo, z_first, nz_global, out):
    """Gradient in voxels of an image slab (central differences, one-sided at the ends).

    Parameters
    ----------
    image : float32 (owned + 2 image_halo, ny, nx)
        With at least one valid ghost plane where a neighbouring plane exists.
    image_halo, z_first, nz_global : int
    out : float32 (3, owned, ny, nx)
    """
    owned = out.shape[1]
    ny, nx = image.shape[1], image.shape[2]
    f = image.reshape((1,) + image.shape)
    for zo in numba.prange(owned):
        k = zo + image_halo
        zg = z_first + zo
        for y in range(ny):
            for x in range(nx):
                out[0, zo, y, x] = _difference(f, 0, zg, nz_global, 1, 0, 0, k, y, x)
                out[1, zo, y, x] = _difference(f, 0, y, ny, 0, 1, 0, k, y, x)
                out[2, zo, y, x] = _difference(f, 0, x, nx, 0, 0, 1, k, y, x)


@numba.njit(parallel=True, cache=True)
def jacobian_determinant(u, halo, z_first, nz_global, out):
    """``det(I + Du)`` of the map ``x + u(x)`` on the owned planes.

    Parameters
    ----------
    u : float32 (3, owned + 2 halo, ny, nx)
        Displacement in voxels, halos filled.
    halo, z_first, nz_global : int
    out : float32 (owned, ny, nx)
    """
    owned = out.shape[0]
    ny, nx = u.shape[2], u.shape[3]
    for zo in numba.prange(owned):
        k = zo + halo
        zg = z_first + zo
        for y in range(ny):
            for x in range(nx):
                a00 = 1.0 + _difference(u, 0, zg, nz_global, 1, 0, 0, k, y, x)
                a01 = _difference(u, 0, y, ny, 0, 1, 0, k, y, x)
                a02 = _difference(u, 0, x, nx, 0, 0, 1, k, y, x)
                a10 = _difference(u, 1, zg, nz_global, 1, 0, 0, k, y, x)
                a11 = 1.0 + _difference(u, 1, y, ny, 0, 1, 0, k, y, x)
                a12 = _difference(u, 1, x, nx, 0, 0, 1, k, y, x)
                a20 = _difference(u, 2, zg, nz_global, 1, 0, 0, k, y, x)
                a21 = _difference(u, 2, y, ny, 0, 1, 0, k, y, x)
                a22 = 1.0 + _difference(u, 2, x, nx, 0, 0, 1, k, y, x)
                out[zo, y, x] = (a00 * (a11 * a22 - a12 * a21) - a01 * (a10 * a22 - a12 * a20)
                                 + a02 * (a10 * a21 - a11 * a20))


@numba.njit(parallel=True, cache=True)
def similarity_force(gradient, j0, j0_halo, j1, determinant, weight_j0, weight_j1, offset, out):
    """The force ``b = |D phi_{t,1}| r_t grad J0_t`` with ``r_t = a J0_t + c J1_t + d``.

    ``r_t`` is the derivative of the similarity term with respect to the warped image,
    pulled back to time t (affine in the two images for SSD and global NCC).

    Parameters
    ----------
    gradient : float32 (3, owned, ny, nx)
        Gradient of ``J0_t``.
    j0 : float32 (owned + 2 j0_halo, ny, nx)
    j0_halo : int
    j1, determinant : float32 (owned, ny, nx)
    weight_j0, weight_j1, offset : float
        ``a``, ``c`` and ``d``.
    out : float32 (3, owned, ny, nx)
    """
    owned, ny, nx = j1.shape
    for zo in numba.prange(owned):
        for y in range(ny):
            for x in range(nx):
                r = determinant[zo, y, x] * (weight_j0 * j0[zo + j0_halo, y, x]
                                             + weight_j1 * j1[zo, y, x] + offset)
                out[0, zo, y, x] = r * gradient[0, zo, y, x]
                out[1, zo, y, x] = r * gradient[1, zo, y, x]
                out[2, zo, y, x] = r * gradient[2, zo, y, x]


@numba.njit(parallel=True, cache=True)
def sample_points(image, points, nearest, fill, out):
    """Sample an image at fractional voxel positions (trilinear or nearest neighbour).

    Parameters
    ----------
    image : float32 (nz, ny, nx)
    points : float32 (3, n)
        ``(z, y, x)`` voxel positions.
    nearest : int
        1 for nearest neighbour, 0 for trilinear.
    fill : float
        Value for points more than half a voxel outside the volume.
    out : float32 (n,)
    """
    nz, ny, nx = image.shape
    for i in numba.prange(points.shape[1]):
        pz = points[0, i]
        py = points[1, i]
        px = points[2, i]
        if (pz < -0.5 or pz > nz - 0.5 or py < -0.5 or py > ny - 0.5
                or px < -0.5 or px > nx - 0.5):
            out[i] = fill
            continue
        if nearest == 1:
            iz = min(max(int(math.floor(pz + 0.5)), 0), nz - 1)
            iy = min(max(int(math.floor(py + 0.5)), 0), ny - 1)
            ix = min(max(int(math.floor(px + 0.5)), 0), nx - 1)
            out[i] = image[iz, iy, ix]
        else:
            z0, z1, wz = _corner(pz, nz)
            y0, y1, wy = _corner(py, ny)
            x0, x1, wx = _corner(px, nx)
            out[i] = _blend(image, z0, z1, wz, y0, y1, wy, x0, x1, wx)


# -- symmetric (stationary velocity) registration ------------------------------------------
@numba.njit(parallel=True, cache=True)
def filter_axis(field, axis, weights, out):
    """Convolve every plane of ``field`` along y (``axis`` 2) or x (``axis`` 3).

    Parameters
    ----------
    field : (c, nz_local, ny, nx)
        Any float dtype; values beyond the volume's y/x ends count as zero.
    axis : int
        2 (y) or 3 (x).
    weights : float64 (2 r + 1,)
        Filter taps, centre at index ``r``.
    out : like ``field`` (its own float dtype)
    """
    channels, planes, ny, nx = field.shape
    radius = (weights.size - 1) // 2
    for item in numba.prange(channels * planes):
        c = item // planes
        z = item % planes
        plane = np.zeros((ny, nx), np.float64)
        for k in range(-radius, radius + 1):
            w = weights[k + radius]
            if axis == 2:
                for y in range(max(0, -k), min(ny, ny - k)):
                    for x in range(nx):
                        plane[y, x] += w * field[c, z, y + k, x]
        if axis == 3:
            padded = np.zeros(nx + 2 * radius, np.float64)
            for y in range(ny):
                for x in range(nx):
                    padded[x + radius] = field[c, z, y, x]
                for k in range(2 * radius + 1):
                    w = weights[k]
                    for x in range(nx):
                        plane[y, x] += w * padded[x + k]
        for y in range(ny):
            for x in range(nx):
                out[c, z, y, x] = plane[y, x]


def filter_planes(field, weights, out):
    """Convolve every plane of ``field`` along y, then x (``filter_axis`` twice).

    Parameters
    ----------
    field : (c, nz_local, ny, nx)
        Values beyond the volume's y/x ends count as zero.
    weights : float64 (2 r + 1,)
    out : like ``field``
    """
    along_y = np.empty(out.shape, out.dtype)
    filter_axis(field, 2, weights, along_y)
    filter_axis(along_y, 3, weights, out)


@numba.njit(parallel=True, cache=True)
def filter_z(field, halo, z_first, nz_global, weights, out):
    """Convolve along z onto the owned planes; planes beyond the volume count as zero.

    Parameters
    ----------
    field : (c, owned + 2 halo, ny, nx)
        Halos filled; ``halo`` is at least the filter radius.
    halo, z_first, nz_global : int
    weights : float64 (2 r + 1,)
    out : (c, owned, ny, nx)
    """
    channels, owned, ny, nx = out.shape
    radius = (weights.size - 1) // 2
    for item in numba.prange(channels * owned):
        c = item // owned
        zo = item % owned
        low = max(-radius, -(z_first + zo))
        high = min(radius, nz_global - 1 - (z_first + zo))
        plane = np.zeros((ny, nx), np.float64)
        for k in range(low, high + 1):
            w = weights[k + radius]
            for y in range(ny):
                for x in range(nx):
                    plane[y, x] += w * field[c, zo + halo + k, y, x]
        for y in range(ny):
            for x in range(nx):
                out[c, zo, y, x] = plane[y, x]


@numba.njit(inline="always")
def _window_product(m, f, q):
    if q == 0:
        return m
    if q == 1:
        return f
    if q == 2:
        return m * m
    if q == 3:
        return f * f
    return m * f


@numba.njit(parallel=True, cache=True)
def window_sums(moving, fixed, image_halo, z_first, nz_global, radius, scratch, out):
    """Sums of ``m``, ``f``, ``m^2``, ``f^2``, ``m f`` over cubes of ``2 radius + 1`` voxels.

    Voxels beyond the volume count as zero (the cube keeps its size). Running sums along
    x, then sliding windows along y and z: a few additions per voxel whatever the radius.

    Parameters
    ----------
    moving, fixed : float32 (owned + 2 image_halo, ny, nx)
        Ghost planes filled (zero beyond the volume); ``image_halo >= radius``.
    image_halo, z_first, nz_global, radius : int
    scratch : float64 (5, owned + 2 image_halo, ny, nx)
    out : float64 (5, owned, ny, nx)
    """
    planes, ny, nx = moving.shape
    owned = out.shape[1]
    for item in numba.prange(planes * 5):
        z = item // 5
        q = item % 5
        prefix = np.empty(nx + 1, np.float64)
        along_x = np.empty((ny, nx), np.float64)
        for y in range(ny):
            prefix[0] = 0.0
            for x in range(nx):
                prefix[x + 1] = prefix[x] + _window_product(np.float64(moving[z, y, x]),
                                                            np.float64(fixed[z, y, x]), q)
            for x in range(nx):
                along_x[y, x] = prefix[min(nx, x + radius + 1)] - prefix[max(0, x - radius)]
        window = np.zeros(nx, np.float64)
        for y in range(min(radius, ny - 1) + 1):
            for x in range(nx):
                window[x] += along_x[y, x]
        for y in range(ny):
            for x in range(nx):
                scratch[q, z, y, x] = window[x]
            entering, leaving = y + radius + 1, y - radius
            if entering < ny:
                for x in range(nx):
                    window[x] += along_x[entering, x]
            if leaving >= 0:
                for x in range(nx):
                    window[x] -= along_x[leaving, x]
    for q in numba.prange(5):
        window = np.zeros((ny, nx), np.float64)
        for zo in range(owned):
            low = max(-radius, -(z_first + zo))
            high = min(radius, nz_global - 1 - (z_first + zo))
            if zo == 0:
                for k in range(low, high + 1):
                    for y in range(ny):
                        for x in range(nx):
                            window[y, x] += scratch[q, image_halo + k, y, x]
            else:
                previous_low = max(-radius, -(z_first + zo - 1)) + zo - 1
                previous_high = min(radius, nz_global - 1 - (z_first + zo - 1)) + zo - 1
                if high + zo > previous_high:
                    for y in range(ny):
                        for x in range(nx):
                            window[y, x] += scratch[q, image_halo + zo + high, y, x]
                if low + zo > previous_low:
                    for y in range(ny):
                        for x in range(nx):
                            window[y, x] -= scratch[q, image_halo + previous_low, y, x]
            for y in range(ny):
                for x in range(nx):
                    out[q, zo, y, x] = window[y, x]


@numba.njit(parallel=True, cache=True)
def correlation_force(sums, moving, fixed, image_halo, z_first, nz_global, count, epsilon,
                      out, correlation):
    """Local correlation of two images and the symmetric force that raises it.

    With window sums ``S`` over ``count`` voxels, ``cc = cross^2 / (var_m var_f)``;
    the derivatives at the window centre are ``dm = 2 cross / (var_m var_f)
    (f - mean_f - cross / var_m (m - mean_m))`` and ``df`` likewise, and the force on a
    displacement ``w`` of the middle space (moving side ``+w``, fixed side ``-w``) is
    ``dm grad m - df grad f``.

    Parameters
    ----------
    sums : float64 (5, owned, ny, nx)
        Window sums of ``m``, ``f``, ``m^2``, ``f^2`` and ``m f``.
    moving, fixed : float32 (owned + 2 image_halo, ny, nx)
        Both images in the middle space with at least one valid ghost plane.
    image_halo, z_first, nz_global : int
    count : float
        Voxels per window.
    epsilon : float
        Added to both variances.
    out : float32 (3, owned, ny, nx)
    correlation : float32 (owned, ny, nx)
    """
    owned, ny, nx = correlation.shape
    m4 = moving.reshape((1,) + moving.shape)
    f4 = fixed.reshape((1,) + fixed.shape)
    inverse_count = 1.0 / count
    for zo in numba.prange(owned):
        k = zo + image_halo
        zg = z_first + zo
        inside_z = 0 < zg < nz_global - 1
        for y in range(ny):
            inside_y = inside_z and 0 < y < ny - 1
            for x in range(nx):
                s_m = sums[0, zo, y, x]
                s_f = sums[1, zo, y, x]
                mean_m = s_m * inverse_count
                mean_f = s_f * inverse_count
                var_m = sums[2, zo, y, x] - mean_m * s_m + epsilon
                var_f = sums[3, zo, y, x] - mean_f * s_f + epsilon
                cross = sums[4, zo, y, x] - mean_m * s_f
                inverse_product = 1.0 / (var_m * var_f)
                correlation[zo, y, x] = cross * cross * inverse_product
                centred_m = moving[k, y, x] - mean_m
                centred_f = fixed[k, y, x] - mean_f
                scale = 2.0 * cross * inverse_product
                ratio = cross * inverse_product
                d_moving = scale * (centred_f - ratio * var_f * centred_m)
                d_fixed = scale * (centred_m - ratio * var_m * centred_f)
                if inside_y and 0 < x < nx - 1:
                    gm_z = 0.5 * (moving[k + 1, y, x] - moving[k - 1, y, x])
                    gm_y = 0.5 * (moving[k, y + 1, x] - moving[k, y - 1, x])
                    gm_x = 0.5 * (moving[k, y, x + 1] - moving[k, y, x - 1])
                    gf_z = 0.5 * (fixed[k + 1, y, x] - fixed[k - 1, y, x])
                    gf_y = 0.5 * (fixed[k, y + 1, x] - fixed[k, y - 1, x])
                    gf_x = 0.5 * (fixed[k, y, x + 1] - fixed[k, y, x - 1])
                else:
                    gm_z, gm_y, gm_x, gf_z, gf_y, gf_x = _gradients(m4, f4, k, zg, nz_global,
                                                                    y, ny, x, nx)
                out[0, zo, y, x] = d_moving * gm_z - d_fixed * gf_z
                out[1, zo, y, x] = d_moving * gm_y - d_fixed * gf_y
                out[2, zo, y, x] = d_moving * gm_x - d_fixed * gf_x


# -- mutual information (symmetric registration, --metric mi) --------------------------------
@numba.njit(parallel=True, cache=True)
def joint_histogram(moving, fixed, image_halo, weight, out):
    """Parzen joint histogram of two images over the owned planes (:mod:`~medhpc.lddmm.parzen`).

    Intensities are clamped to ``[0, 1]``; a voxel adds ``weight B(a - u_m) B(b - u_f)`` to
    bin ``(a, b)`` (rows: moving bins ``a``, columns: fixed bins ``b``), so the histogram
    sums to the weights of the owned voxels. Each plane is binned on its own and the planes
    are added in order, so the result does not depend on the thread count.

    Parameters
    ----------
    moving, fixed : float32 (owned + 2 image_halo, ny, nx)
    image_halo : int
    weight : float32 (owned, ny, nx)
        Voxel weights (ones without masks).
    out : float64 (bins, bins)
        Overwritten.
    """
    owned, ny, nx = weight.shape
    bins = out.shape[0]
    du_dm = float(bins - 3)
    planes = np.zeros((owned, bins, bins), np.float64)
    for zo in numba.prange(owned):
        k = zo + image_halo
        for y in range(ny):
            for x in range(nx):
                w = np.float64(weight[zo, y, x])
                if w == 0.0:
                    continue
                u_m, _ = bin_position(np.float64(moving[k, y, x]), 0.0, 1.0, du_dm)
                u_f, _ = bin_position(np.float64(fixed[k, y, x]), 0.0, 1.0, du_dm)
                a0 = int(math.floor(u_m)) - 1
                b0 = int(math.floor(u_f)) - 1
                for a in range(a0, min(a0 + 4, bins)):
                    wa = w * bspline3(a - u_m)[0]
                    for b in range(b0, min(b0 + 4, bins)):
                        planes[zo, a, b] += wa * bspline3(b - u_f)[0]
    for a in range(bins):
        for b in range(bins):
            out[a, b] = 0.0
    for zo in range(owned):
        for a in range(bins):
            for b in range(bins):
                out[a, b] += planes[zo, a, b]


@numba.njit(parallel=True, cache=True)
def mi_force(moving, fixed, image_halo, z_first, nz_global, log_ratio, out):
    """The symmetric force that raises the mutual information of the two images.

    With ``L = log p(a, b) / (p(a) p(b))`` of the (global) joint histogram, ``N`` its total
    weight and ``u_m``, ``u_f`` the voxel's bins, the derivatives of ``N MI`` with respect to
    the voxel's two intensities are ``dm = -du/dm sum_ab L B'(a - u_m) B(b - u_f)`` and
    ``df = -du/df sum_ab L B(a - u_m) B'(b - u_f)``, and the force on a displacement ``w`` of
    the middle space (moving side ``+w``, fixed side ``-w``) is ``dm grad m - df grad f``
    (the voxel's own weight is the caller's to apply, as for the correlation force).

    Parameters
    ----------
    moving, fixed : float32 (owned + 2 image_halo, ny, nx)
        Both images in the middle space with at least one valid ghost plane.
    image_halo, z_first, nz_global : int
    log_ratio : float64 (bins, bins)
        ``L``, zero on empty bins (:func:`medhpc.lddmm.parzen.mutual_information`).
    out : float32 (3, owned, ny, nx)
    """
    owned, ny, nx = out.shape[1], out.shape[2], out.shape[3]
    bins = log_ratio.shape[0]
    du_dm = float(bins - 3)
    m4 = moving.reshape((1,) + moving.shape)
    f4 = fixed.reshape((1,) + fixed.shape)
    for zo in numba.prange(owned):
        k = zo + image_halo
        zg = z_first + zo
        for y in range(ny):
            for x in range(nx):
                u_m, slope_m = bin_position(np.float64(moving[k, y, x]), 0.0, 1.0, du_dm)
                u_f, slope_f = bin_position(np.float64(fixed[k, y, x]), 0.0, 1.0, du_dm)
                a0 = int(math.floor(u_m)) - 1
                b0 = int(math.floor(u_f)) - 1
                sum_m = 0.0
                sum_f = 0.0
                for a in range(a0, min(a0 + 4, bins)):
                    value_a, slope_a, _ = bspline3(a - u_m)
                    for b in range(b0, min(b0 + 4, bins)):
                        value_b, slope_b, _ = bspline3(b - u_f)
                        ratio = log_ratio[a, b]
                        sum_m += ratio * slope_a * value_b
                        sum_f += ratio * value_a * slope_b
                d_moving = -slope_m * sum_m
                d_fixed = -slope_f * sum_f
                gm_z, gm_y, gm_x, gf_z, gf_y, gf_x = _gradients(m4, f4, k, zg, nz_global, y, ny,
                                                                x, nx)
                out[0, zo, y, x] = d_moving * gm_z - d_fixed * gf_z
                out[1, zo, y, x] = d_moving * gm_y - d_fixed * gf_y
                out[2, zo, y, x] = d_moving * gm_x - d_fixed * gf_x
