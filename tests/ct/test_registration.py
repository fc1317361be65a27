"""The registration task's pieces: sampling of displaced volumes, scaling and squaring,
local NCC, the diffusion energy, folding, and the pair sampler's independence of the ranks."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medhpc.ct import augment_cpu  # noqa: E402
from medhpc.ct.augment import AugmentSettings  # noqa: E402
from medhpc.ct.registration import (PairSampler, diffusion_energy, folding_fraction,  # noqa: E402
                                    integrate_velocity, local_ncc, pad_to_divisor,
                                    registration_loss, sample_at)
from medhpc.ct.sampler import TrainingCase  # noqa: E402


def smooth_field(shape, amplitude, seed=0):
    """A smooth random displacement (3, z, y, x) in voxels."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.normal(0, amplitude, (1, 3, 3, 3, 3)).astype(np.float32))
    return torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear",
                                           align_corners=True)


def test_an_integer_displacement_shifts_the_volume_exactly():
    volume = torch.arange(6 * 7 * 8, dtype=torch.float32).reshape(1, 1, 6, 7, 8)
    displacement = torch.zeros(1, 3, 6, 7, 8)
    displacement[:, 0], displacement[:, 2] = 1.0, -2.0  # z + 1, x - 2
    shifted = sample_at(volume, displacement)
    torch.testing.assert_close(shifted[0, 0, :-1, :, 2:], volume[0, 0, 1:, :, :-2])


def test_a_constant_velocity_integrates_to_the_same_translation():
    velocity = torch.zeros(1, 3, 8, 9, 10)
    velocity[:, 1] = 1.5
    torch.testing.assert_close(integrate_velocity(velocity), velocity)


def test_exp_of_minus_v_inverts_exp_of_v():
    velocity = smooth_field((16, 16, 16), 0.8)
    forward, inverse = integrate_velocity(velocity), integrate_velocity(-velocity)
    # (id + w) o (id + u) = id  <=>  u + w o (id + u) = 0, up to trilinear interpolation
    residual = (forward + sample_at(inverse, forward))[:, :, 3:-3, 3:-3, 3:-3].abs()
    assert float(forward.abs().max()) > 1.0
    assert float(residual.mean()) < 0.01 and float(residual.max()) < 0.1


def test_local_ncc_is_one_for_affine_related_images_and_low_for_noise():
    rng = np.random.default_rng(1)
    image = torch.from_numpy(rng.normal(size=(1, 1, 12, 12, 12)).astype(np.float32))
    smooth = torch.nn.functional.avg_pool3d(image, 3, stride=1, padding=1)
    assert float(local_ncc(smooth, 2 * smooth + 3)[0]) == pytest.approx(1.0, abs=5e-3)
    noise = torch.from_numpy(rng.normal(size=(1, 1, 12, 12, 12)).astype(np.float32))
    assert float(local_ncc(smooth, noise)[0]) < 0.2


def test_diffusion_energy_is_zero_for_a_translation_and_grows_with_roughness():
    translation = torch.full((2, 3, 6, 6, 6), 2.0)
    assert torch.equal(diffusion_energy(translation), torch.zeros(2))
    assert float(diffusion_energy(smooth_field((6, 6, 6), 2.0))[0]) > 0


def test_folding_fraction_counts_voxels_with_a_negative_jacobian():
    displacement = np.zeros((3, 6, 6, 6), np.float32)
    assert folding_fraction(displacement) == 0.0
    displacement[2] = -2 * np.arange(6, dtype=np.float32)  # x -> -x: orientation reversed
    assert folding_fraction(displacement) == 1.0


def test_padding_to_the_network_divisor():
    padded, pad = pad_to_divisor(np.ones((5, 8, 9), np.float32), (1, 4, 4), -1.0)
    assert padded.shape == (5, 8, 12) and pad == (0, 0, 3) and padded[0, 0, -1] == -1.0


def _cases(n=3, shape=(10, 12, 12)):
    rng = np.random.default_rng(2)
    return {i: TrainingCase(f"c{i}", rng.normal(size=shape).astype(np.float32),
                            rng.integers(0, 3, shape).astype(np.uint8), 2, -1.0)
            for i in range(n)}


def test_pair_batches_do_not_depend_on_how_ranks_share_the_global_batch():
    cases = _cases()
    common = dict(n_training_cases=3, global_batch=4, patch_shape=(8, 8, 8), seed=3,
                  kernels=augment_cpu, augment=AugmentSettings())
    whole = PairSampler(cases, slots=range(4), **common)
    halves = [PairSampler(cases, slots=range(2 * r, 2 * r + 2), **common) for r in (0, 1)]
    for step in (0, 5):
        reference = whole.batch(step)
        parts = [h.batch(step) for h in halves]
        for i in range(4):
            np.testing.assert_array_equal(np.concatenate([p[i] for p in parts]), reference[i])
    assert halves[0].needed_cases() and set(halves[0].needed_cases()) <= {0, 1, 2}
    moving, fixed, _, _ = whole.batch(0)
    assert moving.shape == (4, 1, 8, 8, 8) and not np.array_equal(moving, fixed)


def test_unlabelled_pairs_and_a_loss_that_trains_the_network():
    cases = {i: TrainingCase(c.name, c.image, None, 2, -1.0) for i, c in _cases().items()}
    sampler = PairSampler(cases, 3, 2, range(2), (8, 8, 8), 0, augment_cpu,
                          AugmentSettings.none())
    moving, fixed, moving_labels, fixed_labels = sampler.batch(0)
    assert moving_labels is None and fixed_labels is None
    network = torch.nn.Conv3d(2, 3, 3, padding=1)
    loss = registration_loss(network, torch.from_numpy(moving), torch.from_numpy(fixed))
    loss.backward()
    assert torch.isfinite(loss) and float(network.weight.grad.abs().sum()) > 0


def test_refinement_raises_the_similarity_of_a_shifted_pair():
    from medhpc.ct.registration import refine_velocity

    rng = np.random.default_rng(4)
    coarse = torch.from_numpy(rng.normal(size=(1, 1, 4, 4, 4)).astype(np.float32))
    fixed = torch.nn.functional.interpolate(coarse, size=(12, 12, 12), mode="trilinear",
                                            align_corners=True)
    shift = torch.zeros(1, 3, 12, 12, 12)
    shift[:, 2] = 1.0
    moving = sample_at(fixed, -shift)  # fixed moved by one voxel along x
    velocity = refine_velocity(np.zeros((3, 12, 12, 12), np.float32), moving[0, 0].numpy(),
                               fixed[0, 0].numpy(), 30, 0.1)
    warped = sample_at(moving, integrate_velocity(torch.from_numpy(velocity)[None]))
    assert float(local_ncc(fixed, warped)[0]) > float(local_ncc(fixed, moving)[0]) + 0.05
    assert float(velocity[2, 4:8, 4:8, 4:8].mean()) == pytest.approx(1.0, abs=0.35)
