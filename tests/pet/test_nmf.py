"""Low-rank dynamic reconstruction (NMF) through the projector."""

import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.io.geometry import ImageGeometry
from medhpc.pet.nmf import initial_curves
from medhpc.pet.osem import ReconSettings
from medhpc.pet.run import PetRecon
from medhpc.pet.scanner import load_scanner
from medhpc.pet.simulate import Simulation, write_simulation
from medhpc.phantoms.pet import dynamic_phantom, nema_iq_phantom
from tests.pet.conftest import SHAPE, VOXEL_MM, serial_run


def dynamic_sinogram(folder, frames=4, counts=2e5, noise=True):
    phantom = nema_iq_phantom(SHAPE, VOXEL_MM)
    activity, curves = dynamic_phantom(phantom, frames)
    grid = ImageGeometry.from_spacing(SHAPE, VOXEL_MM, origin_mm=phantom["origin_mm"])
    scanner = load_scanner("small-test")
    simulation = Simulation(serial_run(), scanner, activity, phantom["mu_map"].astype(np.float32),
                            grid, counts, noise, 0.2, False)
    path = folder / "dynamic.h5"
    write_simulation(path, scanner, grid, simulation.execute(seed=5), False, True, {})
    return path, activity


@pytest.fixture(scope="module")
def dynamic(tmp_path_factory):
    return dynamic_sinogram(tmp_path_factory.mktemp("nmf"))


def test_dynamic_phantom_is_two_components():
    phantom = nema_iq_phantom(SHAPE, VOXEL_MM)
    activity, curves = dynamic_phantom(phantom, 5)
    flat = activity.reshape(5, -1)
    singular = np.linalg.svd(flat, compute_uv=False)
    assert singular[2] < 1e-5 * singular[0] and singular[1] > 1e-2 * singular[0]
    assert np.all(np.diff(curves["spheres"]) > 0) and np.all(np.diff(curves["background"]) < 0)


def test_initial_curves_are_distinct_and_positive():
    curves = initial_curves(3, 6)
    assert curves.shape == (3, 6) and curves.min() > 0
    assert np.argmax(curves[0]) == 0 and np.argmax(curves[-1]) == 5


def test_nmf_likelihood_rises_and_factors_stay_non_negative(dynamic, tmp_path):
    sinogram, truth = dynamic
    recon = PetRecon(serial_run(), sinogram, tmp_path / "n.nii.gz",
                     ReconSettings(algorithm="nmf", iterations=4, subsets=1, components=2))
    frames, history = recon.compute()
    assert frames.shape == truth.shape and frames.min() >= 0
    assert np.all(np.diff(history) > 0), history
    assert recon._nmf["factors"].min() >= 0 and recon._nmf["curves"].min() >= 0
    # the frames are a rank-2 product
    singular = np.linalg.svd(frames.reshape(len(frames), -1), compute_uv=False)
    assert singular[2] < 1e-5 * singular[0]


def test_nmf_needs_dynamic_data(pet_case, tmp_path):
    with pytest.raises(InputError, match="one frame"):
        PetRecon(serial_run(), pet_case["noisy"], tmp_path / "x.nii.gz",
                 ReconSettings(algorithm="nmf"))
    with pytest.raises(InputError, match="does not checkpoint"):
        PetRecon(serial_run(), pet_case["dynamic"], tmp_path / "x.nii.gz",
                 ReconSettings(algorithm="nmf", components=2), checkpoint_every=1)


def test_nmf_writes_frames_factors_log_and_a_picture_with_the_curves(dynamic, tmp_path):
    import json

    import h5py

    sinogram, truth = dynamic
    out = tmp_path / "nmf.nii.gz"
    recon = PetRecon(serial_run(), sinogram, out, ReconSettings(
        algorithm="nmf", iterations=1, subsets=2, components=2), png=True)
    recon.execute()
    with h5py.File(tmp_path / "nmf.factors.h5") as h5:
        assert h5["spatial_factors"].shape == (2,) + truth.shape[1:]
        assert h5["time_activity_curves"].shape == (2, len(truth))
    log = json.loads((tmp_path / "nmf.json").read_text())
    assert np.asarray(log["time_activity_curves"]).shape == (2, len(truth))
    assert (tmp_path / "nmf.png").read_bytes()[:4] == b"\x89PNG"
