"""Decomposed tnr-register equals the one-rank result (run under mpiexec at 2, 3 and 4 ranks)."""

import json
from pathlib import Path

import numpy as np
import pytest

from medhpc.parallel.comm import get_world
from medhpc.runtime.context import start_run
from tests.tnr.conftest import register


@pytest.mark.mpi
def test_registration_equals_one_rank(phantom_folder, tmp_path):
    world = get_world()
    shared = Path(world.bcast(str(tmp_path)))
    run = start_run("tnr-register", device="cpu", verbosity=-1, overwrite=True, world=world)
    displacement, volume = register(phantom_folder / "sections", shared / "ranks.h5", run=run)
    world.barrier()
    if not world.is_root:
        return
    log = json.loads((shared / "ranks.json").read_text())
    assert log["ranks"] == world.size
    reference_displacement, reference_volume = register(phantom_folder / "sections",
                                                        tmp_path / "one.h5")
    np.testing.assert_allclose(displacement, reference_displacement, atol=1e-4)
    assert np.abs(volume.astype(int) - reference_volume.astype(int)).max() <= 1


@pytest.mark.mpi
def test_sigterm_on_one_rank_while_matching_stops_every_rank_and_resume_equals_one_rank(
        phantom_folder, tmp_path, monkeypatch):
    """The last rank is signalled at its first pair: every rank stops with the same count of
    kept pairs and no output; --resume matches only the rest and equals one rank."""
    import os
    import re
    import signal

    from medhpc.runtime.checkpoint import CheckpointStop
    from medhpc.tnr import run as run_module

    world = get_world()
    shared = Path(world.bcast(str(tmp_path)))
    out = shared / "stopped.h5"
    original = run_module.match_sections
    calls, sent = [], []

    def signalled(*args, **kwargs):
        calls.append(1)
        if world.rank == world.size - 1 and not sent:
            sent.append(signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "match_sections", signalled)
    run = start_run("tnr-register", device="cpu", verbosity=-1, overwrite=True, world=world)
    with pytest.raises(CheckpointStop) as stopped:
        register(phantom_folder / "sections", out, run=run)
    messages = world.allgather(str(stopped.value))
    assert len(set(messages)) == 1, messages
    kept = int(re.search(r"(\d+) of 11 pair", messages[0]).group(1))
    world.barrier()
    if world.is_root:
        assert not out.exists()
        assert len(list((shared / "stopped.tnr-pairs").glob("pair-*.h5"))) == kept
    world.barrier()
    calls.clear()
    run = start_run("tnr-register", device="cpu", verbosity=-1, overwrite=True, world=world)
    _, volume = register(phantom_folder / "sections", out, run=run, resume=True)
    assert world.sum(len(calls)) == 11 - kept
    world.barrier()
    if world.is_root:
        _, reference = register(phantom_folder / "sections", tmp_path / "one.h5")
        assert np.abs(volume.astype(int) - reference.astype(int)).max() <= 1
