"""Shared pieces of the LDDMM tests: a small phantom and in-process registrations."""

from contextlib import nullcontext

import pytest

from medhpc.lddmm import kernels_cpu
from medhpc.lddmm.settings import Settings
from medhpc.lddmm.register import Registration
from medhpc.parallel.comm import World, _SerialComm
from medhpc.phantoms.lddmm import make_phantom, write_lddmm_phantom

QUICK = Settings(method="beg", metric="ssd", levels=2, iterations=(12, 6), timesteps=4)


def serial_world() -> World:
    """A one-rank world, also inside an MPI job (for reference results)."""
    return World(_SerialComm())


def no_stage(name, kind):
    return nullcontext()


def register(fixed, moving, settings=QUICK, world=None, spacing=(1.0, 1.0, 1.0),
             checkpointer=None):
    """Run a registration in this process; return this rank's result."""
    registration = Registration(world or serial_world(), kernels_cpu, settings, fixed, moving,
                                spacing, no_stage)
    return registration.run(checkpointer)


@pytest.fixture(autouse=True)
def one_thread():
    """Test grids are tiny: one thread per process avoids parallel start-up costs that
    dominate on a busy machine (and with several ranks per core)."""
    import numba

    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(previous)


@pytest.fixture(scope="session")
def small_phantom():
    return make_phantom((24, 24, 24), seed=1)


@pytest.fixture(scope="session")
def phantom32():
    return make_phantom((32, 32, 32), seed=0)


@pytest.fixture(scope="session")
def phantom_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lddmm-phantom")
    write_lddmm_phantom(folder, (24, 24, 24), seed=2)
    return folder
