import numpy as np
import pytest

from medhpc.filters.gaussian import GaussianFilter, gaussian_weights


def test_weights_are_normalised_and_symmetric():
    weights = gaussian_weights(1.7)
    assert weights.size % 2 == 1
    assert np.isclose(weights.sum(), 1.0, atol=1e-6)
    np.testing.assert_allclose(weights, weights[::-1])


def test_filter_is_self_adjoint():
    rng = np.random.default_rng(1)
    x = rng.random((9, 10, 11), dtype=np.float32)
    y = rng.random((9, 10, 11), dtype=np.float32)
    gauss = GaussianFilter(5.0, (2.0, 2.0, 3.0))
    left = np.vdot(gauss.apply(x).astype(np.float64), y)
    right = np.vdot(x.astype(np.float64), gauss.apply(y))
    assert abs(left - right) / abs(left) < 1e-5


def test_filter_keeps_mass_inside_and_blurs_a_point():
    image = np.zeros((21, 21, 21), dtype=np.float32)
    image[10, 10, 10] = 1.0
    blurred = GaussianFilter(6.0, (2.0, 2.0, 2.0)).apply(image)
    assert np.isclose(blurred.sum(), 1.0, atol=1e-5)
    profile = blurred[10, 10, :]
    half = profile.max() / 2
    above = np.flatnonzero(profile >= half)
    fwhm_voxels = above[-1] - above[0] + 1
    assert 2 <= fwhm_voxels <= 4  # 6 mm at 2 mm voxels


def test_zero_width_is_identity():
    image = np.ones((3, 4, 5), dtype=np.float32)
    assert GaussianFilter(0.0, (1, 1, 1)).apply(image) is image


@pytest.mark.cudasim
def test_cuda_twin_matches_cpu():
    from numba import cuda

    rng = np.random.default_rng(2)
    image = rng.random((4, 5, 6), dtype=np.float32)
    cpu = GaussianFilter(3.0, (1.0, 1.5, 2.0), "cpu").apply(image)
    gpu = GaussianFilter(3.0, (1.0, 1.5, 2.0), "cuda").apply(cuda.to_device(image))
    np.testing.assert_allclose(gpu.copy_to_host(), cpu, rtol=1e-5, atol=1e-7)
