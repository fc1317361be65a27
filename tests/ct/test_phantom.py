"""medhpc phantom ct: organs at their HU, labels, geometry, and different anatomy per case."""

import json

import numpy as np

from medhpc.io.nifti import read_nifti
from medhpc.phantoms.ct import CLASS_NAMES, HU, NOISE_HU, make_case, phantom_geometry


def test_organs_have_their_hounsfield_units_and_labels():
    hu, labels = make_case((40, 64, 64), np.random.default_rng(3))
    assert hu.dtype == np.float32 and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    for label, name in zip((1, 2, 3), ("liver", "spleen", "kidney")):
        assert abs(np.median(hu[labels == label]) - HU[name]) < 15
        assert 0.6 * NOISE_HU < np.std(hu[labels == label]) < 2.5 * NOISE_HU
    assert np.median(hu[0, 0, :5]) < -900  # air in the corner
    assert np.count_nonzero(hu > 350) > 0 and np.all(labels[hu > 350] == 0)  # spine
    assert np.count_nonzero(labels == 1) > 5 * np.count_nonzero(labels == 3)  # liver largest


def test_cases_differ_and_files_keep_geometry(tiny_phantoms):
    images, labels = tiny_phantoms
    first, geometry = read_nifti(labels / "case_000.nii.gz")
    second, _ = read_nifti(labels / "case_001.nii.gz")
    assert first.shape == (24, 32, 32) and np.any(first != second)
    assert geometry.same_grid(phantom_geometry((24, 32, 32)))
    image, image_geometry = read_nifti(images / "case_000.nii.gz")
    assert image_geometry.same_grid(geometry) and image.min() < -900
    summary = json.loads((images.parent / "phantom.json").read_text())
    assert summary["classes"] == list(CLASS_NAMES) and summary["cases"] == 4
