"""The Fourier-domain K = (L^T L)^-1 against the finite-difference L it must invert."""

import numpy as np
import pytest

from medhpc.lddmm.regulariser import Metric, apply_operator_directly, smooth
from tests.lddmm.conftest import serial_world

CASES = [((12, 10, 9), (1.0, 1.0, 1.0), Metric(0.5, 1.0, 2)),
         ((8, 11, 6), (1.2, 0.8, 1.5), Metric(2.0, 0.3, 1)),
         ((7, 6, 10), (1.0, 2.0, 1.0), Metric(1.0, 1.0, 3))]


@pytest.mark.parametrize("shape, spacing, metric", CASES)
def test_inverse_of_k_is_the_finite_difference_operator_squared(shape, spacing, metric):
    rng = np.random.default_rng(0)
    field = rng.standard_normal((3,) + shape).astype(np.float32)
    direct = apply_operator_directly(field, spacing, metric, times=2)
    fourier = smooth(serial_world(), field, shape, spacing, metric, inverse=True)
    np.testing.assert_allclose(fourier, direct, rtol=2e-4, atol=2e-4 * np.abs(direct).max())


@pytest.mark.parametrize("shape, spacing, metric", CASES)
def test_k_undoes_the_finite_difference_operator(shape, spacing, metric):
    rng = np.random.default_rng(1)
    field = rng.standard_normal((3,) + shape)
    # In double precision: (L^T L) f spans up to six orders of magnitude (power 3), so a
    # float32 input alone would carry rounding far above the operator's own accuracy.
    operated = apply_operator_directly(field, spacing, metric, times=2)
    recovered = smooth(serial_world(), operated, shape, spacing, metric)
    np.testing.assert_allclose(recovered, field, atol=1e-6 * np.abs(field).max())


def test_k_is_symmetric_and_positive():
    rng = np.random.default_rng(2)
    shape, spacing, metric = CASES[1]
    a = rng.standard_normal((3,) + shape).astype(np.float32)
    b = rng.standard_normal((3,) + shape).astype(np.float32)
    world = serial_world()
    ka = smooth(world, a, shape, spacing, metric)
    kb = smooth(world, b, shape, spacing, metric)
    assert np.vdot(ka, b) == pytest.approx(np.vdot(a, kb), rel=1e-4)
    assert np.vdot(a, ka) > 0
