"""Interfile images (``.hv`` header + raw data), as STIR and SIRF read and write them.

The header is ``key := value`` lines; keys are read without case, a leading ``!`` or
extra spaces (``!matrix size [1]`` is ``matrix size[1]``). Axis 1 is x (fastest in the
data), 2 is y, 3 is z; frames (``number of time frames``) are outermost. The world
position of voxel ``(i, j, k)`` is ``first pixel offset (mm)[n] + index * scaling factor
(mm/pixel)[n]`` per axis (axis-aligned; without an offset the axis is centred on 0). Raw
values are
``number format`` (``float``, ``short float``, ``long float``, ``signed integer``,
``unsigned integer``) of ``number of bytes per pixel`` in ``imagedata byte order``,
from ``data offset in bytes[1]``, times ``image scaling factor[1]``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medhpc.errors import InputError
from medhpc.io.atomic import atomic_path
from medhpc.io.geometry import ImageGeometry

HEADER_SUFFIXES = (".hv",)
_KEY_SPACES = re.compile(r"\s+")
_FORMATS = {("float", 4): "f4", ("float", 8): "f8", ("short float", 4): "f4",
            ("long float", 8): "f8", ("signed integer", 1): "i1", ("signed integer", 2): "i2",
            ("signed integer", 4): "i4", ("unsigned integer", 1): "u1",
            ("unsigned integer", 2): "u2", ("unsigned integer", 4): "u4"}


def is_interfile_path(path) -> bool:
    """True for an Interfile image header name (``.hv``, any case)."""
    return str(path).lower().endswith(HEADER_SUFFIXES)


def data_path_for(header_path) -> Path:
    """The data file written beside a header: ``image.hv`` -> ``image.v``."""
    return Path(header_path).with_suffix(".v")


def normalised_key(key: str) -> str:
    """``'!Matrix Size [1]'`` -> ``'matrix size[1]'``."""
    key = key.strip().lstrip("!").strip().lower()
    key = _KEY_SPACES.sub(" ", key)
    return key.replace(" [", "[").replace("[ ", "[").replace(" ]", "]")


def read_header(path) -> dict:
    """The header's entries, keys normalised (:func:`normalised_key`), values stripped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="latin-1")
    except OSError as exc:
        raise InputError(f"{path}: cannot read the Interfile header ({exc.strerror})") from None
    lines = text.splitlines()
    if not lines or normalised_key(lines[0].split(":=")[0]) != "interfile":
        raise InputError(f"{path}: not an Interfile header; expected '!INTERFILE :=' on the "
                         f"first line")
    entries = {}
    for line in lines:
        line = line.split(";", 1)[0]
        if ":=" not in line:
            continue
        key, value = line.split(":=", 1)
        entries[normalised_key(key)] = value.strip()
    return entries


def header_number(entries, key, path, kind=float, default=None):
    """``entries[key]`` as ``kind``; ``default`` when absent (None: the key is required)."""
    if key not in entries or entries[key] == "":
        if default is None:
            raise InputError(f"{path}: missing key '{key} :='")
        return default
    try:
        return kind(entries[key])
    except ValueError:
        raise InputError(f"{path}: '{key} := {entries[key]}' is not a "
                         f"{'number' if kind is float else 'whole number'}") from None


def data_dtype(entries: dict, path) -> np.dtype:
    """The raw values' dtype from ``number format``, ``number of bytes per pixel`` and
    ``imagedata byte order`` (one :class:`InputError` line when unsupported)."""
    number_format = entries.get("number format", "float").lower()
    width = header_number(entries, "number of bytes per pixel", path, int, 4)
    code = _FORMATS.get((number_format, width))
    if code is None:
        raise InputError(f"{path}: 'number format := {number_format}' with {width} bytes per "
                         f"pixel; expected float (4 or 8 bytes) or signed/unsigned integer "
                         f"(1, 2 or 4)")
    order = entries.get("imagedata byte order", "LITTLEENDIAN").upper()
    if order not in ("LITTLEENDIAN", "BIGENDIAN"):
        raise InputError(f"{path}: 'imagedata byte order := {order}'; expected LITTLEENDIAN or "
                         f"BIGENDIAN")
    return np.dtype(("<" if order == "LITTLEENDIAN" else ">") + code)


def data_file(entries: dict, path, needed_bytes: int, what: str) -> tuple[Path, int]:
    """``(data path, offset)`` of ``name of data file``, checked to hold ``needed_bytes``
    after ``data offset in bytes[1]`` (``what`` describes them in the error)."""
    path = Path(path)
    if "name of data file" not in entries:
        raise InputError(f"{path}: missing key 'name of data file :='")
    data_path = path.parent / entries["name of data file"]
    offset = header_number(entries, "data offset in bytes[1]", path, int, 0)
    if not data_path.is_file():
        raise InputError(f"{path}: data file {data_path} (name of data file) not found")
    available = data_path.stat().st_size - offset
    if available < needed_bytes:
        raise InputError(f"{data_path}: {available} bytes after offset {offset}, but {what} "
                         f"need {needed_bytes}")
    return data_path, offset


