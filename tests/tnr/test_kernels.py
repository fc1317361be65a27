"""CPU kernels: FFT-based ZNCC against the direct definition; remap against scipy."""

import numpy as np
import pytest
from scipy import ndimage

from medhpc.tnr import kernels_cpu
from tests.tnr.reference import direct_zncc, random_case


@pytest.mark.parametrize("batch, patch, window", [(3, 8, 8), (4, 16, 37), (5, 12, 40),
                                                  (2, 32, 96), (17, 9, 21)])
def test_fft_zncc_matches_direct_definition(batch, patch, window):
    rng = np.random.default_rng(batch * 100 + patch)
    templates, windows = random_case(rng, batch, patch, window)
    out = np.zeros((batch, window - patch + 1, window - patch + 1), np.float32)
    kernels_cpu.zncc_scores(templates, windows, out)
    expected = direct_zncc(templates, windows)
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)
    assert out.max() > 0.99  # the planted copies are found


def test_flat_template_or_window_scores_zero():
    rng = np.random.default_rng(3)
    templates, windows = random_case(rng, 3, 8, 20, flat=True)
    out = np.full((3, 13, 13), np.nan, np.float32)
    kernels_cpu.zncc_scores(templates, windows, out)
    assert np.all(out[0] == 0) and np.all(out[2] == 0)
    np.testing.assert_allclose(out[1], direct_zncc(templates, windows)[1], atol=1e-4)


def test_bilinear_remap_matches_scipy_inside():
    rng = np.random.default_rng(0)
    image = rng.random((23, 31), dtype=np.float32)
    coord_y = rng.uniform(0, 22, (17, 19)).astype(np.float32)
    coord_x = rng.uniform(0, 30, (17, 19)).astype(np.float32)
    out = np.zeros((17, 19), np.float32)
    kernels_cpu.remap(image, coord_y, coord_x, 1, -1.0, out)
    expected = ndimage.map_coordinates(image, [coord_y, coord_x], order=1)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_bicubic_reproduces_smooth_images_and_fills_outside():
    yy, xx = np.mgrid[0:40, 0:40].astype(np.float32)
    linear = (0.3 * yy - 0.7 * xx + 2).astype(np.float32)
    coord_y = (yy[5:35, 5:35] + 0.37).astype(np.float32)
    coord_x = (xx[5:35, 5:35] - 0.81).astype(np.float32)
    out = np.zeros(coord_y.shape, np.float32)
    kernels_cpu.remap(linear, coord_y, coord_x, 3, 0.0, out)
    np.testing.assert_allclose(out, 0.3 * coord_y - 0.7 * coord_x + 2, atol=1e-4)
    identity = np.zeros((40, 40), np.float32)
    kernels_cpu.remap(linear, yy, xx, 3, 0.0, identity)
    np.testing.assert_allclose(identity, linear, atol=1e-5)
    outside = np.zeros((1, 2), np.float32)
    kernels_cpu.remap(linear, np.array([[-0.6, 10]], np.float32),
                      np.array([[3, 39.6]], np.float32), 3, -5.0, outside)
    assert np.all(outside == -5.0)
