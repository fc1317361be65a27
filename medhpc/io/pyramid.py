"""Pyramidal stacks of sections written in parallel: OME-Zarr (NGFF 0.4) and multi-file OME-TIFF.

A stack is ``(c, z, y, x)``; every rank writes the sections it owns, tile by
tile, and no rank ever holds a whole section:

- **OME-Zarr**: one array per level (``0``, ``1``, ...; each half the size of
  the one before), chunks of one section and one ``tile x tile`` square with
  all channels, so ranks write disjoint chunks without locks. Each rank writes
  level 0 of its sections tile by tile, then builds the coarser levels of its
  sections from the level before, a ``2 tile`` square at a time.
- **OME-TIFF**: the same pyramid is first written to a scratch OME-Zarr in the
  parts folder; each rank then writes one tiled OME-TIFF per section
  (``<out>.parts/z0000.ome.tif``; level 0 with the coarser levels as SubIFDs;
  OME-XML ``BinaryOnly`` pointing to the master) and, at the end, one rank writes
  the small master ``<out>`` whose OME-XML lists every section file by UUID
  (tifffile and Bio-Formats open it as one series with its levels) and whose own
  image is a thumbnail of the centre section.

Physical pixel sizes (micrometres) go to NGFF ``coordinateTransformations`` and
to OME ``PhysicalSizeX/Y`` plus the TIFF resolution tags of every level. The
output appears complete or not at all: everything is written under temporary
names and renamed at the end by one rank.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medhpc.io.atomic import check_output_free, partial_name, publish

ZARR_SUFFIXES = (".ome.zarr", ".zarr")
COMPRESSIONS = ("jpeg", "zlib", "none")
JPEG_QUALITY = 90
_OME_NS = "http://www.openmicroscopy.org/Schemas/OME/2016-06"


def is_zarr_path(path) -> bool:
    """True when ``path`` names an OME-Zarr output (``.zarr``, ``.ome.zarr``)."""
    return str(path).lower().rstrip("/").endswith(ZARR_SUFFIXES)


@dataclass(frozen=True)
class PyramidLayout:
    """Geometry of a pyramidal stack (a pure function of the plan).

    Attributes
    ----------
    shape : (int, int, int)
        Level-0 ``(z, y, x)``.
    channels : int
    dtype : str
    tile : int
        Side of the square tiles (and zarr chunks) of every level.
    levels : tuple of (int, int)
        ``(y, x)`` per level, finest first; each the one before halved (rounded up),
        down to the first level that fits in one tile.
    pixel_size_um : (float, float) or None
        Level-0 ``(y, x)`` pixel size in micrometres.
    fill : float
        Value of pixels outside the warped sections.
    """

    shape: tuple
    channels: int
    dtype: str
    tile: int
    levels: tuple
    pixel_size_um: tuple | None
    fill: float = 0.0

    def tiles(self, level: int = 0):
        """``(rows, columns)`` slices of every tile of ``level``, row by row."""
        ny, nx = self.levels[level]
        for top in range(0, ny, self.tile):
            for left in range(0, nx, self.tile):
                yield (slice(top, min(ny, top + self.tile)),
                       slice(left, min(nx, left + self.tile)))


def pyramid_layout(shape, channels: int, dtype, tile: int, pixel_size_um=None,
                   fill: float = 0.0) -> PyramidLayout:
    """The :class:`PyramidLayout` of a ``(z, y, x)`` stack with ``tile``-square tiles."""
    levels = [tuple(int(n) for n in shape[1:])]
    while max(levels[-1]) > tile:
        levels.append(tuple((n + 1) // 2 for n in levels[-1]))
    size = None if pixel_size_um is None else tuple(float(v) for v in pixel_size_um)
    return PyramidLayout(tuple(int(n) for n in shape), int(channels), str(np.dtype(dtype)),
                         int(tile), tuple(levels), size, float(fill))


def halve(block: np.ndarray, dtype) -> np.ndarray:
    """2 x 2 mean of a ``(c, y, x)`` block (odd edges repeat), cast to ``dtype``."""
    c, ny, nx = block.shape
    if ny % 2 or nx % 2:
        block = np.pad(block, ((0, 0), (0, ny % 2), (0, nx % 2)), mode="edge")
    values = block.reshape(c, block.shape[1] // 2, 2, block.shape[2] // 2, 2)
    return cast_to(values.mean(axis=(2, 4), dtype=np.float32), np.dtype(dtype))


def cast_to(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip float values to an integer ``dtype`` (floats are just cast)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


# -- OME-Zarr -------------------------------------------------------------------------------------
def _level_scale(layout: PyramidLayout, level: int) -> list[float]:
    size_y, size_x = layout.pixel_size_um or (1.0, 1.0)
    ny, nx = layout.levels[0]
    ly, lx = layout.levels[level]
    return [1.0, 1.0, size_y * ny / ly, size_x * nx / lx]


def ngff_attributes(layout: PyramidLayout, name: str) -> dict:
    """NGFF 0.4 ``multiscales`` (axes c, z, y, x; micrometres when the pixel size is known)."""
    unit = {"unit": "micrometer"} if layout.pixel_size_um is not None else {}
    axes = [{"name": "c", "type": "channel"}, {"name": "z", "type": "space"},
            {"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}]
    datasets = [{"path": str(level), "coordinateTransformations": [
        {"type": "scale", "scale": _level_scale(layout, level)}]}
        for level in range(len(layout.levels))]
    return {"multiscales": [{"version": "0.4", "name": name, "axes": axes,
                             "datasets": datasets, "type": "mean"}]}


def create_ome_zarr(path, layout: PyramidLayout, name: str = "volume") -> None:
    """Create the (empty) arrays and metadata of a pyramidal OME-Zarr stack (one rank)."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    nz = layout.shape[0]
    for level, (ny, nx) in enumerate(layout.levels):
        group.create_array(str(level), shape=(layout.channels, nz, ny, nx),
                           chunks=(layout.channels, 1, layout.tile, layout.tile),
                           dtype=layout.dtype, fill_value=layout.fill,
                           chunk_key_encoding={"name": "v2", "separator": "/"})
    group.attrs.update(ngff_attributes(layout, name))


