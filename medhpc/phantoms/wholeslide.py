"""Synthetic whole-slide stacks (pyramidal JPEG OME-TIFF or SVS-like TIFF), written tile by tile.

Every pixel is a function of its position, so any tile of any level is made on
its own and a 40k x 40k slide is written in the memory of a few tiles. Tissue
is an elliptical outline holding a smooth coarse structure (a bilinear
interpolation of a small random field, different in every section by a small
part) and a fine periodic texture; each section is shifted by a few pixels.
Colours follow a hematoxylin/eosin absorption model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

_HEMATOXYLIN = np.array([0.65, 0.70, 0.29], np.float32)
_EOSIN = np.array([0.07, 0.99, 0.11], np.float32)
_PERIOD = 1024
_COARSE = 64


@dataclass(frozen=True)
class SlideStackSettings:
    """A synthetic stack of slides.

    Attributes
    ----------
    sections, size : int
        Number of slides and their level-0 side (px).
    tile : int
        TIFF tile side.
    kind : str
        ``"ome"`` (OME-TIFF, levels as SubIFDs, halving) or ``"svs"`` (Aperio layout:
        baseline, thumbnail, levels every 4x, MPP in the description).
    pixel_size_um : float
    compression : str
        tifffile compression name (``"jpeg"``, ``"zlib"``, ``"lzw"``).
    shift_px : float
        Largest random shift of a section at level 0.
    seed : int
    """

    sections: int = 3
    size: int = 1024
    tile: int = 256
    kind: str = "ome"
    pixel_size_um: float = 0.5
    compression: str = "jpeg"
    shift_px: float = 6.0
    seed: int = 0


class _Texture:
    def __init__(self, settings: SlideStackSettings):
        rng = np.random.default_rng(settings.seed)
        fine = rng.standard_normal((_PERIOD, _PERIOD)).astype(np.float32)
        fine = ndimage.gaussian_filter(fine, 1.5, mode="wrap")
        fine /= fine.std()
        self.fine = [fine]
        while self.fine[-1].shape[0] > 8:
            f = self.fine[-1]
            self.fine.append(f.reshape(f.shape[0] // 2, 2, f.shape[1] // 2, 2).mean(axis=(1, 3)))
        coarse = ndimage.gaussian_filter(rng.standard_normal((_COARSE, _COARSE)), 1.2)
        self.coarse = []
        self.shifts = []
        for _ in range(settings.sections):
            own = ndimage.gaussian_filter(rng.standard_normal((_COARSE, _COARSE)), 1.2)
            field = coarse + 0.2 * own
            self.coarse.append(((field - field.mean()) / field.std()).astype(np.float32))
            self.shifts.append(rng.uniform(-settings.shift_px, settings.shift_px, 2))
        self.settings = settings

    def tile(self, section: int, level_downsample: int, rows: slice, columns: slice):
        """RGB uint8 pixels ``[rows, columns]`` of a level ``level_downsample`` times coarser."""
        s = self.settings
        d = level_downsample
        dy, dx = self.shifts[section]
        y = (np.arange(rows.start, rows.stop, dtype=np.float32) + 0.5) * d - 0.5 - dy
        x = (np.arange(columns.start, columns.stop, dtype=np.float32) + 0.5) * d - 0.5 - dx
        size = float(s.size)
        cy = np.clip(y / size * (_COARSE - 1), 0, _COARSE - 1.001)
        cx = np.clip(x / size * (_COARSE - 1), 0, _COARSE - 1.001)
        iy, ix = cy.astype(np.int64), cx.astype(np.int64)
        fy, fx = (cy - iy)[:, None], (cx - ix)[None, :]
        field = self.coarse[section]
        coarse = ((1 - fy) * ((1 - fx) * field[np.ix_(iy, ix)] + fx * field[np.ix_(iy, ix + 1)])
                  + fy * ((1 - fx) * field[np.ix_(iy + 1, ix)] + fx * field[np.ix_(iy + 1, ix + 1)]))
        level = min(int(np.log2(d)), len(self.fine) - 1)
        fine = self.fine[level]
        period = fine.shape[0]
        fine_rows = np.floor(y / (2 ** level)).astype(np.int64) % period
        fine_cols = np.floor(x / (2 ** level)).astype(np.int64) % period
        texture = fine[np.ix_(fine_rows, fine_cols)]
        radius = ((y[:, None] - size / 2) / (0.42 * size)) ** 2 + \
                 ((x[None, :] - size / 2) / (0.38 * size)) ** 2
        tissue = (radius < 1.0).astype(np.float32)
        hematoxylin = tissue * np.clip(0.45 + 0.25 * coarse + 0.12 * texture, 0.02, 1.5)
        eosin = tissue * np.clip(0.35 - 0.1 * coarse + 0.05 * texture, 0.02, 1.0)
        density = hematoxylin[..., None] * _HEMATOXYLIN + eosin[..., None] * _EOSIN
        return (255.0 * np.exp(-density * np.log(10.0))).clip(0, 255).astype(np.uint8)


def _tiles(texture: _Texture, section: int, shape, downsample: int, tile: int):
    ny, nx = shape
    for top in range(0, ny, tile):
        for left in range(0, nx, tile):
            yield texture.tile(section, downsample, slice(top, min(ny, top + tile)),
                               slice(left, min(nx, left + tile)))


def write_slide_stack(folder, settings: SlideStackSettings) -> list[Path]:
    """Write ``settings.sections`` slides into ``folder``; return their paths."""
    import tifffile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texture = _Texture(settings)
    s = settings
    resolution = (1e4 / s.pixel_size_um, 1e4 / s.pixel_size_um)
    options = {"photometric": "rgb", "compression": s.compression, "tile": (s.tile, s.tile),
               "dtype": np.uint8}
    paths = []
    for section in range(s.sections):
        if s.kind == "ome":
            path = folder / f"section_{section:03d}.ome.tif"
            downsamples = [1]
            while s.size // downsamples[-1] > s.tile:
                downsamples.append(2 * downsamples[-1])
        else:
            path = folder / f"section_{section:03d}.svs"
            downsamples = [1]
            while s.size // downsamples[-1] > 2 * s.tile:
                downsamples.append(4 * downsamples[-1])
        shapes = [(-(-s.size // d), -(-s.size // d)) for d in downsamples]
        with tifffile.TiffWriter(path, bigtiff=s.size > 16384) as writer:
            if s.kind == "ome":
                writer.write(_tiles(texture, section, shapes[0], 1, s.tile), shape=shapes[0] + (3,),
                             subifds=len(shapes) - 1, resolution=resolution,
                             resolutionunit="CENTIMETER",
                             metadata={"axes": "YXS", "PhysicalSizeX": s.pixel_size_um,
                                       "PhysicalSizeY": s.pixel_size_um}, **options)
                for d, shape in zip(downsamples[1:], shapes[1:]):
                    writer.write(_tiles(texture, section, shape, d, s.tile), shape=shape + (3,),
                                 subfiletype=1, metadata=None,
                                 resolution=(resolution[0] / d, resolution[1] / d),
                                 resolutionunit="CENTIMETER", **options)
            else:
                head = (f"Aperio Image Library medhpc\r\n{s.size}x{s.size} [0,0 {s.size}x{s.size}]"
                        f" ({s.tile}x{s.tile}) JPEG/RGB Q=90|AppMag = 20|MPP = {s.pixel_size_um}")
                writer.write(_tiles(texture, section, shapes[0], 1, s.tile), shape=shapes[0] + (3,),
                             description=head, metadata=None, **options)
                thumb = max(1, s.size // 256)
                thumb_shape = (-(-s.size // thumb),) * 2
                writer.write(texture.tile(section, thumb, slice(0, thumb_shape[0]),
                                          slice(0, thumb_shape[1])), photometric="rgb",
                             compression=s.compression, description="Aperio Image Library "
                             "thumbnail", metadata=None)
                for d, shape in zip(downsamples[1:], shapes[1:]):
                    writer.write(_tiles(texture, section, shape, d, s.tile), shape=shape + (3,),
                                 description=f"Aperio Image Library {shape[1]}x{shape[0]} -> "
                                             f"level", metadata=None, **options)
        paths.append(path)
    return paths
