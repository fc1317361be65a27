"""A description of the software and hardware a job runs on."""

from __future__ import annotations

import platform
import socket
from importlib import metadata

from medhpc import __version__
from medhpc.parallel import device as devices

PACKAGES = ("numpy", "numba", "numba-cuda", "mpi4py", "mpich", "h5py", "click", "nibabel",
            "tifffile", "torch")


def package_versions() -> dict:
    """Installed versions of medhpc's dependencies (missing ones left out)."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def mpi_description(world) -> dict:
    """The MPI library mpi4py loaded, its standard version and CUDA-awareness."""
    if world.MPI is None:
        return {"library": "none (serial fallback)", "standard": "-", "cuda_aware": False,
                "mpi4py_library": None}
    MPI = world.MPI
    library = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
    major, minor = MPI.Get_version()
    return {"library": library, "standard": f"{major}.{minor}",
            "cuda_aware": devices.cuda_aware(world), "mpi4py_library": MPI.__file__}


def describe_environment(world, threads: int | None = None) -> dict:
    """Gather every rank's placement (host, node-local rank, GPU, threads) to one document.

    Collective: every rank must call it. Returns the full document on rank 0
    and the local part elsewhere.
    """
    import h5py
    import numba

    gpus = devices.cuda_gpu_count()
    placement = {
        "rank": world.rank, "host": socket.gethostname(), "local_rank": world.local_rank,
        "gpus_on_node": gpus, "gpu": devices.gpu_for_rank(world.local_rank, gpus),
        "threads": min(devices.agreed_threads(world, threads),
                       numba.config.NUMBA_NUM_THREADS),
    }
    everyone = world.gather(placement)
    if not world.is_root:
        return {"placement": [placement]}
    return {
        "medhpc": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "packages": package_versions(),
        "mpi": mpi_description(world),
        "ranks": world.size,
        "nodes": world.node_count,
        "gpus_per_node": max(entry["gpus_on_node"] for entry in everyone),
        "numba": {"threading_layer": numba.config.THREADING_LAYER,
                  "threads_per_rank": placement["threads"],
                  "cpu_threads_available": numba.config.NUMBA_NUM_THREADS},
        "hdf5": {"version": h5py.version.hdf5_version, "h5py": h5py.version.version,
                 "mpi": bool(h5py.get_config().mpi)},
        "placement": everyone,
    }