class ZarrStack:
    """The levels of an OME-Zarr stack opened for writing by one rank."""

    def __init__(self, path, layout: PyramidLayout):
        import zarr

        self.layout = layout
        group = zarr.open_group(str(path), mode="r+")
        self.levels = [group[str(level)] for level in range(len(layout.levels))]

    def write_tile(self, z: int, rows: slice, columns: slice, tile: np.ndarray) -> None:
        """Write a ``(c, y, x)`` tile of section ``z`` into level 0."""
        self.levels[0][:, z, rows, columns] = tile

    def build_levels(self, z: int) -> None:
        """Levels 1.. of section ``z`` from the level before, one output tile at a time."""
        for level in range(1, len(self.layout.levels)):
            source, target = self.levels[level - 1], self.levels[level]
            for rows, columns in self.layout.tiles(level):
                block = source[:, z, 2 * rows.start: 2 * rows.stop, 2 * columns.start:
                               2 * columns.stop]
                target[:, z, rows, columns] = halve(np.asarray(block), self.layout.dtype)

    def read_tile(self, level: int, z: int, rows: slice, columns: slice) -> np.ndarray:
        """A ``(c, y, x)`` tile of section ``z`` at ``level``."""
        return np.asarray(self.levels[level][:, z, rows, columns])


# -- OME-TIFF -------------------------------------------------------------------------------------
def _ome_xml(own_uuid: str, body: str) -> str:
    return ('<?xml version="1.0" encoding="UTF-8"?>'
            f'<OME xmlns="{_OME_NS}" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
            f'xsi:schemaLocation="{_OME_NS} {_OME_NS}/ome.xsd" UUID="{own_uuid}" '
            'Creator="medhpc">' + body + '</OME>')


def _pixels_type(dtype: str) -> str:
    return {"uint8": "uint8", "uint16": "uint16", "float32": "float", "int16": "int16",
            "uint32": "uint32", "float64": "double"}.get(dtype, dtype)


