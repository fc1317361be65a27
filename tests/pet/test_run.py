"""pet-recon end to end on one rank: convergence, contrast, decompositions, checkpoints."""

import os
import signal

import numpy as np
import pytest

from medhpc.pet.osem import OsemReconstructor, ReconSettings
from medhpc.pet.run import PetRecon
from medhpc.runtime.checkpoint import CheckpointStop
from medhpc.phantoms.pet import nema_iq_phantom
from tests.pet.conftest import SHAPE, SMALL_TOF_SCANNER, VOXEL_MM, serial_run


def reconstruct(sinogram, out, decomp="views", run=None, **settings):
    run = run or serial_run("pet-recon")
    recon = PetRecon(run, sinogram, out, ReconSettings(**settings), decomp=decomp)
    return recon.compute()


def nrmse(image, truth):
    scale = np.sum(image * truth) / np.sum(image * image)
    return float(np.linalg.norm(scale * image - truth) / np.linalg.norm(truth))


def test_noise_free_nrmse_falls_with_iterations(pet_case, tmp_path):
    errors = []
    likelihoods = []
    for iterations in (1, 3, 6):
        image, history = reconstruct(pet_case["noise_free"], tmp_path / "x.nii.gz",
                                     iterations=iterations, subsets=4)
        errors.append(nrmse(image, pet_case["truth"]))
        likelihoods.append(history[-1])
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.35, errors
    assert likelihoods[0] < likelihoods[1] < likelihoods[2]


def test_mlem_likelihood_increases_monotonically(pet_case, tmp_path):
    _, history = reconstruct(pet_case["noise_free"], tmp_path / "x.nii.gz", algorithm="mlem",
                             iterations=5)
    assert np.all(np.diff(history) > 0), history


def test_contrast_recovery_of_large_spheres_from_noisy_data(pet_case, tmp_path):
    image, _ = reconstruct(pet_case["noisy"], tmp_path / "x.nii.gz", iterations=6, subsets=8)
    phantom = nema_iq_phantom(SHAPE, VOXEL_MM)
    analysis = __import__("medhpc.phantoms.pet", fromlist=["nema_analysis"]).nema_analysis(
        image, phantom)
    recovery = np.asarray(analysis["contrast_recovery"])
    order = np.argsort(analysis["diameters_mm"])[::-1]
    print("CR", dict(zip(np.asarray(analysis["diameters_mm"])[order].round(1),
                         recovery[order].round(3))),
          "BV", np.asarray(analysis["background_variability"])[order].round(3))
    assert np.all(recovery[order[:4]] >= 0.7), recovery
    assert np.all(np.asarray(analysis["background_variability"]) < 0.5)


def test_psf_postfilter_and_rdp_keep_the_image_positive_and_finite(pet_case, tmp_path):
    for settings in ({"psf_fwhm_mm": 4.0}, {"postfilter_fwhm_mm": 6.0},
                     {"algorithm": "osem-rdp", "rdp_beta": 0.5}):
        image, history = reconstruct(pet_case["noisy"], tmp_path / "x.nii.gz", iterations=2,
                                     subsets=4, **settings)
        assert np.isfinite(image).all() and image.min() >= 0, settings
        assert np.isfinite(history).all()


def test_rdp_smooths_the_background(pet_case, tmp_path):
    plain, _ = reconstruct(pet_case["noisy"], tmp_path / "x.nii.gz", iterations=4, subsets=8)
    smooth, _ = reconstruct(pet_case["noisy"], tmp_path / "x.nii.gz", iterations=4, subsets=8,
                            algorithm="osem-rdp", rdp_beta=2.0)
    body = pet_case["truth"] == 1.0
    assert np.std(smooth[body]) < np.std(plain[body])


def test_planes_decomposition_reconstructs_the_phantom(pet_case, tmp_path):
    image, history = reconstruct(pet_case["noise_free"], tmp_path / "x.nii.gz", decomp="planes",
                                 iterations=4, subsets=4)
    assert image.shape == SHAPE
    assert nrmse(image, pet_case["truth"]) < 0.45


