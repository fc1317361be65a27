"""PET test data: a small NEMA-like phantom and its simulated sinograms (made once per run)."""

import numpy as np
import pytest

from medhpc.io.images import read_image
from medhpc.parallel.comm import World, _SerialComm
from medhpc.pet.scanner import load_scanner
from medhpc.pet.simulate import (Simulation, read_inputs, write_simulated_listmode,
                                 write_simulation)
from medhpc.phantoms.pet_files import write_pet_phantom
from medhpc.runtime.context import start_run

SHAPE = (15, 40, 40)
VOXEL_MM = (4.0, 4.0, 2.0)


def serial_run(command="test", device="cpu"):
    """A one-rank run, also inside an MPI job (for reference results)."""
    return start_run(command, device=device, verbosity=-1, world=World(_SerialComm()))


SMALL_TOF_SCANNER = """[scanner]
name = "small-tof"
crystals_per_ring = 48
rings = 4
radius_mm = 100.0
ring_spacing_mm = 4.0
crystal_size_mm = 6.0
radial_trim = 8
max_ring_difference = 3
tof_bins = 7
tof_resolution_ps = 300.0
"""
LISTMODE_DURATION_S = 100.0


def simulate(folder, name, counts=2e6, noise=True, frames=1, tof=False, scanner="small-test",
             listmode=False, rays=1, scatter=False, timing=None):
    """Simulate the phantom; write a sinogram file (and, with ``listmode``, the same counts
    as list-mode events beside it: ``name.listmode.h5``); ``timing``: the crystals' TOF
    timing calibration (:mod:`medhpc.pet.timing`)."""
    phantom = folder / "phantom"
    activity, mu_map, grid = read_inputs(phantom / "activity.nii.gz", phantom / "mu_map.nii.gz")
    if frames > 1:
        activity = np.concatenate([activity * (1.0 + 0.5 * k) for k in range(frames)])
    geometry = load_scanner(scanner)
    run = serial_run("pet-simulate")
    simulation = Simulation(run, geometry, activity, mu_map, grid, counts, noise, 0.2, tof,
                            rays=rays, scatter=scatter, timing=timing)
    data = simulation.execute(seed=3)
    path = folder / f"{name}.h5"
    write_simulation(path, geometry, grid, data, tof, overwrite=True, attrs={})
    if listmode:
        events = folder / f"{name}.listmode.h5"
        write_simulated_listmode(events, geometry, grid, data, LISTMODE_DURATION_S, seed=3,
                                 overwrite=True, attrs={})
        return path, events
    return path


@pytest.fixture(scope="session")
def pet_case(tmp_path_factory):
    """Phantom folder and sinograms: noise-free, noisy, dynamic (2 frames)."""
    folder = tmp_path_factory.mktemp("pet_case")
    write_pet_phantom(folder / "phantom", "small-test", shape=SHAPE, voxel_mm=VOXEL_MM)
    truth, grid = read_image(folder / "phantom" / "activity.nii.gz")
    return {
        "folder": folder,
        "truth": truth,
        "grid": grid,
        "noise_free": simulate(folder, "noise_free", noise=False),
        "noisy": simulate(folder, "noisy", counts=5e6),
        "dynamic": simulate(folder, "dynamic", counts=2e6, frames=2),
        "listmode": simulate(folder, "counts", counts=3e5, listmode=True),
    }


SPAN_SCANNER = """[scanner]
name = "small-span{span}"
crystals_per_ring = 96
rings = 8
radius_mm = 120.0
ring_spacing_mm = 4.0
crystal_size_mm = 6.0
radial_trim = 17
max_ring_difference = 4
span = {span}
"""


@pytest.fixture(scope="session")
def span_case(pet_case):
    """The phantom on the small scanner up to ring difference 4 at span 1 and span 3:
    noise-free sinograms of both and a noisy span-3 one."""
    folder = pet_case["folder"]
    scanners = {}
    for span in (1, 3):
        scanners[span] = folder / f"span{span}.toml"
        scanners[span].write_text(SPAN_SCANNER.format(span=span))
    return {
        "span1": simulate(folder, "span1", noise=False, scanner=scanners[1]),
        "span3": simulate(folder, "span3", noise=False, scanner=scanners[3]),
        "span3_noisy": simulate(folder, "span3_noisy", counts=5e6, scanner=scanners[3]),
        "truth": pet_case["truth"],
    }
