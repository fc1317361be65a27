"""One entry point for volumes in any supported format, and input validation.

Every problem with an input is an :class:`~medhpc.errors.InputError` whose
message is one line: the file, what is wrong, what was expected.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medhpc.errors import InputError
from medhpc.io.atomic import check_output_path
from medhpc.io.geometry import ImageGeometry
from medhpc.io.hdf5 import read_volume, write_volume
from medhpc.io.interfile import data_path_for, is_interfile_path, read_interfile, write_interfile
from medhpc.io.nifti import is_nifti_path, read_nifti, write_nifti
from medhpc.io.tiff import is_tiff_path, read_tiff_stack, tiff_spacing_mm, write_tiff_stack

SUPPORTED_SUFFIXES = (".nii", ".nii.gz", ".h5", ".hdf5", ".tif", ".tiff", ".hv")
_SUFFIX_LIST = ", ".join(SUPPORTED_SUFFIXES)
_HDF5_WITH_DATASET = re.compile(r"^(.*\.(?:h5|hdf5)):(.+)$", re.IGNORECASE)


def split_dataset(path, dataset: str = "volume") -> tuple[Path, str]:
    """Split ``"file.h5:/group/data"`` into the file and the dataset name.

    Paths without the ``:dataset`` part return ``dataset`` unchanged.
    """
    match = _HDF5_WITH_DATASET.match(str(path))
    if match:
        return Path(match.group(1)), match.group(2)
    return Path(path), dataset


def image_format(path) -> str:
    """Return ``"nifti"``, ``"hdf5"``, ``"tiff"`` or ``"interfile"`` from the file name.

    Raises
    ------
    InputError
        For any other extension, listing the supported ones.
    """
    name = str(path).lower()
    if is_nifti_path(name):
        return "nifti"
    if name.endswith((".h5", ".hdf5")):
        return "hdf5"
    if is_tiff_path(name):
        return "tiff"
    if is_interfile_path(name):
        return "interfile"
    raise InputError(f"{path}: unknown image format '{''.join(Path(path).suffixes)}'; "
                     f"expected one of {_SUFFIX_LIST}")


def read_image(path, *, dataset: str = "volume", ndim=(3,), allow_4d: bool = False,
               require_finite: bool = True):
    """Read a volume and its geometry from NIfTI, HDF5 or TIFF, validated.

    Parameters
    ----------
    path : str or Path
        ``.nii``, ``.nii.gz``, ``.h5``/``.hdf5`` (``file.h5:/dataset`` picks a
        dataset), ``.tif``/``.tiff``, Interfile ``.hv`` (with its data file).
    dataset : str
        HDF5 dataset when the path does not name one.
    ndim : int or sequence of int
        Allowed dimensionalities (3 for ``[z, y, x]``, 4 for ``[c_or_t, z, y, x]``).
    allow_4d : bool
        Also accept 4-D (same as adding 4 to ``ndim``).
    require_finite : bool
        Refuse NaN and infinite values (see :func:`check_finite`).

    Returns
    -------
    array : ndarray
        ``[z, y, x]`` or ``[c_or_t, z, y, x]``; TIFF colour stacks come as
        ``[c, z, y, x]``.
    geometry : ImageGeometry
        For TIFF, axis-aligned from the stored spacing (1 mm when unknown) and
        centred on the origin.
    """
    file_path, dataset = split_dataset(path, dataset)
    allowed = {ndim} if isinstance(ndim, int) else set(ndim)
    if allow_4d:
        allowed.add(4)
    kind = image_format(file_path)
    if not file_path.exists():
        raise InputError(f"{file_path}: file not found; expected an existing image "
                         f"({_SUFFIX_LIST})")
    if kind == "nifti":
        array, geometry = read_nifti(file_path)
    elif kind == "hdf5":
        array, geometry, _ = read_volume(file_path, dataset)
    elif kind == "interfile":
        array, geometry = read_interfile(file_path)
    else:
        array = read_tiff_stack(file_path)
        if array.ndim == 4:
            array = np.moveaxis(array, -1, 0)
        spacing = tiff_spacing_mm(file_path) or 1.0
        geometry = ImageGeometry.from_spacing(array.shape[-3:], spacing)
    check_ndim(path, array, allowed)
    if require_finite:
        check_finite(path, array)
    return array, geometry


def write_image(path, array, geometry: ImageGeometry, overwrite: bool = False,
                units: str = "") -> Path:
    """Write a volume in the format its extension names, atomically.

    ``.nii``/``.nii.gz`` and ``.h5``/``.hdf5`` (``file.h5:/dataset`` allowed)
    keep the whole affine; Interfile ``.hv`` (+ ``.v``) an axis-aligned grid; TIFF keeps only the spacing and takes ``[z, y, x]``
    or colour ``[c, z, y, x]`` with c = 3 or 4. ``units`` is stored in HDF5 only.
    """
    file_path, dataset = split_dataset(path)
    kind = image_format(file_path)
    if kind == "nifti":
        return write_nifti(file_path, array, geometry, overwrite=overwrite)
    if kind == "hdf5":
        return write_volume(file_path, array, geometry, dataset=dataset, units=units,
                            overwrite=overwrite)
    if kind == "interfile":
        return write_interfile(file_path, array, geometry, overwrite=overwrite)
    array = np.asarray(array)
    if array.ndim == 4:
        if array.shape[0] not in (3, 4):
            raise InputError(f"{file_path}: TIFF cannot hold a 4-D volume of shape "
                             f"{array.shape}; expected .nii.gz or .h5 for 4-D data")
        array = np.moveaxis(array, 0, -1)
    return write_tiff_stack(file_path, array, spacing_mm=geometry.spacing_mm,
                            overwrite=overwrite)


def check_image_output(path, overwrite: bool) -> None:
    """Check before any work that :func:`write_image` can write ``path`` (see
    :func:`~medhpc.io.atomic.check_output_path`)."""
    file_path, _ = split_dataset(path)
    check_output_path(file_path, overwrite, SUPPORTED_SUFFIXES)
    if is_interfile_path(file_path):
        check_output_path(data_path_for(file_path), overwrite)


def check_ndim(path, array, allowed) -> None:
    """Raise InputError unless ``array.ndim`` is in ``allowed``."""
    allowed = sorted({allowed} if isinstance(allowed, int) else set(allowed))
    if array.ndim in allowed:
        return
    names = " or ".join(f"{n}-D" for n in allowed)
    raise InputError(f"{path}: expected a {names} volume, got {array.ndim}-D of shape "
                     f"{tuple(array.shape)}")


def check_finite(path, array) -> None:
    """Raise InputError if ``array`` holds NaN or infinite values (counting them)."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.inexact) or np.isfinite(array).all():
        return
    nan_count = int(np.count_nonzero(np.isnan(array)))
    inf_count = int(np.count_nonzero(np.isinf(array)))
    problems = []
    if nan_count:
        problems.append(f"{nan_count} NaN")
    if inf_count:
        problems.append(f"{inf_count} infinite")
    raise InputError(f"{path}: {' and '.join(problems)} value(s) among {array.size}; "
                     "expected finite numbers")


