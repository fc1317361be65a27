"""lddmm's transforms in the files ITK reads: displacement fields and affine transforms.

ITK (and so SimpleITK, ANTs and 3D Slicer) works in LPS physical coordinates, medhpc and
NIfTI in RAS: ``LPS = F RAS`` with ``F = diag(-1, -1, 1)``. ITK's point transforms map
points of the FIXED space to the MOVING space (that is what resampling a moving image
onto the fixed grid needs), the same direction as ``transform.h5``'s ``affine_world_ras``.

With ``A_F`` the fixed grid's affine, ``T`` the world affine and ``u``, ``w`` the
displacements (voxels, components z, y, x) of :mod:`medhpc.lddmm.transform`:

- the forward field on the fixed grid is ``d(p) = F A_F (y + u(y)) - F A_F y`` at
  ``p = F A_F y`` (LPS mm), and the whole fixed -> moving map is ``p -> T_lps(p + d(p))``:
  the displacement first, then the affine;
- the inverse field is ``e(p) = F A_F (y + w(y)) - F A_F y``, and the moving -> fixed map
  is ``m -> q + e(q)`` with ``q = T_lps^-1(m)``: the inverse affine first.

Displacement fields are 5-D NIfTI ``(nx, ny, nz, 1, 3)`` with intent
``NIFTI_INTENT_VECTOR`` (1007), whose vectors ITK reads as LPS as they are (the intent
``NIFTI_INTENT_DISPVECT``, 1006, would make recent ITK flip them from RAS). Affines are ITK
text transforms (``AffineTransform_double_3_3``); :func:`read_affine` also reads ITK/ANTs
MATLAB v4 ``.mat`` files and plain 4x4 world RAS matrices.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np

from medhpc.errors import InputError
from medhpc.io.geometry import ImageGeometry

NIFTI_INTENT_VECTOR = 1007
VECTOR_QUANTUM_PER_MM = 1024.0
FORWARD_WARP, INVERSE_WARP, AFFINE_TEXT = "forward_warp.nii.gz", "inverse_warp.nii.gz", "affine.txt"
ITK_OUTPUT_NAMES = (FORWARD_WARP, INVERSE_WARP, AFFINE_TEXT)  # lddmm writes them by transform.h5
ITK_TEXT_HEADER = "#Insight Transform File V1.0"
AFFINE_NAME = "AffineTransform_double_3_3"
# ITK transforms whose 12 parameters are a row-major 3x3 matrix then a translation, with
# the centre as fixed parameters.
_MATRIX_OFFSET = re.compile(r"^(AffineTransform|MatrixOffsetTransformBase)_(double|float)_3_3$")
_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS, its own inverse
_EXPECTED = ("expected an ITK affine transform (.txt/.tfm text or ITK/ANTs .mat, "
             "AffineTransform_double_3_3) or a 4x4 world RAS matrix (fixed -> moving)")


def ras_to_lps(matrix_ras: np.ndarray) -> np.ndarray:
    """A 4x4 world affine in RAS mm written in LPS mm (and back: the change is its own
    inverse)."""
    return _LPS @ np.asarray(matrix_ras, np.float64) @ _LPS


# -- displacement fields --------------------------------------------------------------------
def displacement_lps_mm(displacement_vox_zyx: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """Displacements ``(3, planes, ny, nx)`` in voxels (z, y, x) of the grid ``geometry``
    (all its planes or a block of them) as LPS mm vectors, same shape, components
    (L, P, S): ``F A_F[:3, :3] u_xyz``."""
    displacement = np.asarray(displacement_vox_zyx, np.float64)
    if (displacement.ndim != 4 or displacement.shape[0] != 3
            or displacement.shape[2:] != tuple(geometry.shape[1:])
            or displacement.shape[1] > geometry.shape[0]):
        raise ValueError(f"displacement of shape {displacement.shape}; expected "
                         f"(3, planes) + {geometry.shape[1:]} of the grid {geometry.shape}")
    linear = _LPS[:3, :3] @ geometry.affine[:3, :3]
    xyz = displacement[::-1]
    return np.stack([linear[i, 0] * xyz[0] + linear[i, 1] * xyz[1] + linear[i, 2] * xyz[2]
                     for i in range(3)])


def field_vectors(displacement_vox_zyx: np.ndarray, geometry: ImageGeometry,
                  dtype=np.float32) -> np.ndarray:
    """The vectors a displacement-field file stores for a block of planes: LPS mm,
    rounded to 1/1024 mm (exact in binary, far below any interpolation error, and it
    compresses)."""
    displacement = np.asarray(displacement_vox_zyx)
    out = np.empty(displacement.shape, dtype)
    from medhpc.lddmm.transform import RESAMPLE_BLOCK_VOXELS

    step = max(1, RESAMPLE_BLOCK_VOXELS // max(1, int(np.prod(displacement.shape[2:]))))
    for start in range(0, displacement.shape[1], step):  # blocks: bounded float64 scratch
        vectors = displacement_lps_mm(displacement[:, start:start + step], geometry)
        out[:, start:start + step] = (np.round(vectors * VECTOR_QUANTUM_PER_MM)
                                      / VECTOR_QUANTUM_PER_MM)
    return out


def displacement_field_stream(path, fixed_geometry: ImageGeometry, overwrite: bool = False,
                              dtype=np.float32):
    """A :class:`~medhpc.io.nifti.NiftiStream` for an ITK displacement field on the fixed
    grid: write :func:`field_vectors` component by component, planes in z order."""
    from medhpc.io.nifti import NiftiStream

    path = Path(path)
    if not str(path).lower().endswith((".nii", ".nii.gz")):
        raise InputError(f"{path}: not a NIfTI name; expected a .nii or .nii.gz output for "
                         f"a displacement field")
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype {dtype}: expected float32 or float64")
    nz, ny, nx = fixed_geometry.shape
    return NiftiStream(path, (nx, ny, nz, 1, 3), dtype, fixed_geometry.affine, overwrite,
                       intent="vector", code="scanner")


def write_displacement_field(path, displacement_vox_zyx: np.ndarray,
                             fixed_geometry: ImageGeometry, overwrite: bool = False,
                             dtype=np.float32) -> Path:
    """Write an ITK displacement field (NIfTI, LPS mm vectors) on the fixed grid.

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz`` output, written atomically.
    displacement_vox_zyx : ndarray (3, nz, ny, nx)
        ``u`` (or ``w``) of ``transform.h5``: voxels of the fixed grid, components z, y, x.
    fixed_geometry : ImageGeometry
        The fixed grid; its affine becomes the file's sform (and qform unless sheared).
    overwrite : bool
        Replace an existing file.
    dtype : float32 or float64
        Stored vector type.

    The file is 5-D ``(nx, ny, nz, 1, 3)`` with intent ``NIFTI_INTENT_VECTOR``; the vector
    at voxel ``y`` (at LPS point ``p``) is ``d(p) = F A_F (y + u(y)) - F A_F y``, so ITK's
    ``DisplacementFieldTransform`` maps ``p`` to ``p + d(p)``.
    """
    if np.shape(displacement_vox_zyx) != (3,) + tuple(fixed_geometry.shape):
        raise ValueError(f"displacement of shape {np.shape(displacement_vox_zyx)}; expected "
                         f"(3,) + {fixed_geometry.shape}")
    stream = displacement_field_stream(path, fixed_geometry, overwrite, dtype)
    vectors = field_vectors(displacement_vox_zyx, fixed_geometry, stream.dtype)
    with stream:
        for component in vectors:
            stream.write(component)
    return Path(path)


# -- affine transforms ----------------------------------------------------------------------
def itk_parameters(affine_world_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ITK ``Parameters`` (12: row-major 3x3 matrix, then translation) and
    ``FixedParameters`` (the centre, here 0) of a world RAS affine (fixed -> moving)."""
    lps = ras_to_lps(affine_world_ras)
    return np.concatenate([lps[:3, :3].ravel(), lps[:3, 3]]) + 0.0, np.zeros(3)  # no -0.0


