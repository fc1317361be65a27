import math

import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.phantoms.pet import (MU_LUNG_PER_MM, MU_WATER_PER_MM, NEMA_SPHERE_DIAMETERS_MM,
                                 nema_analysis, nema_iq_phantom, sphere_masks)


@pytest.fixture(scope="module")
def full_size():
    """DMI voxels, a few slices: nominal sizes (scale 1)."""
    return nema_iq_phantom((21, 215, 215), (2.78, 2.78, 2.78))


@pytest.fixture(scope="module")
def small():
    """The test-scanner grid: the phantom is scaled down to fit."""
    return nema_iq_phantom((15, 48, 48), (4.0, 4.0, 2.0))


def voxel_at(phantom, xyz_mm):
    index = [round((c - o) / v) for c, o, v in zip(xyz_mm, phantom["origin_mm"],
                                                    phantom["voxel_mm"])]
    return index[2], index[1], index[0]


def test_grid_and_values(full_size):
    activity, mu = full_size["activity"], full_size["mu_map"]
    assert activity.shape == mu.shape == (21, 215, 215)
    assert activity.dtype == mu.dtype == np.float32
    assert full_size["scale"] == 1.0
    np.testing.assert_allclose(full_size["origin_mm"], [-107 * 2.78, -107 * 2.78, -10 * 2.78])
    assert [s["diameter_mm"] for s in full_size["spheres"]] == list(NEMA_SPHERE_DIAMETERS_MM)
    for sphere in full_size["spheres"][-3:]:
        assert activity[voxel_at(full_size, sphere["centre_mm"])] == pytest.approx(4.0)
        assert mu[voxel_at(full_size, sphere["centre_mm"])] == pytest.approx(MU_WATER_PER_MM)
    centre = voxel_at(full_size, (0.0, 0.0, 0.0))
    assert activity[centre] == 0.0
    assert mu[centre] == pytest.approx(MU_LUNG_PER_MM)
    assert activity[0, 0, 0] == 0.0 and mu[0, 0, 0] == 0.0
    background = full_size["background_mask"]
    assert background.sum() > 0
    np.testing.assert_allclose(activity[background], 1.0)
    np.testing.assert_allclose(mu[background], MU_WATER_PER_MM)


def test_sphere_volume(full_size, small):
    for phantom in (full_size, small):
        box, fraction = phantom["sphere_fractions"][-1]
        radius = phantom["spheres"][-1]["diameter_mm"] / 2
        volume = fraction.sum(dtype=np.float64) * np.prod(phantom["voxel_mm"])
        assert volume == pytest.approx(4 / 3 * math.pi * radius ** 3, rel=0.03)
        mask = sphere_masks(phantom)[-1]
        assert mask.sum() * np.prod(phantom["voxel_mm"]) == pytest.approx(volume, rel=0.15)


def test_small_grid_is_scaled_to_fit(small):
    assert 0.5 < small["scale"] < 1.0
    activity = small["activity"]
    assert np.all(activity[:, [0, -1], :] == 0) and np.all(activity[:, :, [0, -1]] == 0)
    largest = small["spheres"][-1]
    assert largest["diameter_mm"] == pytest.approx(37.0 * small["scale"])
    assert activity[voxel_at(small, largest["centre_mm"])] == pytest.approx(4.0, abs=0.05)
    assert activity[voxel_at(small, (0.0, 0.0, 0.0))] == pytest.approx(0.0, abs=0.05)


def test_analysis_of_truth(full_size):
    result = nema_analysis(full_size["activity"], full_size)
    assert len(full_size["background_roi_centres_mm"]) == 12
    assert len(full_size["background_roi_slices"]) == 5
    assert min(result["contrast_recovery"][-3:]) > 0.9
    assert max(result["contrast_recovery"]) <= 1.0 + 1e-6
    assert max(result["background_variability"]) < 1e-6
    assert result["background_mean"] == pytest.approx(1.0)
    assert result["lung_residual"] == pytest.approx(0.0, abs=1e-6)


def test_analysis_sees_noise_and_contrast(small):
    rng = np.random.default_rng(1)
    noisy = small["activity"] * rng.gamma(25.0, 1 / 25.0, small["activity"].shape)
    result = nema_analysis(noisy, small)
    assert all(0.0 < bv < 0.5 for bv in result["background_variability"])
    flat = nema_analysis(np.where(small["activity"] > 0, 1.0, 0.0), small)
    np.testing.assert_allclose(flat["contrast_recovery"], 0.0, atol=1e-6)


def test_bad_inputs(small):
    with pytest.raises(InputError, match="shape"):
        nema_iq_phantom((15, 48), (4.0, 4.0, 2.0))
    with pytest.raises(InputError, match="voxel_mm"):
        nema_iq_phantom((15, 48, 48), (4.0, -4.0, 2.0))
    with pytest.raises(InputError, match="does not match"):
        nema_analysis(np.zeros((3, 4, 5)), small)
