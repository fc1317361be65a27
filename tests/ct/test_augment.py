"""Patch warp kernels (CPU): crops, flips, rotations, scaling, elastic, resampling."""

import numpy as np
import pytest

from medhpc.ct import augment_cpu
from medhpc.ct.augment import AugmentSettings, PatchTransform, draw_transform, extract_patch
from medhpc.ct.dataset import resample, resampled_geometry
from medhpc.io.geometry import ImageGeometry

NO_DISPLACEMENT = np.zeros((3, 1, 1, 1), np.float32)


@pytest.fixture
def volume():
    rng = np.random.default_rng(0)
    return rng.random((12, 14, 16), dtype=np.float32), rng.integers(0, 4, (12, 14, 16),
                                                                      dtype=np.uint8)


def warp(image, labels, matrix, offset, shape, displacement=NO_DISPLACEMENT, fill=-5.0):
    out_image = np.empty(shape, np.float32)
    out_labels = np.empty(shape, np.uint8)
    matrix = np.ascontiguousarray(matrix, np.float32)
    offset = np.asarray(offset, np.float32)
    augment_cpu.warp_image(image, matrix, offset, displacement, np.float32(fill), out_image)
    augment_cpu.warp_labels(labels, matrix, offset, displacement, out_labels)
    return out_image, out_labels


def test_identity_crop_is_slicing_and_outside_is_filled(volume):
    image, labels = volume
    out_image, out_labels = warp(image, labels, np.eye(3), (2, 3, 4), (6, 6, 6))
    np.testing.assert_allclose(out_image, image[2:8, 3:9, 4:10], atol=1e-6)
    np.testing.assert_array_equal(out_labels, labels[2:8, 3:9, 4:10])
    out_image, out_labels = warp(image, labels, np.eye(3), (-20, 0, 0), (2, 2, 2))
    assert np.all(out_image == -5.0) and np.all(out_labels == 0)


def test_flip_and_quarter_turn_are_exact(volume):
    image, labels = volume
    flip = np.diag([1.0, 1.0, -1.0])
    out_image, out_labels = warp(image, labels, flip, (0, 0, 15), image.shape)
    np.testing.assert_allclose(out_image, image[:, :, ::-1], atol=1e-6)
    np.testing.assert_array_equal(out_labels, labels[:, :, ::-1])
    cube = image[:, :12, :12].copy()
    cube_labels = labels[:, :12, :12].copy()
    # out[z, y, x] = cube[z, x, 11 - y]  (a quarter turn in the y-x plane)
    turn = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)
    out_image, out_labels = warp(cube, cube_labels, turn, (0, 0, 11), cube.shape)
    np.testing.assert_allclose(out_image, np.rot90(cube, 1, axes=(1, 2)), atol=1e-5)
    np.testing.assert_array_equal(out_labels, np.rot90(cube_labels, 1, axes=(1, 2)))


def test_linear_ramp_is_interpolated_exactly_under_scaling_and_elastic_shift():
    z, y, x = np.meshgrid(np.arange(10.0), np.arange(12.0), np.arange(14.0), indexing="ij")
    ramp = (2 * z + 3 * y - x).astype(np.float32)
    labels = np.zeros(ramp.shape, np.uint8)
    matrix = np.diag([0.5, 0.75, 1.25])
    offset = np.array([1.0, 2.0, 0.5])
    out, _ = warp(ramp, labels, matrix, offset, (6, 6, 6))
    p = np.stack(np.meshgrid(*(np.arange(6.0),) * 3, indexing="ij"), -1)
    source = p @ matrix.T + offset
    expected = 2 * source[..., 0] + 3 * source[..., 1] - source[..., 2]
    np.testing.assert_allclose(out, expected, atol=1e-4)
    shift = np.zeros((3, 2, 2, 2), np.float32)
    shift[0] = 1.0  # one voxel along z everywhere
    out_shifted, _ = warp(ramp, labels, matrix, offset, (6, 6, 6), displacement=shift)
    np.testing.assert_allclose(out_shifted, expected + 2.0, atol=1e-4)


def test_normalise_and_scale_shift():
    values = np.array([[[-2000.0, 0.0, 50.0, 3000.0]]], np.float32)
    out = np.empty_like(values)
    augment_cpu.normalise_hu(values, np.float32(-100), np.float32(100), np.float32(0),
                             np.float32(50), out)
    np.testing.assert_allclose(out.ravel(), [-2, 0, 1, 2])
    augment_cpu.scale_shift(out, np.float32(2), np.float32(1))
    np.testing.assert_allclose(out.ravel(), [-3, 1, 3, 5])


def test_random_patches_keep_labels_aligned_with_the_image():
    rng = np.random.default_rng(1)
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[5:15, 4:12, 6:16] = 1
    image = np.where(labels == 1, 10.0, -10.0).astype(np.float32)
    settings = AugmentSettings(rotation_probability=1, scale_probability=1,
                               elastic_probability=1, intensity_probability=0,
                               noise_probability=0)
    for _ in range(5):
        transform = draw_transform(rng, (10, 8, 11), (12, 12, 12), settings)
        patch, patch_labels = extract_patch(augment_cpu, image, labels, transform, (12, 12, 12),
                                            -10.0, rng)
        inside = patch[patch_labels == 1]
        assert inside.size and np.median(inside) > 5  # nearest label agrees with the image
        assert np.median(patch[patch_labels == 0]) < -5
    plain = PatchTransform.crop((10, 8, 11), (4, 4, 4))
    patch, _ = extract_patch(augment_cpu, image, labels, plain, (4, 4, 4), 0.0)
    np.testing.assert_array_equal(patch, image[8:12, 6:10, 9:13])


def test_resampling_to_a_coarser_grid_keeps_the_extent_and_labels():
    geometry = ImageGeometry.from_spacing((20, 30, 40), (1.0, 1.0, 2.0))
    labels = np.zeros(geometry.shape, np.uint8)
    labels[5:15, 10:20, 10:30] = 2
    coarse = resampled_geometry(geometry, (2.0, 2.0, 2.0))
    assert coarse.shape == (20, 15, 20) and coarse.spacing_mm == (2.0, 2.0, 2.0)
    down = resample(labels, geometry, coarse, labels=True)
    assert abs(np.count_nonzero(down) * 4 - np.count_nonzero(labels)) < 0.1 * np.count_nonzero(labels)
    back = resample(down, coarse, geometry, labels=True)
    assert np.mean(back == labels) > 0.97
