"""What every benchmark records beside its numbers: CPU, cores, load, Python and versions."""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata
from pathlib import Path


def machine(packages=("medhpc", "numpy", "numba", "mpi4py", "mpich", "h5py")) -> dict:
    """CPU model, core count, load average, platform and the versions of ``packages``.

    A package that is not installed is recorded as ``None``.
    """
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average": load,
            "python": platform.python_version(), "platform": platform.platform(),
            "versions": versions, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
