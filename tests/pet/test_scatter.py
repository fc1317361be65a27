"""Single-scatter simulation against a brute-force integral of the same physics, and the
physics pieces against their textbook values."""

import math

import numpy as np
import pytest
from scipy import ndimage

from medhpc.pet.scanner import ScannerGeometry, crystal_xy, sinogram_crystals
from medhpc.pet.scatter import (interpolate_to_sinogram, klein_nishina,
                                single_scatter, tail_fit, total_compton, window_efficiency)
from medhpc.pet.settings import ScatterSettings


def test_klein_nishina_and_its_total():
    assert klein_nishina(1.0) == pytest.approx(1.0)  # forward: r_e^2
    cos = np.linspace(-1, 1, 20001)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    integral = 2 * np.pi * trapezoid(klein_nishina(cos), cos)
    assert integral == pytest.approx(total_compton(511.0), rel=1e-6)
    # 0.2867 barn at 511 keV, r_e^2 = 0.079407 barn
    assert total_compton(511.0) * 0.079407 == pytest.approx(0.2867, rel=2e-3)
    assert total_compton(340.0) > total_compton(511.0)


def test_window_efficiency():
    assert window_efficiency(511.0, (425, 650), 0.12) > 0.9
    assert window_efficiency(300.0, (425, 650), 0.12) < 0.01
    assert window_efficiency(425.0, (425, 650), 0.12) == pytest.approx(0.5, abs=0.02)


TINY = ScannerGeometry(name="tiny", crystals_per_ring=32, rings=2, radius_mm=60.0,
                       ring_spacing_mm=4.0, crystal_size_mm=5.0, radial_trim=6,
                       max_ring_difference=1)


def tiny_images():
    shape, voxel = (4, 24, 24), (3.0, 3.0, 3.0)
    origin = -(np.array(shape[::-1]) - 1) / 2 * np.array(voxel)
    z, y, x = np.meshgrid(*[origin[i] + voxel[i] * np.arange(shape[2 - i]) for i in (2, 1, 0)],
                          indexing="ij")
    mu = ndimage.gaussian_filter(((x ** 2 + y ** 2) < 25.0 ** 2).astype(float) * 0.0096, 1.0)
    activity = np.exp(-((x - 8) ** 2 + (y + 5) ** 2) / (2 * 8.0 ** 2)) * (np.abs(z) < 6)
    activity = ndimage.gaussian_filter(activity, 1.0)
    return activity.astype(np.float32), mu.astype(np.float32), origin, np.array(voxel)


def line_integral(image, origin, voxel, start, end, step_mm=0.05):
    """Dense sampling with trilinear interpolation: independent of the Joseph projector."""
    length = np.linalg.norm(end - start)
    t = (np.arange(int(length / step_mm)) + 0.5) / int(length / step_mm)
    points = start[None] + t[:, None] * (end - start)[None]
    index = ((points - origin) / voxel)[:, ::-1].T  # z, y, x
    return float(ndimage.map_coordinates(image.astype(np.float64), index, order=1,
                                         mode="constant", cval=0.0).sum() * length / len(t))


def brute_force(scanner, activity, mu, origin, voxel, a, b, settings):
    """S_AB / (trues' geometric factor) summed over every voxel, exact physics functions."""
    area = scanner.crystal_size_mm * scanner.ring_spacing_mm
    xy = crystal_xy(scanner)
    normal = xy / np.linalg.norm(xy, axis=1, keepdims=True)
    (ca, ra), (cb, rb) = a, b
    A = np.array([*xy[ca], scanner.ring_z_mm[ra]])
    B = np.array([*xy[cb], scanner.ring_z_mm[rb]])
    na, nb = np.array([*normal[ca], 0]), np.array([*normal[cb], 0])
    ab = B - A
    r_ab = np.linalg.norm(ab)
    trues = area ** 2 * abs(ab @ na) / r_ab * abs(ab @ nb) / r_ab / (4 * np.pi * r_ab ** 2)
    eps511 = window_efficiency(511.0, settings.window_kev, settings.energy_resolution)
    total = 0.0
    for index in np.argwhere(mu > settings.mu_threshold_per_mm):
        S = origin + index[::-1] * voxel
        sa, sb = A - S, B - S
        r_sa, r_sb = np.linalg.norm(sa), np.linalg.norm(sb)
        cos = -(sa @ sb) / (r_sa * r_sb)
        energy = 511.0 / (2.0 - cos)
        f = total_compton(energy) / total_compton(511.0)
        eps = window_efficiency(energy, settings.window_kev, settings.energy_resolution) / eps511
        geometry = (area * abs(sa @ na) / r_sa * area * abs(sb @ nb) / r_sb
                    / (4 * np.pi * r_sa ** 2 * r_sb ** 2))
        i_sa = line_integral(mu, origin, voxel, S, A)
        i_sb = line_integral(mu, origin, voxel, S, B)
        l_sa = line_integral(activity, origin, voxel, S, A)
        l_sb = line_integral(activity, origin, voxel, S, B)
        emission = math.exp(-i_sa - f * i_sb) * l_sa + math.exp(-f * i_sa - i_sb) * l_sb
        total += (np.prod(voxel) * mu[tuple(index)] * klein_nishina(cos) / total_compton(511.0)
                  * geometry * eps * emission)
    return total / trues


