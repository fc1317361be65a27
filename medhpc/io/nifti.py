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

from medhpc.errors import InputError, one_line
from medhpc.io.atomic import atomic_path
from medhpc.io.geometry import ImageGeometry

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_EXPECTED = "expected a NIfTI file (.nii, .nii.gz)"
# dtypes NIfTI-1 cannot hold, and what they are written as
_WRITE_AS = {np.dtype(bool): np.dtype(np.uint8), np.dtype(np.float16): np.dtype(np.float32)}


def place_on_grid(image, affine, code: str = "aligned") -> None:
    """Give ``image`` (a nibabel image or header) the grid ``affine`` as sform and, unless
    it has shear (which a qform cannot hold), as qform too."""
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
        stored = image.get_data_dtype()
        if stored.kind not in "biuf":
            kind = {"c": "complex", "V": "RGB or structured"}.get(stored.kind, str(stored))
            raise InputError(f"{path}: voxels are {kind} ({stored}); expected one real value "
                             f"per voxel (integer or floating point)")
        proxy = image.dataobj
        scaled = getattr(proxy, "slope", 1.0) != 1.0 or getattr(proxy, "inter", 0.0) != 0.0
        data = image.get_fdata(dtype=np.float32) if scaled else np.asarray(proxy)
        affine = image.affine
    except InputError:
        raise
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, ImageFileError,
            HeaderDataError, ImageDataError) as error:
        raise InputError(f"{path}: cannot be read as NIfTI ({one_line(error)}); "
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
        raise InputError(f"{path}: unusable affine ({one_line(error)}); "
                         "expected an invertible voxel-to-world affine") from error
    return array, geometry


def read_nifti_geometry(path) -> ImageGeometry:
    """The geometry :func:`read_nifti` would return, from the header alone."""
    path = Path(path)
    try:
        image = nib.load(path)
        shape = tuple(int(n) for n in image.shape[:3])
        affine = image.affine
    except (OSError, EOFError, ValueError, zlib.error, gzip.BadGzipFile, ImageFileError,
            HeaderDataError) as error:
        raise InputError(f"{path}: cannot be read as NIfTI ({one_line(error)}); "
                         f"{_EXPECTED}") from error
    shape = shape + (1,) * (3 - len(shape))
    try:
        return ImageGeometry(shape[::-1], affine)
    except ValueError as error:
        raise InputError(f"{path}: unusable affine ({one_line(error)}); "
                         "expected an invertible voxel-to-world affine") from error


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
    array = np.asarray(array)
    if array.ndim not in (3, 4):
        raise ValueError(f"expected a 3-D or 4-D array, got shape {array.shape}")
    if tuple(array.shape[-3:]) != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not end with the geometry's "
                         f"grid {geometry.shape}")
    dtype = _WRITE_AS.get(array.dtype, array.dtype)
    with NiftiStream(path, array.shape[::-1], dtype, geometry.affine, overwrite) as stream:
        stream.write(array)
    return Path(path)


class NiftiStream:
    """A NIfTI-1 file written block by block in file order, atomically.

    The data go in as consecutive blocks of the array in NIfTI's order read backwards:
    a ``(z, y, x)`` block of whole planes, or, for ``shape_xyz = (nx, ny, nz, 1, c)``,
    component by component. Nothing but the current block is held, so a rank can write a
    volume it never holds whole. The file appears under ``path`` only when the block
    ends without an error. ``.gz`` names get a Huffman-only gzip stream
    (:func:`save_image`); the header is the one nibabel writes.

    Parameters
    ----------
    path : str or Path
    shape_xyz : tuple of int
        NIfTI dimensions, x first.
    dtype : numpy dtype
    affine : (4, 4) array
        Voxel ``(x, y, z)`` to world mm; sform, and qform unless sheared.
    overwrite : bool
    intent : str, optional
        A NIfTI intent name (``"vector"`` for displacement fields).
    code : str
        sform/qform code.
    """

    def __init__(self, path, shape_xyz, dtype, affine, overwrite: bool = False,
                 intent: str | None = None, code: str = "aligned"):
        self.path = Path(path)
        if not is_nifti_path(self.path):
            raise InputError(f"{self.path}: not a NIfTI name; expected a .nii or .nii.gz "
                             f"output")
        self.dtype = np.dtype(dtype)
        self.shape_xyz = tuple(int(n) for n in shape_xyz)
        self.expected = int(np.prod(self.shape_xyz, dtype=np.int64)) * self.dtype.itemsize
        self.written = 0
        self.overwrite = overwrite
        header = nib.Nifti1Header()
        header.set_data_dtype(self.dtype)
        header.set_data_shape(self.shape_xyz)
        header.set_xyzt_units("mm", "sec")
        if intent is not None:
            header.set_intent(intent, (), name="")
        place_on_grid(header, np.asarray(affine, np.float64), code=code)
        zooms = list(header.get_zooms())
        zooms[:3] = np.sqrt(np.sum(np.asarray(affine, np.float64)[:3, :3] ** 2, axis=0))
        header.set_zooms(zooms)
        header.set_data_offset(_SINGLE_FILE_OFFSET)
        header.set_slope_inter(1.0, 0.0)
        self.header = header

    def __enter__(self) -> "NiftiStream":
        self._atomic = atomic_path(self.path, self.overwrite)
        tmp = self._atomic.__enter__()
        try:
            self._file = open(tmp, "wb")
            gz = self.path.name.lower().endswith(".gz")
            self._compressor = (zlib.compressobj(1, zlib.DEFLATED, 31, 8, zlib.Z_HUFFMAN_ONLY)
                                if gz else None)
            self._put(self.header.binaryblock + b"\x00" * (_SINGLE_FILE_OFFSET - 348))
        except BaseException:
            self._close_file()
            self._atomic.__exit__(*_exc_info())
            raise
        return self

    def write(self, block: np.ndarray) -> None:
        """Append ``block`` (C order, the file's order read backwards)."""
        data = np.ascontiguousarray(block, dtype=self.dtype)
        self.written += data.nbytes
        if self.written > self.expected:
            raise ValueError(f"{self.path}: {self.written} data bytes; expected "
                             f"{self.expected}")
        self._put(memoryview(data).cast("B"))

    def _put(self, data) -> None:
        self._file.write(data if self._compressor is None else self._compressor.compress(data))

    def _close_file(self) -> None:
        file = getattr(self, "_file", None)
        if file is not None and not file.closed:
            file.close()

    def __exit__(self, kind, error, trace) -> bool:
        try:
            if kind is None:
                if self.written != self.expected:
                    raise ValueError(f"{self.path}: {self.written} data bytes written; "
                                     f"expected {self.expected}")
                if self._compressor is not None:
                    self._file.write(self._compressor.flush())
                self._file.close()
        except BaseException:
            self._close_file()
            self._atomic.__exit__(*_exc_info())
            raise
        self._close_file()
        self._atomic.__exit__(kind, error, trace)
        return False


_SINGLE_FILE_OFFSET = 352


def _exc_info():
    import sys

    return sys.exc_info()
