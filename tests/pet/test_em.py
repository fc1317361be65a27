import numpy as np
import pytest

from medhpc.pet import em_cpu


def random_measurements(rng, n_lors, tof_bins):
    measured = rng.poisson(3.0, n_lors * tof_bins).astype(np.float32)
    projection = rng.random(n_lors * tof_bins, dtype=np.float32) + 0.1
    multiplicative = rng.random(n_lors, dtype=np.float32) + 0.5
    additive = rng.random(n_lors * tof_bins, dtype=np.float32) * 0.1
    projection[0] = 0.0
    additive[0] = 0.0
    measured[0] = 0.0
    return measured, projection, multiplicative, additive


@pytest.mark.parametrize("tof_bins", [1, 3])
def test_em_ratio_and_likelihood(tof_bins):
    rng = np.random.default_rng(3)
    measured, projection, multiplicative, additive = random_measurements(rng, 40, tof_bins)
    out = np.empty_like(measured)
    em_cpu.em_ratio(measured, projection, multiplicative, additive, tof_bins, out)
    factor = np.repeat(multiplicative, tof_bins)
    expected = factor * projection + additive
    with np.errstate(divide="ignore", invalid="ignore"):
        reference = np.where(expected > 0, factor * measured / expected, 0.0)
    np.testing.assert_allclose(out, reference, rtol=1e-6)
    keep = expected > 0
    likelihood = em_cpu.poisson_log_likelihood(measured, projection, multiplicative, additive,
                                               tof_bins)
    reference = np.sum(measured[keep] * np.log(expected[keep]) - expected[keep])
    assert np.isclose(likelihood, reference, rtol=1e-5)


def test_em_update_keeps_positivity():
    image = np.ones((2, 3, 4), dtype=np.float32)
    back = np.full_like(image, 2.0)
    back[0, 0, 0] = -1.0
    denominator = np.full_like(image, 4.0)
    denominator[1, 1, 1] = 0.0
    em_cpu.em_update(image, back, denominator)
    assert image[0, 0, 0] == 0.0 and image[1, 1, 1] == 0.0
    assert np.allclose(image[0, 1], 0.5)


def rdp_value(image, gamma, epsilon):
    total = 0.0
    nz, ny, nx = image.shape
    padded = np.pad(image.astype(np.float64), 1, constant_values=np.nan)
    for dz in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                if dz == dy == dx == 0:
                    continue
                b = padded[1 + dz:1 + dz + nz, 1 + dy:1 + dy + ny, 1 + dx:1 + dx + nx]
                a = image.astype(np.float64)
                d = a - b
                term = d * d / (a + b + gamma * np.abs(d) + epsilon)
                total += np.nansum(term) / np.sqrt(dz * dz + dy * dy + dx * dx)
    return 0.5 * total


def test_rdp_gradient_matches_finite_differences():
    rng = np.random.default_rng(4)
    image = (rng.random((4, 5, 6)) + 0.5).astype(np.float32)
    gradient = np.empty_like(image)
    em_cpu.rdp_gradient(image, 2.0, 1e-3, gradient)
    step = 1e-3
    for index in [(0, 0, 0), (2, 3, 4), (1, 2, 5)]:
        plus, minus = image.astype(np.float64).copy(), image.astype(np.float64).copy()
        plus[index] += step
        minus[index] -= step
        numeric = (rdp_value(plus, 2.0, 1e-3) - rdp_value(minus, 2.0, 1e-3)) / (2 * step)
        assert np.isclose(gradient[index], numeric, rtol=2e-3, atol=1e-4)


def test_bsrem_update_is_the_preconditioned_step_kept_positive():
    image = np.array([[[1.0, 2.0, 0.5, 3.0]]], np.float32)
    back = np.array([[[2.0, 1.0, 0.0, 9.0]]], np.float32)
    sensitivity = np.array([[[1.0, 2.0, 1.0, 0.0]]], np.float32)
    gradient = np.array([[[0.5, 0.0, 0.0, 0.0]]], np.float32)
    em_cpu.bsrem_update(image, back, sensitivity, gradient, 2.0, 0.5)
    # 1 + 0.5 * 1 / 1 * (2 - 1 - 1); 2 + 0.5 * 2 / 2 * (1 - 2); max(0, 0.5 - 0.25); unchanged
    np.testing.assert_allclose(image.ravel(), [1.0, 1.5, 0.25, 3.0])
    image = np.array([[[1.0]]], np.float32)
    em_cpu.bsrem_update(image, np.zeros_like(image), np.ones_like(image), np.zeros_like(image),
                        0.0, 2.0)
    assert image[0, 0, 0] == 0.0  # a step past zero stops at the bound


