"""ImageGeometry, the read_image/write_image entry point and input validation."""

import h5py
import numpy as np
import pytest

from medhpc.io import (ImageGeometry, check_finite, check_nonnegative, check_same_grid,
                       read_image, split_dataset, write_image, write_tiff_stack)
from tests.io import raises_input_error

VOLUME = np.random.default_rng(6).random((4, 5, 6)).astype(np.float32)


# ImageGeometry

def test_from_spacing_centres_the_volume():
    geometry = ImageGeometry.from_spacing((4, 5, 6), (1.0, 2.0, 3.0))
    assert geometry.spacing_mm == (1.0, 2.0, 3.0)
    assert geometry.origin_mm == (-2.5, -4.0, -4.5)
    centre = geometry.voxel_to_world([(6 - 1) / 2, (5 - 1) / 2, (4 - 1) / 2])
    np.testing.assert_allclose(centre, 0.0, atol=1e-12)
    placed = ImageGeometry.from_spacing((4, 5, 6), 2.0, origin_mm=(10, 20, 30))
    assert placed.origin_mm == (10.0, 20.0, 30.0) and placed.spacing_mm == (2.0, 2.0, 2.0)


def test_world_voxel_round_trip_and_attrs():
    affine = np.array([[0, -1.5, 0, 20], [2.0, 0, 0, -3], [0, 0, 0.5, 7], [0, 0, 0, 1]])
    geometry = ImageGeometry((3, 4, 5), affine)
    np.testing.assert_allclose(geometry.spacing_mm, (2.0, 1.5, 0.5))
    voxels = np.array([[0, 0, 0], [4, 3, 2], [1.5, 2.5, 0.25]])
    np.testing.assert_allclose(geometry.world_to_voxel(geometry.voxel_to_world(voxels)), voxels)
    np.testing.assert_allclose(geometry.voxel_to_world([1, 0, 0]), [20, -1, 7])
    assert ImageGeometry.from_attrs(geometry.to_attrs()) == geometry
    assert hash(ImageGeometry.from_attrs(geometry.to_attrs())) == hash(geometry)
    assert not geometry.affine.flags.writeable


def test_same_grid_and_describe():
    a = ImageGeometry.from_spacing((32, 64, 64), 2.0)
    assert a.describe() == "64x64x32 at 2.0 mm"
    anisotropic = ImageGeometry.from_spacing((3, 4, 5), (1, 1, 2.5))
    assert anisotropic.describe() == "5x4x3 at 1.0x1.0x2.5 mm"
    shifted = ImageGeometry(a.shape, a.affine + 1e-6)
    assert a.same_grid(shifted) and not a.same_grid(shifted, tol=1e-8)
    assert not a.same_grid(ImageGeometry.from_spacing((32, 64, 63), 2.0))


def test_invalid_geometry():
    with pytest.raises(ValueError):
        ImageGeometry((2, 3), np.eye(4))
    with pytest.raises(ValueError):
        ImageGeometry((2, 3, 4), np.zeros((4, 4)))
    with pytest.raises(ValueError):
        ImageGeometry.from_spacing((2, 3, 4), (1.0, 0.0, 1.0))


# read_image / write_image

@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz", "v.h5", "v.hdf5", "v.tif", "v.ome.tiff"])
def test_round_trip_by_extension(tmp_path, name):
    geometry = ImageGeometry.from_spacing(VOLUME.shape, (0.5, 0.75, 2.0))
    write_image(tmp_path / name, VOLUME, geometry, units="Bq/mL")
    array, read_geometry = read_image(tmp_path / name)
    np.testing.assert_array_equal(array, VOLUME)
    assert read_geometry.same_grid(geometry, tol=1e-6)


def test_hdf5_dataset_syntax(tmp_path):
    geometry = ImageGeometry.from_spacing(VOLUME.shape)
    write_image(f"{tmp_path}/v.h5:/recon/activity", VOLUME, geometry)
    array, _ = read_image(f"{tmp_path}/v.h5:/recon/activity")
    np.testing.assert_array_equal(array, VOLUME)
    assert split_dataset("C:/data/x.H5:/a/b") == (split_dataset("C:/data/x.H5")[0], "/a/b")
    assert split_dataset("x.nii.gz", "volume")[1] == "volume"


