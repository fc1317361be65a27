"""EM update kernels on the CPU (twins of :mod:`medhpc.pet.em_cuda`).

Measurement-domain arrays are flat float32: ``n_lors * tof_bins`` values, TOF
bin fastest; ``multiplicative`` holds one factor per LOR. Image arrays are
``[z, y, x]`` float32.
"""

import math

import numba
import numpy as np


@numba.njit(parallel=True, cache=True)
def em_ratio(measured, projection, multiplicative, additive, tof_bins, out):
    """out = m * y / (m * projection + a) per bin; 0 where the expectation is 0."""
    for i in numba.prange(measured.shape[0]):
        factor = multiplicative[i // tof_bins]
        expected = factor * projection[i] + additive[i]
        out[i] = factor * measured[i] / expected if expected > 0.0 else 0.0


@numba.njit(parallel=True, cache=True)
def poisson_log_likelihood(measured, projection, multiplicative, additive, tof_bins):
    """Sum of y log(ybar) - ybar over bins with ybar = m * projection + a (constant dropped)."""
    total = 0.0
    for i in numba.prange(measured.shape[0]):
        expected = multiplicative[i // tof_bins] * projection[i] + additive[i]
        if expected > 0.0:
            total += measured[i] * math.log(expected) - expected
        elif measured[i] > 0.0:
            total += -1e30
    return total


@numba.njit(parallel=True, cache=True)
def em_update(image, backprojection, denominator):
    """image *= backprojection / denominator where the denominator is positive, else 0."""
    flat_image = image.reshape(-1)
    flat_back = backprojection.reshape(-1)
    flat_den = denominator.reshape(-1)
    for i in numba.prange(flat_image.shape[0]):
        if flat_den[i] > 0.0:
            value = flat_image[i] * flat_back[i] / flat_den[i]
            flat_image[i] = value if value > 0.0 else 0.0
        else:
            flat_image[i] = 0.0


@numba.njit(parallel=True, cache=True)
def rdp_gradient(image, gamma, epsilon, out):
    """Gradient of the relative difference prior over the 26-neighbourhood.

    R(x) = 1/2 sum_j sum_k w_jk (x_j - x_k)^2 / (x_j + x_k + gamma |x_j - x_k| + epsilon),
    w_jk = 1 / distance in voxels.
    """
    nz, ny, nx = image.shape
    for z_index in numba.prange(nz):
        z = np.int64(z_index)
        for y in range(ny):
            for x in range(nx):
                a = image[z, y, x]
                total = 0.0
                for dz in range(-1, 2):
                    for dy in range(-1, 2):
                        for dx in range(-1, 2):
                            if dz == 0 and dy == 0 and dx == 0:
                                continue
                            zz, yy, xx = z + dz, y + dy, x + dx
                            if 0 <= zz < nz and 0 <= yy < ny and 0 <= xx < nx:
                                b = image[zz, yy, xx]
                                d = a - b
                                denominator = a + b + gamma * abs(d) + epsilon
                                sign = 1.0 if d >= 0.0 else -1.0
                                weight = 1.0 / math.sqrt(dz * dz + dy * dy + dx * dx)
                                total += weight * (2.0 * d / denominator - d * d * (1.0 + gamma * sign)
                                                   / (denominator * denominator))
                out[z, y, x] = total


@numba.njit(parallel=True, cache=True)
def osl_denominator(sensitivity, penalty_gradient, beta, out):
    """out = sensitivity + beta * gradient, kept at least 1% of the sensitivity (OSL)."""
    flat_sens = sensitivity.reshape(-1)
    flat_grad = penalty_gradient.reshape(-1)
    flat_out = out.reshape(-1)
    for i in numba.prange(flat_out.shape[0]):
        value = flat_sens[i] + beta * flat_grad[i]
        floor = 0.01 * flat_sens[i]
        flat_out[i] = value if value > floor else floor


@numba.njit(parallel=True, cache=True)
def listmode_log_likelihood(projection, multiplicative, additive):
    """Sum over events of log(m * projection + a); -1e30 for an event with expectation 0."""
    total = 0.0
    for i in numba.prange(projection.shape[0]):
        expected = multiplicative[i] * projection[i] + additive[i]
        total += math.log(expected) if expected > 0.0 else -1e30
    return total


@numba.njit(parallel=True, cache=True)
def image_dot(first, second):
    """Sum of first * second over all voxels (float64)."""
    flat_first = first.reshape(-1)
    flat_second = second.reshape(-1)
    total = 0.0
    for i in numba.prange(flat_first.shape[0]):
        total += np.float64(flat_first[i]) * flat_second[i]
    return total


@numba.njit(parallel=True, cache=True)
def bsrem_update(image, backprojection, sensitivity, penalty_gradient, beta, step):
    """image += step * image / sensitivity * (backprojection - sensitivity - beta * gradient),
    kept >= 0; unchanged where the sensitivity is 0 (BSREM's preconditioned ascent)."""
    flat_image = image.reshape(-1)
    flat_back = backprojection.reshape(-1)
    flat_sens = sensitivity.reshape(-1)
    flat_grad = penalty_gradient.reshape(-1)
    for i in numba.prange(flat_image.shape[0]):
        if flat_sens[i] > 0.0:
            ascent = flat_back[i] - flat_sens[i] - beta * flat_grad[i]
            value = flat_image[i] + step * flat_image[i] / flat_sens[i] * ascent
            flat_image[i] = value if value > 0.0 else 0.0
