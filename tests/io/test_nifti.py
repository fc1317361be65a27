"""NIfTI volumes: [z, y, x] in memory, the file's affine untouched."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.io import ImageGeometry, read_nifti, write_nifti
from medhpc.io.nifti import read_nifti_geometry
from tests.io import raises_input_error


def _oblique_affine():
    angle = np.deg2rad(15)
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)],
                         [0, np.sin(angle), np.cos(angle)]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.9, 1.1, 2.5])  # x flipped, as in RAS/LAS files
    affine[:3, 3] = [90.0, -126.0, -72.0]
    return affine


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8, np.int64])
def test_round_trip_keeps_data_dtype_and_oblique_affine(tmp_path, name, dtype):
    volume = (np.random.default_rng(2).random((4, 5, 6)) * 50).astype(dtype)
    geometry = ImageGeometry(volume.shape, _oblique_affine())
    write_nifti(tmp_path / name, volume, geometry)
    array, read_geometry = read_nifti(tmp_path / name)
    assert array.dtype == volume.dtype
    np.testing.assert_array_equal(array, volume)
    assert read_geometry.shape == geometry.shape
    np.testing.assert_allclose(read_geometry.affine, geometry.affine, atol=1e-5)
    header_geometry = read_nifti_geometry(tmp_path / name)
    assert header_geometry.shape == read_geometry.shape
    np.testing.assert_array_equal(header_geometry.affine, read_geometry.affine)


def test_axes_are_transposed_and_affine_kept(tmp_path):
    data_xyz = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    affine = _oblique_affine()
    nib.save(nib.Nifti1Image(data_xyz, affine), tmp_path / "x.nii.gz")
    array, geometry = read_nifti(tmp_path / "x.nii.gz")
    assert array.shape == (4, 3, 2)
    assert array[3, 2, 1] == data_xyz[1, 2, 3]
    np.testing.assert_allclose(geometry.affine, affine, atol=1e-5)
    np.testing.assert_allclose(geometry.spacing_mm, (0.9, 1.1, 2.5), atol=1e-6)
    written = tmp_path / "back.nii.gz"
    write_nifti(written, array, geometry)
    image = nib.load(written)
    np.testing.assert_array_equal(np.asarray(image.dataobj), data_xyz)
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    assert image.header.get_qform(coded=True)[1] > 0  # a rigid affine fills the qform too


def test_sheared_affine_is_kept_in_the_sform(tmp_path):
    affine = np.array([[1.0, 0.3, 0, 0], [0, 1.0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]])
    write_nifti(tmp_path / "s.nii", np.zeros((2, 3, 4)), ImageGeometry((2, 3, 4), affine))
    _, geometry = read_nifti(tmp_path / "s.nii")
    np.testing.assert_allclose(geometry.affine, affine, atol=1e-6)


def test_4d_round_trip(tmp_path):
    frames = np.random.default_rng(3).random((3, 4, 5, 6)).astype(np.float32)
    geometry = ImageGeometry.from_spacing(frames.shape[1:], (2.0, 2.0, 3.27))
    write_nifti(tmp_path / "f.nii.gz", frames, geometry)
    assert nib.load(tmp_path / "f.nii.gz").shape == (6, 5, 4, 3)
    array, read_geometry = read_nifti(tmp_path / "f.nii.gz")
    np.testing.assert_array_equal(array, frames)
    assert read_geometry.same_grid(geometry)


def test_scaled_data_comes_back_as_float32(tmp_path):
    image = nib.Nifti1Image(np.array([[[1, 2], [3, 4]]], np.int16), np.eye(4))
    image.header.set_slope_inter(0.5, 10.0)
    nib.save(image, tmp_path / "scaled.nii")
    array, _ = read_nifti(tmp_path / "scaled.nii")
    assert array.dtype == np.float32
    np.testing.assert_allclose(array[:, :, 0], [[10.5, 11.5], [11.0, 12.0]])


def test_bool_is_written_as_uint8(tmp_path):
    mask = np.zeros((2, 3, 4), bool)
    mask[1, 1, 1] = True
    write_nifti(tmp_path / "m.nii.gz", mask, ImageGeometry.from_spacing(mask.shape))
    array, _ = read_nifti(tmp_path / "m.nii.gz")
    assert array.dtype == np.uint8 and array.sum() == 1 and array[1, 1, 1] == 1


def test_vector_image_5d(tmp_path):
    field_xyz = np.random.default_rng(4).random((4, 5, 6, 1, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(field_xyz, np.eye(4)), tmp_path / "warp.nii.gz")
    array, geometry = read_nifti(tmp_path / "warp.nii.gz")
    assert array.shape == (3, 6, 5, 4) and geometry.shape == (6, 5, 4)
    assert array[2, 5, 4, 3] == field_xyz[3, 4, 5, 0, 2]


def test_wrong_extension_and_shape(tmp_path):
    with pytest.raises(InputError):
        write_nifti(tmp_path / "v.img", np.zeros((2, 2, 2)),
                    ImageGeometry.from_spacing((2, 2, 2)))
    with pytest.raises(ValueError):
        write_nifti(tmp_path / "v.nii", np.zeros((2, 2, 2)),
                    ImageGeometry.from_spacing((3, 2, 2)))


def test_missing_file(tmp_path):
    path = tmp_path / "missing.nii.gz"
    assert "not found" in raises_input_error(path, read_nifti, path)


def test_not_nifti(tmp_path):
    path = tmp_path / "text.nii"
    path.write_text("not an image at all\n" * 30)
    raises_input_error(path, read_nifti, path)


def test_truncated_gzip(tmp_path):
    path = tmp_path / "cut.nii.gz"
    write_nifti(path, np.random.default_rng(5).random((8, 8, 8)),
                ImageGeometry.from_spacing((8, 8, 8)))
    path.write_bytes(path.read_bytes()[:200])
    raises_input_error(path, read_nifti, path)


def test_garbage_gzip(tmp_path):
    path = tmp_path / "junk.nii.gz"
    path.write_bytes(gzip.compress(b"\x00" * 400))
    raises_input_error(path, read_nifti, path)


@pytest.mark.parametrize("dtype, kind", [(np.complex64, "complex"),
                                         (np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")]),
                                          "RGB or structured")])
def test_voxels_that_are_not_one_real_value_are_refused(tmp_path, dtype, kind):
    path = tmp_path / "odd.nii.gz"
    data = np.zeros((4, 5, 6), dtype=dtype)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    message = raises_input_error(path, read_nifti, path)
    assert f"voxels are {kind}" in message and "one real value per voxel" in message