def test_4d_needs_allow_4d(tmp_path):
    frames = np.zeros((2,) + VOLUME.shape, np.float32)
    write_image(tmp_path / "f.nii.gz", frames, ImageGeometry.from_spacing(VOLUME.shape))
    message = raises_input_error(tmp_path / "f.nii.gz", read_image, tmp_path / "f.nii.gz")
    assert message.endswith("expected a 3-D volume, got 4-D of shape (2, 4, 5, 6)")
    assert read_image(tmp_path / "f.nii.gz", allow_4d=True)[0].shape == frames.shape
    assert read_image(tmp_path / "f.nii.gz", ndim=4)[0].shape == frames.shape


def test_tiff_colour_and_unknown_spacing(tmp_path):
    rgb = np.zeros((2, 5, 6, 3), np.uint8)
    rgb[..., 1] = 9
    write_tiff_stack(tmp_path / "rgb.tif", rgb)
    array, geometry = read_image(tmp_path / "rgb.tif", allow_4d=True)
    assert array.shape == (3, 2, 5, 6) and array[1].max() == 9
    assert geometry.spacing_mm == (1.0, 1.0, 1.0) and geometry.shape == (2, 5, 6)
    write_image(tmp_path / "back.tif", array, geometry)
    np.testing.assert_array_equal(read_image(tmp_path / "back.tif", allow_4d=True)[0], array)
    with pytest.raises(Exception) as excinfo:
        write_image(tmp_path / "t.tif", np.zeros((5, 2, 3, 4)),
                    ImageGeometry.from_spacing((2, 3, 4)))
    assert "t.tif" in str(excinfo.value)


def test_missing_and_unknown_files(tmp_path):
    missing = tmp_path / "missing.nii.gz"
    assert "not found" in raises_input_error(missing, read_image, missing)
    unknown = tmp_path / "scan.mha"
    unknown.write_bytes(b"x")
    message = raises_input_error(unknown, read_image, unknown)
    assert ".nii.gz" in message and ".h5" in message and ".tif" in message
    raises_input_error(tmp_path / "out.png", write_image, tmp_path / "out.png", VOLUME,
                       ImageGeometry.from_spacing(VOLUME.shape))


def test_unreadable_content(tmp_path):
    for name in ("bad.nii.gz", "bad.h5", "bad.tif"):
        (tmp_path / name).write_bytes(b"garbage" * 50)
        raises_input_error(tmp_path / name, read_image, tmp_path / name)


def test_wrong_dimensionality_from_hdf5(tmp_path):
    with h5py.File(tmp_path / "plane.h5", "w") as h5:
        h5["volume"] = np.zeros((5, 6))
    message = raises_input_error(tmp_path / "plane.h5", read_image, tmp_path / "plane.h5")
    assert "2-D" in message and "(5, 6)" in message


def test_nonfinite_values_are_counted(tmp_path):
    bad = VOLUME.copy()
    bad[0, 0, :3] = np.nan
    bad[1, 1, 1] = np.inf
    write_image(tmp_path / "bad.nii.gz", bad, ImageGeometry.from_spacing(bad.shape))
    message = raises_input_error(tmp_path / "bad.nii.gz", read_image, tmp_path / "bad.nii.gz")
    assert "3 NaN and 1 infinite" in message
    array, _ = read_image(tmp_path / "bad.nii.gz", require_finite=False)
    assert np.isnan(array).sum() == 3
    check_finite("ints.h5", np.arange(4))


def test_check_nonnegative():
    check_nonnegative("a.nii", np.zeros(3), "activity")
    message = raises_input_error("a.nii", check_nonnegative, "a.nii", np.array([1.0, -0.5, -2]),
                                 "activity values")
    assert "2 negative activity values" in message and "-2" in message


def test_check_same_grid_messages():
    mu = ImageGeometry.from_spacing((32, 64, 64), 2.0)
    activity = ImageGeometry.from_spacing((32, 48, 48), 4.0)
    check_same_grid("mu-map.nii.gz", mu, "activity.nii.gz", mu)
    message = raises_input_error("mu-map.nii.gz", check_same_grid, "mu-map.nii.gz", mu,
                                 "activity.nii.gz", activity)
    assert message == ("mu-map.nii.gz: grid 64x64x32 at 2.0 mm does not match "
                       "activity.nii.gz's 48x48x32 at 4.0 mm; expected the same grid")
    moved = ImageGeometry.from_spacing(mu.shape, 2.0, origin_mm=(0, 0, 0))
    assert "origin" in raises_input_error("a.h5", check_same_grid, "a.h5", mu, "b.h5", moved)
    flipped_affine = mu.affine.copy()
    flipped_affine[0, 0] = -2.0
    flipped = ImageGeometry(mu.shape, flipped_affine)
    assert "orientation" in raises_input_error("a.h5", check_same_grid, "a.h5", flipped,
                                               "b.h5", mu)
