"""CPU kernels against NumPy references on small slabs (halos and global ends included)."""

import numpy as np
import pytest

from medhpc.lddmm import kernels_cpu as k
from medhpc.lddmm.transform import sample

SHAPE = (9, 7, 8)


def reference_trilinear(image, points):
    """Trilinear interpolation with clamped coordinates, written independently."""
    shape = np.array(image.shape)[:, None]
    p = np.clip(points.reshape(3, -1), 0, shape - 1)
    low = np.minimum(np.floor(p).astype(int), np.maximum(shape - 2, 0))
    high = np.minimum(low + 1, shape - 1)
    w = p - low
    out = 0.0
    for corner in range(8):
        bits = [(corner >> axis) & 1 for axis in range(3)]
        index = tuple(np.where(bits[a], high[a], low[a]) for a in range(3))
        weight = np.prod([np.where(bits[a], w[a], 1 - w[a]) for a in range(3)], axis=0)
        out = out + weight * image[index]
    return out.reshape(points.shape[1:])


def test_warp_image_matches_trilinear_reference():
    rng = np.random.default_rng(0)
    image = rng.random(SHAPE).astype(np.float32)
    halo, z_first, owned = 2, 3, 4
    u = (rng.standard_normal((3, owned + 2 * halo) + SHAPE[1:]) * 2).astype(np.float32)
    out = np.zeros((owned + 2,) + SHAPE[1:], np.float32)
    k.warp_image(image, 0, SHAPE[0], u, halo, z_first, out, 1)
    grid = np.indices((owned + 2,) + SHAPE[1:], dtype=np.float64)
    grid[0] += z_first - 1
    points = grid + u[:, halo - 1:halo + owned + 1]
    np.testing.assert_allclose(out, reference_trilinear(image, points), atol=1e-5)


@pytest.mark.parametrize("z_first", [0, 3, 5])
def test_compose_with_a_constant_velocity_shifts_a_linear_map(z_first):
    """u(x) = A x + c is linear, so u(x + s v) + s v is exact away from the clamped ends."""
    halo, owned, nz = 3, 4, 9
    a = np.array([[0.1, -0.05, 0.02], [0.03, 0.1, 0.0], [-0.02, 0.04, -0.1]])
    local = np.indices((owned + 2 * halo,) + SHAPE[1:], dtype=np.float64)
    local[0] += z_first - halo
    u = np.einsum("ij,j...->i...", a, local).astype(np.float32)
    v = np.zeros((3, owned) + SHAPE[1:], np.float32)
    v[:] = np.array([0.6, -0.4, 0.3], np.float32)[:, None, None, None]
    out = np.zeros_like(u)
    k.compose_displacement(u, v, -1.5, halo, z_first, nz, out)
    shift = -1.5 * np.array([0.6, -0.4, 0.3])
    expected = shift[:, None, None, None] + u[:, halo:halo + owned] + np.einsum(
        "ij,j->i", a, shift)[:, None, None, None]
    inside = (slice(None), slice(None), slice(1, -1), slice(1, -1))
    got = out[:, halo:halo + owned]
    interior_z = [z for z in range(owned) if 1 <= z_first + z + shift[0] <= nz - 2]
    np.testing.assert_allclose(got[:, interior_z][inside], expected[:, interior_z][inside],
                               atol=1e-5)


def test_jacobian_determinant_of_an_affine_map():
    halo, owned = 1, 5
    a = np.array([[0.2, 0.1, 0.0], [-0.1, 0.3, 0.05], [0.0, 0.02, -0.4]])
    local = np.indices((owned + 2 * halo,) + SHAPE[1:], dtype=np.float64)
    u = np.einsum("ij,j...->i...", a, local).astype(np.float32)
    out = np.empty((owned,) + SHAPE[1:], np.float32)
    k.jacobian_determinant(u, halo, 2, 9, out)
    np.testing.assert_allclose(out, np.linalg.det(np.eye(3) + a), rtol=1e-5)


def test_image_gradient_matches_numpy_gradient_at_the_ends_and_inside():
    rng = np.random.default_rng(1)
    volume = rng.random(SHAPE).astype(np.float32)
    expected = np.stack(np.gradient(volume.astype(np.float64)))
    for z_first, owned in ((0, 3), (3, 4), (7, 2)):
        padded = np.zeros((owned + 2,) + SHAPE[1:], np.float32)
        low, high = max(z_first - 1, 0), min(z_first + owned + 1, SHAPE[0])
        padded[low - (z_first - 1):high - (z_first - 1)] = volume[low:high]
        out = np.empty((3, owned) + SHAPE[1:], np.float32)
        k.image_gradient(padded, 1, z_first, SHAPE[0], out)
        np.testing.assert_allclose(out, expected[:, z_first:z_first + owned], atol=1e-5)


def test_similarity_force_is_the_pulled_back_derivative_times_the_gradient():
    rng = np.random.default_rng(2)
    owned = 3
    gradient = rng.standard_normal((3, owned) + SHAPE[1:]).astype(np.float32)
    j0 = rng.random((owned + 2,) + SHAPE[1:]).astype(np.float32)
    j1 = rng.random((owned,) + SHAPE[1:]).astype(np.float32)
    det = rng.random((owned,) + SHAPE[1:]).astype(np.float32) + 0.5
    out = np.empty_like(gradient)
    k.similarity_force(gradient, j0, 1, j1, det, 2.0, -3.0, 0.5, out)
    expected = det * (2.0 * j0[1:-1] - 3.0 * j1 + 0.5) * gradient
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_sampling_modes_and_labels_stay_labels():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, SHAPE).astype(np.int16)
    points = np.indices(SHAPE, dtype=np.float32) + 0.2
    nearest = sample(labels, points, "nearest")
    np.testing.assert_array_equal(nearest[:-1, :-1, :-1], labels[:-1, :-1, :-1])
    warped = sample(labels, points + rng.standard_normal(points.shape).astype(np.float32) * 0.4,
                    "label")
    assert set(np.unique(warped)) <= set(np.unique(labels))
    linear = sample(labels.astype(np.float32), points)
    np.testing.assert_allclose(linear, reference_trilinear(labels.astype(np.float64), points),
                               atol=1e-5)
    outside = sample(labels.astype(np.float32), points - 10.0, fill=-1.0)
    assert np.all(outside[:2, :2, :2] == -1.0)


def test_cubic_sampling_is_exact_at_voxels_and_sharper_than_trilinear():
    from medhpc.lddmm.transform import sample

    z, y, x = np.meshgrid(np.arange(20.0), np.arange(21.0), np.arange(22.0), indexing="ij")
    image = (np.sin(z / 3) * np.cos(y / 4) + x / 10).astype(np.float32)
    points = (np.random.default_rng(0).random((3, 500)) * np.array([[17], [18], [19]])
              + 1).astype(np.float32)
    truth = np.sin(points[0] / 3) * np.cos(points[1] / 4) + points[2] / 10
    cubic = np.abs(sample(image, points, "cubic") - truth).max()
    assert cubic < 0.1 * np.abs(sample(image, points, "linear") - truth).max()
    voxels = np.indices(image.shape, dtype=np.float32)
    np.testing.assert_allclose(sample(image, voxels, "cubic"), image, atol=1e-6)
    outside = np.array([[-1.0], [3.0], [3.0]], np.float32)
    assert sample(image, outside, "cubic", fill=-5.0)[0] == -5.0
