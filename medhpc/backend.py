"""Compute backends: the one place that chooses between CPU and CUDA kernels.

Every algorithm package keeps its kernels as twins with one signature:
``kernels_cpu.py`` (``numba.njit``) and ``kernels_cuda.py`` (``numba.cuda.jit``
kernels behind launcher functions of the same name). :func:`kernels` returns
the module for a device; the CUDA module is only imported when it is asked for,
so the CPU path needs neither a GPU nor numba-cuda.
"""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np

from medhpc.errors import DeviceError
from medhpc.parallel.device import is_device_array  # noqa: F401  (re-exported)

DEVICES = ("cpu", "cuda", "auto")


def cuda_available() -> bool:
    """True when numba-cuda is importable and a driver with at least one GPU is present."""
    from medhpc.parallel.device import cuda_gpu_count

    return cuda_gpu_count() > 0


def resolve_device(request: str, notice=None) -> str:
    """Turn ``--device cpu|cuda|auto`` into 'cpu' or 'cuda'.

    ``cuda`` without a usable GPU raises :class:`DeviceError`; ``auto`` falls back
    to the CPU and calls ``notice`` with a one-line message.
    """
    request = (request or "auto").lower()
    if request not in DEVICES:
        raise DeviceError(f"--device {request!r}: expected one of {', '.join(DEVICES)}")
    if request == "cpu":
        return "cpu"
    if cuda_available():
        return "cuda"
    if request == "cuda":
        raise DeviceError("--device cuda: no CUDA GPU is usable here (no driver, no GPU, or "
                          "numba-cuda missing: pip install 'medhpc[cuda12]' or 'medhpc[cuda13]')")
    if notice is not None:
        notice("no CUDA GPU found: running on the CPU")
    return "cpu"


def kernels(package: str, device: str, stem: str = "kernels"):
    """Return the kernel module ``{package}.{stem}_{device}`` ('cpu' or 'cuda').

    ``kernels("medhpc.pet", "cuda")`` imports ``medhpc.pet.kernels_cuda``;
    ``kernels("medhpc.pet", "cpu", "em")`` imports ``medhpc.pet.em_cpu``.
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be resolved to 'cpu' or 'cuda', got {device!r}")
    return importlib.import_module(f"{package}.{stem}_{device}")


def host_kernels(package: str, device: str, stem: str = "kernels"):
    """The kernels of ``{package}.{stem}_{device}``, callable with host (NumPy) arrays.

    On the CPU this is the module itself; with CUDA each call is staged by
    :class:`HostStaged`. The one place where whole arrays cross PCIe per kernel call.
    """
    module = kernels(package, device, stem)
    return module if device == "cpu" else HostStaged(module)


class HostStaged:
    """The launchers of a CUDA kernel module, callable with NumPy arrays.

    Each call copies its array arguments to the GPU (C-contiguous; floating arrays cast to
    the module's ``HOST_DTYPE`` when it names one), launches, and copies back the arrays
    it writes: ``out``, and for kernels with more than one output the parameters the
    module's ``WRITTEN`` table names. Correct on any GPU, but bound by the copies.
    """

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        import inspect

        launcher = getattr(self._module, name)
        parameters = list(inspect.signature(launcher).parameters)
        written = getattr(self._module, "WRITTEN", {}).get(name, ("out",))
        positions = [parameters.index(parameter) for parameter in written]
        dtype = getattr(self._module, "HOST_DTYPE", None)

        def staged(*args):
            from numba import cuda

            device_args = [cuda.to_device(_staged_copy(a, dtype)) if isinstance(a, np.ndarray)
                           else a for a in args]
            launcher(*device_args)
            for position in positions:
                host = args[position]
                if host.flags.c_contiguous and host.dtype == device_args[position].dtype:
                    device_args[position].copy_to_host(host)
                else:
                    host[...] = device_args[position].copy_to_host()

        return staged


def _staged_copy(array: np.ndarray, dtype) -> np.ndarray:
    if dtype is not None and array.dtype.kind == "f":
        return np.ascontiguousarray(array, dtype=dtype)
    return np.ascontiguousarray(array)


def to_device(array: np.ndarray, device: str):
    """Copy a host array to ``device`` (a no-op on the CPU)."""
    if device == "cpu":
        return np.ascontiguousarray(array)
    from numba import cuda

    return cuda.to_device(np.ascontiguousarray(array))


def to_host(array) -> np.ndarray:
    """Return a host NumPy array for a host or device array."""
    if hasattr(array, "copy_to_host"):
        return array.copy_to_host()
    return np.asarray(array)


def empty(shape, dtype, device: str):
    """Allocate an uninitialised array on ``device``."""
    if device == "cpu":
        return np.empty(shape, dtype=dtype)
    from numba import cuda

    return cuda.device_array(shape, dtype=dtype)


def zeros(shape, dtype, device: str):
    """Allocate a zeroed array on ``device``."""
    if device == "cpu":
        return np.zeros(shape, dtype=dtype)
    from numba import cuda

    if cuda_simulator_active():
        return cuda.to_device(np.zeros(shape, dtype=dtype))
    from numba.cuda.cudadrv import driver

    out = cuda.device_array(shape, dtype=dtype)
    driver.device_memset(out, 0, out.nbytes)  # on the device: no host buffer, no copy
    return out


def synchronizer(device: str):
    """Return a callable that waits for queued device work (``None`` on the CPU)."""
    if device != "cuda":
        return None
    from numba import cuda

    return cuda.synchronize


def cuda_simulator_active() -> bool:
    """True when ``NUMBA_ENABLE_CUDASIM=1`` runs CUDA kernels on the CPU (tests)."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" or (
        "numba" in sys.modules and getattr(sys.modules["numba"].config, "ENABLE_CUDASIM", 0) == 1)


def launch_config_1d(items: int, threads_per_block: int = 256) -> tuple[int, int]:
    """Blocks and threads per block to cover ``items`` with a 1-D grid."""
    blocks = max(1, (int(items) + threads_per_block - 1) // threads_per_block)
    return blocks, threads_per_block
