"""Decomposed pet-recon equals the one-rank result (run under mpiexec at 2, 3 and 4 ranks)."""

import numpy as np
import pytest

from medhpc.parallel.comm import get_world
from medhpc.pet import decomposition
from medhpc.pet.osem import ReconSettings
from medhpc.pet.run import PetRecon
from medhpc.runtime.context import start_run
from tests.pet.conftest import serial_run

SETTINGS = ReconSettings(iterations=2, subsets=4, psf_fwhm_mm=3.0)


def compare(case, tmp_path, decomp):
    world = get_world()
    run = start_run("pet-recon", device="cpu", verbosity=-1, world=world)
    image, history = PetRecon(run, case, tmp_path / "x.nii.gz", SETTINGS,
                                    decomp=decomp).compute()
    reference, reference_history = PetRecon(serial_run(), case, tmp_path / "y.nii.gz",
                                                  SETTINGS, decomp=decomp).compute()
    if decomp != "views" and not world.is_root:
        assert image is None
        return
    np.testing.assert_allclose(image, reference, rtol=2e-4, atol=2e-5 * reference.max())
    np.testing.assert_allclose(np.ravel(history), np.ravel(reference_history), rtol=1e-5)


@pytest.mark.mpi
def test_views_decomposition_equals_one_rank(pet_case, tmp_path):
    compare(pet_case["noisy"], tmp_path, "views")


@pytest.mark.mpi
def test_planes_decomposition_equals_one_rank(pet_case, tmp_path):
    compare(pet_case["noisy"], tmp_path, "planes")


@pytest.mark.mpi
def test_frames_decomposition_equals_one_rank(pet_case, tmp_path):
    compare(pet_case["dynamic"], tmp_path, "frames")


@pytest.mark.mpi
@pytest.mark.parametrize("decomp", ["views", "planes"])
def test_stir_data_over_the_ranks_equal_one_rank(pet_case, tmp_path, decomp):
    from medhpc.pet.interchange import write_stir
    from medhpc.pet.sinogram import read_block, read_layout

    layout = read_layout(pet_case["noisy"])
    header = write_stir(tmp_path / "noisy.hs", layout.scanner, read_block(layout).prompts)
    compare(header, tmp_path, decomp)


def test_every_view_of_every_subset_is_owned_once():
    for size in (1, 2, 3, 5):
        owned = [np.concatenate(decomposition.views_of_rank(48, 8, size, rank))
                 for rank in range(size)]
        everything = np.sort(np.concatenate(owned))
        np.testing.assert_array_equal(everything, np.arange(48))


def test_auto_mode_and_errors():
    assert decomposition.choose_mode("auto", frames=1, ranks=4) == "views"
    assert decomposition.choose_mode("auto", frames=8, ranks=4) == "frames"
    assert decomposition.choose_mode("auto", frames=2, ranks=4) == "views"
    with pytest.raises(Exception, match="frames"):
        decomposition.choose_mode("frames", frames=1, ranks=2)


@pytest.mark.mpi
def test_frames_stopped_by_sigterm_on_one_rank_resume_bit_identically(pet_case, monkeypatch):
    import os
    import signal

    from medhpc.pet.osem import OsemReconstructor
    from medhpc.runtime.checkpoint import CheckpointStop
    from tests.parallel import shared_tmp_dir

    world = get_world()
    settings = ReconSettings(iterations=3, subsets=4)
    original = OsemReconstructor.subiteration
    original_shares = PetRecon.view_shares
    calls = {"n": 0, "frame": None}

    def shares_of_frame(self, views_per_subset, world, frame=None):
        calls["frame"], calls["n"] = frame, 0
        return original_shares(self, views_per_subset, world, frame=frame)

    def interrupted(self, image, subset):
        calls["n"] += 1
        # frames are dealt as ranks ask, so only the rank that drew frame 0 is signalled,
        # at iteration 2 of that frame
        if calls["frame"] == 0 and calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, image, subset)

    with shared_tmp_dir(world) as folder:
        run = start_run("pet-recon", device="cpu", verbosity=-1, world=world)
        reference, reference_history = PetRecon(  # never stopped, same ranks and threads
            run, pet_case["dynamic"], folder / "ref.h5", settings, decomp="frames").compute()
        monkeypatch.setattr(OsemReconstructor, "subiteration", interrupted)
        monkeypatch.setattr(PetRecon, "view_shares", shares_of_frame)
        run = start_run("pet-recon", device="cpu", verbosity=-1, world=world)
        with pytest.raises(CheckpointStop, match="frame"):
            PetRecon(run, pet_case["dynamic"], folder / "x.h5", settings,
                           decomp="frames").compute()
        monkeypatch.setattr(OsemReconstructor, "subiteration", original)
        monkeypatch.setattr(PetRecon, "view_shares", original_shares)
        run = start_run("pet-recon", device="cpu", verbosity=-1, world=world)
        resumed = PetRecon(run, pet_case["dynamic"], folder / "x.h5", settings,
                                 decomp="frames", resume=True)
        images, histories = resumed.compute()
        world.barrier()
        if world.is_root:
            np.testing.assert_array_equal(images, reference)
            assert [list(h) for h in histories] == [list(h) for h in reference_history]
            assert not any(resumed.frame_checkpoint_path(f).exists() for f in (0, 1))