def test_sss_equals_the_brute_force_single_scatter_integral():
    activity, mu, origin, voxel = tiny_images()
    settings = ScatterSettings(scatter_point_mm=3.0, radial_step=5, view_step=5, rings_sampled=2)
    bins, values = single_scatter(TINY, activity, origin, voxel, mu, origin, voxel, settings)
    start, end = sinogram_crystals(TINY, bins.views)
    checked = 0
    for i, radial in enumerate(bins.radial[::2]):
        for j, view in enumerate(bins.views[::2]):
            for r1, r2 in ((0, 0), (0, 1)):
                reference = brute_force(TINY, activity, mu, origin, voxel,
                                        (start[radial, 2 * j], r1), (end[radial, 2 * j], r2),
                                        settings)
                got = values[2 * i, 2 * j, r1, r2]
                assert got == pytest.approx(reference, rel=5e-3, abs=1e-4 * values.max())
                checked += 1
    assert checked >= 8 and values.max() > 0


def test_interpolation_reproduces_the_samples_and_tail_fit_finds_the_scale():
    activity, mu, origin, voxel = tiny_images()
    settings = ScatterSettings(scatter_point_mm=6.0, radial_step=3, view_step=4)
    bins, values = single_scatter(TINY, activity, origin, voxel, mu, origin, voxel, settings)
    full = interpolate_to_sinogram(TINY, bins, values)
    assert full.shape == TINY.sinogram_shape
    direct = 0  # plane 0 is rings (0, 0)
    np.testing.assert_allclose(full[np.ix_(bins.radial, bins.views, [direct])][..., 0],
                               values[:, :, 0, 0], rtol=1e-6)  # float32
    rng = np.random.default_rng(0)
    attenuation = np.where(rng.random(full.shape) < 0.4, 1.0, 0.5)
    randoms = np.full(full.shape, 2.0)
    prompts = rng.poisson(2.5 * full * 1000 / full.max() + randoms).astype(np.float64)
    scale, tails = tail_fit(full * 1000 / full.max(), prompts, randoms, attenuation)
    assert tails > 0 and scale == pytest.approx(2.5, rel=0.05)


# ---------------------------------------------------------------- estimate, correct, loop

def estimate(sinogram, activity, mu_map, out, fit_tails=True, world=None):
    from medhpc.pet.run_scatter import ScatterEstimate
    from medhpc.runtime.context import start_run

    run = start_run("pet-scatter", device="cpu", verbosity=-1, overwrite=True,
                    world=world) if world else serial_run("pet-scatter")
    return ScatterEstimate(run, sinogram, activity, mu_map, out, ScatterSettings(),
                           fit_tails=fit_tails)


def serial_run(command):
    from tests.pet.conftest import serial_run as run

    return run(command)


@pytest.fixture(scope="module")
def scattered(pet_case):
    from tests.pet.conftest import simulate

    return simulate(pet_case["folder"], "scattered", counts=5e6, scatter=True)


