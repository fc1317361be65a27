"""Whole-slide images: pyramidal TIFF, OME-TIFF, SVS, NDPI and OME-Zarr, read by region.

A slide is described once (:func:`describe_slide`: pyramid levels, channels,
type, physical pixel size, compression; headers only) and then read by
regions of any level through zarr (tifffile's zarr store for TIFF files,
``zarr`` itself for OME-Zarr), so no level is ever decoded whole unless it is
asked for. :func:`read_downsampled` reads a slide at ``factor`` times coarser
than level 0 from the stored level nearest to (finer than or equal to) that
resolution and block-averages the rest in bands. :func:`preflight_slide` is the
cheap check done before any compute: every tile of every level lies inside the
file, the compression can be decoded, the smallest level and one level-0 tile
decode.

Pixel sizes are in micrometres, ``(y, x)``: OME ``PhysicalSizeX/Y``, the
``MPP`` of an Aperio ImageDescription, the TIFF resolution tags (NDPI and most
scanners), or the scale of an OME-Zarr's first dataset.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medhpc.errors import InputError, one_line
from medhpc.io.tiff import ome_physical_sizes

SLIDE_SUFFIXES = (".svs", ".ndpi", ".tif", ".tiff", ".ome.tif", ".ome.tiff", ".zarr",
                  ".ome.zarr")
_EXPECTED = ("expected a pyramidal TIFF/OME-TIFF/SVS/NDPI (JPEG, JPEG 2000, LZW, deflate or "
             "no compression) or an OME-Zarr folder")
_UM_PER_UNIT = {"m": 1e6, "meter": 1e6, "cm": 1e4, "centimeter": 1e4, "mm": 1e3,
                "millimeter": 1e3, "\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0, "micron": 1.0,
                "micrometer": 1.0, "nm": 1e-3, "nanometer": 1e-3}
_MPP = re.compile(r"MPP\s*=\s*([0-9.eE+-]+)")
BAND_BYTES = 64 << 20          # rows of a level read at a time by read_downsampled
LEVEL_RATIO_TOLERANCE = 0.02   # a level is "2x" when level-0 size / its size is within 2 %
_MAGIC = {"JPEG": (b"\xff\xd8",), "ADOBE_DEFLATE": (b"\x78",), "DEFLATE": (b"\x78",),
          "JPEG2000": (b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0c")}


@contextmanager
def _quiet_tifffile():
    """Silence tifffile's own warnings about damaged files: the InputError says it once."""
    logger = logging.getLogger("tifffile")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def is_slide_path(path) -> bool:
    """True for names a whole-slide reader takes (``.svs``, ``.ndpi``, TIFF, ``.zarr``)."""
    return str(path).lower().rstrip("/").endswith(SLIDE_SUFFIXES)


@dataclass(frozen=True)
class Slide:
    """What a slide holds (headers only; small, shared with every rank).

    Attributes
    ----------
    path : str
    format : str
        ``"tiff"`` (TIFF, OME-TIFF, SVS, NDPI) or ``"zarr"`` (OME-Zarr).
    level_shapes : tuple of (int, int)
        ``(y, x)`` of every stored pyramid level, finest first.
    channels : int
        Samples per pixel (1 grey, 3 RGB; a 4th alpha sample is dropped on reading).
    dtype : str
    pixel_size_um : tuple of (float, float) or None
        Level-0 pixel size ``(y, x)`` in micrometres, None when the file does not say.
    compression : str
        Compression of level 0 (``"JPEG"``, ``"NONE"``, ...).
    tile_shape : tuple of (int, int)
        Level-0 tile (or strip) shape ``(y, x)``.
    """

    path: str
    format: str
    level_shapes: tuple
    channels: int
    dtype: str
    pixel_size_um: tuple | None
    compression: str
    tile_shape: tuple

    @property
    def shape(self) -> tuple:
        """Level-0 ``(y, x)``."""
        return tuple(self.level_shapes[0])

    def level_downsample(self, level: int) -> float:
        """Level-0 width over the width of ``level`` (2.0 for a half-size level)."""
        return self.level_shapes[0][1] / self.level_shapes[level][1]


