"""ct-prepare on NIfTI: content, geometry, resampling, ranks, and bad input (exit 2, once)."""

import json
import shutil

import h5py
import numpy as np
import pytest

from medhpc.ct.dataset import CtDataset
from medhpc.io.nifti import read_nifti, write_nifti
from tests.ct.conftest import prepare
from tests.helpers import run_medhpc


def test_dataset_holds_every_case_with_its_geometry_and_statistics(tiny_phantoms, tiny_dataset):
    images, labels = tiny_phantoms
    dataset = CtDataset(tiny_dataset)
    assert dataset.names == [f"case_{i:03d}" for i in range(4)]
    assert dataset.classes == ["liver", "spleen", "kidneys"] and dataset.n_classes == 3
    image, label_map, geometry = dataset.read("case_002")
    source, source_geometry = read_nifti(images / "case_002.nii.gz")
    np.testing.assert_array_equal(image, np.clip(source, -1000, 1000))
    np.testing.assert_array_equal(label_map, read_nifti(labels / "case_002.nii.gz")[0])
    assert geometry.same_grid(source_geometry)
    stats = dataset.intensity
    assert 60 < stats["mean"] < 160 and stats["low"] < stats["mean"] < stats["high"]


def test_two_ranks_write_the_same_dataset_as_one(tiny_phantoms, tiny_dataset, tmp_path):
    images, labels = tiny_phantoms
    out = tmp_path / "two.h5"
    done = run_medhpc("ct-prepare", "--images", images, "--labels", labels, "--out", out,
                      "--clip-hu", "-1000,1000", "--device", "cpu", ranks=2, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not list(tmp_path.glob(".*part*"))
    with h5py.File(out) as two, h5py.File(tiny_dataset) as one:
        assert json.loads(two.attrs["intensity"]) == pytest.approx(json.loads(one.attrs["intensity"]))
        for name in one["cases"]:
            for item in ("image", "labels"):
                np.testing.assert_array_equal(two["cases"][name][item][()],
                                              one["cases"][name][item][()])


def test_resampling_keeps_the_original_grid_in_attributes(tiny_phantoms, tmp_path):
    images, labels = tiny_phantoms
    out = tmp_path / "coarse.h5"
    prepare(images, labels, out, spacing_mm=(22.5, 22.5, 16.0))
    dataset = CtDataset(out)
    image, label_map, geometry = dataset.read("case_000")
    assert geometry.shape == (12, 16, 16) and dataset.spacing_mm == [22.5, 22.5, 16.0]
    assert set(np.unique(label_map)) <= {0, 1, 2, 3} and np.count_nonzero(label_map == 1) > 0
    with h5py.File(out) as h5:
        assert tuple(h5["cases/case_000"].attrs["original_shape"]) == (24, 32, 32)


def broken_copy(tiny_phantoms, tmp_path):
    images, labels = tiny_phantoms
    shutil.copytree(images, tmp_path / "images")
    shutil.copytree(labels, tmp_path / "labels")
    return tmp_path / "images", tmp_path / "labels"


@pytest.mark.parametrize("defect, message", [
    ("shape", "expected the same grid"),
    ("geometry", "grid"),
    ("range", "outside the class range"),
    ("missing", "label map of case case_001 not found"),
    ("empty", "empty dataset"),
])
def test_bad_input_is_refused_once_with_exit_2(tiny_phantoms, tmp_path, defect, message):
    images, labels = broken_copy(tiny_phantoms, tmp_path)
    target = labels / "case_001.nii.gz"
    label_map, geometry = read_nifti(target)
    if defect == "shape":
        from medhpc.io.geometry import ImageGeometry

        write_nifti(target, label_map[:-2], ImageGeometry(label_map[:-2].shape, geometry.affine),
                    overwrite=True)
    elif defect == "geometry":
        from medhpc.io.geometry import ImageGeometry

        shifted = geometry.affine.copy()
        shifted[0, 3] += 7.0
        write_nifti(target, label_map, ImageGeometry(geometry.shape, shifted), overwrite=True)
    elif defect == "range":
        label_map[0, 0, 0] = 4
        write_nifti(target, label_map, geometry, overwrite=True)
    elif defect == "missing":
        target.unlink()
    elif defect == "empty":
        for path in images.iterdir():
            path.unlink()
    out = tmp_path / "data.h5"
    done = run_medhpc("ct-prepare", "--images", images, "--labels", labels, "--out", out,
                      "--device", "cpu", ranks=2, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("error:") == 1 and message in done.stderr, done.stderr
    assert not out.exists() and not list(tmp_path.glob(".*part*"))
