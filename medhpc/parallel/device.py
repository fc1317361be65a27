"""Devices per rank: GPU selection, CPU threads, CUDA-aware MPI and device buffers."""

from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager

import numpy as np

from medhpc.errors import InputError


def is_device_array(array) -> bool:
    """True for CUDA device arrays: ``__cuda_array_interface__``, or the simulator's
    arrays, which have ``copy_to_host`` but no interface."""
    return hasattr(array, "__cuda_array_interface__") or hasattr(array, "copy_to_host")


def probe_cuda_aware(mpi_module=None) -> bool:
    """Return whether the loaded MPI library can take device buffers directly.

    ``MEDHPC_CUDA_AWARE_MPI=1|0`` overrides the probe. Otherwise the MPI library
    that mpi4py loaded is asked through ``MPIX_Query_cuda_support`` (MPICH and
    Open MPI both provide it); a library without it counts as not CUDA-aware.
    """
    override = os.environ.get("MEDHPC_CUDA_AWARE_MPI")
    if override is not None:
        return override.strip().lower() in ("1", "true", "yes", "on")
    if mpi_module is None:
        return False
    try:
        library = ctypes.CDLL(mpi_module.__file__)
        query = library.MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return False
    query.restype = ctypes.c_int
    try:
        return bool(query())
    except Exception:
        return False


_cuda_aware_cache: dict[int, bool] = {}


def cuda_aware(world) -> bool:
    """Cached :func:`probe_cuda_aware` for ``world``'s MPI library."""
    key = id(world.MPI)
    if key not in _cuda_aware_cache:
        _cuda_aware_cache[key] = probe_cuda_aware(world.MPI)
    return _cuda_aware_cache[key]


@contextmanager
def mpi_buffer(array, world, write_back: bool):
    """Yield a buffer of ``array`` that MPI can use.

    Host arrays and device arrays under a CUDA-aware MPI are yielded as they
    are. Other device arrays are copied to host memory (``copy_to_host``) and,
    when ``write_back`` is true, copied back (``copy_to_device``) on exit.
    """
    if not is_device_array(array) or cuda_aware(world):
        yield array
        return
    host = np.ascontiguousarray(array.copy_to_host())
    yield host
    if write_back:
        array.copy_to_device(host)


def gpu_for_rank(local_rank: int, gpus_visible: int) -> int | None:
    """Return the GPU index a rank uses: one GPU per rank by node-local rank.

    When the launcher already restricted the rank to one device
    (``CUDA_VISIBLE_DEVICES`` with one entry, as Slurm's ``--gpus-per-task=1``
    does), that device is index 0. Returns ``None`` without GPUs.
    """
    if gpus_visible <= 0:
        return None
    return local_rank % gpus_visible


def _driver_may_exist() -> bool:
    """False only where no GPU device node exists and no driver path is set: importing
    numba.cuda to learn that costs a third of a second at every start."""
    if os.environ.get("NUMBA_CUDA_DRIVER"):
        return True
    from pathlib import Path

    dev = Path("/dev")
    return not dev.is_dir() or any(dev.glob("nvidia*")) or (dev / "dxg").exists()


def cuda_gpu_count() -> int:
    """Number of CUDA GPUs this process can see (0 without a driver or numba-cuda)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return 0
    if not _driver_may_exist():
        return 0
    try:
        from numba import cuda
    except ImportError:
        return 0
    try:
        if not cuda.is_available():
            return 0
        return len(cuda.gpus)
    except Exception:
        return 0


def select_gpu(local_rank: int) -> int | None:
    """Bind this process to its GPU before any other CUDA call; return the index used."""
    index = gpu_for_rank(local_rank, cuda_gpu_count())
    if index is not None:
        from numba import cuda

        cuda.select_device(index)
    return index


def default_threads(local_size: int, cores: int | None = None) -> int:
    """CPU threads per rank: the cores this process may use divided by ranks on the node."""
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:
            cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_size))


def resolve_threads(requested: int | None, local_size: int) -> int:
    """Threads per rank: ``requested`` (option), else ``MEDHPC_THREADS``, else the default.

    Raises :class:`InputError` for a count below 1 or above the node's cores.
    """
    source = "--threads"
    if requested is None:
        env = os.environ.get("MEDHPC_THREADS", "").strip()
        if env:
            source = "MEDHPC_THREADS"
            try:
                requested = int(env)
            except ValueError:
                raise InputError(f"MEDHPC_THREADS={env!r}: not a whole number; expected CPU "
                                 f"threads per rank, e.g. 4") from None
    if requested is None:
        return default_threads(local_size)
    cores = os.cpu_count() or 1
    if not 1 <= requested <= cores:
        raise InputError(f"{source} {requested}: expected CPU threads per rank from 1 to the "
                         f"{cores} cores of this node")
    return requested


def agreed_threads(world, requested: int | None) -> int:
    """:func:`resolve_threads` on this rank, its count checked on rank 0 first, so a bad
    count is one agreed error (collective)."""
    world.agree(lambda: resolve_threads(requested, world.local_size))
    return resolve_threads(requested, world.local_size)


def set_threads(threads: int) -> int:
    """Set numba's thread count for this rank (capped at its thread pool size)."""
    import numba

    threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    return threads