def read_interfile(path):
    """Read an Interfile image: ``(array [z, y, x] or [t, z, y, x] float32, geometry)``."""
    path = Path(path)
    entries = read_header(path)
    dimensions = header_number(entries, "number of dimensions", path, int)
    if dimensions != 3:
        raise InputError(f"{path}: 'number of dimensions := {dimensions}'; expected 3 "
                         f"(x, y, z; frames by 'number of time frames')")
    sizes = [header_number(entries, f"matrix size[{axis}]", path, int) for axis in (1, 2, 3)]
    spacing = [header_number(entries, f"scaling factor (mm/pixel)[{axis}]", path, float, 1.0)
               for axis in (1, 2, 3)]
    offsets = [header_number(entries, f"first pixel offset (mm)[{axis}]", path, float,
                       -0.5 * (sizes[axis - 1] - 1) * spacing[axis - 1]) for axis in (1, 2, 3)]
    frames = header_number(entries, "number of time frames", path, int, 1)
    if min(sizes) < 1 or frames < 1 or min(spacing) <= 0:
        raise InputError(f"{path}: matrix sizes {sizes}, {frames} frame(s), spacing {spacing} "
                         f"mm; expected positive sizes and spacing")
    dtype = data_dtype(entries, path)
    count = frames * sizes[0] * sizes[1] * sizes[2]
    data_path, offset = data_file(entries, path, count * dtype.itemsize,
                                  f"{frames} x {sizes[2]} x {sizes[1]} x {sizes[0]} values of "
                                  f"{dtype.itemsize} bytes")
    values = np.fromfile(data_path, dtype=dtype, count=count, offset=offset)
    scale = header_number(entries, "image scaling factor[1]", path, float, 1.0)
    array = (values.astype(np.float32) * np.float32(scale)).reshape(
        (frames, sizes[2], sizes[1], sizes[0]))
    geometry = ImageGeometry.from_spacing(array.shape[1:], tuple(spacing), tuple(offsets))
    return (array[0] if frames == 1 else array), geometry


def write_interfile(path, array, geometry: ImageGeometry, overwrite: bool = False) -> Path:
    """Write ``array`` ([z, y, x] or [t, z, y, x]) as float32 Interfile, atomically (data,
    then header). The grid must be axis-aligned with positive spacing."""
    path = Path(path)
    array = np.asarray(array, dtype="<f4")
    if array.ndim not in (3, 4):
        raise InputError(f"{path}: Interfile holds 3-D images or frames of them; got shape "
                         f"{array.shape}")
    rotation = np.asarray(geometry.affine)[:3, :3]
    spacing = np.diag(rotation)
    if not np.allclose(rotation, np.diag(spacing), atol=1e-6) or np.any(spacing <= 0):
        raise InputError(f"{path}: Interfile images are axis-aligned; this grid is rotated or "
                         f"flipped (affine {rotation.tolist()}); write .nii.gz instead")
    frames = 1 if array.ndim == 3 else array.shape[0]
    nz, ny, nx = array.shape[-3:]
    origin = np.asarray(geometry.affine)[:3, 3]
    data_path = data_path_for(path)
    lines = ["!INTERFILE :=", "!imaging modality := PT", f"name of data file := {data_path.name}",
             "!version of keys := 3.3", "!GENERAL DATA :=", "!GENERAL IMAGE DATA :=",
             "!type of data := PET", "imagedata byte order := LITTLEENDIAN",
             "!PET STUDY (General) :=", "!PET data type := Image",
             "process status := Reconstructed", "!number format := float",
             "!number of bytes per pixel := 4", "number of dimensions := 3"]
    for axis, (label, size) in enumerate((("x", nx), ("y", ny), ("z", nz)), start=1):
        lines += [f"matrix axis label [{axis}] := {label}", f"!matrix size [{axis}] := {size}",
                  f"scaling factor (mm/pixel) [{axis}] := {spacing[axis - 1]:.9g}"]
    for axis in (1, 2, 3):
        lines.append(f"first pixel offset (mm) [{axis}] := {origin[axis - 1]:.9g}")
    lines += [f"number of time frames := {frames}", "image scaling factor[1] := 1",
              "data offset in bytes[1] := 0", "!END OF INTERFILE :="]
    with atomic_path(data_path, overwrite=overwrite) as tmp:
        np.ascontiguousarray(array).tofile(tmp)
    with atomic_path(path, overwrite=overwrite) as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n", encoding="latin-1")
    return path
