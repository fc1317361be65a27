"""Registration on the phantom: recovery, energy, diffeomorphism, inverse, metrics, resume."""

import os
import signal

import numpy as np
import pytest

from medhpc.lddmm import optimise, similarity
from medhpc.lddmm.optimise import LevelOptimiser
from medhpc.lddmm.settings import Settings
from medhpc.lddmm.register import downsample, pyramid_shapes
from medhpc.lddmm.transform import compose_error_voxels, sample
from medhpc.runtime.checkpoint import Checkpointer, CheckpointStop
from tests.lddmm.conftest import QUICK, register, serial_world

RECOVERY = Settings(method="beg", metric="ssd", levels=3, iterations=(40, 20, 10),
                    max_step_voxels=2.0, tolerance=1e-4)


def owned_map(result, field):
    halo = result.grid.halo
    return field[:, halo:field.shape[1] - halo]


def dice(a, b, label):
    a, b = a == label, b == label
    return 2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b))


@pytest.fixture(scope="module")
def recovered(phantom32):
    result = register(phantom32["fixed"], phantom32["moving"], RECOVERY)
    return result, owned_map(result, result.forward), owned_map(result, result.inverse)


def test_phantom_tissues_are_recovered(phantom32, recovered):
    _, forward, _ = recovered
    points = np.indices(forward.shape[1:], dtype=np.float32) + forward
    warped = sample(phantom32["moving_labels"], points, "label")
    for tissue in (2, 3):  # grey and white matter
        before = dice(phantom32["moving_labels"], phantom32["fixed_labels"], tissue)
        after = dice(warped, phantom32["fixed_labels"], tissue)
        assert after >= 0.95 and after > before + 0.03, (tissue, before, after)


def test_no_folding_and_energy_decreases_at_every_level(recovered):
    result, forward, _ = recovered
    from medhpc.lddmm.flows import Flows
    from medhpc.lddmm import kernels_cpu
    from tests.lddmm.conftest import no_stage

    flows = Flows(serial_world(), result.grid, kernels_cpu, RECOVERY.timesteps,
                  RECOVERY.max_step_voxels, no_stage)
    determinant = flows.determinant(result.forward)
    assert determinant.min() > 0
    for level in range(RECOVERY.levels):
        energies = [e["energy"] for e in result.history if e["level"] == level]
        assert len(energies) > 2
        assert all(b < a for a, b in zip(energies, energies[1:]))
    coarse = [e for e in result.history if e["level"] == 0]
    assert coarse[-1]["similarity"] < 0.3 * coarse[0]["similarity"]


def test_forward_map_composed_with_inverse_is_near_identity(phantom32, recovered):
    _, forward, inverse = recovered
    error = compose_error_voxels(forward, inverse)
    assert error.mean() < 0.05, error.mean()
    truth_error = np.abs(forward - phantom32["inverse_displacement"]).mean()
    assert truth_error < 0.6  # voxels, mean over components; the deformation reaches 2 voxels


def test_self_registration_is_the_identity(small_phantom):
    result = register(small_phantom["fixed"], small_phantom["fixed"], QUICK)
    assert np.abs(result.forward).max() < 1e-6
    assert np.abs(result.inverse).max() < 1e-6


def test_ncc_registration_also_recovers_and_ignores_intensity_scale(small_phantom):
    settings = Settings(method="beg", metric="ncc", levels=2, iterations=(20, 10), timesteps=4)
    moving = 3.0 * small_phantom["moving"] + 0.5
    result = register(small_phantom["fixed"], moving, settings)
    forward = owned_map(result, result.forward)
    warped = sample(small_phantom["moving_labels"],
                    np.indices(forward.shape[1:], dtype=np.float32) + forward, "label")
    before = dice(small_phantom["moving_labels"], small_phantom["fixed_labels"], 3)
    assert dice(warped, small_phantom["fixed_labels"], 3) > before + 0.02


@pytest.mark.parametrize("metric", ["ssd", "ncc"])
def test_similarity_derivative_matches_finite_differences(metric):
    rng = np.random.default_rng(0)
    warped = rng.random((4, 5, 6))
    target = rng.random((4, 5, 6))
    term = similarity.evaluate(serial_world(), warped, target, metric, 0.3)
    a, c, d = term.coefficients
    derivative = a * warped + c * target + d
    for index in [(0, 0, 0), (2, 3, 4), (3, 1, 2)]:
        step = 1e-6
        bumped = warped.copy()
        bumped[index] += step
        value = similarity.evaluate(serial_world(), bumped, target, metric, 0.3).value
        assert (value - term.value) / step == pytest.approx(derivative[index], rel=1e-3, abs=1e-3)


