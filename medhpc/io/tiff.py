"""TIFF and OME-TIFF stacks through tifffile.

A stack is ``[z, y, x]`` (grey) or ``[z, y, x, c]`` (RGB/RGBA or channels).
Spacing travels as OME ``PhysicalSize*`` (OME-TIFF), as ``spacing_mm`` in
tifffile's JSON description (plain TIFF) and as resolution tags for other
readers.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import tifffile

from medhpc.errors import InputError, one_line
from medhpc.io.atomic import atomic_path

TIFF_SUFFIXES = (".tif", ".tiff")
OME_SUFFIXES = (".ome.tif", ".ome.tiff")
TILE_ABOVE_PIXELS = 2048  # planes wider or taller than this are written in tiles
TILE_SHAPE = (512, 512)
_EXPECTED = "expected a TIFF file (.tif, .tiff)"
_CHANNEL_AXES = "SC"
_MM_PER_UNIT = {"m": 1e3, "cm": 10.0, "mm": 1.0, "\u00b5m": 1e-3, "\u03bcm": 1e-3, "um": 1e-3,
                "micron": 1e-3, "nm": 1e-6, "inch": 25.4}


def is_tiff_path(path) -> bool:
    """Return True if ``path`` ends with ``.tif`` or ``.tiff`` (any case)."""
    return str(path).lower().endswith(TIFF_SUFFIXES)


def is_ome_path(path) -> bool:
    """Return True if ``path`` ends with ``.ome.tif`` or ``.ome.tiff`` (any case)."""
    return str(path).lower().endswith(OME_SUFFIXES)


def read_tiff_stack(path) -> np.ndarray:
    """Read the first image series (full resolution) of a TIFF or OME-TIFF.

    Series of equal shape (pages written one at a time) are stacked along z.

    Returns
    -------
    ndarray
        ``[z, y, x]`` or ``[z, y, x, c]``; a single page gives ``z = 1``.
        Length-1 axes other than y and x are dropped first; a series with two
        stack axes of length > 1 (for instance time and z) is refused.
    """
    with _open(path) as tif:
        if not tif.series:
            raise InputError(f"{path}: TIFF holds no image; {_EXPECTED}")
        series = tif.series[0]
        # pages written one by one can form one series each; equal ones form a stack
        stack_series = [s for s in tif.series if (s.shape, s.dtype, s.axes)
                        == (series.shape, series.dtype, series.axes)]
        if len(stack_series) != len(tif.series):
            stack_series = [series]
        try:
            planes = [s.asarray() for s in stack_series]
        except (ValueError, OSError, RuntimeError) as error:
            raise InputError(f"{path}: TIFF data cannot be decoded ({one_line(error)}); "
                             f"{_EXPECTED}") from error
        if len(planes) == 1:
            return _to_zyxc(planes[0], series.axes, path)
        return _to_zyxc(np.stack(planes), "I" + series.axes, path)


def read_tiff_page(path, index: int) -> np.ndarray:
    """Read one page as ``[y, x]`` or ``[y, x, c]``."""
    with _open(path) as tif:
        count = len(tif.pages)
        if not 0 <= index < count:
            raise InputError(f"{path}: page {index} requested but the file has {count} "
                             f"page(s); expected an index in 0..{count - 1}")
        page = tif.pages[index]
        array = page.asarray()
        if page.axes.startswith("S"):
            array = np.moveaxis(array, 0, -1)
        return array


def tiff_spacing_mm(path) -> tuple | None:
    """Return the voxel size ``(x, y, z)`` in mm stored in a TIFF, or None if unknown.

    Reads OME ``PhysicalSize*``, the ``spacing_mm`` written by
    :func:`write_tiff_stack`, or ImageJ's ``spacing`` with resolution tags.
    All three sizes must be known.
    """
    with _open(path) as tif:
        if tif.is_ome:
            return _ome_spacing_mm(tif.ome_metadata)
        if tif.shaped_metadata and "spacing_mm" in tif.shaped_metadata[0]:
            spacing = tif.shaped_metadata[0]["spacing_mm"]
            return tuple(float(v) for v in spacing) if len(spacing) == 3 else None
        if tif.is_imagej:
            return _imagej_spacing_mm(tif)
    return None


def write_tiff_stack(path, array, spacing_mm=None, overwrite: bool = False, ome=None,
                     compression: str | None = "zlib", tile="auto") -> Path:
    """Write a stack as TIFF or OME-TIFF, atomically.

    Parameters
    ----------
    path : str or Path
        Output; OME-TIFF when it ends with ``.ome.tif``/``.ome.tiff``.
    array : ndarray
        ``[z, y, x]``, ``[y, x]`` or RGB(A) ``[z, y, x, c]`` with c = 3 or 4.
    spacing_mm : sequence of 3 floats, optional
        Voxel size ``(x, y, z)`` in mm.
    overwrite : bool
        Replace an existing file; otherwise raise ``OutputExistsError``.
    ome : bool, optional
        Force or forbid OME-XML; by default decided by the extension.
    compression : str or None
        tifffile compression name (``"zlib"``, ``None``).
    tile : "auto", tuple or None
        ``"auto"`` tiles planes larger than ``TILE_ABOVE_PIXELS`` with
        ``TILE_SHAPE`` (multiples of 16); None writes strips.

    Returns
    -------
    Path
        The written file.
    """
    path = Path(path)
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[np.newaxis]
    rgb = array.ndim == 4 and array.shape[-1] in (3, 4)
    if array.ndim != 3 and not rgb:
        raise ValueError(f"expected [z, y, x] or RGB [z, y, x, 3|4], got shape {array.shape}")
    if ome is None:
        ome = is_ome_path(path)
    ny, nx = array.shape[1:3]
    if isinstance(tile, str) and tile == "auto":
        tile = TILE_SHAPE if max(ny, nx) > TILE_ABOVE_PIXELS else None

    options = {"photometric": "rgb" if rgb else "minisblack", "compression": compression,
               "tile": tile}
    axes = "ZYXS" if rgb else "ZYX"
    metadata = {"axes": axes}
    if spacing_mm is not None:
        sx, sy, sz = (float(v) for v in spacing_mm)
        options["resolution"] = (10.0 / sx, 10.0 / sy)
        options["resolutionunit"] = tifffile.RESUNIT.CENTIMETER
        if ome:
            for name, size in zip("XYZ", (sx, sy, sz)):
                metadata[f"PhysicalSize{name}"] = size
                metadata[f"PhysicalSize{name}Unit"] = "mm"
        else:
            metadata["spacing_mm"] = [sx, sy, sz]
    with atomic_path(path, overwrite) as tmp:
        tifffile.imwrite(tmp, array, ome=ome, metadata=metadata, **options)
    return path


class _open:
    """Open a TIFF for reading, turning failures into one-line InputErrors."""

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self):
        path = self.path
        if not path.exists():
            raise InputError(f"{path}: file not found; {_EXPECTED}")
        if path.is_dir():
            raise InputError(f"{path}: is a folder; {_EXPECTED}")
        try:
            self.tif = tifffile.TiffFile(path)
        except (tifffile.TiffFileError, OSError, ValueError) as error:
            raise InputError(f"{path}: not a readable TIFF ({one_line(error)}); "
                             f"{_EXPECTED}") from error
        return self.tif

    def __exit__(self, *exc):
        self.tif.close()
        return False


def _to_zyxc(array, axes: str, path) -> np.ndarray:
    keep = [i for i, axis in enumerate(axes) if axis in "YX" or array.shape[i] != 1]
    array = array.reshape([array.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    channel = [i for i, axis in enumerate(axes) if axis in _CHANNEL_AXES]
    stack = [i for i, axis in enumerate(axes) if axis not in "YX" + _CHANNEL_AXES]
    if len(channel) > 1 or len(stack) > 1:
        raise InputError(f"{path}: TIFF series has axes '{axes}' of shape {array.shape}; "
                         "expected one z-stack of grey or colour planes")
    order = stack + [axes.index("Y"), axes.index("X")] + channel
    array = array.transpose(order)
    return array if stack else array[np.newaxis]


def ome_physical_sizes(xml_text, axes: str, per_unit: dict) -> tuple | None:
    """OME ``PhysicalSize<axis>`` of the first ``Pixels`` element for every axis in ``axes``,
    converted by ``per_unit`` (unit name -> wanted unit); None if any is missing or of an
    unknown unit, or the XML does not parse."""
    try:
        root = ElementTree.fromstring(xml_text)
    except ElementTree.ParseError:
        return None
    pixels = next((e for e in root.iter() if e.tag.rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for name in axes:
        size = pixels.get(f"PhysicalSize{name}")
        unit = pixels.get(f"PhysicalSize{name}Unit", "\u00b5m")
        if size is None or unit not in per_unit:
            return None
        sizes.append(float(size) * per_unit[unit])
    return tuple(sizes)


def _ome_spacing_mm(xml_text) -> tuple | None:
    return ome_physical_sizes(xml_text, "XYZ", _MM_PER_UNIT)


def _imagej_spacing_mm(tif) -> tuple | None:
    metadata = tif.imagej_metadata or {}
    unit = _MM_PER_UNIT.get(str(metadata.get("unit", "")).strip())
    page = tif.pages[0]
    if unit is None or "spacing" not in metadata:
        return None
    try:
        x_res = page.tags["XResolution"].value
        y_res = page.tags["YResolution"].value
    except KeyError:
        return None
    sx = unit * x_res[1] / x_res[0]
    sy = unit * y_res[1] / y_res[0]
    return (sx, sy, unit * float(metadata["spacing"]))
