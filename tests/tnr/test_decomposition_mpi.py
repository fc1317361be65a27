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
