"""Test-suite wiring: CUDA-simulator selection and aborting MPI jobs on a failure.

Passes run by ``make test``:
- serial: ``pytest tests`` (``mpi`` tests are skipped without ``--with-mpi``, ``cudasim``
  tests without ``NUMBA_ENABLE_CUDASIM=1``);
- simulator: ``NUMBA_ENABLE_CUDASIM=1 pytest -m cudasim tests``;
- MPI: ``mpiexec -n N python -m pytest --with-mpi -m mpi tests`` for N = 2, 3.
"""

import os
import sys

import pytest

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def pytest_collection_modifyitems(config, items):
    skip_sim = pytest.mark.skip(reason="needs NUMBA_ENABLE_CUDASIM=1 (the CUDA simulator pass)")
    for item in items:
        if "cudasim" in item.keywords and not SIMULATOR:
            item.add_marker(skip_sim)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not (report.failed and item.config.getoption("--with-mpi", default=False)):
        return
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() > 1:
        sys.stderr.write(f"\n[rank {MPI.COMM_WORLD.Get_rank()}] {item.nodeid} failed "
                         f"({report.when}); aborting the MPI job\n{report.longreprtext}\n")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