def recon_scale_to_truth(sinogram, pet_case, tmp_path, scatter=None):
    from medhpc.io.images import write_image
    from medhpc.pet.corrections import CorrectionFiles
    from medhpc.pet.figures import truth_scale
    from medhpc.pet.osem import ReconSettings
    from medhpc.pet.run import PetRecon

    out = tmp_path / f"r{0 if scatter is None else 1}.nii.gz"
    recon = PetRecon(serial_run("pet-recon"), sinogram, out, ReconSettings(iterations=4),
                     corrections=CorrectionFiles(scatter=scatter) if scatter else None)
    image, _ = recon.compute()
    write_image(out, image, pet_case["grid"], overwrite=True)
    return out, truth_scale(image, pet_case["truth"])


def test_estimate_correct_and_loop_once(pet_case, scattered, tmp_path):
    import h5py

    mu_map = pet_case["folder"] / "phantom" / "mu_map.nii.gz"
    with h5py.File(scattered) as h5:
        true_scatter = h5["true_scatter"][...]
    first, uncorrected = recon_scale_to_truth(scattered, pet_case, tmp_path)
    errors, scales = [], []
    activity = first
    for loop in range(2):  # reconstruct, estimate, reconstruct with the estimate, again
        estimator = estimate(scattered, activity, mu_map, tmp_path / f"s{loop}.h5")
        estimated, document = estimator.compute()
        errors.append(np.linalg.norm(estimated - true_scatter) / np.linalg.norm(true_scatter))
        estimator._write(estimated, document)
        activity, scale = recon_scale_to_truth(scattered, pet_case, tmp_path,
                                               str(tmp_path / f"s{loop}.h5"))
        scales.append(scale)
    # uncorrected, scatter inflates the image by ~9%; corrected, within 3% of the truth's scale
    assert uncorrected < 0.94
    assert all(abs(scale - 1.0) < 0.04 for scale in scales), scales
    assert errors[0] < 0.1 and errors[1] < errors[0], errors


def test_data_without_scatter_fit_almost_none(pet_case):
    mu_map = pet_case["folder"] / "phantom" / "mu_map.nii.gz"
    estimator = estimate(pet_case["noisy"], pet_case["folder"] / "phantom" / "activity.nii.gz",
                         mu_map, "unused.h5")
    _, document = estimator.compute()
    assert document["scale"] < 0.1 and document["tail_bins"] > 1000


def test_interpolation_equals_scipy_multilinear():
    from scipy.interpolate import RegularGridInterpolator

    from medhpc.pet.scanner import load_scanner, plane_ring_pairs
    from medhpc.pet.scatter import SampledBins

    scanner = load_scanner("small-test")
    bins = SampledBins(np.array([0, 4, 9, 30, 62]), np.array([0, 5, 20, 47]),
                       np.array([0, 3, 7]))
    values = np.random.default_rng(2).random((5, 4, 3, 3))
    got = interpolate_to_sinogram(scanner, bins, values, views=np.arange(0, 48, 5))
    reference = RegularGridInterpolator((bins.radial, bins.views, bins.rings, bins.rings),
                                        values)
    pairs = plane_ring_pairs(scanner)
    r, v, p = np.meshgrid(np.arange(63), np.arange(0, 48, 5), np.arange(len(pairs)),
                          indexing="ij")
    expected = reference(np.stack([r, v, pairs[p, 0], pairs[p, 1]], -1).reshape(-1, 4))
    np.testing.assert_allclose(got.ravel(), expected, rtol=1e-6)


def test_span3_estimate_from_the_true_activity_finds_the_simulated_scatter(pet_case, tmp_path):
    """At span 3 the SSS is interpolated to every ring pair and summed into the planes; from
    the true activity the tail-fitted estimate is within 5% of the simulated scatter."""
    import h5py

    from tests.pet.conftest import SPAN_SCANNER, simulate

    scanner = tmp_path / "span3.toml"
    scanner.write_text(SPAN_SCANNER.format(span=3))
    sinogram = simulate(pet_case["folder"], "span3_scattered", counts=5e6, scatter=True,
                        scanner=scanner)
    with h5py.File(sinogram) as h5:
        true_scatter = h5["true_scatter"][...]
    phantom = pet_case["folder"] / "phantom"
    estimated, document = estimate(sinogram, phantom / "activity.nii.gz",
                                   phantom / "mu_map.nii.gz", tmp_path / "s.h5").compute()
    assert estimated.shape == true_scatter.shape and true_scatter.shape[2] == 37
    assert np.linalg.norm(estimated - true_scatter) / np.linalg.norm(true_scatter) < 0.05
