"""TOF timing calibration: each crystal's time offset and, optionally, its timing resolution.

A crystal whose clock runs ``delta_ps`` late shifts the TOF position of every coincidence it
takes part in. For a LOR from crystal ``a`` (its ``xstart``) to crystal ``b`` the measured
position lies ``c / 2 (delta_a - delta_b)`` beyond the true one (towards ``b``), and with
per-crystal coincidence timing resolutions ``r`` (FWHM against a partner like itself) the LOR's
resolution is ``sqrt((r_a^2 + r_b^2) / 2)``. The system model takes both as the LOR's TOF kernel
(:class:`~medhpc.pet.projector.LorTofKernels`).

File (HDF5): ``crystal_time_offset_ps`` of shape ``(rings, crystals_per_ring)`` (crystal IDs
``ring * crystals_per_ring + crystal``, see :func:`~medhpc.pet.scanner.crystal_ids`) and,
optionally, ``crystal_time_resolution_ps`` of the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from medhpc.errors import InputError
from medhpc.io.hdf5 import open_hdf5
from medhpc.pet.projector import LorTofKernels
from medhpc.pet.scanner import (FWHM_PER_SIGMA, SPEED_OF_LIGHT_MM_PER_PS, ScannerGeometry,
                                crystal_ids, plane_members, sinogram_crystals)

OFFSET_DATASET = "crystal_time_offset_ps"
RESOLUTION_DATASET = "crystal_time_resolution_ps"
#: TOF position shift per ps of time difference (half the speed of light).
MM_PER_PS = 0.5 * SPEED_OF_LIGHT_MM_PER_PS
#: Offsets beyond this (ns) are not a timing calibration (wrong unit or data).
LARGEST_OFFSET_PS = 10_000.0


@dataclass(frozen=True)
class TimingCalibration:
    """Per-crystal time offsets and resolutions (ps), flat in crystal-ID order.

    ``resolution_ps`` is None where the file gives none: every LOR then has the scanner's.
    """

    path: Path
    offset_ps: np.ndarray
    resolution_ps: np.ndarray | None
    scanner_resolution_ps: float

    def fingerprint(self) -> dict:
        """What the file adds to a checkpoint's or sensitivity cache's fingerprint."""
        status = self.path.stat()
        return {"tof_calibration": [str(self.path.resolve()), status.st_size,
                                    status.st_mtime_ns]}

    def pair_kernels(self, crystal1, crystal2) -> LorTofKernels:
        """TOF kernels of the LORs from crystal IDs ``crystal1`` to ``crystal2``."""
        crystal1 = np.asarray(crystal1, np.int64).reshape(-1)
        crystal2 = np.asarray(crystal2, np.int64).reshape(-1)
        if crystal1.size == 0:
            return LorTofKernels.uniform(MM_PER_PS * self.scanner_resolution_ps / FWHM_PER_SIGMA)
        offset_mm = MM_PER_PS * (self.offset_ps[crystal1] - self.offset_ps[crystal2])
        if self.resolution_ps is None:
            resolution = np.full(crystal1.shape, self.scanner_resolution_ps)
        else:
            resolution = np.sqrt(0.5 * (self.resolution_ps[crystal1] ** 2
                                        + self.resolution_ps[crystal2] ** 2))
        return LorTofKernels(MM_PER_PS * resolution / FWHM_PER_SIGMA, offset_mm)


def read_timing_calibration(path, scanner: ScannerGeometry, tof: bool = True
                            ) -> TimingCalibration:
    """Read and check a timing calibration for ``scanner``'s data (``tof``: the data have TOF
    bins); one :class:`InputError` line."""
    path = Path(path)
    if scanner.tof_bins <= 0 or not tof:
        raise InputError(f"{path}: a TOF timing calibration, but the data (scanner "
                         f"{scanner.name!r}) have no TOF; expected TOF data")
    shape = (scanner.rings, scanner.crystals_per_ring)
    with open_hdf5(path) as h5:
        offset = _crystal_values(h5, path, OFFSET_DATASET, shape, required=True)
        resolution = _crystal_values(h5, path, RESOLUTION_DATASET, shape, required=False)
    if np.abs(offset).max() > LARGEST_OFFSET_PS:
        raise InputError(f"{path}:{OFFSET_DATASET}: offsets up to {np.abs(offset).max():g} ps; "
                         f"expected picoseconds within +-{LARGEST_OFFSET_PS:g}")
    if resolution is not None and not np.all(resolution > 0):
        raise InputError(f"{path}:{RESOLUTION_DATASET}: values <= 0; expected each crystal's "
                         f"coincidence timing resolution (FWHM, ps) > 0")
    return TimingCalibration(path, offset, resolution, float(scanner.tof_resolution_ps))


def _crystal_values(h5, path, name, shape, required):
    data = h5.get(name)
    if data is None:
        if required:
            raise InputError(f"{path}: no dataset {name!r}; expected each crystal's time "
                             f"offset in ps, shape (rings, crystals per ring) = {shape}")
        return None
    if not isinstance(data, h5py.Dataset) or data.shape != shape:
        found = data.shape if isinstance(data, h5py.Dataset) else "a group"
        raise InputError(f"{path}:{name}: shape {found}; expected (rings, crystals per ring) "
                         f"= {shape} of the scanner")
    values = np.asarray(data[()], np.float64).reshape(-1)
    if not np.all(np.isfinite(values)):
        raise InputError(f"{path}:{name}: non-finite values; expected finite picoseconds")
    return values


def write_timing_calibration(path, offset_ps, resolution_ps=None) -> None:
    """Write a timing calibration file: ``(rings, crystals_per_ring)`` arrays in ps."""
    with h5py.File(path, "w") as h5:
        h5.create_dataset(OFFSET_DATASET, data=np.asarray(offset_ps, np.float32))
        if resolution_ps is not None:
            h5.create_dataset(RESOLUTION_DATASET, data=np.asarray(resolution_ps, np.float32))


def sinogram_kernels(calibration: TimingCalibration | None, scanner: ScannerGeometry,
                     views=None, planes=None) -> LorTofKernels | None:
    """The TOF kernels of a sinogram block's LORs, in the order of
    :func:`~medhpc.pet.scanner.lor_endpoints` (radial, view, ring pair); None without a
    calibration."""
    if calibration is None:
        return None
    start_crystal, end_crystal = sinogram_crystals(scanner, views)
    pairs = plane_members(scanner, planes)[0]
    crystal1 = crystal_ids(scanner, start_crystal[:, :, None], pairs[None, None, :, 0])
    crystal2 = crystal_ids(scanner, end_crystal[:, :, None], pairs[None, None, :, 1])
    return calibration.pair_kernels(crystal1, crystal2)
