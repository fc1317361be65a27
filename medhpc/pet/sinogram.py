"""The sinogram file: measured counts with everything needed to reconstruct them.

One HDF5 file holds:

- ``prompts``: float32, radial x view x plane (x TOF bin) (x frame);
- ``multiplicative``: float32, radial x view x plane: attenuation x normalisation;
- ``additive``: float32, the shape of ``prompts``: randoms + scatter (expected counts);
- ``attenuation`` and ``normalisation`` (optional, radial x view x plane): the factors
  of ``multiplicative``, kept for inspection;
- attributes: ``format = "medhpc-sinogram"``, ``version``, the scanner (``scanner/*``),
  the image grid (``image/*``: shape and affine) and ``frames``.

Chunks are blocks of whole radial rows over a few views and planes, so that the
ranks' reads (a block of views, or of planes) touch only their own chunks.

A STIR projection-data header (``.hs``, :mod:`medhpc.pet.interchange`) is read in
place of a sinogram file: its values are the prompts, the multiplicative factor is 1
where STIR stores a bin (0 elsewhere), the additive term 0, the image grid the
scanner's default; corrections come from pet-recon's ``--norm``, ``--mu-map``,
``--randoms`` and ``--scatter``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from medhpc.errors import InputError
from medhpc.io.atomic import atomic_path
from medhpc.io.geometry import ImageGeometry
from medhpc.pet import interchange
from medhpc.pet.scanner import (ScannerGeometry, default_image_grid, scanner_from_dict,
                                scanner_to_dict)

FORMAT = "medhpc-sinogram"
VERSION = 1


def sinogram_chunks(shape: tuple[int, ...], has_frames: bool) -> tuple[int, ...]:
    """Chunk shape: all radial bins, 8 views, up to 16 planes, all TOF bins, one frame."""
    chunks = [shape[0], min(shape[1], 8), min(shape[2], 16)] + list(shape[3:])
    if has_frames:
        chunks[-1] = 1
    return tuple(chunks)


@dataclass(frozen=True)
class SinogramLayout:
    """What a sinogram file holds, read without its data."""

    path: Path
    scanner: ScannerGeometry
    image: ImageGeometry
    frames: int
    tof: bool
    kind: str = "medhpc"
    stir: interchange.StirLayout | None = None

    @property
    def prompts_shape(self) -> tuple[int, ...]:
        """Shape of ``prompts`` (and ``additive``)."""
        shape = tuple(self.scanner.sinogram_shape[:3])
        shape += (self.scanner.tof_bins,) if self.tof else ()
        return shape + ((self.frames,) if self.frames > 1 else ())

    @property
    def tof_bins(self) -> int:
        """TOF bins per LOR (1 without TOF)."""
        return self.scanner.tof_bins if self.tof else 1


def write_sinogram(path, scanner: ScannerGeometry, image: ImageGeometry, prompts: np.ndarray,
                   multiplicative: np.ndarray, additive: np.ndarray, tof: bool = False,
                   frames: int = 1, overwrite: bool = False, factors: dict | None = None,
                   attrs: dict | None = None) -> None:
    """Write a sinogram file atomically (see the module notes for the layout)."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs["format"] = FORMAT
            h5.attrs["version"] = VERSION
            h5.attrs["frames"] = frames
            h5.attrs["tof"] = bool(tof)
            h5.attrs["scanner"] = json.dumps(scanner_to_dict(scanner))
            h5.attrs["image_shape"] = np.asarray(image.shape, dtype=np.int64)
            h5.attrs["image_affine"] = np.asarray(image.affine, dtype=np.float64)
            for key, value in (attrs or {}).items():
                h5.attrs[key] = value
            arrays = {"prompts": prompts, "multiplicative": multiplicative, "additive": additive}
            arrays.update(factors or {})
            for name, array in arrays.items():
                array = np.asarray(array, dtype=np.float32)
                chunks = sinogram_chunks(array.shape, frames > 1 and array.ndim > 3)
                h5.create_dataset(name, data=array, chunks=chunks,
                                  compression="gzip", compression_opts=1, shuffle=True)


