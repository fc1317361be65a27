"""Serial HDF5 volumes: one dataset per volume, geometry and units as attributes.

Volumes are ``[z, y, x]`` or ``[c_or_t, z, y, x]`` arrays, chunked by whole
z-planes (or slabs of planes) so that a rank reading its slab of planes touches
only its own chunks. Per-rank slab I/O under MPI lives in
:mod:`medhpc.parallel.slabs`; this module is the serial format layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from medhpc.errors import InputError, one_line
from medhpc.io.atomic import atomic_path
from medhpc.io.geometry import ATTR_SHAPE, GEOMETRY_ATTRS, ImageGeometry

TARGET_CHUNK_BYTES = 2 * 2**20
UNITS_ATTR = "units"
VOLUME_NDIMS = (3, 4)
_LISTED_DATASETS = 10


class VolumeInfo(NamedTuple):
    """What :func:`volume_info` learns without reading the data."""

    shape: tuple
    dtype: np.dtype
    geometry: ImageGeometry
    chunks: tuple | None
    attrs: dict


def plane_chunks(shape, itemsize: int) -> tuple:
    """Return a chunk shape of whole z-planes (or slabs of them) near 2 MiB.

    Planes larger than the target are split into bands of whole rows.

    Parameters
    ----------
    shape : tuple of int
        ``(z, y, x)`` or ``(c_or_t, z, y, x)``.
    itemsize : int
        Bytes per voxel.
    """
    *lead, nz, ny, nx = shape
    plane_bytes = ny * nx * itemsize
    if plane_bytes <= TARGET_CHUNK_BYTES:
        chunk = (min(nz, max(1, TARGET_CHUNK_BYTES // plane_bytes)), ny, nx)
    else:
        rows = max(1, TARGET_CHUNK_BYTES // (nx * itemsize))
        chunk = (1, min(ny, rows), nx)
    return (1,) * len(lead) + chunk


def write_volume(path, array, geometry: ImageGeometry, dataset: str = "volume",
                 units: str = "", attrs=None, overwrite: bool = False,
                 chunks="auto", compression="gzip") -> Path:
    """Write a volume with its geometry to a new HDF5 file, atomically.

    Parameters
    ----------
    path : str or Path
        Output file; replaced as a whole when ``overwrite`` is true.
    array : ndarray
        ``[z, y, x]`` or ``[c_or_t, z, y, x]``.
    geometry : ImageGeometry
        Grid of the last three axes.
    dataset : str
        Dataset name; may contain groups (``"recon/activity"``).
    units : str
        Physical unit of the values (``"Bq/mL"``, ``"HU"``, ``"1/mm"``).
    attrs : dict, optional
        Extra attributes stored on the dataset.
    overwrite : bool
        Replace an existing file; otherwise raise ``OutputExistsError``.
    chunks : "auto", tuple or None
        ``"auto"`` chunks by planes (:func:`plane_chunks`); None lets h5py decide.
    compression : str or None
        ``"gzip"`` (with shuffle), ``"lzf"`` or None.

    Returns
    -------
    Path
        The written file.
    """
    array = np.asarray(array)
    if array.ndim not in VOLUME_NDIMS:
        raise ValueError(f"expected a 3-D or 4-D array, got shape {array.shape}")
    if tuple(array.shape[-3:]) != geometry.shape:
        raise ValueError(f"array shape {array.shape} does not end with the geometry's "
                         f"grid {geometry.shape}")
    extra = dict(attrs or {})
    clashes = sorted(set(extra) & set(GEOMETRY_ATTRS + (UNITS_ATTR,)))
    if clashes:
        raise ValueError(f"attrs may not set {clashes}: they come from geometry and units")
    if isinstance(chunks, str) and chunks == "auto":
        chunks = plane_chunks(array.shape, array.dtype.itemsize)
    options = {}
    if compression == "gzip":
        options = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    elif compression is not None:
        options = {"compression": compression}

    path = Path(path)
    with atomic_path(path, overwrite) as tmp:
        with h5py.File(tmp, "w") as h5:
            data = h5.create_dataset(dataset, data=array, chunks=chunks, **options)
            data.attrs.update(extra)
            data.attrs.update(geometry.to_attrs())
            data.attrs[UNITS_ATTR] = units
    return path


def read_volume(path, dataset: str = "volume"):
    """Read a whole volume, its geometry and its other attributes.

    Parameters
    ----------
    path : str or Path
        HDF5 file.
    dataset : str
        Dataset name.

    Returns
    -------
    array : ndarray
        ``[z, y, x]`` or ``[c_or_t, z, y, x]``, in the stored dtype.
    geometry : ImageGeometry
        From the attributes; 1 mm axis-aligned and centred when there are none.
    attrs : dict
        The dataset's other attributes (``units`` included).
    """
    with open_hdf5(path) as h5:
        data = _volume_dataset(h5, path, dataset)
        geometry = _geometry(data, path)
        return _read(data, path, ()), geometry, _user_attrs(data)


def read_planes(path, dataset: str, z_start: int, z_stop: int) -> np.ndarray:
    """Read planes ``[z_start, z_stop)`` only (a hyperslab along z).

    Returns ``[z, y, x]`` for a 3-D dataset and ``[c_or_t, z, y, x]`` for 4-D.
    Use ``geometry.slab(z_start, z_stop)`` for the slab's geometry.
    """
    with open_hdf5(path) as h5:
        data = _volume_dataset(h5, path, dataset)
        nz = data.shape[-3]
        if not 0 <= z_start <= z_stop <= nz:
            raise ValueError(f"{path}: planes [{z_start}, {z_stop}) outside the "
                             f"{nz} planes of '{data.name}'")
        return _read(data, path, (Ellipsis, slice(z_start, z_stop), slice(None), slice(None)))


def volume_info(path, dataset: str = "volume") -> VolumeInfo:
    """Return shape, dtype, geometry, chunks and attributes without reading the data."""
    with open_hdf5(path) as h5:
        data = _volume_dataset(h5, path, dataset)
        return VolumeInfo(tuple(data.shape), data.dtype, _geometry(data, path),
                          data.chunks, _user_attrs(data))


def list_datasets(path) -> list[str]:
    """Return the full names of all datasets in an HDF5 file."""
    with open_hdf5(path) as h5:
        return _dataset_names(h5)


@contextmanager
def open_hdf5(path):
    """Open an input HDF5 file for reading; one :class:`InputError` line when it cannot be."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found; expected an HDF5 file (.h5, .hdf5)")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; expected an HDF5 file (.h5, .hdf5)")
    try:
        if not h5py.is_hdf5(path):
            raise InputError(f"{path}: not an HDF5 file; expected an HDF5 file (.h5, .hdf5)")
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise InputError(f"{path}: cannot be opened ({one_line(error)}); "
                         "expected a readable HDF5 file") from error
    with h5:
        yield h5


