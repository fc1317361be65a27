"""NIfTI-1 volumes (``.nii``, ``.nii.gz``) through nibabel.

NIfTI stores arrays as ``[x, y, z(, t)]``; here they are transposed to
``[z, y, x]`` and ``[t, z, y, x]``. The affine is kept exactly as nibabel
reports it (sform, else qform): nothing is reoriented, so it still maps the
voxel index ``(x, y, z)`` to world mm and writing back preserves orientation.
The sform is stored in float32, so an affine survives a round trip to about
1e-7 relative precision.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError, ImageDataError

from medhpc.errors import InputError
from medhpc.io.atomic import atomic_path
from medhpc.io.geometry import ImageGeometry

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_EXPECTED = "expected a NIfTI file (.nii, .nii.gz)"
# dtypes NIfTI-1 cannot hold, and what they are written as
_WRITE_AS = {np.dtype(bool): np.dtype(np.uint8), np.dtype(np.float16): np.dtype(np.float32)}


def place_on_grid(image, affine, code: str = "aligned") -> None:
    """Give ``image`` the grid ``affine`` as sform and, unless it has shear (which a qform
    cannot hold), as qform too."""
    image.set_sform(affine, code=code)
    image.set_qform(affine, code=code)
    if not np.allclose(image.get_qform(), affine, rtol=0.0, atol=1e-5):
        image.set_qform(None, code="unknown")


def save_image(image, path) -> None:
    """Write a nibabel image; ``.gz`` names get a gzip stream of Huffman-only deflate.

    Float volumes barely shrink under full deflate, which costs several times more; the
    Huffman-only stream is a standard gzip file that every reader opens.
    """
    path = Path(path)
    if not path.name.lower().endswith(".gz"):
        nib.save(image, path)
        return
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31, 8, zlib.Z_HUFFMAN_ONLY)
    with open(path, "wb") as stream:
        stream.write(compressor.compress(image.to_bytes()))
        stream.write(compressor.flush())


def is_nifti_path(path) -> bool:
    """Return True if ``path`` ends with ``.nii`` or ``.nii.gz`` (any case)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def read_nifti(path):
    """Read a NIfTI volume as ``[z, y, x]`` or ``[t, z, y, x]``.

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz`` file.

    Returns
    -------
    array : ndarray
        float32 when the header scales values (``scl_slope``/``scl_inter``,
        applied by nibabel), else the stored dtype. A 2-D image comes back with
        one z-plane; a 5-D vector image ``[x, y, z, 1, c]`` (ITK displacement
        fields) comes back as ``[c, z, y, x]``.
    geometry : ImageGeometry
        The file's affine, unchanged.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found; {_EXPECTED}")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; {_EXPECTED}")
    try:
        image = nib.load(path)
        if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
            raise InputError(f"{path}: is a {type(image).__name__}, not NIfTI; {_EXPECTED}")
        proxy = image.dataobj
        scaled = getattr(proxy, "slope", 1.0) != 1.0 or getattr(proxy, "inter", 0.0) != 0.0
        data = image.get_fdata(dtype=np.float32) if scaled else np.asarray(proxy)
        affine = image.affine
    except InputError:
        raise
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, ImageFileError,
            HeaderDataError, ImageDataError) as error:
        raise InputError(f"{path}: cannot be read as NIfTI ({_one_line(error)}); "
                         f"{_EXPECTED}") from error

    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    if data.ndim not in (3, 4):
        raise InputError(f"{path}: NIfTI image is {data.ndim}-D of shape {data.shape}; "
                         "expected a 3-D or 4-D image")
    array = np.ascontiguousarray(data.transpose(tuple(range(data.ndim))[::-1]))
    try:
        geometry = ImageGeometry(array.shape[-3:], affine)
    except ValueError as error:
        raise InputError(f"{path}: unusable affine ({_one_line(error)}); "
                         "expected an invertible voxel-to-world affine") from error
    return array, geometry


def write_nifti(path, array, geometry: ImageGeometry, overwrite: bool = False) -> Path:
    """Write ``[z, y, x]`` or ``[t, z, y, x]`` as NIfTI-1, atomically.

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz`` (gzip-compressed) output.
    array : ndarray
        The volume; bool is written as uint8 and float16 as float32.
    geometry : ImageGeometry
        Grid of the last three axes; its affine becomes the sform, and the
        qform too unless it has shear (which a qform cannot hold).
    overwrite : bool
        Replace an existing file; otherwise raise ``OutputExistsError``.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    if not is_nifti_path(path):
        raise InputError(f"{path}: not a NIfTI name; expected a .nii or .nii.gz output")
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise ValueError(f"expected a 3-D or 4-D array, got shape {array.shape}")
    if tuple(array.shape[-3:]) != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not end with the geometry's "
                         f"grid {geometry.shape}")
    dtype = _WRITE_AS.get(array.dtype, array.dtype)
    data_xyz = array.astype(dtype, copy=False).transpose(tuple(range(array.ndim))[::-1])
    image = nib.Nifti1Image(data_xyz, geometry.affine, dtype=dtype)
    image.header.set_xyzt_units("mm", "sec")
    place_on_grid(image, geometry.affine)
    with atomic_path(path, overwrite) as tmp:
        save_image(image, tmp)
    return path


def _one_line(error) -> str:
    return " ".join(str(error).split())