def test_frames_decomposition_gives_one_image_per_frame(pet_case, tmp_path):
    images, histories = reconstruct(pet_case["dynamic"], tmp_path / "x.nii.gz", decomp="frames",
                                    iterations=2, subsets=4)
    assert images.shape == (2,) + SHAPE
    ratio = images[1].sum() / images[0].sum()
    assert 1.3 < ratio < 1.7  # the second frame has 1.5 x the activity
    assert len(histories) == 2


def test_checkpoint_on_sigterm_then_resume_gives_the_same_image(pet_case, tmp_path,
                                                                monkeypatch):
    settings = dict(iterations=3, subsets=4)
    reference, _ = reconstruct(pet_case["noisy"], tmp_path / "ref.nii.gz", **settings)
    original = OsemReconstructor.subiteration
    calls = {"n": 0}

    def interrupted(self, image, subset):
        calls["n"] += 1
        if calls["n"] == 6:  # during iteration 2
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, image, subset)

    out = tmp_path / "stopped.nii.gz"
    monkeypatch.setattr(OsemReconstructor, "subiteration", interrupted)
    run = serial_run("pet-recon")
    recon = PetRecon(run, pet_case["noisy"], out, ReconSettings(**settings))
    with pytest.raises(CheckpointStop):
        recon.compute()
    assert recon.checkpoint_path.exists()
    monkeypatch.setattr(OsemReconstructor, "subiteration", original)
    resumed = PetRecon(serial_run("pet-recon"), pet_case["noisy"], out,
                             ReconSettings(**settings), resume=True)
    image, history = resumed.compute()
    np.testing.assert_array_equal(image, reference)
    assert len(history) == 3 * 4
    assert not resumed.checkpoint_path.exists()


def test_tof_reconstruction_converges_faster_than_non_tof(tmp_path):
    from medhpc.io.images import read_image
    from medhpc.phantoms.pet_files import write_pet_phantom
    from tests.pet.conftest import simulate

    scanner = tmp_path / "small-tof.toml"
    scanner.write_text(SMALL_TOF_SCANNER)
    write_pet_phantom(tmp_path / "phantom", str(scanner), shape=(7, 32, 32),
                      voxel_mm=(4.0, 4.0, 2.0))
    truth, _ = read_image(tmp_path / "phantom" / "activity.nii.gz")
    errors = {}
    for tof in (False, True):
        sinogram = simulate(tmp_path, f"tof-{tof}", noise=False, tof=tof, scanner=str(scanner))
        errors[tof] = [nrmse(reconstruct(sinogram, tmp_path / "x.nii.gz", iterations=n,
                                         subsets=4)[0], truth) for n in (1, 3)]
    assert errors[True][1] < errors[True][0]
    assert errors[True][0] < errors[False][0], errors


def test_sensitivity_cache_is_written_reused_and_refreshed(pet_case, tmp_path):
    cache = tmp_path / "sensitivity.h5"

    def run_with_cache(subsets):
        run = serial_run("pet-recon")
        recon = PetRecon(run, pet_case["noisy"], tmp_path / "x.nii.gz",
                               ReconSettings(iterations=1, subsets=subsets),
                               sensitivity_cache=cache)
        image, _ = recon.compute()
        return image, set(run.timer.seconds)

    first, stages = run_with_cache(4)
    assert cache.exists() and "sensitivity" in stages and "write sensitivity cache" in stages
    second, stages = run_with_cache(4)
    assert "sensitivity" not in stages and "read sensitivity cache" in stages
    np.testing.assert_array_equal(first, second)
    _, stages = run_with_cache(2)  # other subsets: the cache is outdated and rewritten
    assert "sensitivity" in stages and "write sensitivity cache" in stages


