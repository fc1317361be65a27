"""Threads per rank: the option, the environment and the default; absurd counts refused."""

import os

import pytest

from medhpc.errors import InputError
from medhpc.parallel.device import default_threads, resolve_threads


def test_requested_then_environment_then_default(monkeypatch):
    monkeypatch.setenv("MEDHPC_THREADS", "1")
    assert resolve_threads(None, 1) == 1
    monkeypatch.delenv("MEDHPC_THREADS")
    assert resolve_threads(None, 2) == default_threads(2)
    assert resolve_threads(1, 2) == 1


@pytest.mark.parametrize("count", [0, -3, 100000])
def test_counts_outside_one_to_the_cores_are_refused(count):
    with pytest.raises(InputError, match=rf"--threads {count}: expected CPU threads per rank "
                                         rf"from 1 to the {os.cpu_count()} cores"):
        resolve_threads(count, 1)


def test_a_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv("MEDHPC_THREADS", "four")
    with pytest.raises(InputError, match="MEDHPC_THREADS='four': not a whole number"):
        resolve_threads(None, 1)
