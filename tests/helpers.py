"""Shared test helpers."""

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest


def _numba_cuda_importable() -> bool:
    try:
        from numba import cuda  # noqa: F401
    except Exception:
        return False
    return True


requires_numba_cuda = pytest.mark.skipif(not _numba_cuda_importable(),
                                         reason="numba-cuda is not installed")


def mpiexec() -> str:
    """The mpiexec beside this Python (the MPI wheel's), else the one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    if local.exists():
        return str(local)
    found = shutil.which("mpiexec")
    if found is None:
        pytest.skip("no mpiexec")
    return found


def medhpc_command(*args, ranks: int | None = None) -> list[str]:
    """The command line that runs ``medhpc args`` (under mpiexec when ``ranks`` is given)."""
    command = [sys.executable, "-m", "medhpc", *map(str, args)]
    if ranks is not None:
        command = [mpiexec(), "-n", str(ranks), *command]
    return command


def run_medhpc(*args, ranks: int | None = None, timeout: float = 300, env: dict | None = None,
               cwd=None, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run medhpc in a subprocess with a timeout (``stdin``: text fed to it); return the
    completed process."""
    full_env = dict(os.environ)
    full_env.pop("NUMBA_ENABLE_CUDASIM", None)
    full_env.setdefault("MPIEXEC_TIMEOUT", str(int(timeout)))
    if env:
        full_env.update(env)
    return subprocess.run(medhpc_command(*args, ranks=ranks), capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


@contextmanager
def tiny_filesystem(folder, kib: int):
    """A ``kib``-KiB tmpfs mounted at ``folder`` (a full disk on demand); skips the test
    with a notice where this process may not mount one."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("a tiny file system needs root and mount; the disk-full check is skipped")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the disk-full "
                    f"check is skipped")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], capture_output=True)


class PlantedObject:
    """An object whose unpickling would create ``marker`` (checks that nothing is unpickled)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))