def test_frames_stop_on_sigterm_keep_finished_frames_and_resume_to_the_same_images(
        pet_case, tmp_path, monkeypatch):
    settings = dict(iterations=3, subsets=4)
    reference, reference_history = reconstruct(pet_case["dynamic"], tmp_path / "ref.nii.gz",
                                               decomp="frames", **settings)
    original = OsemReconstructor.subiteration
    calls = {"n": 0}

    def interrupted(self, image, subset):
        calls["n"] += 1
        if calls["n"] == 12 + 6:  # frame 1, iteration 2
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, image, subset)

    out = tmp_path / "stopped.h5"
    monkeypatch.setattr(OsemReconstructor, "subiteration", interrupted)
    stopped = PetRecon(serial_run("pet-recon"), pet_case["dynamic"], out,
                             ReconSettings(**settings), decomp="frames")
    with pytest.raises(CheckpointStop, match="2 of 2 frame"):
        stopped.compute()
    assert stopped.frame_checkpoint_path(0).exists() and stopped.frame_checkpoint_path(1).exists()
    monkeypatch.setattr(OsemReconstructor, "subiteration", original)
    counted = {"n": 0}

    def counting(self, image, subset):
        counted["n"] += 1
        return original(self, image, subset)

    monkeypatch.setattr(OsemReconstructor, "subiteration", counting)
    resumed = PetRecon(serial_run("pet-recon"), pet_case["dynamic"], out,
                             ReconSettings(**settings), decomp="frames", resume=True)
    images, histories = resumed.compute()
    assert counted["n"] == 4  # frame 0 was finished; frame 1 redoes its third iteration only
    np.testing.assert_array_equal(images, reference)
    assert [list(h) for h in histories] == [list(h) for h in reference_history]
    assert not any(resumed.frame_checkpoint_path(f).exists() for f in (0, 1))


def test_frames_checkpoint_every_k_iterations(pet_case, tmp_path, monkeypatch):
    saved = []
    from medhpc.runtime.checkpoint import Checkpointer

    original = Checkpointer.save
    monkeypatch.setattr(Checkpointer, "save",
                        lambda self, i, state: (saved.append((self.path.name, i)),
                                                original(self, i, state)))
    recon = PetRecon(serial_run("pet-recon"), pet_case["dynamic"], tmp_path / "e.h5",
                           ReconSettings(iterations=2, subsets=2), decomp="frames",
                           checkpoint_every=1)
    recon.compute()
    assert saved == [("e.checkpoint.frame0000.h5", 1), ("e.checkpoint.frame0000.h5", 2),
                     ("e.checkpoint.frame0001.h5", 1), ("e.checkpoint.frame0001.h5", 2)]


def penalised_objective(sinogram, image, beta, gamma=2.0, epsilon=1e-3):
    """Poisson log-likelihood of the whole sinogram minus beta x RDP (float64)."""
    from medhpc.pet.projector import JosephProjector, axis_aligned_grid
    from medhpc.pet.scanner import lor_endpoints
    from medhpc.pet.sinogram import read_block, read_layout
    from tests.pet.test_em import rdp_value

    layout = read_layout(sinogram)
    block = read_block(layout)
    origin, voxel = axis_aligned_grid(layout.image, sinogram)
    xstart, xend = lor_endpoints(layout.scanner)
    projector = JosephProjector(xstart.reshape(-1, 3), xend.reshape(-1, 3), layout.image.shape,
                                origin, voxel)
    expected = (block.multiplicative.ravel().astype(np.float64) * projector.forward(image)
                + block.additive.ravel())
    measured = block.prompts.ravel()
    likelihood = np.sum(measured * np.log(np.maximum(expected, 1e-30)) - expected)
    return likelihood - beta * rdp_value(image, gamma, epsilon)


def test_bsrem_objective_increases_every_iteration(pet_case, tmp_path):
    beta = 2.0
    objectives = []
    for iterations in range(1, 7):
        image, _ = reconstruct(pet_case["noisy"], tmp_path / "b.nii.gz", iterations=iterations,
                               subsets=4, algorithm="bsrem", rdp_beta=beta,
                               bsrem_relaxation=0.5)
        objectives.append(penalised_objective(pet_case["noisy"], image, beta))
    steps = np.diff(objectives)
    assert np.all(steps > 0), objectives
    assert steps[-1] < 0.05 * steps[0]  # and levels off