def affine_from_itk(parameters, fixed_parameters) -> np.ndarray:
    """The world RAS affine (4x4, fixed -> moving) of ITK matrix-offset parameters:
    ``x -> A (x - c) + c + t`` in LPS."""
    parameters = np.asarray(parameters, np.float64)
    centre = np.asarray(fixed_parameters, np.float64)
    matrix, translation = parameters[:9].reshape(3, 3), parameters[9:12]
    lps = np.eye(4)
    lps[:3, :3] = matrix
    lps[:3, 3] = translation + centre - matrix @ centre
    return ras_to_lps(lps)


def write_affine_text(path, affine_world_ras: np.ndarray, overwrite: bool = False) -> Path:
    """Write a world RAS affine (4x4, fixed -> moving) as an ITK text transform
    (``AffineTransform_double_3_3`` in LPS, centre 0; numbers to the last bit)."""
    from medhpc.io.atomic import atomic_path
    from medhpc.lddmm.transform import check_affine_world

    path = Path(path)
    parameters, fixed = itk_parameters(check_affine_world(affine_world_ras))
    text = "\n".join([ITK_TEXT_HEADER, "#Transform 0", f"Transform: {AFFINE_NAME}",
                      "Parameters: " + " ".join(repr(float(v)) for v in parameters),
                      "FixedParameters: " + " ".join(repr(float(v)) for v in fixed), ""])
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text)
    return path