def test_listmode_log_likelihood_and_image_dot():
    rng = np.random.default_rng(4)
    _, projection, multiplicative, additive = random_measurements(rng, 30, 1)
    expected = multiplicative.astype(np.float64) * projection + additive
    value = em_cpu.listmode_log_likelihood(projection[1:], multiplicative[1:], additive[1:])
    assert np.isclose(value, np.sum(np.log(expected[1:])), rtol=1e-6)
    assert em_cpu.listmode_log_likelihood(projection, multiplicative, additive) < -1e29
    image = rng.random((3, 4, 5), dtype=np.float32)
    assert np.isclose(em_cpu.image_dot(image, image + 1),
                      np.sum(image.astype(np.float64) * (image + 1)), rtol=1e-6)


@pytest.mark.cudasim
def test_cuda_twins_match_cpu():
    from numba import cuda

    from medhpc.pet import em_cuda

    rng = np.random.default_rng(5)
    for tof_bins in (1, 2):
        arrays = random_measurements(rng, 16, tof_bins)
        out_cpu = np.empty_like(arrays[0])
        em_cpu.em_ratio(*arrays, tof_bins, out_cpu)
        device = [cuda.to_device(a) for a in arrays]
        out_gpu = cuda.to_device(np.zeros_like(arrays[0]))
        em_cuda.em_ratio(*device, tof_bins, out_gpu)
        np.testing.assert_allclose(out_gpu.copy_to_host(), out_cpu, rtol=1e-6)
        assert np.isclose(em_cuda.poisson_log_likelihood(*device, tof_bins),
                          em_cpu.poisson_log_likelihood(*arrays, tof_bins), rtol=1e-6)
    events = [a[1:] for a in random_measurements(rng, 40, 1)[1:]]
    assert np.isclose(em_cuda.listmode_log_likelihood(*[cuda.to_device(a) for a in events]),
                      em_cpu.listmode_log_likelihood(*events), rtol=1e-6)
    image = (rng.random((3, 4, 5)) + 0.5).astype(np.float32)
    assert np.isclose(em_cuda.image_dot(cuda.to_device(image), cuda.to_device(image + 1)),
                      em_cpu.image_dot(image, image + 1), rtol=1e-6)
    grad_cpu = np.empty_like(image)
    em_cpu.rdp_gradient(image, 2.0, 1e-3, grad_cpu)
    grad_gpu = cuda.to_device(np.zeros_like(image))
    em_cuda.rdp_gradient(cuda.to_device(image), 2.0, 1e-3, grad_gpu)
    np.testing.assert_allclose(grad_gpu.copy_to_host(), grad_cpu, rtol=1e-5, atol=1e-6)
    sens, back = image + 1, image * 2
    den_cpu = np.empty_like(image)
    em_cpu.osl_denominator(sens, grad_cpu, 0.3, den_cpu)
    den_gpu = cuda.to_device(np.zeros_like(image))
    em_cuda.osl_denominator(cuda.to_device(sens), cuda.to_device(grad_cpu), 0.3, den_gpu)
    np.testing.assert_allclose(den_gpu.copy_to_host(), den_cpu, rtol=1e-6)
    step_cpu = image.copy()
    em_cpu.bsrem_update(step_cpu, back, sens, grad_cpu, 0.3, 0.7)
    step_gpu = cuda.to_device(image)
    em_cuda.bsrem_update(step_gpu, cuda.to_device(back), cuda.to_device(sens),
                         cuda.to_device(grad_cpu), 0.3, 0.7)
    np.testing.assert_allclose(step_gpu.copy_to_host(), step_cpu, rtol=1e-5, atol=1e-7)
    img_cpu = image.copy()
    em_cpu.em_update(img_cpu, back, den_cpu)
    img_gpu = cuda.to_device(image)
    em_cuda.em_update(img_gpu, cuda.to_device(back), cuda.to_device(den_cpu))
    np.testing.assert_allclose(img_gpu.copy_to_host(), img_cpu, rtol=1e-6)