def test_bsrem_without_prior_or_relaxation_is_osem(pet_case, tmp_path):
    osem, _ = reconstruct(pet_case["noisy"], tmp_path / "o.nii.gz", iterations=2, subsets=4)
    bsrem, _ = reconstruct(pet_case["noisy"], tmp_path / "b.nii.gz", iterations=2, subsets=4,
                           algorithm="bsrem", rdp_beta=0.0, bsrem_relaxation=0.0)
    np.testing.assert_allclose(bsrem, osem, rtol=1e-4, atol=1e-6 * osem.max())


def test_bsrem_smooths_the_background_like_osl(pet_case, tmp_path):
    plain, _ = reconstruct(pet_case["noisy"], tmp_path / "x.nii.gz", iterations=4, subsets=8)
    smooth, _ = reconstruct(pet_case["noisy"], tmp_path / "x.nii.gz", iterations=4, subsets=8,
                            algorithm="bsrem", rdp_beta=2.0)
    body = pet_case["truth"] == 1.0
    assert np.std(smooth[body]) < np.std(plain[body])


def test_the_image_is_zero_outside_the_field_of_view_unless_asked(pet_case, tmp_path):
    from medhpc.pet.scanner import field_of_view_mask, load_scanner
    from medhpc.pet.projector import axis_aligned_grid

    scanner = load_scanner("small-test")
    origin, voxel = axis_aligned_grid(pet_case["grid"], "phantom")
    inside = field_of_view_mask(scanner, SHAPE, origin, voxel)
    assert 0 < np.count_nonzero(~inside) < 0.2 * inside.size  # the grid's corners
    masked, _ = reconstruct(pet_case["noisy"], tmp_path / "m.nii.gz", iterations=1, subsets=4)
    assert np.all(masked[:, ~inside] == 0) and masked[:, inside].max() > 0
    recon = PetRecon(serial_run("pet-recon"), pet_case["noisy"], tmp_path / "u.nii.gz",
                     ReconSettings(iterations=1, subsets=4), fov_mask=False)
    unmasked, _ = recon.compute()
    assert unmasked[:, ~inside].max() > 0


def test_a_modular_scanner_with_ring_gaps_reconstructs_and_refuses_planes(tmp_path):
    from medhpc.errors import InputError
    from medhpc.io.images import read_image
    from medhpc.phantoms.pet_files import write_pet_phantom
    from tests.pet.conftest import simulate
    from tests.pet.test_scanner import MODULAR

    scanner = tmp_path / "modular.toml"
    scanner.write_text(MODULAR)
    write_pet_phantom(tmp_path / "phantom", str(scanner), shape=(15, 40, 40),
                      voxel_mm=(4.0, 4.0, 2.0))
    truth, _ = read_image(tmp_path / "phantom" / "activity.nii.gz")
    sinogram = simulate(tmp_path, "modular", noise=False, scanner=str(scanner))
    image, _ = reconstruct(sinogram, tmp_path / "x.nii.gz", iterations=4, subsets=4)
    assert nrmse(image, truth) < 0.35
    with pytest.raises(InputError, match="gaps between its ring blocks"):
        reconstruct(sinogram, tmp_path / "y.nii.gz", decomp="planes", iterations=1, subsets=1)


@pytest.mark.parametrize("decomp", ["views", "planes"])
def test_span3_data_reconstruct_as_the_span1_data_of_the_same_phantom(span_case, tmp_path,
                                                                      decomp):
    """The same activity measured at span 3 (planes summing up to 3 ring pairs, factors the
    pairs' mean) and at span 1: the reconstructions agree, as close to the truth."""
    span1, _ = reconstruct(span_case["span1"], tmp_path / "a.nii.gz", decomp=decomp,
                           iterations=3, subsets=4)
    span3, _ = reconstruct(span_case["span3"], tmp_path / "b.nii.gz", decomp=decomp,
                           iterations=3, subsets=4)
    assert np.linalg.norm(span3 - span1) / np.linalg.norm(span1) < 0.03
    assert abs(span3.sum() / span1.sum() - 1) < 0.01
    assert nrmse(span3, span_case["truth"]) < nrmse(span1, span_case["truth"]) + 0.01
