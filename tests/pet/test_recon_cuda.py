"""The whole reconstruction on the CUDA path (in the simulator) equals the CPU path."""

import numpy as np
import pytest

from medhpc.io.geometry import ImageGeometry
from medhpc.pet.osem import ReconSettings
from medhpc.pet.run import PetRecon
from medhpc.pet.scanner import load_scanner
from medhpc.pet.simulate import Simulation, write_simulation
from tests.pet.conftest import serial_run

TINY_SCANNER = """[scanner]
name = "tiny"
crystals_per_ring = 16
rings = 2
radius_mm = 40.0
ring_spacing_mm = 4.0
crystal_size_mm = 4.0
radial_trim = 3
max_ring_difference = 1
tof_bins = 3
tof_resolution_ps = 200.0
"""


@pytest.fixture
def tiny_sinograms(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SCANNER)
    scanner = load_scanner(path)
    grid = ImageGeometry.from_spacing((3, 8, 8), (5.0, 5.0, 2.0))
    rng = np.random.default_rng(0)
    activity = (rng.random((1, 3, 8, 8)) + 0.5).astype(np.float32)
    mu_map = np.full((3, 8, 8), 0.005, np.float32)
    files = {}
    for tof in (False, True):
        data = Simulation(serial_run(), scanner, activity, mu_map, grid, 1e4, False, 0.1,
                          tof).execute(seed=1)
        files[tof] = tmp_path / f"tiny-{tof}.h5"
        write_simulation(files[tof], scanner, grid, data, tof, overwrite=True, attrs={})
    return files


@pytest.mark.cudasim
@pytest.mark.parametrize("tof", [False, True], ids=["non-tof", "tof"])
def test_cuda_reconstruction_matches_cpu(tiny_sinograms, tmp_path, tof):
    settings = ReconSettings(algorithm="osem-rdp", iterations=2, subsets=2, psf_fwhm_mm=4.0,
                             postfilter_fwhm_mm=3.0, rdp_beta=0.1)
    images = {}
    for device in ("cpu", "cuda"):
        run = serial_run()
        run.device = device
        images[device], _ = PetRecon(run, tiny_sinograms[tof], tmp_path / "x.nii.gz",
                                           settings).compute()
    np.testing.assert_allclose(images["cuda"], images["cpu"], rtol=1e-4,
                               atol=1e-5 * images["cpu"].max())


@pytest.mark.cudasim
@pytest.mark.parametrize("tof", [False, True], ids=["non-tof", "tof"])
def test_cuda_listmode_and_bsrem_match_cpu(tmp_path, tof):
    from medhpc.pet.run_listmode import ListModeRecon
    from medhpc.pet.simulate import write_simulated_listmode

    path = tmp_path / "tiny.toml"
    path.write_text(TINY_SCANNER)
    scanner = load_scanner(path)
    grid = ImageGeometry.from_spacing((3, 8, 8), (5.0, 5.0, 2.0))
    activity = (np.random.default_rng(0).random((1, 3, 8, 8)) + 0.5).astype(np.float32)
    data = Simulation(serial_run(), scanner, activity, np.full((3, 8, 8), 0.005, np.float32),
                      grid, 300, True, 0.1, tof).execute(seed=1)
    events = tmp_path / "events.h5"
    write_simulated_listmode(events, scanner, grid, data, 10.0, seed=1, overwrite=True, attrs={})
    settings = ReconSettings(algorithm="bsrem", iterations=2, subsets=2, rdp_beta=0.1)
    images = {}
    for device in ("cpu", "cuda"):
        run = serial_run()
        run.device = device
        images[device], history = ListModeRecon(run, events, tmp_path / "x.nii.gz",
                                                settings).compute()
        assert np.isfinite(history).all()
    np.testing.assert_allclose(images["cuda"], images["cpu"], rtol=1e-4,
                               atol=1e-5 * images["cpu"].max())