def _physical(layout: PyramidLayout) -> str:
    if layout.pixel_size_um is None:
        return ""
    size_y, size_x = layout.pixel_size_um
    # 7-bit ASCII only in TIFF strings: the micro sign as a character reference
    return (f' PhysicalSizeX="{size_x:.6g}" PhysicalSizeXUnit="&#181;m"'
            f' PhysicalSizeY="{size_y:.6g}" PhysicalSizeYUnit="&#181;m"')


def _tiff_options(layout: PyramidLayout, compression: str, level: int) -> dict:
    rgb = layout.channels == 3 and layout.dtype == "uint8"
    options = {"photometric": "rgb" if rgb else "minisblack", "tile": (layout.tile, layout.tile),
               "metadata": None}
    if compression == "jpeg" and layout.dtype == "uint8":
        options.update(compression="jpeg", compressionargs={"level": JPEG_QUALITY})
    elif compression != "none":
        options.update(compression="zlib", predictor=True)
    if not rgb and layout.channels > 1:
        options["planarconfig"] = "contig"
    if layout.pixel_size_um is not None:
        scale = _level_scale(layout, level)
        options["resolution"] = (1e4 / scale[3], 1e4 / scale[2])
        options["resolutionunit"] = "CENTIMETER"
    return options


def _tile_iterator(stack: ZarrStack, level: int, z: int):
    for rows, columns in stack.layout.tiles(level):
        tile = stack.read_tile(level, z, rows, columns)
        yield np.ascontiguousarray(np.moveaxis(tile, 0, -1))


def write_section_tiff(path, stack: ZarrStack, z: int, compression: str, own_uuid: str,
                       master_uuid: str, master_name: str) -> None:
    """One section's pyramid as a tiled OME-TIFF (levels as SubIFDs), from a zarr stack."""
    import tifffile

    layout = stack.layout
    body = f'<BinaryOnly MetadataFile="{master_name}" UUID="{master_uuid}"/>'
    shape_of = lambda level: tuple(layout.levels[level]) + (layout.channels,)  # noqa: E731
    with tifffile.TiffWriter(path, bigtiff=True) as writer:
        writer.write(_tile_iterator(stack, 0, z), shape=shape_of(0), dtype=layout.dtype,
                     subifds=len(layout.levels) - 1, description=_ome_xml(own_uuid, body),
                     **_tiff_options(layout, compression, 0))
        for level in range(1, len(layout.levels)):
            writer.write(_tile_iterator(stack, level, z), shape=shape_of(level),
                         dtype=layout.dtype, subfiletype=1,
                         **_tiff_options(layout, compression, level))


def write_master_tiff(path, layout: PyramidLayout, file_names: list[str], uuids: list[str],
                      master_uuid: str, thumbnail: np.ndarray) -> None:
    """The master OME-TIFF: OME-XML over every section file, and a thumbnail image."""
    import tifffile

    nz, ny, nx = layout.shape
    pixels_type = _pixels_type(layout.dtype)
    samples = layout.channels
    tiff_data = "".join(f'<TiffData FirstZ="{z}" IFD="0" PlaneCount="1"><UUID FileName="{name}">'
                        f'{file_uuid}</UUID></TiffData>'
                        for z, (name, file_uuid) in enumerate(zip(file_names, uuids)))
    thumb_y, thumb_x = thumbnail.shape[:2]
    body = (f'<Image ID="Image:0" Name="volume"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" '
            f'Type="{pixels_type}" SizeX="{nx}" SizeY="{ny}" SizeC="{samples}" SizeZ="{nz}" '
            f'SizeT="1" Interleaved="true"{_physical(layout)}>'
            f'<Channel ID="Channel:0:0" SamplesPerPixel="{samples}"/>{tiff_data}</Pixels></Image>'
            f'<Image ID="Image:1" Name="thumbnail"><Pixels ID="Pixels:1" DimensionOrder="XYCZT" '
            f'Type="{pixels_type}" SizeX="{thumb_x}" SizeY="{thumb_y}" SizeC="{samples}" '
            f'SizeZ="1" SizeT="1" Interleaved="true"><Channel ID="Channel:1:0" '
            f'SamplesPerPixel="{samples}"/><TiffData IFD="0" PlaneCount="1"/></Pixels></Image>')
    rgb = samples == 3 and layout.dtype == "uint8"
    tifffile.imwrite(path, thumbnail, photometric="rgb" if rgb else "minisblack",
                     description=_ome_xml(master_uuid, body), metadata=None,
                     compression="zlib")