def _dataset_names(h5) -> list[str]:
    names = []
    h5.visititems(lambda name, obj: names.append("/" + name)
                  if isinstance(obj, h5py.Dataset) else None)
    return names


def _volume_dataset(h5, path, dataset: str):
    try:
        data = h5.get(dataset)
    except (KeyError, OSError):
        data = None
    if not isinstance(data, h5py.Dataset):
        names = _dataset_names(h5)
        found = "is a group" if isinstance(data, h5py.Group) else "not found"
        if not names:
            listing = "the file has no datasets"
        else:
            listing = "datasets in the file: " + ", ".join(names[:_LISTED_DATASETS])
            if len(names) > _LISTED_DATASETS:
                listing += f" and {len(names) - _LISTED_DATASETS} more"
        raise InputError(f"{path}: dataset '{dataset}' {found}; {listing}")
    if data.ndim not in VOLUME_NDIMS:
        raise InputError(f"{path}: dataset '{data.name}' is {data.ndim}-D of shape "
                         f"{data.shape}; expected a 3-D or 4-D volume")
    return data


def _read(data, path, selection) -> np.ndarray:
    try:
        return data[selection]
    except OSError as error:
        raise InputError(f"{path}: dataset '{data.name}' cannot be read ({one_line(error)}); "
                         "expected an intact HDF5 file") from error


def _geometry(data, path) -> ImageGeometry:
    grid = tuple(data.shape[-3:])
    if ATTR_SHAPE in data.attrs:
        stored = tuple(int(n) for n in np.asarray(data.attrs[ATTR_SHAPE]))
        if stored != grid:
            raise InputError(f"{path}: dataset '{data.name}' has grid {grid} but its "
                             f"{ATTR_SHAPE} attribute says {stored}; expected them to agree")
    try:
        return ImageGeometry.from_attrs(data.attrs, shape=grid)
    except (ValueError, TypeError) as error:
        raise InputError(f"{path}: dataset '{data.name}' has invalid geometry attributes "
                         f"({one_line(error)}); expected a 4x4 affine") from error


def _user_attrs(data) -> dict:
    attrs = {}
    for name, value in data.attrs.items():
        if name in GEOMETRY_ATTRS:
            continue
        attrs[name] = value.decode() if isinstance(value, bytes) else value
    return attrs
