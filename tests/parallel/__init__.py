"""Helpers for the parallel tests: the same test body runs on every kind of world.

``WORLD_KINDS`` parametrises a ``world`` fixture over:
- ``"mpi"``: ``get_world()`` (marked ``mpi``: runs under ``--with-mpi`` at any size);
- ``"self"``: a real MPI world of one rank (``COMM_SELF``);
- ``"serial"``: the stand-in used when no MPI library loads.
"""

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from medhpc.parallel.comm import World, _SerialComm, get_world

WORLD_KINDS = [pytest.param("mpi", marks=pytest.mark.mpi), "self", "serial"]


def make_world(kind: str) -> World:
    """Return the world of ``kind`` (see the module docstring)."""
    if kind == "mpi":
        return get_world()
    if kind == "self":
        from mpi4py import MPI

        return World(MPI.COMM_SELF)
    return World(_SerialComm())


@contextmanager
def shared_tmp_dir(world: World):
    """A temporary folder with the same path on every rank, removed afterwards."""
    name = world.bcast(tempfile.mkdtemp(prefix="medhpc-test-") if world.is_root else None)
    try:
        yield Path(name)
    finally:
        world.barrier()
        if world.is_root:
            shutil.rmtree(name, ignore_errors=True)


class FakeDeviceArray:
    """A host array posing as a CUDA device array, for the device-buffer MPI paths.

    It exposes ``__cuda_array_interface__`` (pointing at host memory) and
    numba's ``copy_to_host`` / ``copy_to_device``, and counts the copies.
    """

    def __init__(self, host: np.ndarray, counter: dict | None = None):
        self.host = host
        self.counter = counter if counter is not None else {"to_host": 0, "to_device": 0}

    @property
    def shape(self):
        return self.host.shape

    @property
    def ndim(self):
        return self.host.ndim

    @property
    def dtype(self):
        return self.host.dtype

    @property
    def __cuda_array_interface__(self):
        strides = None if self.host.flags.c_contiguous else self.host.strides
        return {"shape": self.host.shape, "typestr": self.host.dtype.str,
                "data": (self.host.ctypes.data, False), "strides": strides, "version": 3}

    def __getitem__(self, key):
        return FakeDeviceArray(self.host[key], self.counter)

    def copy_to_host(self):
        self.counter["to_host"] += 1
        return self.host.copy()

    def copy_to_device(self, host):
        self.counter["to_device"] += 1
        np.copyto(self.host, host)


def set_cuda_aware(monkeypatch, aware: bool) -> None:
    """Make medhpc treat MPI as CUDA-aware (pass-through) or not (host staging)."""
    from medhpc.parallel import device

    monkeypatch.setenv("MEDHPC_CUDA_AWARE_MPI", "1" if aware else "0")
    monkeypatch.setattr(device, "_cuda_aware_cache", {})
