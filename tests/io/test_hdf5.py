"""HDF5 volumes: round trips, plane chunks, attributes, partial reads, errors."""

import h5py
import numpy as np
import pytest

from medhpc.io import (ImageGeometry, list_datasets, plane_chunks, read_planes, read_volume,
                       volume_info, write_volume)
from medhpc.io.hdf5 import TARGET_CHUNK_BYTES
from tests.io import raises_input_error


def _oblique_geometry(shape):
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0],
                         [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.9, 2.5])
    affine[:3, 3] = [-12.5, 3.0, 40.25]
    return ImageGeometry(shape, affine)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.uint8, bool])
def test_round_trip_keeps_data_dtype_and_affine(tmp_path, dtype):
    rng = np.random.default_rng(0)
    volume = (rng.random((5, 6, 7)) * 100).astype(dtype)
    geometry = _oblique_geometry(volume.shape)
    write_volume(tmp_path / "v.h5", volume, geometry, units="Bq/mL")
    array, read_geometry, attrs = read_volume(tmp_path / "v.h5")
    assert array.dtype == volume.dtype
    np.testing.assert_array_equal(array, volume)
    assert read_geometry == geometry
    assert attrs["units"] == "Bq/mL"


def test_4d_and_nested_dataset(tmp_path):
    frames = np.random.default_rng(1).random((3, 4, 5, 6)).astype(np.float32)
    geometry = ImageGeometry.from_spacing(frames.shape[1:], (1.0, 2.0, 3.0))
    write_volume(tmp_path / "f.h5", frames, geometry, dataset="recon/frames", compression=None)
    array, read_geometry, _ = read_volume(tmp_path / "f.h5", "recon/frames")
    np.testing.assert_array_equal(array, frames)
    assert read_geometry.spacing_mm == (1.0, 2.0, 3.0)
    assert list_datasets(tmp_path / "f.h5") == ["/recon/frames"]
    np.testing.assert_array_equal(read_planes(tmp_path / "f.h5", "recon/frames", 1, 3),
                                  frames[:, 1:3])


def test_extra_attrs_are_returned(tmp_path):
    volume = np.zeros((2, 3, 4), np.float32)
    attrs = {"tracer": "FDG", "iterations": 12, "frame_s": np.array([0.0, 60.0])}
    write_volume(tmp_path / "v.h5", volume, ImageGeometry.from_spacing(volume.shape, 2.0),
                 attrs=attrs)
    _, _, read_attrs = read_volume(tmp_path / "v.h5")
    assert read_attrs["tracer"] == "FDG"
    assert read_attrs["iterations"] == 12
    np.testing.assert_array_equal(read_attrs["frame_s"], [0.0, 60.0])
    assert "affine" not in read_attrs


def test_geometry_attrs_cannot_be_overridden(tmp_path):
    volume = np.zeros((2, 3, 4))
    with pytest.raises(ValueError):
        write_volume(tmp_path / "v.h5", volume, ImageGeometry.from_spacing(volume.shape),
                     attrs={"affine": np.eye(4)})


def test_chunks_are_whole_planes(tmp_path):
    volume = np.zeros((40, 64, 96), np.float32)
    write_volume(tmp_path / "v.h5", volume, ImageGeometry.from_spacing(volume.shape))
    info = volume_info(tmp_path / "v.h5")
    assert info.chunks[1:] == (64, 96)
    assert info.chunks[0] == 40  # 40 planes of 24 KiB fit in one ~2 MiB chunk
    assert info.shape == volume.shape and info.dtype == np.float32


def test_plane_chunk_sizes():
    assert plane_chunks((500, 256, 256), 4) == (8, 256, 256)
    assert plane_chunks((3, 500, 256, 256), 4) == (1, 8, 256, 256)
    big_plane = plane_chunks((10, 4096, 4096), 4)
    assert big_plane[0] == 1 and big_plane[2] == 4096
    assert big_plane[1] * 4096 * 4 <= TARGET_CHUNK_BYTES


def test_explicit_chunks(tmp_path):
    volume = np.zeros((4, 6, 8), np.int16)
    write_volume(tmp_path / "v.h5", volume, ImageGeometry.from_spacing(volume.shape),
                 chunks=(1, 6, 8), compression="lzf")
    assert volume_info(tmp_path / "v.h5").chunks == (1, 6, 8)


def test_volume_info_does_not_read_data(tmp_path):
    volume = np.ones((3, 4, 5), np.float32)
    geometry = _oblique_geometry(volume.shape)
    write_volume(tmp_path / "v.h5", volume, geometry, units="HU")
    info = volume_info(tmp_path / "v.h5")
    assert info.geometry == geometry and info.attrs["units"] == "HU"


def test_read_planes_geometry_and_bounds(tmp_path):
    volume = np.arange(6 * 2 * 3, dtype=np.float32).reshape(6, 2, 3)
    geometry = ImageGeometry.from_spacing(volume.shape, 2.0)
    write_volume(tmp_path / "v.h5", volume, geometry)
    np.testing.assert_array_equal(read_planes(tmp_path / "v.h5", "volume", 2, 5), volume[2:5])
    slab = geometry.slab(2, 5)
    np.testing.assert_allclose(slab.voxel_to_world([0, 0, 0]),
                               geometry.voxel_to_world([0, 0, 2]))
    with pytest.raises(ValueError):
        read_planes(tmp_path / "v.h5", "volume", 4, 7)


def test_file_without_geometry_gets_1mm(tmp_path):
    with h5py.File(tmp_path / "raw.h5", "w") as h5:
        h5["volume"] = np.zeros((2, 3, 4))
    _, geometry, _ = read_volume(tmp_path / "raw.h5")
    assert geometry.spacing_mm == (1.0, 1.0, 1.0) and geometry.shape == (2, 3, 4)


def test_missing_file(tmp_path):
    path = tmp_path / "missing.h5"
    assert "not found" in raises_input_error(path, read_volume, path)


def test_not_hdf5(tmp_path):
    path = tmp_path / "text.h5"
    path.write_text("hello\n")
    assert "not an HDF5 file" in raises_input_error(path, read_volume, path)


def test_folder_instead_of_file(tmp_path):
    raises_input_error(tmp_path, volume_info, tmp_path)


def test_missing_dataset_lists_the_datasets(tmp_path):
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as h5:
        h5["activity"] = np.zeros((2, 2, 2))
        h5["aux/mu"] = np.zeros((2, 2, 2))
    message = raises_input_error(path, read_volume, path, "volume")
    assert "'volume'" in message and "/activity" in message and "/aux/mu" in message
    message = raises_input_error(path, read_volume, path, "aux")
    assert "is a group" in message


def test_wrong_dimensionality(tmp_path):
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as h5:
        h5["volume"] = np.zeros((3, 4))
    message = raises_input_error(path, read_volume, path)
    assert "2-D" in message and "(3, 4)" in message


def test_inconsistent_geometry_attributes(tmp_path):
    path = tmp_path / "v.h5"
    with h5py.File(path, "w") as h5:
        h5["volume"] = np.zeros((2, 3, 4))
        h5["volume"].attrs["shape_zyx"] = [9, 9, 9]
    raises_input_error(path, read_volume, path)
    with h5py.File(path, "w") as h5:
        h5["volume"] = np.zeros((2, 3, 4))
        h5["volume"].attrs["affine"] = np.zeros((4, 4))
    raises_input_error(path, volume_info, path)