def read_affine(path) -> np.ndarray:
    """The world RAS affine (4x4, fixed -> moving) stored in ``path``.

    Reads ITK text transforms (``.txt``, ``.tfm``: one ``AffineTransform`` or
    ``MatrixOffsetTransformBase``, double or float, 3-D), ITK/ANTs MATLAB v4 ``.mat`` files
    (variables ``AffineTransform_double_3_3`` or ``_float_3_3``, 12 values, and ``fixed``,
    3 values) and plain text 4x4 matrices (world RAS mm, fixed -> moving: 4 rows of 4
    numbers). ITK files are in LPS and are converted. Anything else is an
    :class:`InputError` naming the file.
    """
    from medhpc.lddmm.transform import check_affine_world

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: {'is a folder' if path.exists() else 'file not found'}; "
                         f"{_EXPECTED}")
    data = path.read_bytes()
    if path.suffix.lower() == ".mat":
        if _looks_like_text(data):
            raise InputError(f"{path}: a text .mat file (FSL FLIRT matrices are in scaled "
                             f"voxel coordinates, not world space); expected an ITK/ANTs "
                             f"binary .mat, or a 4x4 world RAS matrix saved as .txt")
        variables = _read_mat_v4(path, data)
        names = [name for name in variables if _MATRIX_OFFSET.match(name)]
        if len(names) != 1 or variables[names[0]].size != 12:
            raise InputError(f"{path}: variables {sorted(variables)}; expected one "
                             f"AffineTransform_double_3_3 (12 values) and fixed (3 values)")
        fixed = variables.get("fixed", np.zeros(3))
        if fixed.size != 3:
            raise InputError(f"{path}: variable fixed has {fixed.size} values; expected the "
                             f"3 coordinates of the centre")
        matrix = affine_from_itk(variables[names[0]].ravel(), fixed.ravel())
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{path}: binary data; {_EXPECTED}") from None
        if "Transform:" in text or text.lstrip().startswith("#Insight"):
            matrix = _read_itk_text(path, text)
        else:
            matrix = _read_matrix_text(path, text)
    return check_affine_world(matrix, str(path))


def _looks_like_text(data: bytes) -> bool:
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        return False
    return bool(text.strip()) and all(ch.isprintable() or ch.isspace() for ch in text)


def _numbers(path, line: str, what: str) -> np.ndarray:
    try:
        return np.array([float(v) for v in line.split()], np.float64)
    except ValueError:
        raise InputError(f"{path}: {what} '{line.strip()[:60]}' are not numbers; "
                         f"{_EXPECTED}") from None


def _read_itk_text(path, text: str) -> np.ndarray:
    """The one matrix-offset transform of an ITK text transform file."""
    transforms = []
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "Transform":
            transforms.append({"name": value.strip()})
        elif key in ("Parameters", "FixedParameters") and transforms:
            transforms[-1][key] = _numbers(path, value, key)
    if len(transforms) != 1:
        names = ", ".join(t["name"] for t in transforms) or "none"
        raise InputError(f"{path}: {len(transforms)} transforms ({names}); expected one "
                         f"{AFFINE_NAME}")
    transform = transforms[0]
    if not _MATRIX_OFFSET.match(transform["name"]):
        raise InputError(f"{path}: transform {transform['name']}; expected {AFFINE_NAME} "
                         f"(or MatrixOffsetTransformBase_double_3_3)")
    parameters = transform.get("Parameters")
    fixed = transform.get("FixedParameters", np.zeros(3))
    if parameters is None or parameters.size != 12 or fixed.size != 3:
        got = "no" if parameters is None else parameters.size
        raise InputError(f"{path}: {got} Parameters and {fixed.size} FixedParameters; "
                         f"expected 12 (3x3 matrix, translation) and 3 (centre)")
    return affine_from_itk(parameters, fixed)


