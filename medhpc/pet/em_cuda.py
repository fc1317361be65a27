"""EM update kernels on the GPU (twins of :mod:`medhpc.pet.em_cpu`, same signatures)."""

import math

import numpy as np
from numba import cuda

from medhpc.backend import launch_config_1d


def _em_ratio(measured, projection, multiplicative, additive, tof_bins, out):
    i = cuda.grid(1)
    if i < measured.shape[0]:
        factor = multiplicative[i // tof_bins]
        expected = factor * projection[i] + additive[i]
        out[i] = factor * measured[i] / expected if expected > 0.0 else 0.0


def _poisson_log_likelihood(measured, projection, multiplicative, additive, tof_bins, total):
    i = cuda.grid(1)
    if i < measured.shape[0]:
        expected = multiplicative[i // tof_bins] * projection[i] + additive[i]
        if expected > 0.0:
            cuda.atomic.add(total, 0, measured[i] * math.log(expected) - expected)
        elif measured[i] > 0.0:
            cuda.atomic.add(total, 0, -1e30)


def _em_update(image, backprojection, denominator):
    i = cuda.grid(1)
    if i < image.shape[0]:
        if denominator[i] > 0.0:
            value = image[i] * backprojection[i] / denominator[i]
            image[i] = value if value > 0.0 else 0.0
        else:
            image[i] = 0.0


def _rdp_gradient(image, gamma, epsilon, out):
    index = cuda.grid(1)
    nz, ny, nx = image.shape
    if index >= nz * ny * nx:
        return
    z = index // (ny * nx)
    y = (index // nx) % ny
    x = index % nx
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
                    weight = 1.0 / math.sqrt(float(dz * dz + dy * dy + dx * dx))
                    total += weight * (2.0 * d / denominator - d * d * (1.0 + gamma * sign)
                                       / (denominator * denominator))
    out[z, y, x] = total


def _osl_denominator(sensitivity, penalty_gradient, beta, out):
    i = cuda.grid(1)
    if i < out.shape[0]:
        value = sensitivity[i] + beta * penalty_gradient[i]
        floor = 0.01 * sensitivity[i]
        out[i] = value if value > floor else floor


def _listmode_log_likelihood(projection, multiplicative, additive, total):
    i = cuda.grid(1)
    if i < projection.shape[0]:
        expected = multiplicative[i] * projection[i] + additive[i]
        cuda.atomic.add(total, 0, math.log(expected) if expected > 0.0 else -1e30)


def _image_dot(first, second, total):
    i = cuda.grid(1)
    if i < first.shape[0]:
        cuda.atomic.add(total, 0, np.float64(first[i]) * second[i])


def _bsrem_update(image, backprojection, sensitivity, penalty_gradient, beta, step):
    i = cuda.grid(1)
    if i < image.shape[0] and sensitivity[i] > 0.0:
        ascent = backprojection[i] - sensitivity[i] - beta * penalty_gradient[i]
        value = image[i] + step * image[i] / sensitivity[i] * ascent
        image[i] = value if value > 0.0 else 0.0


em_ratio_kernel = cuda.jit(_em_ratio)
poisson_log_likelihood_kernel = cuda.jit(_poisson_log_likelihood)
em_update_kernel = cuda.jit(_em_update)
rdp_gradient_kernel = cuda.jit(_rdp_gradient)
osl_denominator_kernel = cuda.jit(_osl_denominator)
listmode_log_likelihood_kernel = cuda.jit(_listmode_log_likelihood)
image_dot_kernel = cuda.jit(_image_dot)
bsrem_update_kernel = cuda.jit(_bsrem_update)

_FLAT = "float32[::1]"
PTX_SIGNATURES = {
    "em_ratio": (_em_ratio, f"({_FLAT}, {_FLAT}, {_FLAT}, {_FLAT}, int64, {_FLAT})"),
    "poisson_log_likelihood": (_poisson_log_likelihood,
                               f"({_FLAT}, {_FLAT}, {_FLAT}, {_FLAT}, int64, float64[::1])"),
    "em_update": (_em_update, f"({_FLAT}, {_FLAT}, {_FLAT})"),
    "rdp_gradient": (_rdp_gradient, "(float32[:, :, ::1], float64, float64, float32[:, :, ::1])"),
    "osl_denominator": (_osl_denominator, f"({_FLAT}, {_FLAT}, float64, {_FLAT})"),
    "listmode_log_likelihood": (_listmode_log_likelihood,
                                f"({_FLAT}, {_FLAT}, {_FLAT}, float64[::1])"),
    "image_dot": (_image_dot, f"({_FLAT}, {_FLAT}, float64[::1])"),
    "bsrem_update": (_bsrem_update, f"({_FLAT}, {_FLAT}, {_FLAT}, {_FLAT}, float64, float64)"),
}


def _flat(array):
    return array.reshape(array.size)


def em_ratio(measured, projection, multiplicative, additive, tof_bins, out):
    """out = m * y / (m * projection + a) per bin; 0 where the expectation is 0."""
    blocks, threads = launch_config_1d(measured.shape[0])
    em_ratio_kernel[blocks, threads](measured, projection, multiplicative, additive, tof_bins, out)


def poisson_log_likelihood(measured, projection, multiplicative, additive, tof_bins):
    """Sum of y log(ybar) - ybar over bins with ybar = m * projection + a (constant dropped)."""
    total = cuda.to_device(np.zeros(1, dtype=np.float64))
    blocks, threads = launch_config_1d(measured.shape[0])
    poisson_log_likelihood_kernel[blocks, threads](measured, projection, multiplicative, additive,
                                                   tof_bins, total)
    return float(total.copy_to_host()[0])


def em_update(image, backprojection, denominator):
    """image *= backprojection / denominator where the denominator is positive, else 0."""
    blocks, threads = launch_config_1d(image.size)
    em_update_kernel[blocks, threads](_flat(image), _flat(backprojection), _flat(denominator))


def rdp_gradient(image, gamma, epsilon, out):
    """Gradient of the relative difference prior over the 26-neighbourhood."""
    blocks, threads = launch_config_1d(image.size)
    rdp_gradient_kernel[blocks, threads](image, gamma, epsilon, out)


def osl_denominator(sensitivity, penalty_gradient, beta, out):
    """out = sensitivity + beta * gradient, kept at least 1% of the sensitivity (OSL)."""
    blocks, threads = launch_config_1d(out.size)
    osl_denominator_kernel[blocks, threads](_flat(sensitivity), _flat(penalty_gradient), beta,
                                            _flat(out))


def listmode_log_likelihood(projection, multiplicative, additive):
    """Sum over events of log(m * projection + a); -1e30 for an event with expectation 0."""
    total = cuda.to_device(np.zeros(1, dtype=np.float64))
    blocks, threads = launch_config_1d(projection.shape[0])
    listmode_log_likelihood_kernel[blocks, threads](projection, multiplicative, additive, total)
    return float(total.copy_to_host()[0])


def image_dot(first, second):
    """Sum of first * second over all voxels (float64)."""
    total = cuda.to_device(np.zeros(1, dtype=np.float64))
    blocks, threads = launch_config_1d(first.size)
    image_dot_kernel[blocks, threads](_flat(first), _flat(second), total)
    return float(total.copy_to_host()[0])


def bsrem_update(image, backprojection, sensitivity, penalty_gradient, beta, step):
    """image += step * image / sensitivity * (backprojection - sensitivity - beta * gradient),
    kept >= 0; unchanged where the sensitivity is 0 (BSREM's preconditioned ascent)."""
    blocks, threads = launch_config_1d(image.size)
    bsrem_update_kernel[blocks, threads](_flat(image), _flat(backprojection), _flat(sensitivity),
                                         _flat(penalty_gradient), beta, step)
