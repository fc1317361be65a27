"""Volumes split into z-slabs across ranks: allocation, halo exchange, scatter/gather, HDF5.

A volume is ``(z, y, x)`` or, with channels first, ``(c, z, y, x)``; the z axis
is axis 0 or 1 accordingly (:func:`z_axis_of`). Each rank holds its owned
planes plus ``halo`` ghost planes on both sides (see :class:`~medhpc.parallel.geometry.Slab`).
Every rank must own at least ``max(1, halo)`` planes; otherwise the functions
raise :class:`~medhpc.errors.InputError` on every rank.

Boundary conditions fill the halos at the volume ends: ``"zero"``,
``"replicate"`` (copy of the edge plane) or ``"periodic"`` (planes from the
other end).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medhpc.errors import InputError
from medhpc.parallel import device
from medhpc.parallel.comm import World
from medhpc.parallel.geometry import Slab, block_ranges, check_slab_split, neighbours, slab

BOUNDARIES = ("zero", "replicate", "periodic")

_TAG_UP = 4101
_TAG_DOWN = 4102


def z_axis_of(ndim: int) -> int:
    """Return the z axis of a ``(z, y, x)`` (0) or ``(c, z, y, x)`` (1) array."""
    if ndim == 3:
        return 0
    if ndim == 4:
        return 1
    raise ValueError(f"expected a (z, y, x) or (c, z, y, x) array, got {ndim} dimensions")


def _check_boundary(boundary: str) -> None:
    if boundary not in BOUNDARIES:
        raise ValueError(f"boundary {boundary!r}: expected one of {', '.join(BOUNDARIES)}")


def _local_shape(global_shape: Sequence[int], slab_: Slab) -> tuple[int, ...]:
    shape = list(global_shape)
    shape[z_axis_of(len(shape))] = slab_.local_nz
    return tuple(shape)


def allocate_slab(world: World, global_shape: Sequence[int], halo: int = 0,
                  dtype=np.float32) -> tuple[np.ndarray, Slab]:
    """Allocate this rank's zeroed slab of a volume of ``global_shape``.

    Parameters
    ----------
    world : World
    global_shape : sequence of int
        ``(nz, ny, nx)`` or ``(c, nz, ny, nx)``.
    halo : int
        Ghost planes on each side.
    dtype : numpy dtype

    Returns
    -------
    local : numpy.ndarray
        Shape of ``global_shape`` with z replaced by ``owned + 2 * halo``.
    slab : Slab
    """
    nz = global_shape[z_axis_of(len(global_shape))]
    check_slab_split(nz, world.size, halo)
    slab_ = slab(nz, world.size, world.rank, halo)
    return np.zeros(_local_shape(global_shape, slab_), dtype=dtype), slab_


# -- plane access for host and device arrays ---------------------------------------------------
def _planes_index(z_axis: int, start: int, stop: int) -> tuple:
    return (slice(None),) * z_axis + (slice(start, stop),)


def _blocks(local, z_axis: int, start: int, stop: int) -> list:
    """Views of planes ``[start, stop)`` of ``local`` that are contiguous for C-ordered arrays.

    One view, except for ``(c, z, y, x)`` device arrays: one per channel.
    """
    if z_axis == 0 or not device.is_device_array(local):
        return [local[_planes_index(z_axis, start, stop)]]
    return [local[c, start:stop] for c in range(local.shape[0])]


def _with_planes(local, z_axis: int, planes: int) -> tuple[int, ...]:
    shape = list(local.shape)
    shape[z_axis] = planes
    return tuple(shape)


def _read_planes(local, z_axis: int, start: int, stop: int) -> np.ndarray:
    """Host copy of planes ``[start, stop)`` of a host or device array."""
    if not device.is_device_array(local):
        return np.array(local[_planes_index(z_axis, start, stop)])
    parts = [block.copy_to_host() for block in _blocks(local, z_axis, start, stop)]
    return parts[0] if z_axis == 0 else np.stack(parts)


def _write_planes(local, z_axis: int, start: int, stop: int, host: np.ndarray) -> None:
    """Copy host planes into planes ``[start, stop)`` of a host or device array."""
    if not device.is_device_array(local):
        local[_planes_index(z_axis, start, stop)] = host
        return
    target_shape = _with_planes(local, z_axis, stop - start)
    host = np.ascontiguousarray(np.broadcast_to(host, target_shape), dtype=local.dtype)
    blocks = _blocks(local, z_axis, start, stop)
    for c, block in enumerate(blocks):
        block.copy_to_device(host if z_axis == 0 else np.ascontiguousarray(host[c]))


def _c_strides(shape: Sequence[int], itemsize: int) -> tuple[int, ...]:
    strides, step = [], itemsize
    for extent in reversed(shape):
        strides.append(step)
        step *= extent
    return tuple(reversed(strides))


def _require_c_contiguous(local) -> None:
    if device.is_device_array(local):
        interface = local.__cuda_array_interface__
        strides = interface.get("strides")
        itemsize = np.dtype(interface["typestr"]).itemsize
        if strides is not None and tuple(strides) != _c_strides(interface["shape"], itemsize):
            raise ValueError("device slab must be C-contiguous")
    elif not local.flags.c_contiguous:
        raise ValueError("slab must be C-contiguous")


def _sendrecv_planes(world: World, local, z_axis: int, send: tuple[int, int], dest: int,
                     recv: tuple[int, int], source: int, tag: int) -> None:
    """Send planes ``send`` to ``dest`` while receiving planes ``recv`` from ``source``."""
    send_blocks = _blocks(local, z_axis, *send)
    recv_blocks = _blocks(local, z_axis, *recv)
    for send_block, recv_block in zip(send_blocks, recv_blocks):
        if device.is_device_array(local) or recv_block.flags.c_contiguous:
            world.sendrecv_(send_block, dest, recv_block, source, tag=tag)
        else:
            received = np.empty_like(recv_block, order="C")
            world.sendrecv_(np.ascontiguousarray(send_block), dest, received, source, tag=tag)
            recv_block[...] = received


def exchange_halos(world: World, local, slab: Slab, boundary: str = "zero"):
    """Fill the halo planes of ``local`` from the neighbouring ranks, in place.

    Parameters
    ----------
    world : World
    local : numpy.ndarray or device array
        C-contiguous ``(z, y, x)`` or ``(c, z, y, x)`` slab with halos. Device
        arrays (``__cuda_array_interface__``) go through :meth:`World.sendrecv_`,
        which passes them to a CUDA-aware MPI or stages them through host memory.
    slab : Slab
        This rank's slab.
    boundary : {"zero", "replicate", "periodic"}
        How the halos at the volume ends are filled.

    Returns
    -------
    local
        The same array.
    """
    _check_boundary(boundary)
    z_axis = z_axis_of(len(local.shape))
    if local.shape[z_axis] != slab.local_nz:
        raise ValueError(f"slab holds {slab.local_nz} planes along z, array has "
                         f"{local.shape[z_axis]}")
    check_slab_split(slab.nz, world.size, slab.halo)
    _require_c_contiguous(local)
    halo, owned = slab.halo, slab.owned
    if halo == 0:
        return local
    lower_halo = (0, halo)
    upper_halo = (halo + owned, 2 * halo + owned)
    lowest_owned = (halo, 2 * halo)
    highest_owned = (owned, owned + halo)

    periodic = boundary == "periodic"
    if periodic and world.size == 1:
        _write_planes(local, z_axis, *lower_halo, _read_planes(local, z_axis, *highest_owned))
        _write_planes(local, z_axis, *upper_halo, _read_planes(local, z_axis, *lowest_owned))
        return local
    below, above = neighbours(world.size, world.rank, periodic)
    if below is not None or above is not None:
        nobody = world.proc_null
        below_rank = nobody if below is None else below
        above_rank = nobody if above is None else above
        _sendrecv_planes(world, local, z_axis, highest_owned, above_rank, lower_halo, below_rank,
                         _TAG_UP)
        _sendrecv_planes(world, local, z_axis, lowest_owned, below_rank, upper_halo, above_rank,
                         _TAG_DOWN)
    if below is None:
        _fill_end(local, z_axis, lower_halo, lowest_owned[0], boundary)
    if above is None:
        _fill_end(local, z_axis, upper_halo, highest_owned[1] - 1, boundary)
    return local


def _fill_end(local, z_axis: int, halo_planes: tuple[int, int], edge_plane: int,
              boundary: str) -> None:
    """Fill a halo at a volume end with zeros or copies of the edge plane."""
    shape = _with_planes(local, z_axis, halo_planes[1] - halo_planes[0])
    if boundary == "zero":
        values = np.zeros(shape, dtype=local.dtype)
    else:
        values = np.broadcast_to(_read_planes(local, z_axis, edge_plane, edge_plane + 1), shape)
    _write_planes(local, z_axis, *halo_planes, values)


# -- scatter / gather --------------------------------------------------------------------------
def _plane_counts(global_shape: Sequence[int], size: int) -> list[int]:
    """Elements per rank when whole z planes (all channels) are sent, in rank order."""
    z_axis = z_axis_of(len(global_shape))
    per_plane = int(np.prod(global_shape)) // max(1, global_shape[z_axis])
    return [(stop - start) * per_plane for start, stop in
            block_ranges(global_shape[z_axis], size)]


def _z_first(array: np.ndarray, z_axis: int) -> np.ndarray:
    return np.ascontiguousarray(np.moveaxis(array, z_axis, 0))


def scatter_volume(world: World, volume: np.ndarray | None, halo: int = 0, root: int = 0,
                   boundary: str = "zero") -> tuple[np.ndarray, Slab]:
    """Split a volume held on ``root`` into z-slabs with filled halos.

    Parameters
    ----------
    world : World
    volume : numpy.ndarray or None
        ``(z, y, x)`` or ``(c, z, y, x)`` on ``root``; ignored (pass ``None``) elsewhere.
    halo : int
        Ghost planes on each side.
    root : int
    boundary : {"zero", "replicate", "periodic"}

    Returns
    -------
    local : numpy.ndarray
        This rank's planes with halos (see :func:`allocate_slab`).
    slab : Slab
    """
    _check_boundary(boundary)

    def describe():
        if volume is None or np.ndim(volume) not in (3, 4):
            raise InputError(f"scatter_volume: root needs a (z, y, x) or (c, z, y, x) volume, "
                             f"got {None if volume is None else np.shape(volume)}")
        return tuple(volume.shape), np.asarray(volume).dtype.str

    global_shape, dtype = world.agree(describe, root=root)
    local, slab_ = allocate_slab(world, global_shape, halo, np.dtype(dtype))
    z_axis = z_axis_of(len(global_shape))
    counts = _plane_counts(global_shape, world.size)
    other_axes = global_shape[:z_axis] + global_shape[z_axis + 1:]
    owned = np.empty((slab_.owned,) + tuple(other_axes), dtype=local.dtype)
    send = _z_first(np.asarray(volume), z_axis) if world.rank == root else None
    world.scatterv_(send, counts, owned, root=root)
    local[_planes_index(z_axis, slab_.interior.start, slab_.interior.stop)] = \
        np.moveaxis(owned, 0, z_axis)
    exchange_halos(world, local, slab_, boundary)
    return local, slab_


def gather_volume(world: World, local: np.ndarray, slab: Slab,
                  root: int = 0) -> np.ndarray | None:
    """Collect the owned planes of every rank's slab into the full volume on ``root``.

    Returns the volume (``(z, y, x)`` or ``(c, z, y, x)``) on ``root`` and
    ``None`` elsewhere. Host arrays only.
    """
    z_axis = z_axis_of(local.ndim)
    global_shape = _with_planes(local, z_axis, slab.nz)
    owned = _z_first(local[_planes_index(z_axis, slab.interior.start, slab.interior.stop)],
                     z_axis)
    counts = _plane_counts(global_shape, world.size)
    if world.rank == root:
        gathered = np.empty((slab.nz,) + owned.shape[1:], dtype=local.dtype)
    else:
        gathered = None
    world.gatherv_(owned, gathered, counts, root=root)
    if gathered is None:
        return None
    return np.ascontiguousarray(np.moveaxis(gathered, 0, z_axis))


def scatter_planes(world: World, volume: np.ndarray | None, root: int = 0) -> np.ndarray:
    """This rank's owned planes of a z-first volume held on ``root`` (None elsewhere).

    Planes are split as :func:`~medhpc.parallel.geometry.block_ranges` splits them; a
    rank may own none (a volume thinner than the ranks). Host arrays only.
    """
    shape, dtype = world.bcast(None if world.rank != root else
                               (tuple(volume.shape), np.asarray(volume).dtype.str), root=root)
    ranges = block_ranges(shape[0], world.size)
    start, stop = ranges[world.rank]
    owned = np.empty((stop - start,) + tuple(shape[1:]), np.dtype(dtype))
    per_plane = int(np.prod(shape[1:], dtype=np.int64))
    send = np.ascontiguousarray(volume) if world.rank == root else None
    world.scatterv_(send, [(b - a) * per_plane for a, b in ranges], owned, root=root)
    return owned


def stream_to_root(world: World, owned: np.ndarray, nz: int, consume, root: int = 0,
                   tag: int = 4103) -> None:
    """Hand every rank's owned planes to ``consume(start, stop, planes)`` on ``root``.

    ``owned`` is this rank's ``(planes, ...)`` block of a z-first volume of ``nz`` planes
    split as :func:`~medhpc.parallel.geometry.block_ranges` splits it. Blocks arrive in z
    order, one rank at a time, so ``root`` never holds more than one other rank's block:
    files are written whole without a full volume in memory. If ``consume`` raises (a
    full disk), ``root`` still takes the remaining blocks and every rank raises its
    exception (marked ``agreed``). Host arrays only.
    """
    from medhpc.parallel.comm import portable_exception

    owned = np.ascontiguousarray(owned)
    ranges = block_ranges(nz, world.size)
    if owned.shape[0] != ranges[world.rank][1] - ranges[world.rank][0]:
        raise ValueError(f"rank {world.rank} holds {owned.shape[0]} planes; expected "
                         f"{ranges[world.rank]}")
    error = None
    for rank, (start, stop) in enumerate(ranges):
        if stop == start:
            continue
        block = None
        if rank == world.rank == root:
            block = owned
        elif world.rank == rank:
            world.send_(owned, root, tag)
        elif world.rank == root:
            block = np.empty((stop - start,) + owned.shape[1:], owned.dtype)
            world.recv_(block, rank, tag)
        if block is not None and error is None:
            try:
                consume(start, stop, block)
            except Exception as exc:  # shared with the others below
                error = exc
    failure = world.bcast(None if error is None else portable_exception(error), root=root)
    if failure is not None:
        failure = error if world.rank == root else failure
        failure.agreed = True
        raise failure


def fetch_planes(world: World, owned: np.ndarray, nz: int, start: int, stop: int) -> np.ndarray:
    """Planes ``[start, stop)`` of a z-first volume distributed by owned planes.

    Collective: every rank asks for its own range (clipped to the volume) and gets it
    from the ranks that own those planes, in one all-to-all. ``owned`` is this rank's
    ``(planes, ...)`` block as :func:`~medhpc.parallel.geometry.block_ranges` splits
    ``nz``.
    """
    owned = np.ascontiguousarray(owned)
    start, stop = max(0, int(start)), min(int(nz), int(stop))
    stop = max(start, stop)
    ranges = block_ranges(nz, world.size)
    per_plane = int(np.prod(owned.shape[1:], dtype=np.int64))
    out = np.empty((stop - start,) + owned.shape[1:], owned.dtype)
    if world.size == 1:
        out[...] = owned[start:stop]
        return out
    requests = world.allgather((start, stop))
    mine_lo, mine_hi = ranges[world.rank]
    send_blocks, send_counts = [], []
    for lo, hi in requests:
        a, b = max(lo, mine_lo), min(hi, mine_hi)
        if b > a:
            send_blocks.append(owned[a - mine_lo:b - mine_lo].reshape(-1))
        send_counts.append(max(0, b - a) * per_plane)
    recv_counts = [max(0, min(stop, hi) - max(start, lo)) * per_plane for lo, hi in ranges]
    send = (np.concatenate(send_blocks) if send_blocks else np.empty(0, owned.dtype))
    world.alltoallv_(send, send_counts, out.reshape(-1), recv_counts)
    return out


# -- HDF5 ------------------------------------------------------------------------------------------
def read_slab_hdf5(world: World, path, dataset: str, halo: int = 0,
                   boundary: str = "zero") -> tuple[np.ndarray, Slab]:
    """Read this rank's slab (owned planes and halos) of an HDF5 dataset.

    Every rank opens the file read-only and reads only its own planes, the
    halo planes from the neighbours' ranges, and at the volume ends the halos
    the boundary asks for (periodic halos from the other end of the file). No
    messages are exchanged; if any rank fails, every rank raises.

    Parameters
    ----------
    world : World
    path : str or path-like
    dataset : str
        Name of a ``(z, y, x)`` or ``(c, z, y, x)`` dataset.
    halo : int
    boundary : {"zero", "replicate", "periodic"}

    Returns
    -------
    local : numpy.ndarray
    slab : Slab
    """
    _check_boundary(boundary)
    return world.agree_all(lambda: _read_slab(world, path, dataset, halo, boundary))


def _read_slab(world: World, path, dataset: str, halo: int, boundary: str):
    import h5py

    try:
        file = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path}: cannot open as HDF5 ({exc})") from None
    with file:
        if dataset not in file:
            raise InputError(f"{path}: no dataset {dataset!r}")
        data = file[dataset]
        if data.ndim not in (3, 4):
            raise InputError(f"{path}:{dataset}: expected (z, y, x) or (c, z, y, x), "
                             f"got shape {data.shape}")
        z_axis = z_axis_of(data.ndim)
        local, slab_ = allocate_slab(world, data.shape, halo, data.dtype)
        nz = slab_.nz
        inside = (max(0, slab_.read_start), min(nz, slab_.read_stop))
        offset = inside[0] - slab_.read_start
        local[_planes_index(z_axis, offset, offset + inside[1] - inside[0])] = \
            data[_planes_index(z_axis, *inside)]
        below = inside[0] - slab_.read_start
        above = slab_.read_stop - inside[1]
        if boundary == "periodic":
            if below:
                local[_planes_index(z_axis, 0, below)] = data[_planes_index(z_axis, nz - below,
                                                                            nz)]
            if above:
                local[_planes_index(z_axis, slab_.local_nz - above, slab_.local_nz)] = \
                    data[_planes_index(z_axis, 0, above)]
        else:
            if below:
                _fill_end(local, z_axis, (0, below), below, boundary)
            if above:
                _fill_end(local, z_axis, (slab_.local_nz - above, slab_.local_nz),
                          slab_.local_nz - above - 1, boundary)
    return local, slab_


def parts_folder(path) -> Path:
    """Folder that holds the per-rank part files behind the virtual dataset at ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def _plane_chunks(shape: Sequence[int], z_axis: int, itemsize: int,
                  target_bytes: int = 2 << 20) -> tuple[int, ...]:
    """Chunks of whole planes (one channel), about ``target_bytes`` each."""
    chunks = [1] * len(shape)
    chunks[-2:] = shape[-2:]
    plane_bytes = max(1, int(np.prod(shape[-2:])) * itemsize)
    chunks[z_axis] = int(max(1, min(shape[z_axis], target_bytes // plane_bytes)))
    return tuple(chunks)


def write_slabs_hdf5(world: World, path, dataset: str, local: np.ndarray, slab: Slab,
                     attrs: dict[str, Any] | None = None, chunks="planes",
                     compression: str | None = "gzip", overwrite: bool = False) -> None:
    """Write the owned planes of every rank's slab as one HDF5 dataset.

    Each rank writes its planes to ``<path>.parts/part-<rank>.h5``; rank 0 then
    writes ``path``, holding a virtual dataset over the parts, so readers see
    one array (keep the ``.parts`` folder beside the file). Works with the
    plain, non-MPI h5py. ``path`` appears only once every part is complete; if
    any rank fails, every rank raises and ``path`` is left untouched.

    Parameters
    ----------
    world : World
    path : str or path-like
    dataset : str
    local : numpy.ndarray
        This rank's ``(z, y, x)`` or ``(c, z, y, x)`` slab with halos.
    slab : Slab
    attrs : dict, optional
        Attributes stored on the dataset (for example ``spacing_mm``, ``affine``).
    chunks : "planes", tuple, bool or None
        ``"planes"``: chunks of whole planes, about 2 MiB; otherwise passed to h5py.
    compression : str or None
        h5py compression filter of the part files.
    overwrite : bool
        Replace an existing ``path`` (and its parts folder).
    """
    from medhpc.io.atomic import check_output_free, partial_name

    path = Path(path)
    z_axis = z_axis_of(local.ndim)
    layout = (tuple(local.shape[:z_axis]) + tuple(local.shape[z_axis + 1:]), local.dtype.str,
              slab.nz)
    layouts = world.allgather(layout)
    if any(other != layout for other in layouts):
        raise ValueError(f"ranks hold slabs of different shapes or types: {layouts}")

    def prepare():
        check_output_free(path, overwrite)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = partial_name(parts_folder(path))
        staging.mkdir()
        return staging

    staging = world.agree(prepare)
    part_names = [f"part-{rank}.h5" for rank in range(world.size)]
    owned = local[_planes_index(z_axis, slab.interior.start, slab.interior.stop)]

    def write_part():
        import h5py

        if slab.owned == 0:
            return
        chunk_shape = (_plane_chunks(owned.shape, z_axis, owned.dtype.itemsize)
                       if chunks == "planes" else chunks)
        with h5py.File(staging / part_names[world.rank], "w") as part:
            part.create_dataset(dataset, data=owned, chunks=chunk_shape, compression=compression)

    try:
        world.agree_all(write_part)
        world.agree(lambda: _publish(path, dataset, staging, part_names, slab.nz, z_axis,
                                     layout, world.size, attrs))
    except BaseException:
        if world.rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(path: Path, dataset: str, staging: Path, part_names: list[str], nz: int,
             z_axis: int, layout, size: int, attrs) -> None:
    """Write the virtual dataset over the parts, then move parts and file into place."""
    import h5py

    from medhpc.io.atomic import partial_name, publish

    other_axes, dtype, _ = layout
    global_shape = other_axes[:z_axis] + (nz,) + other_axes[z_axis:]
    virtual = h5py.VirtualLayout(shape=global_shape, dtype=np.dtype(dtype))
    parts = parts_folder(path)
    for rank, (start, stop) in enumerate(block_ranges(nz, size)):
        if stop == start:
            continue
        part_shape = other_axes[:z_axis] + (stop - start,) + other_axes[z_axis:]
        source = h5py.VirtualSource(f"{parts.name}/{part_names[rank]}", dataset,
                                    shape=part_shape)
        virtual[_planes_index(z_axis, start, stop)] = source
    staged_file = partial_name(path)
    with h5py.File(staged_file, "w") as file:
        virtual_dataset = file.create_virtual_dataset(dataset, virtual, fillvalue=0)
        for key, value in (attrs or {}).items():
            virtual_dataset.attrs[key] = value
    try:  # path and parts are replaced when published (checked free unless overwriting)
        publish((staging, parts, False), (staged_file, path))
    except BaseException:
        if staged_file.exists():
            staged_file.unlink()
        raise