def test_gradient_step_lowers_the_energy_as_predicted(small_phantom):
    """A small step along -grad changes E by about -eps * |grad|_V^2 (the V-gradient is right)."""
    from tests.lddmm.conftest import no_stage
    from medhpc.lddmm import kernels_cpu
    from medhpc.lddmm.grid import LevelGrid

    settings = Settings(method="beg", metric="ssd", timesteps=3, levels=1, iterations=(1,),
                        step=1e-3)
    grid = LevelGrid.build((24, 24, 24), (1.0, 1.0, 1.0), 1, 0, 3)
    level = LevelOptimiser(serial_world(), grid, kernels_cpu, settings, small_phantom["moving"],
                           small_phantom["fixed"], no_stage)
    state = optimise.LevelState(level.zero_velocity(), 0.0, settings.step)
    state, _ = level.run(state, 1)
    first, second = state.history
    predicted = -settings.step * second["gradient_norm"] ** 2
    assert second["energy"] - first["energy"] == pytest.approx(predicted, rel=0.2)


def test_pyramid_shapes_and_downsampling():
    assert pyramid_shapes((33, 20, 9), 3) == [(9, 5, 3), (17, 10, 5), (33, 20, 9)]
    image = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    coarse = downsample(image)
    assert coarse.shape == (2, 2, 2)
    assert coarse[0, 0, 0] == pytest.approx(np.mean(image[:2, :2, :2]))
    assert coarse[1, 1, 1] == pytest.approx(image[2, 2, 2])


def test_sigterm_checkpoint_then_resume_gives_the_same_velocity(small_phantom, tmp_path,
                                                                 monkeypatch):
    reference = register(small_phantom["fixed"], small_phantom["moving"], QUICK)
    original = LevelOptimiser.similarity
    calls = {"n": 0}

    def interrupted(self, forward):
        calls["n"] += 1
        if calls["n"] == 25:  # during the second level
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, forward)

    path = tmp_path / "checkpoint.h5"
    monkeypatch.setattr(LevelOptimiser, "similarity", interrupted)
    with pytest.raises(CheckpointStop):
        with Checkpointer(serial_world(), path, every=0) as checkpointer:
            register(small_phantom["fixed"], small_phantom["moving"], QUICK,
                     checkpointer=checkpointer)
    monkeypatch.setattr(LevelOptimiser, "similarity", original)
    assert path.exists()
    with Checkpointer(serial_world(), path, resume=True) as checkpointer:
        resumed = register(small_phantom["fixed"], small_phantom["moving"], QUICK,
                           checkpointer=checkpointer)
    for v, w in zip(resumed.velocity, reference.velocity):
        np.testing.assert_array_equal(v, w)
    np.testing.assert_array_equal(resumed.forward, reference.forward)
    assert [e["energy"] for e in resumed.history] == [e["energy"] for e in reference.history]


def test_local_correlation_derivative_matches_finite_differences():
    from medhpc.parallel.geometry import slab

    rng = np.random.default_rng(3)
    radius, shape = 2, (7, 6, 8)
    warped = rng.random(shape)
    target = 0.5 * warped + 0.5 * rng.random(shape)
    pad = ((radius, radius), (0, 0), (0, 0))
    slab_ = slab(shape[0], 1, 0, radius)

    def term(values):
        return similarity.local_correlation(serial_world(), np.pad(values, pad),
                                            np.pad(target, pad), slab_, radius, 0.5)

    base = term(warped)
    for index in [(0, 0, 0), (3, 2, 4), (6, 5, 7), (1, 4, 2)]:
        step = 1e-5
        bumped = warped.copy()
        bumped[index] += step
        numeric = (term(bumped).value - base.value) / step
        assert numeric == pytest.approx(base.derivative[index], rel=2e-3, abs=2e-3)


def test_box_sum_counts_clipped_windows():
    inside = np.zeros((4 + 2, 3, 5))
    inside[1:5] = 1.0
    counts = similarity.box_sum(inside, 1)
    assert counts.shape == (4, 3, 5)
    assert counts[0, 0, 0] == 2 * 2 * 2 and counts[1, 1, 2] == 27


def test_lncc_registration_recovers(small_phantom):
    settings = Settings(method="beg", metric="lncc", sigma=0.2, levels=2, iterations=(15, 8),
                        timesteps=4)
    result = register(small_phantom["fixed"], small_phantom["moving"], settings)
    forward = owned_map(result, result.forward)
    warped = sample(small_phantom["moving_labels"],
                    np.indices(forward.shape[1:], dtype=np.float32) + forward, "label")
    before = dice(small_phantom["moving_labels"], small_phantom["fixed_labels"], 3)
    assert dice(warped, small_phantom["fixed_labels"], 3) > before + 0.02