def read_layout(path) -> SinogramLayout:
    """Read and validate a sinogram file's description (no data).

    Raises :class:`InputError` naming the file when it is missing, not a medhpc
    sinogram, lacks a dataset, or its shapes do not match its scanner.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: sinogram file not found")
    if interchange.is_stir_path(path):
        stir = interchange.read_stir_layout(path)
        shape, voxel = default_image_grid(stir.scanner)
        return SinogramLayout(path=path, scanner=stir.scanner,
                              image=ImageGeometry.from_spacing(shape, voxel), frames=1, tof=False,
                              kind="stir", stir=stir)
    if interchange.is_castor_path(path):
        raise InputError(f"{path}: a CASToR header; convert a histogram with 'medhpc "
                         f"pet-convert {path} sinogram.h5 --scanner S', or give list-mode data "
                         f"to --listmode")
    try:
        h5 = h5py.File(path, "r")
    except OSError:
        raise InputError(f"{path}: not an HDF5 file; expected a sinogram written by "
                         f"'medhpc pet-simulate' or in its layout") from None
    with h5:
        if h5.attrs.get("format") != FORMAT:
            raise InputError(f"{path}: not a medhpc sinogram (attribute format is "
                             f"{h5.attrs.get('format')!r}, expected {FORMAT!r})")
        scanner = scanner_from_dict(json.loads(h5.attrs["scanner"]), source=str(path))
        image = ImageGeometry(shape=tuple(int(n) for n in h5.attrs["image_shape"]),
                              affine=np.asarray(h5.attrs["image_affine"]))
        layout = SinogramLayout(path=path, scanner=scanner, image=image,
                                frames=int(h5.attrs.get("frames", 1)),
                                tof=bool(h5.attrs.get("tof", False)))
        for name in ("prompts", "multiplicative", "additive"):
            if name not in h5:
                raise InputError(f"{path}: dataset '{name}' is missing; a sinogram needs "
                                 f"prompts, multiplicative and additive")
        expected = {"prompts": layout.prompts_shape, "additive": layout.prompts_shape,
                    "multiplicative": tuple(scanner.sinogram_shape[:3])}
        for name, shape in expected.items():
            if tuple(h5[name].shape) != shape:
                raise InputError(f"{path}: '{name}' has shape {tuple(h5[name].shape)}, but the "
                                 f"scanner '{scanner.name}' needs {shape} (radial x view x plane"
                                 f"{' x TOF' if layout.tof else ''}{' x frame' if layout.frames > 1 else ''})")
    return layout


@dataclass
class SinogramBlock:
    """A rank's share of the measured data, in sinogram order (views and planes chosen)."""

    prompts: np.ndarray
    multiplicative: np.ndarray
    additive: np.ndarray


def read_block(layout: SinogramLayout, views=None, planes=None, frame: int | None = None,
               check: bool = True) -> SinogramBlock:
    """Read the prompts, factors and additive term of some views and planes (one frame).

    ``views`` and ``planes`` are increasing index arrays or slices (None: all).
    With ``check``, negative or non-finite values raise :class:`InputError`.
    """
    views = slice(None) if views is None else views
    planes = slice(None) if planes is None else planes
    if layout.kind == "stir":
        arrays = _stir_block(layout, views, planes)
    else:
        arrays = _medhpc_block(layout, views, planes, frame)
    if check:
        for name, array in arrays.items():
            bad = ~np.isfinite(array)
            if bad.any():
                raise InputError(f"{layout.path}: '{name}' has {int(bad.sum())} NaN/Inf values; "
                                 f"expected finite numbers")
            if (array < 0).any():
                raise InputError(f"{layout.path}: '{name}' has {int((array < 0).sum())} negative "
                                 f"values; expected counts and factors >= 0")
    return SinogramBlock(**arrays)


def _stir_block(layout: SinogramLayout, views, planes) -> dict:
    index = interchange.stir_bin_index(layout.stir, layout.scanner,
                                       _as_index(views, layout.scanner.n_views),
                                       _as_index(planes, layout.scanner.n_planes))
    return {"prompts": interchange.read_stir_values(layout.stir, index),
            "multiplicative": (index >= 0).astype(np.float32),
            "additive": np.zeros(index.shape, np.float32)}


def _medhpc_block(layout: SinogramLayout, views, planes, frame) -> dict:
    with h5py.File(layout.path, "r") as h5:
        arrays = {}
        for name in ("prompts", "multiplicative", "additive"):
            dataset = h5[name]
            block = _read_views_planes(dataset, views, planes)
            if name != "multiplicative" and layout.frames > 1:
                block = block[..., frame if frame is not None else 0]
            arrays[name] = np.ascontiguousarray(block, dtype=np.float32)
    return arrays


def read_stored_factor(layout: SinogramLayout, name: str, views=None, planes=None):
    """The file's ``attenuation`` or ``normalisation`` at some views and planes (float32),
    None when it holds none (STIR data never do)."""
    if layout.kind != "medhpc":
        return None
    views = slice(None) if views is None else views
    planes = slice(None) if planes is None else planes
    with h5py.File(layout.path, "r") as h5:
        if name not in h5:
            return None
        return np.ascontiguousarray(_read_views_planes(h5[name], views, planes), np.float32)


def _read_views_planes(dataset, views, planes) -> np.ndarray:
    """Read some views and planes, one chunk-wide window of planes at a time.

    Views are read as their covering range and picked in memory (h5py reads long
    point lists slowly); windows without a wanted plane are skipped, so memory
    stays bounded by the window and only the needed chunks are decompressed.
    """
    views = _as_index(views, dataset.shape[1])
    planes = _as_index(planes, dataset.shape[2])
    if views.size == 0 or planes.size == 0:
        return np.zeros((dataset.shape[0], views.size, planes.size) + dataset.shape[3:],
                        dtype=np.float32)
    view_lo, view_hi = int(views.min()), int(views.max()) + 1
    out = np.empty((dataset.shape[0], views.size, planes.size) + dataset.shape[3:], np.float32)
    window = dataset.chunks[2] if dataset.chunks else 16
    for first in range(int(planes.min()) // window * window, int(planes.max()) + 1, window):
        inside = np.flatnonzero((planes >= first) & (planes < first + window))
        if inside.size == 0:
            continue
        stop = int(planes[inside].max()) + 1
        block = dataset[:, view_lo:view_hi, first:stop]
        out[:, :, inside] = block[:, views - view_lo][:, :, planes[inside] - first]
    return out


def _as_index(selection, n: int) -> np.ndarray:
    if isinstance(selection, slice):
        return np.arange(n, dtype=np.int64)[selection]
    return np.asarray(selection, dtype=np.int64)