def check_nonnegative(path, array, what: str = "values") -> None:
    """Raise InputError if ``array`` has negative values; ``what`` names them."""
    array = np.asarray(array)
    negative = int(np.count_nonzero(array < 0))
    if negative:
        raise InputError(f"{path}: {negative} negative {what} (minimum "
                         f"{float(array.min()):g}); expected {what} >= 0")


def check_same_grid(path_a, geom_a: ImageGeometry, path_b, geom_b: ImageGeometry,
                    what: str = "grid", tol: float = 1e-4) -> None:
    """Raise InputError if two volumes do not share a voxel grid.

    The message reads ``"mu-map.nii.gz: grid 64x64x32 at 2.0 mm does not match
    activity.nii.gz's 48x48x32 at 4.0 mm; expected the same grid"``; when size
    and spacing agree it names the origin or the orientation instead.

    Parameters
    ----------
    path_a, path_b : str or Path
        The files, ``path_a`` being the one blamed.
    geom_a, geom_b : ImageGeometry
        Their geometries.
    what : str
        What must match, used in the message (``"grid"``).
    tol : float
        Allowed affine difference in mm.
    """
    if geom_a.same_grid(geom_b, tol):
        return
    desc_a, desc_b = geom_a.describe(), geom_b.describe()
    if desc_a == desc_b:
        origin_a = np.round(geom_a.origin_mm, 4).tolist()
        origin_b = np.round(geom_b.origin_mm, 4).tolist()
        if origin_a != origin_b:
            desc_a += f" with origin {tuple(origin_a)} mm"
            desc_b += f" with origin {tuple(origin_b)} mm"
        else:
            desc_a += " in another orientation"
    raise InputError(f"{path_a}: {what} {desc_a} does not match {path_b}'s {desc_b}; "
                     f"expected the same {what}")