@pytest.mark.mpi
def test_listmode_events_over_the_ranks_equal_one_rank(pet_case, tmp_path, monkeypatch):
    from medhpc.pet import run_listmode
    from medhpc.pet.run_listmode import ListModeRecon

    from medhpc.pet.listmode import read_listmode_layout

    _, events = pet_case["listmode"]
    # reads of the smaller block's size: where the blocks differ, ranks need 1 or 2 reads
    n_events = read_listmode_layout(events).n_events
    monkeypatch.setattr(run_listmode, "READ_EVENTS", max(n_events // get_world().size, 1))
    run = start_run("pet-recon", device="cpu", verbosity=-1, world=get_world())
    image, history = ListModeRecon(run, events, tmp_path / "x.nii.gz", SETTINGS).compute()
    reference, reference_history = ListModeRecon(serial_run(), events, tmp_path / "y.nii.gz",
                                                 SETTINGS).compute()
    np.testing.assert_allclose(image, reference, rtol=2e-4, atol=2e-5 * reference.max())
    np.testing.assert_allclose(history, reference_history, rtol=1e-5)


@pytest.mark.mpi
def test_scatter_estimate_over_the_ranks_equals_one_rank(pet_case, tmp_path):
    from medhpc.pet.run_scatter import ScatterEstimate
    from medhpc.pet.settings import ScatterSettings

    phantom = pet_case["folder"] / "phantom"
    inputs = (pet_case["noise_free"], phantom / "activity.nii.gz", phantom / "mu_map.nii.gz")
    run = start_run("pet-scatter", device="cpu", verbosity=-1, world=get_world())
    scatter, document = ScatterEstimate(run, *inputs, tmp_path / "s.h5", ScatterSettings(),
                                        fit_tails=False).compute()
    reference, reference_document = ScatterEstimate(serial_run(), *inputs, tmp_path / "t.h5",
                                                    ScatterSettings(), fit_tails=False).compute()
    assert document["scatter_fraction"] == pytest.approx(reference_document["scatter_fraction"],
                                                         rel=1e-6)
    if get_world().is_root:
        np.testing.assert_allclose(scatter, reference, rtol=1e-5, atol=1e-7 * reference.max())


@pytest.mark.mpi
def test_nmf_frames_over_the_ranks_equal_one_rank(tmp_path):
    from tests.pet.test_nmf import dynamic_sinogram

    sinogram, _ = dynamic_sinogram(tmp_path, frames=4, counts=1e5)
    settings = ReconSettings(algorithm="nmf", iterations=1, subsets=1, components=2)
    run = start_run("pet-recon", device="cpu", verbosity=-1, world=get_world())
    image, history = PetRecon(run, sinogram, tmp_path / "x.nii.gz", settings).compute()
    reference, reference_history = PetRecon(serial_run(), sinogram, tmp_path / "y.nii.gz",
                                            settings).compute()
    if get_world().is_root:
        np.testing.assert_allclose(history, reference_history, rtol=1e-6)
        np.testing.assert_allclose(image, reference, rtol=1e-4, atol=1e-5 * reference.max())
    else:
        assert image is None


@pytest.mark.mpi
@pytest.mark.parametrize("decomp", ["views", "planes"])
def test_span3_data_over_the_ranks_equal_one_rank(span_case, tmp_path, decomp):
    compare(span_case["span3_noisy"], tmp_path, decomp)


@pytest.mark.mpi
def test_dip_views_over_the_ranks_equal_one_rank(pet_case, tmp_path):
    pytest.importorskip("torch")
    settings = ReconSettings(algorithm="dip", iterations=1, subsets=2, dip_widths=(4, 8))
    world = get_world()
    run = start_run("pet-recon", device="cpu", verbosity=-1, world=world)
    image, history = PetRecon(run, pet_case["noisy"], tmp_path / "x.nii.gz", settings).compute()
    reference, reference_history = PetRecon(serial_run(), pet_case["noisy"],
                                            tmp_path / "y.nii.gz", settings).compute()
    np.testing.assert_allclose(image, reference, rtol=1e-3, atol=1e-4 * reference.max())
    np.testing.assert_allclose(history, reference_history, rtol=1e-5)