def choose_level(slide: Slide, factor: int) -> tuple[int, int]:
    """The coarsest stored level that block-averages exactly to ``factor``.

    Returns ``(level, block)``: reading ``level`` and averaging ``block x block``
    pixels gives the resolution of level 0 divided by ``factor``. Only levels whose
    downsampling is (within 2 %) an integer dividing ``factor`` qualify, so the
    result is the nearest level finer than or equal to the working resolution.
    """
    best = (0, int(factor))
    for level in range(1, len(slide.level_shapes)):
        ratio = slide.level_downsample(level)
        whole = int(round(ratio))
        if whole < 1 or abs(ratio - whole) > LEVEL_RATIO_TOLERANCE * whole:
            continue
        if whole <= factor and factor % whole == 0 and whole > factor // best[1]:
            best = (level, factor // whole)
    return best


# -- describing ---------------------------------------------------------------------------------
def describe_slide(path) -> Slide:
    """Read the headers of a slide and describe it (raises one-line InputErrors)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: not found; {_EXPECTED}")
    if path.is_dir():
        return _describe_zarr(path)
    with _quiet_tifffile():
        return _describe_tiff(path)


def _yxs(axes: str, shape, path) -> tuple[tuple, int]:
    """(y, x) and samples of a series, refusing stacks (z, t or channels beyond samples)."""
    sizes = dict(zip(axes, shape))
    extra = {a: n for a, n in sizes.items() if a not in "YXS" and n > 1}
    if extra or "Y" not in sizes or "X" not in sizes:
        raise InputError(f"{path}: image series has axes '{axes}' of shape {tuple(shape)}; "
                         "expected one 2-D section (grey or RGB) per slide")
    return (sizes["Y"], sizes["X"]), int(sizes.get("S", 1))


def _describe_tiff(path: Path) -> Slide:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise InputError(f"{path}: TIFF holds no image; {_EXPECTED}")
            series = tif.series[0]
            levels = list(series.levels) or [series]
            level_shapes, channels = [], None
            for level in levels:
                shape, samples = _yxs(level.axes, level.shape, path)
                level_shapes.append(shape)
                channels = samples if channels is None else channels
            page = series.keyframe
            compression = _compression_name(page.compression)
            tile = ((page.tilelength, page.tilewidth) if page.is_tiled
                    else (page.rowsperstrip or page.imagelength, page.imagewidth))
            pixel_size = _tiff_pixel_size_um(tif, page)
            dtype = str(series.dtype)
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"{path}: cannot be read as a TIFF slide ({one_line(error)}); "
                         f"{_EXPECTED}") from None
    return Slide(str(path), "tiff", tuple(level_shapes), channels, dtype, pixel_size,
                 compression, tuple(int(t) for t in tile))


def _compression_name(code) -> str:
    return getattr(code, "name", str(code))


def _tiff_pixel_size_um(tif, page) -> tuple | None:
    if tif.is_ome:
        size = _ome_pixel_size_um(tif.ome_metadata)
        if size is not None:
            return size
    if tif.is_svs:
        match = _MPP.search(page.description or "")
        if match:
            mpp = float(match.group(1))
            return (mpp, mpp)
    try:
        x_res = page.tags["XResolution"].value
        y_res = page.tags["YResolution"].value
        unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
    except KeyError:
        return None
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)
    if um_per_unit is None or x_res[0] == 0 or y_res[0] == 0:
        return None
    size_x = um_per_unit * x_res[1] / x_res[0]
    size_y = um_per_unit * y_res[1] / y_res[0]
    if unit == 2 and x_res[0] == x_res[1] * 72:  # the 72 dpi that writers put by default
        return None
    return (size_y, size_x)


def _ome_pixel_size_um(xml_text) -> tuple | None:
    return ome_physical_sizes(xml_text, "YX", _UM_PER_UNIT)


def ngff_multiscales(attrs) -> dict | None:
    """The first ``multiscales`` entry of OME-Zarr attributes (NGFF 0.4 or 0.5)."""
    attrs = dict(attrs)
    if "ome" in attrs and isinstance(attrs["ome"], dict):
        attrs = attrs["ome"]
    entries = attrs.get("multiscales")
    return entries[0] if entries else None


def _describe_zarr(path: Path) -> Slide:
    import zarr

    try:
        group = zarr.open_group(str(path), mode="r")
        multiscales = ngff_multiscales(group.attrs)
    except Exception as error:
        raise InputError(f"{path}: cannot be read as OME-Zarr ({one_line(error)}); "
                         f"{_EXPECTED}") from None
    if multiscales is None:
        raise InputError(f"{path}: zarr group without 'multiscales' metadata; {_EXPECTED}")
    axes = _ngff_axes(multiscales)
    level_shapes, channels, dtype, tile = [], 1, "", ()
    for dataset in multiscales["datasets"]:
        try:
            array = group[dataset["path"]]
        except KeyError:
            raise InputError(f"{path}: multiscales names dataset '{dataset['path']}' that is "
                             f"missing; {_EXPECTED}") from None
        sizes = dict(zip(axes, array.shape))
        extra = {a: n for a, n in sizes.items() if a not in "cyx" and n > 1}
        if extra or len(axes) != array.ndim:
            raise InputError(f"{path}: OME-Zarr axes {''.join(axes)} of shape {array.shape}; "
                             "expected one 2-D section (axes c, y, x; others of size 1)")
        level_shapes.append((sizes["y"], sizes["x"]))
        if not dtype:
            channels, dtype = sizes.get("c", 1), str(array.dtype)
            chunks = dict(zip(axes, array.chunks))
            tile = (chunks["y"], chunks["x"])
    scale = _ngff_scale(multiscales, 0)
    units = {a["name"]: a.get("unit") for a in multiscales["axes"]}
    pixel_size = None
    if scale is not None and all(units.get(a) in _UM_PER_UNIT for a in "yx"):
        pixel_size = tuple(scale[axes.index(a)] * _UM_PER_UNIT[units[a]] for a in "yx")
    return Slide(str(path), "zarr", tuple(level_shapes), int(channels), dtype, pixel_size,
                 "zarr", tuple(tile))


def _ngff_axes(multiscales) -> list[str]:
    axes = [a["name"] if isinstance(a, dict) else a for a in multiscales.get("axes", [])]
    return [a.lower() for a in axes] or ["c", "y", "x"][-len(multiscales["datasets"]):]


def _ngff_scale(multiscales, level: int):
    for transform in multiscales["datasets"][level].get("coordinateTransformations", []):
        if transform.get("type") == "scale":
            return [float(v) for v in transform["scale"]]
    return None


# -- reading --------------------------------------------------------------------------------------
class SlideReader:
    """Regions of any level of one open slide, as ``[y, x]`` or ``[y, x, c]``."""

    def __init__(self, slide: Slide):
        self.slide = slide
        self._tif = None
        self._arrays: dict[int, object] = {}
        self._axes: list[str] = []

    def __enter__(self):
        import zarr

        if self.slide.format == "tiff":
            import tifffile

            self._tif = tifffile.TiffFile(self.slide.path)
            series = self._tif.series[0]
            self._axes = list(series.axes.lower())
            self._open = lambda level: zarr.open(self._tif.aszarr(series=0, level=level),
                                                 mode="r")
        else:
            group = zarr.open_group(self.slide.path, mode="r")
            multiscales = ngff_multiscales(group.attrs)
            self._axes = _ngff_axes(multiscales)
            paths = [d["path"] for d in multiscales["datasets"]]
            self._open = lambda level: group[paths[level]]
        return self

    def __exit__(self, *exc):
        self._arrays.clear()
        if self._tif is not None:
            self._tif.close()
        return False

    def _array(self, level: int):
        if level not in self._arrays:
            self._arrays[level] = self._open(level)
        return self._arrays[level]

    def region(self, level: int, rows: slice, columns: slice) -> np.ndarray:
        """Pixels ``[rows, columns]`` of ``level`` (inside the level), ``[y, x]`` or ``[y, x, c]``."""
        array = self._array(level)
        axes = self._axes if len(self._axes) == array.ndim else _default_axes(array.ndim)
        index = tuple(rows if a == "y" else columns if a == "x" else slice(None)
                      if a in "cs" else 0 for a in axes)
        try:
            values = np.asarray(array[index])
        except Exception as error:
            raise InputError(f"{self.slide.path}: level {level} rows {rows.start}-{rows.stop} "
                             f"columns {columns.start}-{columns.stop} cannot be decoded "
                             f"({one_line(error)}); {_EXPECTED}") from None
        kept = [a for a in axes if a in "yxcs"]
        if "c" in kept:  # OME-Zarr stores channels first
            values = np.moveaxis(values, kept.index("c"), -1)
        if values.ndim == 3 and values.shape[2] == 1:
            values = values[..., 0]
        if values.ndim == 3 and values.shape[2] == 4:
            values = values[..., :3]
        return values


def _default_axes(ndim: int) -> list[str]:
    return ["y", "x", "s"] if ndim == 3 else ["y", "x"]


@contextmanager
def open_slide(slide: Slide):
    """Context manager giving a :class:`SlideReader` of ``slide``."""
    with SlideReader(slide) as reader:
        yield reader


def block_mean(values: np.ndarray, block: int) -> np.ndarray:
    """float32 mean over ``block x block`` pixels (a trailing partial block is dropped)."""
    if block == 1:
        return values.astype(np.float32)
    ny, nx = values.shape[0] // block, values.shape[1] // block
    trimmed = values[: ny * block, : nx * block]
    shape = (ny, block, nx, block) + trimmed.shape[2:]
    return trimmed.reshape(shape).mean(axis=(1, 3), dtype=np.float32)


def read_downsampled(reader: SlideReader, factor: int, out_shape) -> tuple[np.ndarray, dict]:
    """The slide ``factor`` times coarser than level 0, float32 in input units.

    The stored level nearest to (finer than or equal to) that resolution is read in
    bands of rows (about :data:`BAND_BYTES` each) and block-averaged, so the peak
    memory is the result plus one band. ``out_shape`` is ``(y, x)`` of the result
    (level-0 size // factor); a level a pixel short at its far edge repeats its last
    row or column.

    Returns
    -------
    image : float32 ndarray
        ``[y, x]`` or ``[y, x, c]``.
    record : dict
        ``level``, ``level_shape``, ``block`` (what was read).
    """
    slide = reader.slide
    level, block = choose_level(slide, factor)
    level_y, level_x = slide.level_shapes[level]
    out_y, out_x = (int(n) for n in out_shape)
    channel_shape = (slide.channels,) if slide.channels > 1 else ()
    image = np.empty((out_y, out_x) + (channel_shape if slide.channels != 4 else (3,)),
                     np.float32)
    row_bytes = max(1, block * level_x * max(1, slide.channels) * np.dtype(slide.dtype).itemsize)
    band_rows = max(1, BAND_BYTES // row_bytes)
    columns = slice(0, min(level_x, out_x * block))
    for top in range(0, out_y, band_rows):
        stop = min(out_y, top + band_rows)
        rows = slice(min(top * block, level_y - 1), min(level_y, stop * block))
        band = reader.region(level, rows, columns)
        band = extend_to(band, ((stop - top) * block, out_x * block))
        image[top:stop] = block_mean(band, block)
    record = {"level": level, "level_shape": [level_y, level_x], "block": block,
              "level_downsample": round(slide.level_downsample(level), 4)}
    return image, record


def extend_to(values: np.ndarray, shape) -> np.ndarray:
    """Repeat the last row/column so that ``values`` covers ``shape`` (y, x)."""
    pad_y, pad_x = shape[0] - values.shape[0], shape[1] - values.shape[1]
    if pad_y <= 0 and pad_x <= 0:
        return values[: shape[0], : shape[1]]
    widths = [(0, max(0, pad_y)), (0, max(0, pad_x))] + [(0, 0)] * (values.ndim - 2)
    return np.pad(values, widths, mode="edge")[: shape[0], : shape[1]]


# -- preflight ------------------------------------------------------------------------------------
def preflight_slide(slide: Slide) -> None:
    """Cheap checks before any compute; raise one-line InputErrors naming the file.

    TIFF: every tile of every level lies inside the file, its compression can be
    decoded, JPEG/deflate tiles start with their format's marker; then the smallest
    level and the central level-0 tile are decoded. OME-Zarr: the smallest level
    and one level-0 chunk are decoded.
    """
    with _quiet_tifffile():
        if slide.format == "tiff":
            _preflight_tiff(slide)
        _preflight_decode(slide)


def _preflight_decode(slide: Slide) -> None:
    with open_slide(slide) as reader:
        last = len(slide.level_shapes) - 1
        ny, nx = slide.level_shapes[last]
        reader.region(last, slice(0, ny), slice(0, nx))
        ty, tx = slide.tile_shape
        y0 = (slide.shape[0] // 2 // ty) * ty
        x0 = (slide.shape[1] // 2 // tx) * tx
        reader.region(0, slice(y0, min(slide.shape[0], y0 + ty)),
                      slice(x0, min(slide.shape[1], x0 + tx)))


def _preflight_tiff(slide: Slide) -> None:
    import tifffile
    from tifffile import TIFF

    path = Path(slide.path)
    size = path.stat().st_size
    with tifffile.TiffFile(path) as tif, open(path, "rb") as stream:
        series = tif.series[0]
        for level, level_series in enumerate(list(series.levels) or [series]):
            for page in level_series.pages:
                if page is None:
                    raise InputError(f"{path}: level {level} has a missing page; {_EXPECTED}")
                compression = page.compression
                try:
                    if compression != 1:
                        TIFF.DECOMPRESSORS[compression]
                except KeyError:
                    raise InputError(f"{path}: level {level} uses compression "
                                     f"{_compression_name(compression)}, which cannot be "
                                     f"decoded; {_EXPECTED}") from None
                offsets = np.asarray(page.dataoffsets, np.int64)
                counts = np.asarray(page.databytecounts, np.int64)
                ends = offsets + counts
                if len(ends) and int(ends.max()) > size:
                    tile = int(np.argmax(ends > size))
                    raise InputError(f"{path}: truncated: tile {tile} of level {level} ends at "
                                     f"byte {int(ends[tile])} beyond the file size {size}; "
                                     "expected a complete file")
                magic = _MAGIC.get(_compression_name(compression))
                if magic is not None and not tif.is_ndpi:
                    _check_magic(stream, path, level, offsets, magic)


def _check_magic(stream, path, level: int, offsets, magic) -> None:
    length = max(len(m) for m in magic)
    for tile, offset in enumerate(offsets):
        if offset == 0:  # a sparse (never written) tile
            continue
        stream.seek(int(offset))
        head = stream.read(length)
        if not any(head.startswith(m) for m in magic):
            raise InputError(f"{path}: tile {tile} of level {level} is not valid "
                             f"compressed data (starts with {head[:4].hex()}); expected a "
                             "complete, undamaged file")