def _read_matrix_text(path, text: str) -> np.ndarray:
    """A plain 4x4 matrix: 4 rows of 4 numbers (spaces or commas; ``#`` comments)."""
    rows = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if line:
            rows.append(_numbers(path, line, "values"))
    if len(rows) != 4 or any(row.size != 4 for row in rows):
        sizes = ",".join(str(row.size) for row in rows) or "none"
        raise InputError(f"{path}: {len(rows)} rows of {sizes} numbers; {_EXPECTED}")
    return np.stack(rows)


# MATLAB v4 element types (the P digit of the MOPT code)
_MAT_TYPES = {0: "f8", 1: "f4", 2: "i4", 3: "i2", 4: "u2", 5: "u1"}


def _read_mat_v4(path, data: bytes) -> dict:
    """The numeric full matrices of a MATLAB v4 file, by variable name (column-major).

    Each variable is a header of five int32 (``MOPT`` type code, rows, columns, imaginary
    flag, name length with its NUL), the name, then rows x columns values. ``M`` of
    ``MOPT`` is 0 for little-endian and 1 for big-endian files.
    """
    variables = {}
    offset = 0
    while offset < len(data):
        if len(data) - offset < 20:
            raise InputError(f"{path}: truncated MATLAB v4 header at byte {offset}; {_EXPECTED}")
        for order in "<>":
            mopt, rows, columns, imaginary, name_length = struct.unpack_from(
                order + "5i", data, offset)
            if 0 <= mopt < 2000 and mopt // 1000 == (0 if order == "<" else 1):
                break
        else:
            raise InputError(f"{path}: not a MATLAB v4 file (type code at byte {offset}); "
                             f"{_EXPECTED}")
        element = (mopt // 10) % 10
        kind = mopt % 10
        if (mopt // 100) % 10 or element not in _MAT_TYPES or kind != 0 or imaginary or \
                rows < 0 or columns < 0 or not 0 < name_length < 256:
            raise InputError(f"{path}: unsupported MATLAB v4 variable (type {mopt}, "
                             f"{rows}x{columns}, imaginary {imaginary}); {_EXPECTED}")
        offset += 20
        name = data[offset:offset + name_length].split(b"\0", 1)[0].decode("ascii", "replace")
        offset += name_length
        dtype = np.dtype(order + _MAT_TYPES[element])
        size = rows * columns * dtype.itemsize
        if offset + size > len(data):
            raise InputError(f"{path}: variable {name} is truncated; {_EXPECTED}")
        values = np.frombuffer(data, dtype, rows * columns, offset).astype(np.float64)
        variables[name] = values.reshape((rows, columns), order="F")
        offset += size
    return variables


def write_itk_outputs(folder, transform: dict, overwrite: bool = False) -> list[Path]:
    """``forward_warp.nii.gz``, ``inverse_warp.nii.gz`` and ``affine.txt`` of a transform
    (the dict of :func:`medhpc.lddmm.transform.read_transform`) in ``folder``.

    Fixed -> moving points: ``p -> affine(p + forward(p))``; moving -> fixed points:
    ``m -> q + inverse(q)`` with ``q = affine^-1(m)`` (all LPS mm, as ITK).
    """
    from medhpc.lddmm.transform import affine_world

    folder = Path(folder)
    fixed = transform["fixed"]
    return [write_displacement_field(folder / FORWARD_WARP, transform["forward"], fixed,
                                     overwrite),
            write_displacement_field(folder / INVERSE_WARP, transform["inverse"], fixed,
                                     overwrite),
            write_affine_text(folder / AFFINE_TEXT, affine_world(transform), overwrite)]

