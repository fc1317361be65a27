"""DICOM CT series: slices sorted along the slice normal, values in Hounsfield units.

DICOM positions are in the patient's LPS frame; the geometry returned here is in
NIfTI's RAS frame (x and y negated), so labels stored as NIfTI line up.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medhpc.errors import InputError
from medhpc.io.geometry import ImageGeometry

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_EXPECTED = "expected a folder of CT slices of one series (DICOM)"


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise InputError("reading DICOM needs pydicom; install medhpc[dicom]") from None
    return pydicom


def read_dicom_series(paths) -> tuple[np.ndarray, ImageGeometry]:
    """Read the slices of one series as a ``[z, y, x]`` float32 HU volume and its geometry.

    Parameters
    ----------
    paths : str, Path or sequence of them
        A folder (every file in it is read) or the slice files.

    Slices are sorted by their position along the slice normal (the cross
    product of the row and column directions); values are
    ``stored * RescaleSlope + RescaleIntercept``. The slice spacing is the
    distance between the first two sorted positions and must be uniform.
    """
    slices, geometry = _series(paths, pixels=True)
    rows, columns = slices[0][1].Rows, slices[0][1].Columns
    volume = np.empty((len(slices), rows, columns), dtype=np.float32)
    for index, (path, dataset) in enumerate(slices):
        slope = float(getattr(dataset, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(dataset, "RescaleIntercept", 0.0) or 0.0)
        volume[index] = dataset.pixel_array.astype(np.float32) * slope + intercept
    return volume, geometry


def dicom_series_geometry(paths) -> ImageGeometry:
    """The geometry of one series from its slices' headers (pixel data not read)."""
    return _series(paths, pixels=False)[1]


def _series(paths, pixels: bool) -> tuple[list, ImageGeometry]:
    """The checked slices of one series, sorted along the normal, and its geometry."""
    pydicom = _pydicom()
    if isinstance(paths, (str, Path)):
        folder = Path(paths)
        paths = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else [folder]
    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError(f"no files; {_EXPECTED}")
    required = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") \
        + (("PixelData",) if pixels else ())
    slices = []
    for path in paths:
        try:
            dataset = pydicom.dcmread(path, stop_before_pixels=not pixels)
        except Exception as error:  # pydicom raises several types for non-DICOM files
            raise InputError(f"{path}: not readable as DICOM ({type(error).__name__}); "
                             f"{_EXPECTED}") from None
        if "DirectoryRecordSequence" in dataset:  # a DICOMDIR index beside the slices
            continue
        modality = str(getattr(dataset, "Modality", "CT") or "CT")
        if modality != "CT":
            raise InputError(f"{path}: DICOM Modality {modality}, not CT (ct-* reads CT in "
                             f"Hounsfield units); {_EXPECTED}")
        for keyword in required:
            if keyword not in dataset:
                raise InputError(f"{path}: DICOM slice without {keyword}; {_EXPECTED}")
        slices.append((path, dataset))
    if not slices:
        raise InputError(f"{paths[0].parent}: no image slices; {_EXPECTED}")
    _check_one_series(slices)

    orientation = np.array(slices[0][1].ImageOrientationPatient, dtype=np.float64)
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    for path, dataset in slices[1:]:
        if not np.allclose(np.array(dataset.ImageOrientationPatient, dtype=float), orientation,
                           atol=1e-4):
            raise InputError(f"{path}: slice orientation differs from {slices[0][0]}; "
                             f"expected one series")
    slices.sort(key=lambda item: float(np.dot(normal, np.array(item[1].ImagePositionPatient,
                                                                 dtype=float))))
    positions = np.array([[float(v) for v in d.ImagePositionPatient] for _, d in slices])
    distances = positions @ normal
    if len(slices) > 1:
        steps = np.diff(distances)
        if np.any(steps <= 1e-6):
            raise InputError(f"{slices[0][0].parent}: two slices at the same position; "
                             f"{_EXPECTED}")
        if np.ptp(steps) > 1e-3 * max(abs(float(np.mean(steps))), 1.0) + 1e-3:
            raise InputError(f"{slices[0][0].parent}: slice spacing is not uniform "
                             f"({steps.min():.4g}..{steps.max():.4g} mm); expected a regular series")
        slice_step = positions[1] - positions[0]
    else:
        thickness = float(getattr(slices[0][1], "SliceThickness", 0) or 1.0)
        slice_step = normal * thickness

    rows, columns = slices[0][1].Rows, slices[0][1].Columns
    for path, dataset in slices:
        if (dataset.Rows, dataset.Columns) != (rows, columns):
            raise InputError(f"{path}: slice is {dataset.Columns}x{dataset.Rows}, others "
                             f"{columns}x{rows}; expected one series")

    row_spacing, column_spacing = (float(v) for v in slices[0][1].PixelSpacing)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_direction * column_spacing   # x index: along a row
    affine_lps[:3, 1] = column_direction * row_spacing   # y index: down a column
    affine_lps[:3, 2] = slice_step
    affine_lps[:3, 3] = positions[0]
    return slices, ImageGeometry((len(slices), rows, columns), LPS_TO_RAS @ affine_lps)


