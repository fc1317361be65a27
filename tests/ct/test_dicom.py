"""DICOM CT series: slice order along the normal, HU from rescale, geometry; ct-prepare on it."""

import json

import h5py
import numpy as np
import pytest

from medhpc.io.geometry import ImageGeometry
from medhpc.io.nifti import write_nifti
from tests.helpers import run_medhpc

pydicom = pytest.importorskip("pydicom")

ROW_DIRECTION = np.array([0.0, 1.0, 0.0])     # x index moves along +y (LPS)
COLUMN_DIRECTION = np.array([1.0, 0.0, 0.0])  # y index moves along +x (LPS)
NORMAL = np.cross(ROW_DIRECTION, COLUMN_DIRECTION)  # (0, 0, -1): slices go towards the feet
ORIGIN_LPS = np.array([-120.0, 35.5, 60.0])
PIXEL_SPACING = (0.8, 0.6)  # row spacing (between rows), column spacing (between columns)
SLICE_MM = 2.5
SLOPE, INTERCEPT = 2.0, -1024.0


def write_series(folder, hu):
    """One file per plane of ``hu`` [z, y, x], written in a shuffled order of names."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series = generate_uid()
    order = np.random.default_rng(0).permutation(hu.shape[0])
    for name_index, z in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID = series
        ds.Modality = "CT"
        ds.ImageOrientationPatient = [*ROW_DIRECTION, *COLUMN_DIRECTION]
        ds.ImagePositionPatient = list(ORIGIN_LPS + z * SLICE_MM * NORMAL)
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.SliceThickness = SLICE_MM
        ds.RescaleSlope, ds.RescaleIntercept = SLOPE, INTERCEPT
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        stored = np.round((hu[z] - INTERCEPT) / SLOPE).astype(np.int16)
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"slice_{name_index:03d}.dcm", enforce_file_format=True)


def expected_geometry(shape):
    lps = np.eye(4)
    lps[:3, 0] = ROW_DIRECTION * PIXEL_SPACING[1]
    lps[:3, 1] = COLUMN_DIRECTION * PIXEL_SPACING[0]
    lps[:3, 2] = NORMAL * SLICE_MM
    lps[:3, 3] = ORIGIN_LPS
    return ImageGeometry(shape, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dicom")
    rng = np.random.default_rng(2)
    hu = (2 * rng.integers(-500, 700, (6, 10, 12))).astype(np.float32)
    hu[:, 0, 0] = np.arange(6) * 100  # a marker of each plane
    write_series(folder / "images" / "patient_a", hu)
    return folder, hu


def test_series_is_sorted_along_the_normal_in_hounsfield_units(series):
    from medhpc.ct.dicom import read_dicom_series

    folder, hu = series
    volume, geometry = read_dicom_series(folder / "images" / "patient_a")
    np.testing.assert_array_equal(volume, hu)
    assert geometry.same_grid(expected_geometry(hu.shape), tol=1e-6)
    assert geometry.spacing_mm == pytest.approx((0.6, 0.8, 2.5))
    # voxel (x=3, y=2, z=4) sits at ORIGIN + 3*0.6 row + 2*0.8 column + 4*2.5 normal (LPS)
    lps = ORIGIN_LPS + 3 * 0.6 * ROW_DIRECTION + 2 * 0.8 * COLUMN_DIRECTION + 10 * NORMAL
    np.testing.assert_allclose(geometry.voxel_to_world([3, 2, 4]), lps * [-1, -1, 1], atol=1e-9)
    from medhpc.ct.dicom import dicom_series_geometry

    headers_only = dicom_series_geometry(folder / "images" / "patient_a")
    assert headers_only.shape == geometry.shape
    np.testing.assert_array_equal(headers_only.affine, geometry.affine)


def test_pydicom_bundled_ct_slice_reads_with_hu_and_geometry():
    from pydicom.data import get_testdata_file

    from medhpc.ct.dicom import read_dicom_series

    path = get_testdata_file("CT_small.dcm")
    reference = pydicom.dcmread(path)
    volume, geometry = read_dicom_series([path])
    assert volume.shape == (1, 128, 128)
    expected = reference.pixel_array * float(reference.RescaleSlope) + float(reference.RescaleIntercept)
    np.testing.assert_array_equal(volume[0], expected)
    assert volume.min() == 128 - 1024 and volume.max() == 2191 - 1024
    spacing = [float(v) for v in reference.PixelSpacing]
    assert geometry.spacing_mm == pytest.approx((spacing[1], spacing[0], 5.0))
    position = np.array([float(v) for v in reference.ImagePositionPatient])
    np.testing.assert_allclose(geometry.origin_mm, position * [-1, -1, 1], atol=1e-9)


def test_ct_prepare_converts_a_dicom_series_with_nifti_labels(series, tmp_path):
    folder, hu = series
    geometry = expected_geometry(hu.shape)
    labels = folder / "labels"
    label_map = (hu > 600).astype(np.uint8) + (hu > 1000).astype(np.uint8)
    write_nifti(labels / "patient_a.nii.gz", label_map, geometry, overwrite=True)
    out = tmp_path / "data.h5"
    done = run_medhpc("ct-prepare", "--images", folder / "images", "--labels", labels,
                      "--out", out, "--classes", "soft,bone", "--device", "cpu", timeout=60)
    assert done.returncode == 0, done.stderr
    with h5py.File(out) as h5:
        assert json.loads(h5.attrs["classes"]) == ["soft", "bone"]
        case = h5["cases/patient_a"]
        np.testing.assert_array_equal(case["image"][()], hu)
        np.testing.assert_array_equal(case["labels"][()], label_map)
        stored = ImageGeometry.from_attrs(case["image"].attrs)
        assert stored.same_grid(geometry, tol=1e-5)
        np.testing.assert_allclose(case.attrs["original_affine"], geometry.affine, atol=1e-5)
        assert case["image"].chunks is not None


def _pydicom_test_folder(name):
    from pathlib import Path

    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("DICOMDIR")).parent / name


def test_real_mr_is_refused_as_ct_naming_the_file_and_modality():
    from pydicom.data import get_testdata_file

    from medhpc.ct.dicom import read_dicom_series
    from medhpc.errors import InputError

    with pytest.raises(InputError, match="MR_small.dcm: DICOM Modality MR, not CT"):
        read_dicom_series([get_testdata_file("MR_small.dcm")])
    with pytest.raises(InputError, match="Modality MR, not CT"):  # three MR series, one folder
        read_dicom_series(_pydicom_test_folder("98892003/MR2"))


def test_slices_of_two_real_ct_series_in_one_folder_are_refused_listing_both(tmp_path):
    import shutil

    from medhpc.ct.dicom import read_dicom_series
    from medhpc.errors import InputError

    for name in ("77654033/CT2", "98892001/CT5N"):
        for path in _pydicom_test_folder(name).iterdir():
            shutil.copy(path, tmp_path / f"{name.replace('/', '_')}_{path.name}")
    shutil.copy(_pydicom_test_folder("DICOMDIR"), tmp_path / "DICOMDIR")  # an index: skipped
    with pytest.raises(InputError, match=r"slices of 2 series \(series 5 \(SmartScore - Gated "
                                         r"0.5 sec\): 5 slice\(s\); series 2 \(Routine Brain\): "
                                         r"4 slice\(s\)\); expected one series per folder"):
        read_dicom_series(tmp_path)
    for path in tmp_path.glob("77654033_CT2_*"):
        path.unlink()
    volume, geometry = read_dicom_series(tmp_path)  # one real series beside its DICOMDIR
    assert volume.shape == (5, 16, 16)
    assert geometry.spacing_mm == pytest.approx((0.488281, 0.488281, 2.5))


def test_ct_segment_writes_a_dicom_seg_of_a_real_series_and_an_overlay(tmp_path):
    """pydicom's real CT series 98892001/CT5N: the Segmentation references its slices, holds
    the NIfTI label map frame by frame, and reads back with highdicom and pydicom."""
    import shutil

    highdicom = pytest.importorskip("highdicom")
    pytest.importorskip("torch")
    from medhpc.ct.dicom import _series
    from medhpc.io.nifti import read_nifti
    from tests.ct.test_inference import _save_model

    shutil.copytree(_pydicom_test_folder("98892001/CT5N"), tmp_path / "images" / "ct5n")
    model = _save_model(tmp_path / "model.pt", 3, ["liver", "kidneys"])
    done = run_medhpc("ct-segment", "--model", model, "--images", tmp_path / "images", "--out",
                      tmp_path / "seg", "--dicom-seg", "--png", "--device", "cpu", timeout=120)
    assert done.returncode == 0, done.stderr
    labels, _ = read_nifti(tmp_path / "seg" / "ct5n.nii.gz")
    seg = highdicom.seg.segread(tmp_path / "seg" / "ct5n.seg.dcm")
    slices, _ = _series(tmp_path / "images" / "ct5n", pixels=False)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == slices[0][1].SeriesInstanceUID
    present = [i for i in (1, 2) if np.any(labels == i)]
    assert present and [s.SegmentLabel for s in seg.SegmentSequence] == \
        [["liver", "kidneys"][i - 1] for i in present]
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[ds.SOPInstanceUID for _, ds in slices],
        segment_numbers=list(range(1, len(present) + 1)))
    for number, index in enumerate(present):
        np.testing.assert_array_equal(frames[..., number], labels == index)
    assert pydicom.dcmread(tmp_path / "seg" / "ct5n.seg.dcm").Modality == "SEG"
    assert (tmp_path / "seg" / "ct5n.png").stat().st_size > 1000


def test_dicom_seg_of_a_nifti_input_is_refused_before_segmenting(tmp_path):
    pytest.importorskip("torch")
    from tests.ct.test_inference import _save_model

    geometry = ImageGeometry.from_spacing((6, 10, 12), (0.8, 0.8, 2.0))
    (tmp_path / "images").mkdir()
    write_nifti(tmp_path / "images" / "a.nii.gz", np.zeros((6, 10, 12), np.float32), geometry)
    model = _save_model(tmp_path / "model.pt", 3, ["liver", "kidneys"])
    done = run_medhpc("ct-segment", "--model", model, "--images", tmp_path / "images", "--out",
                      tmp_path / "seg", "--dicom-seg", "--device", "cpu", timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "a.nii.gz: not a DICOM series folder" in lines[0]
    assert not (tmp_path / "seg").exists()
