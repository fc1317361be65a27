"""Distributed real FFT: each rank's block equals NumPy's transform of the whole volume."""

import numpy as np
import pytest

from medhpc.parallel.fft import (apply_fourier_multiplier, fourier_frequencies_local,
                                 irfftn_slabs, rfftn_slabs, spectrum_shape)
from medhpc.parallel.geometry import block_range
from tests.parallel import WORLD_KINDS, make_world

SHAPES = [(7, 6, 5), (8, 9, 10), (2, 3, 4), (1, 5, 1)]
TOLERANCE = {np.float32: 2e-5, np.float64: 1e-12}


@pytest.fixture(params=WORLD_KINDS)
def world(request):
    return make_world(request.param)


def random_volume(shape, dtype, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def owned(world, volume):
    z0, z1 = block_range(volume.shape[0], world.size, world.rank)
    return volume[z0:z1]


def assert_close(actual, expected, dtype):
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE[dtype] * scale * 10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_inverse_match_numpy(world, shape, dtype):
    volume = random_volume(shape, dtype)
    spectrum = rfftn_slabs(world, owned(world, volume), shape[0])
    y0, y1 = block_range(shape[1], world.size, world.rank)
    assert spectrum.shape == spectrum_shape(world, shape) == (shape[0], y1 - y0,
                                                             shape[2] // 2 + 1)
    assert spectrum.dtype == (np.complex64 if dtype == np.float32 else np.complex128)
    assert_close(spectrum, np.fft.rfftn(volume.astype(np.float64))[:, y0:y1], dtype)

    back = irfftn_slabs(world, spectrum, shape)
    assert back.dtype == dtype
    assert_close(back, owned(world, volume), dtype)


def test_inverse_of_a_given_spectrum_matches_numpy(world):
    shape = (5, 4, 6)
    full = np.fft.rfftn(random_volume(shape, np.float64, seed=3)) * (1 + 0.5j)
    y0, y1 = block_range(shape[1], world.size, world.rank)
    real = irfftn_slabs(world, np.ascontiguousarray(full[:, y0:y1]), shape)
    assert_close(real, owned(world, np.fft.irfftn(full, s=shape, axes=(0, 1, 2))), np.float64)


def test_frequencies_of_local_block(world):
    shape = (5, 7, 6)
    kz, ky, kx = fourier_frequencies_local(world, shape)
    y0, y1 = block_range(7, world.size, world.rank)
    np.testing.assert_array_equal(kz.ravel(), [0, 1, 2, -2, -1])
    np.testing.assert_array_equal(ky.ravel(), np.fft.fftfreq(7, 1 / 7)[y0:y1])
    np.testing.assert_array_equal(kx.ravel(), [0, 1, 2, 3])
    assert np.broadcast_shapes(kz.shape, ky.shape, kx.shape) == spectrum_shape(world, shape)


def smoothing(kz, ky, kx, shape=(7, 6, 5), alpha=0.5):
    """A discrete (1 + alpha * Laplacian eigenvalue)^-2 multiplier, like LDDMM's K."""
    eigen = sum(2 - 2 * np.cos(2 * np.pi * k / n) for k, n in zip((kz, ky, kx), shape))
    return 1.0 / (1.0 + alpha * eigen) ** 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fourier_multiplier_matches_numpy(world, dtype):
    shape = (7, 6, 5)
    volume = random_volume(shape, dtype, seed=1)
    kz = np.fft.fftfreq(7, 1 / 7)[:, None, None]
    ky = np.fft.fftfreq(6, 1 / 6)[None, :, None]
    kx = np.arange(3)[None, None, :]
    expected = np.fft.irfftn(np.fft.rfftn(volume) * smoothing(kz, ky, kx), s=shape,
                             axes=(0, 1, 2))
    result = apply_fourier_multiplier(world, owned(world, volume), shape, smoothing)
    assert result.dtype == dtype
    assert_close(result, owned(world, expected), dtype)

    field = np.stack([volume, 2 * volume, -volume])
    z0, z1 = block_range(7, world.size, world.rank)
    smoothed = apply_fourier_multiplier(world, field[:, z0:z1], shape, smoothing)
    for channel, factor in enumerate((1, 2, -1)):
        assert_close(smoothed[channel], factor * owned(world, expected), dtype)


def test_identity_multiplier_returns_input(world):
    volume = random_volume((4, 5, 6), np.float64, seed=2)
    result = apply_fourier_multiplier(world, owned(world, volume), volume.shape,
                                      lambda kz, ky, kx: 1.0)
    assert_close(result, owned(world, volume), np.float64)


def test_wrong_slab_is_rejected(world):
    with pytest.raises(ValueError, match="owns"):
        rfftn_slabs(world, np.zeros((9, 3, 3)), 8)
    with pytest.raises(ValueError, match="spectrum block"):
        irfftn_slabs(world, np.zeros((8, 9, 2), complex), (8, 9, 5))
    with pytest.raises(ValueError, match="slab"):
        rfftn_slabs(world, np.zeros((3, 3)), 3)