def _check_one_series(slices) -> None:
    """Raise :class:`InputError` naming the series when the slices belong to several."""
    series = {}
    for path, dataset in slices:
        series.setdefault(str(getattr(dataset, "SeriesInstanceUID", "")), []).append(dataset)
    if len(series) < 2:
        return
    described = []
    for uid, members in sorted(series.items(), key=lambda item: -len(item[1])):
        description = str(getattr(members[0], "SeriesDescription", "") or "").strip()
        number = getattr(members[0], "SeriesNumber", None)
        label = f"series {number}" if number not in (None, "") else f"UID ...{uid[-12:]}"
        described.append(f"{label}{f' ({description})' if description else ''}: "
                         f"{len(members)} slice(s)")
    raise InputError(f"{slices[0][0].parent}: slices of {len(series)} series "
                     f"({'; '.join(described)}); expected one series per folder (put each "
                     f"series in its own folder)")


def is_dicom_series(path) -> bool:
    """True when ``path`` is a folder (a DICOM series is given as its folder)."""
    return Path(path).is_dir()


def _property_type(name: str):
    """The SNOMED CT code of an organ name (``kidneys`` -> Kidney), else Tissue."""
    from pydicom.sr.codedict import codes

    for candidate in (name, name.rstrip("s"), name.replace("_", " ")):
        key = "".join(part.capitalize() for part in candidate.replace("_", " ").split())
        try:
            return getattr(codes.SCT, key)
        except AttributeError:
            continue
    return codes.SCT.Tissue


def write_dicom_seg(path, series, labels: np.ndarray, classes,
                    overwrite: bool = False) -> Path | None:
    """Write a label map of a DICOM CT series as a DICOM Segmentation (binary, one segment
    per class) referencing the series' slices (highdicom; the ``dicom`` extra).

    ``labels`` is ``[z, y, x]`` on the series' own grid, in the slice order of
    :func:`read_dicom_series`; classes absent from it are left out of the object, and
    nothing is written (None returned) when no class is present.
    """
    try:
        import highdicom
        from pydicom.sr.codedict import codes
    except ImportError:
        raise InputError("--dicom-seg needs highdicom; install medhpc[dicom]") from None
    from medhpc import __version__
    from medhpc.io.atomic import atomic_path

    sources = [dataset for _, dataset in _series(series, pixels=False)[0]]
    present = [index for index in range(1, len(classes) + 1) if np.any(labels == index)]
    algorithm = highdicom.AlgorithmIdentificationSequence(
        name="medhpc ct-segment", version=__version__,
        family=codes.cid7162.ArtificialIntelligence)
    descriptions, masks = [], []
    for number, index in enumerate(present, start=1):
        name = classes[index - 1]
        descriptions.append(highdicom.seg.SegmentDescription(
            segment_number=number, segment_label=name,
            segmented_property_category=codes.SCT.Organ,
            segmented_property_type=_property_type(name),
            algorithm_type=highdicom.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm))
        masks.append(labels == index)
    if not masks:
        return None
    pixels = np.stack(masks, axis=-1).astype(np.uint8)  # (frames, rows, columns, segments)
    reference = sources[0]
    segmentation = highdicom.seg.Segmentation(
        source_images=sources, pixel_array=pixels,
        segmentation_type=highdicom.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=highdicom.UID(), series_number=int(
            getattr(reference, "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=highdicom.UID(), instance_number=1,
        manufacturer="medhpc", manufacturer_model_name="medhpc ct-segment",
        software_versions=__version__, device_serial_number="0",
        series_description="medhpc ct-segment")
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        segmentation.save_as(tmp)
    return path