# -- the parallel writer --------------------------------------------------------------------------
class PyramidOutput:
    """A pyramidal OME-Zarr or OME-TIFF stack written by every rank of ``world``.

    Use: every rank calls :meth:`write_tile` for the tiles of the sections it
    owns, then :meth:`finish` with those sections (collective). If anything fails,
    :meth:`abort` (collective-free) removes what was staged; ``path`` is only
    created by the final rename.
    """

    def __init__(self, world, path, layout: PyramidLayout, compression: str = "zlib",
                 overwrite: bool = False, name: str = "volume"):
        self.world = world
        self.path = Path(path)
        self.layout = layout
        self.compression = compression
        self.overwrite = overwrite
        self.tiff = not is_zarr_path(self.path)
        self.parts = self.path.with_name(self.path.name + ".parts")

        def prepare():
            check_output_free(self.path, overwrite)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            staging = partial_name(self.parts if self.tiff else self.path)
            if self.tiff:
                staging.mkdir()
                store = staging / "scratch.zarr"
            else:
                store = staging
            create_ome_zarr(store, layout, name)
            uuids = [f"urn:uuid:{uuid.uuid4()}" for _ in range(layout.shape[0] + 1)]
            return str(staging), str(store), uuids

        staging, store, self.uuids = world.agree(prepare)
        self.staging, self.store_path = Path(staging), Path(store)
        self.stack = ZarrStack(self.store_path, layout)

    def file_name(self, z: int) -> str:
        """Name of section ``z``'s OME-TIFF relative to the master's folder."""
        return f"{self.parts.name}/z{z:04d}.ome.tif"

    def write_tile(self, z: int, rows: slice, columns: slice, tile: np.ndarray) -> None:
        """Write a ``(c, y, x)`` level-0 tile of section ``z``."""
        self.stack.write_tile(z, rows, columns, tile)

    def finish(self, sections) -> None:
        """Build the levels of this rank's ``sections``, write their files and publish."""
        def own_part():
            for z in sections:
                self.stack.build_levels(z)
                if self.tiff:
                    write_section_tiff(self.staging / f"z{z:04d}.ome.tif", self.stack, z,
                                       self.compression, self.uuids[z], self.uuids[-1],
                                       self.path.name)

        try:
            self.world.agree_all(own_part)
            self.world.agree(self._publish)
        except BaseException:
            self.abort()
            raise

    def _publish(self) -> None:
        if not self.tiff:
            publish((self.staging, self.path))
            return
        nz = self.layout.shape[0]
        coarsest = len(self.layout.levels) - 1
        ny, nx = self.layout.levels[coarsest]
        thumbnail = np.moveaxis(self.stack.read_tile(coarsest, nz // 2, slice(0, ny),
                                                     slice(0, nx)), 0, -1)
        shutil.rmtree(self.store_path)
        master = partial_name(self.path)
        write_master_tiff(master, self.layout, [self.file_name(z) for z in range(nz)],
                          self.uuids[:-1], self.uuids[-1], np.ascontiguousarray(thumbnail))
        try:
            publish((self.staging, self.parts, False), (master, self.path))
        except BaseException:
            master.unlink(missing_ok=True)
            raise

    def abort(self) -> None:
        """Remove what was staged (rank 0)."""
        if self.world.rank == 0:
            shutil.rmtree(self.staging, ignore_errors=True)


def tile_write_bytes(layout: PyramidLayout) -> int:
    """Peak bytes one rank uses to write a level-0 tile or build a coarser one."""
    itemsize = np.dtype(layout.dtype).itemsize
    tile_pixels = layout.tile * layout.tile
    # a (2 tile)^2 source block, its float32 mean, the encoded chunk (about a tile)
    return layout.channels * tile_pixels * (4 * itemsize + 4 + 2 * itemsize)
