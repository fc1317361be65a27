"""Corrections given to pet-recon as separate files, in place of those in the sinogram file.

- ``--mu-map IMAGE``: linear attenuation (1/mm) on any axis-aligned grid, in any image
  format; the attenuation factor of a LOR is ``exp(-line integral)``.
- ``--norm``, ``--randoms``, ``--scatter``: sinograms (HDF5 ``file.h5`` with one dataset,
  or ``file.h5:/dataset``) of the data's shape: radial x view x plane for ``--norm``
  (efficiencies, multiplying), radial x view x plane [x TOF] for the expected randoms and
  scatter counts. Or STIR sinograms (``.hs``) of the same scanner: ``--norm`` then holds
  STIR's normalisation correction factors, whose reciprocals are the efficiencies.

The multiplicative term becomes normalisation x attenuation, each from its file or, when
not given, from the sinogram file's ``normalisation`` / ``attenuation`` datasets (1 when
absent). ``--randoms`` replaces the stored additive term; ``--scatter`` is added to it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import h5py
import numpy as np

from medhpc.errors import InputError
from medhpc.io.images import check_nonnegative, read_image, split_dataset
from medhpc.pet.projector import JosephProjector, axis_aligned_grid
from medhpc.pet.scanner import lor_endpoints, mean_over_members, plane_members
from medhpc.pet import interchange
from medhpc.pet.sinogram import SinogramBlock, _as_index, _read_views_planes, read_stored_factor


@dataclass(frozen=True)
class CorrectionFiles:
    """What the command line gave (None: keep the sinogram file's)."""

    mu_map: str | None = None
    norm: str | None = None
    randoms: str | None = None
    scatter: str | None = None

    @property
    def any(self) -> bool:
        """Whether any correction replaces the sinogram file's."""
        return any(value is not None for value in (self.mu_map, self.norm, self.randoms,
                                                   self.scatter))


@dataclass
class Corrections:
    """Checked correction inputs, ready to apply to blocks of the sinogram."""

    files: CorrectionFiles
    datasets: dict  # option name -> (path, dataset name)
    mu_map: np.ndarray | None = None
    mu_origin_mm: np.ndarray | None = None
    mu_voxel_mm: np.ndarray | None = None
    mu_shape: tuple | None = None


def _sinogram_dataset(option: str, value: str, expected: tuple, layout):
    """``(path, dataset name)`` of an HDF5 sinogram, or ``(path, StirLayout)`` of a STIR
    one, checked against the data's shape."""
    if interchange.is_stir_path(value):
        stir = interchange.read_stir_layout(value)
        if len(expected) == 4:
            raise InputError(f"{value}: {option} for TOF data needs TOF bins; STIR TOF "
                             f"sinograms are not read (give file.h5:/dataset)")
        interchange.check_stir_scanner(stir, layout.scanner, option)
        return stir.path, stir
    path, name = split_dataset(value, "")
    if not path.is_file():
        raise InputError(f"{path}: {option} file not found")
    try:
        h5 = h5py.File(path, "r")
    except OSError:
        raise InputError(f"{path}: {option} is not an HDF5 file; expected a sinogram "
                         f"dataset (file.h5 or file.h5:/dataset) or a STIR sinogram "
                         f"(.hs)") from None
    with h5:
        if not name:
            names = [key for key in h5 if isinstance(h5[key], h5py.Dataset)]
            if len(names) != 1:
                raise InputError(f"{path}: {option} holds {len(names)} datasets; name one as "
                                 f"{path}:/dataset")
            name = names[0]
        if name not in h5 or not isinstance(h5[name], h5py.Dataset):
            raise InputError(f"{path}: {option} has no dataset '{name}'")
        shape = tuple(h5[name].shape)
    if shape != expected:
        raise InputError(f"{path}:{name}: {option} has shape {shape}, but the sinogram of "
                         f"scanner '{layout.scanner.name}' needs {expected} (radial x view x "
                         f"plane{' x TOF' if len(expected) == 4 else ''})")
    return path, name


def check_corrections(files: CorrectionFiles, layout) -> Corrections | None:
    """Read and check the correction files against the sinogram's layout (rank 0)."""
    if not files.any:
        return None
    lors_shape = tuple(layout.scanner.sinogram_shape[:3])
    counts_shape = lors_shape + ((layout.scanner.tof_bins,) if layout.tof else ())
    datasets = {}
    for option, value, shape in (("--norm", files.norm, lors_shape),
                                 ("--randoms", files.randoms, counts_shape),
                                 ("--scatter", files.scatter, counts_shape)):
        if value is not None:
            datasets[option] = _sinogram_dataset(option, value, shape, layout)
    corrections = Corrections(files=files, datasets=datasets)
    if files.mu_map is not None:
        mu, grid = read_mu_map(files.mu_map)
        origin, voxel = axis_aligned_grid(grid, files.mu_map)
        corrections = replace(corrections, mu_map=mu, mu_origin_mm=origin, mu_voxel_mm=voxel,
                              mu_shape=mu.shape)
    return corrections


def read_mu_map(path):
    """Read and check a linear-attenuation image: ``(mu float32 [z, y, x], grid)``; one
    :class:`InputError` line for negative values or units that are not 1/mm."""
    mu, grid = read_image(path, ndim=(3,))
    check_nonnegative(path, mu, "attenuation coefficients")
    if mu.max() > 1.0:
        raise InputError(f"{path}: mu-map maximum {mu.max():g} looks like 1/cm or HU; "
                         f"expected linear attenuation in 1/mm (water 0.0096)")
    return np.ascontiguousarray(mu, np.float32), grid


def _read(source, views, planes, scanner, reciprocal: bool = False) -> np.ndarray:
    """A correction sinogram's views and planes; STIR correction factors (``reciprocal``)
    become the factors of the forward model, ``1 / value`` (0 where the value is 0)."""
    path, name = source
    if isinstance(name, interchange.StirLayout):
        index = interchange.stir_bin_index(name, scanner, _as_index(views, scanner.n_views),
                                           _as_index(planes, scanner.n_planes))
        block = interchange.read_stir_values(name, index)
        name = "STIR data"
    else:
        with h5py.File(path, "r") as h5:
            block = np.ascontiguousarray(_read_views_planes(h5[name], views, planes), np.float32)
    if not np.all(np.isfinite(block) & (block >= 0)):
        raise InputError(f"{path}:{name}: negative or non-finite values; expected factors and "
                         f"counts >= 0")
    if reciprocal:
        block = np.where(block > 0, 1.0 / np.maximum(block, 1e-30), 0.0).astype(np.float32)
    return block


def corrected_block(corrections: Corrections | None, layout, block: SinogramBlock, views,
                    planes, device: str) -> SinogramBlock:
    """``block`` with the factors the correction files replace (views/planes as read)."""
    if corrections is None:
        return block
    files = corrections.files
    multiplicative = block.multiplicative
    if files.mu_map is not None or files.norm is not None:
        if files.norm is not None:
            source = corrections.datasets["--norm"]
            normalisation = _read(source, views, planes, layout.scanner,
                                  reciprocal=isinstance(source[1], interchange.StirLayout))
        else:
            normalisation = read_stored_factor(layout, "normalisation", views, planes)
        if files.mu_map is not None:
            attenuation = attenuation_factors(corrections, layout.scanner, views, planes, device)
        else:
            attenuation = read_stored_factor(layout, "attenuation", views, planes)
        multiplicative = np.ones(block.multiplicative.shape, np.float32)
        for factor in (normalisation, attenuation):
            if factor is not None:
                multiplicative *= factor
    additive = block.additive
    if files.randoms is not None:
        additive = _read(corrections.datasets["--randoms"], views, planes, layout.scanner)
    if files.scatter is not None:
        additive = additive + _read(corrections.datasets["--scatter"], views, planes,
                                       layout.scanner)
    return SinogramBlock(prompts=block.prompts, multiplicative=multiplicative, additive=additive)


def mu_map_corrections(mu_map: np.ndarray, origin_mm, voxel_mm) -> Corrections:
    """Corrections holding only a mu-map (for :func:`attenuation_factors`)."""
    return Corrections(files=CorrectionFiles(), datasets={}, mu_map=mu_map,
                       mu_origin_mm=origin_mm, mu_voxel_mm=voxel_mm, mu_shape=mu_map.shape)


def attenuation_factors(corrections: Corrections, scanner, views, planes, device) -> np.ndarray:
    """``exp(-line integral of mu)`` of the LORs at ``views`` x ``planes`` (radial x view x
    plane; at span > 1 the mean over each plane's ring pairs)."""
    view_index = None if isinstance(views, slice) else views
    plane_index = None if isinstance(planes, slice) else planes
    xstart, xend = lor_endpoints(scanner, views=view_index, planes=plane_index)
    factors = line_attenuation(corrections, xstart.reshape(-1, 3), xend.reshape(-1, 3),
                               device).reshape(xstart.shape[:3])
    return mean_over_members(factors, plane_members(scanner, plane_index)[1]).astype(np.float32)


def line_attenuation(corrections: Corrections, xstart, xend, device) -> np.ndarray:
    """``exp(-line integral of mu)`` between the (n, 3) end points (float32, (n,))."""
    projector = JosephProjector(xstart, xend, corrections.mu_shape, corrections.mu_origin_mm,
                                corrections.mu_voxel_mm, device=device)
    return np.exp(-projector.forward(corrections.mu_map)).astype(np.float32)


def corrections_fingerprint(corrections: Corrections | None) -> dict:
    """What the correction files add to a checkpoint's or sensitivity cache's fingerprint."""
    if corrections is None:
        return {}
    files = {}
    for option, value in (("mu_map", corrections.files.mu_map), ("norm", corrections.files.norm),
                          ("randoms", corrections.files.randoms),
                          ("scatter", corrections.files.scatter)):
        if value is not None:
            path = split_dataset(value, "")[0].resolve()
            status = path.stat()
            files[option] = [str(value), status.st_size, status.st_mtime_ns]
    return {"corrections": files}
