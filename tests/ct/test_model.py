"""Network, loss, Dice counts, memory planner, sliding windows and the patch sampler."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medhpc.ct import augment_cpu  # noqa: E402
from medhpc.ct.augment import AugmentSettings  # noqa: E402
from medhpc.ct.inference import gaussian_weights, sliding_window_probabilities, window_starts  # noqa: E402
from medhpc.ct.loss import (confusion_counts, deep_supervision_loss, dice_ce_loss,  # noqa: E402
                            dice_from_counts)
from medhpc.ct.planner import estimate_bytes, parameter_count, plan_training  # noqa: E402
from medhpc.ct.sampler import PatchSampler, TrainingCase, rank_slots, slot_cases  # noqa: E402
from medhpc.ct.unet import UNet3D, UNetConfig  # noqa: E402


def test_unet_shapes_and_deep_supervision():
    torch.manual_seed(0)
    config = UNetConfig(classes=3, widths=(4, 8, 16), deep_supervision=True)
    model = UNet3D(config)
    x = torch.randn(2, 1, 16, 24, 8)
    outputs = model(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 3, 16, 24, 8), (2, 3, 8, 12, 4)]
    model.eval()
    assert tuple(model(x).shape) == (2, 3, 16, 24, 8)
    loss = deep_supervision_loss(outputs, torch.randint(0, 3, (2, 16, 24, 8)))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    for ds in (False, True):
        widths = (8, 16, 32, 64)
        count = sum(p.numel() for p in UNet3D(UNetConfig(widths=widths, deep_supervision=ds)).parameters())
        assert count == parameter_count(widths, 4, deep_supervision=ds)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(1)
    plain = UNet3D(UNetConfig(widths=(4, 8)))
    checkpointed = UNet3D(UNetConfig(widths=(4, 8)), activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, y = torch.randn(2, 1, 8, 8, 8), torch.randint(0, 4, (2, 8, 8, 8))
    for model in (plain, checkpointed):
        dice_ce_loss(model(x), y).backward()
    for a, b in zip(plain.parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad)


def test_loss_of_a_batch_is_the_mean_of_its_halves():
    torch.manual_seed(2)
    logits, labels = torch.randn(4, 4, 6, 6, 6), torch.randint(0, 4, (4, 6, 6, 6))
    labels[1] = 0  # a patch of background only
    whole = dice_ce_loss(logits, labels)
    halves = (dice_ce_loss(logits[:2], labels[:2]) + dice_ce_loss(logits[2:], labels[2:])) / 2
    torch.testing.assert_close(whole, halves)
    perfect = 50.0 * torch.nn.functional.one_hot(labels, 4).permute(0, 4, 1, 2, 3).float()
    assert float(dice_ce_loss(perfect, labels)) < 1e-3


def test_dice_from_summed_counts_is_not_the_mean_of_case_dice():
    truth = np.zeros((4, 4, 4), np.uint8)
    truth[:2] = 1
    prediction = truth.copy()
    prediction[0, 0, 0] = 0
    counts = confusion_counts(prediction, truth, 2)
    assert counts[0].tolist() == [31, 0, 1]
    assert np.isnan(dice_from_counts(counts)[1])  # class 2 absent everywhere
    small = confusion_counts(np.array([1, 0]), np.array([0, 1]), 1)  # Dice 0 on 2 voxels
    pooled = dice_from_counts(counts[:1] + small)[0]
    assert pooled == pytest.approx(2 * 31 / (2 * 31 + 3))
    assert pooled != pytest.approx((dice_from_counts(counts)[0] + 0.0) / 2)


def test_memory_plan_grows_with_the_budget_and_fits_it():
    widths = (32, 64, 128, 256, 320, 320)
    previous = 0
    for budget in (8, 16, 32, 80):
        plan = plan_training(widths, 4, (200, 512, 512), budget, None, None)
        assert plan.fits and plan.estimated_gb <= budget
        assert all(p % 32 == 0 for p in plan.patch)
        size = np.prod(plan.patch) * plan.batch
        assert size >= previous
        previous = size
    tight = plan_training(widths, 4, (200, 512, 512), 3, None, None)
    assert tight.checkpointing and tight.estimated_gb <= 3 and min(tight.patch) >= 64
    refused = plan_training(widths, 4, (200, 512, 512), 3, None, False)
    assert not refused.checkpointing and refused.estimated_gb > tight.estimated_gb
    assert all(a <= b for a, b in zip(refused.patch, tight.patch))
    assert estimate_bytes(widths, 4, (128,) * 3, 4, False, False) > \
        estimate_bytes(widths, 4, (128,) * 3, 2, False, False) > \
        estimate_bytes(widths, 4, (128,) * 3, 2, True, False) > \
        estimate_bytes(widths, 4, (128,) * 3, 2, True, True)


def test_the_patch_spans_the_same_mm_on_every_axis_of_anisotropic_voxels():
    """200 x 512^2 at 2.5 x 0.8 x 0.8 mm: the patch is short in z (voxels) and about as long
    in mm on every axis, at every budget."""
    widths = (32, 64, 128, 256, 320, 320)
    for budget in (8, 16, 32):
        plan = plan_training(widths, 4, (200, 512, 512), budget, None, None,
                             spacing_zyx=(2.5, 0.8, 0.8))
        assert plan.fits and plan.patch[0] <= 96 and plan.patch[1] >= 2 * plan.patch[0]
        extents = np.array(plan.patch) * (2.5, 0.8, 0.8)
        assert extents.max() <= 1.5 * extents.min(), (budget, plan.patch)
    isotropic = plan_training(widths, 4, (200, 512, 512), 16, None, None)
    assert isotropic == plan_training(widths, 4, (200, 512, 512), 16, None, None,
                                      spacing_zyx=(1.0, 1.0, 1.0))


def test_windows_cover_the_volume_and_blend_an_exact_model_exactly():
    assert window_starts(10, 10) == [0] and window_starts(7, 10) == [0]
    starts = window_starts(50, 16)
    assert starts[0] == 0 and starts[-1] == 34 and max(np.diff(starts)) <= 8
    weights = gaussian_weights((8, 8, 8))
    assert weights.max() == 1.0 and weights.min() >= 1e-3

    class Threshold(torch.nn.Module):  # class 1 where the image is positive
        def forward(self, x):
            return torch.cat([-x, x], dim=1) * 20

    image = np.random.default_rng(3).normal(size=(9, 21, 30)).astype(np.float32)
    probabilities = sliding_window_probabilities(Threshold(), image, (8, 8, 8), 2,
                                                 torch.device("cpu"), fill=-1.0, batch=3)
    assert probabilities.shape == (2,) + image.shape
    np.testing.assert_array_equal(np.argmax(probabilities, 0), (image > 0).astype(int))


def test_patches_depend_on_step_and_slot_only():
    rng = np.random.default_rng(4)
    cases = {}
    for index in range(6):
        labels = np.zeros((12, 16, 16), np.uint8)
        labels[3:9, 4:10, 5:12] = 1 + index % 3
        cases[index] = TrainingCase(f"c{index}", rng.normal(size=(12, 16, 16)).astype(np.float32),
                                    labels, 3, fill=-2.0)
    settings = AugmentSettings()

    def batches(batch_per_rank, ranks):
        parts = []
        for rank in range(ranks):
            slots = rank_slots(rank, batch_per_rank)
            sampler = PatchSampler({}, 6, 4, slots, (8, 8, 8), 7, augment_cpu, settings)
            sampler.cases = {i: cases[i] for i in sampler.needed_cases()}
            parts.append(sampler.batch(step=5))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    one = batches(4, 1)
    for split in ((2, 2), (1, 4)):
        many = batches(*split)
        np.testing.assert_array_equal(one[0], many[0])
        np.testing.assert_array_equal(one[1], many[1])
    assert list(slot_cases(6, 4, 0)) == [0, 1] and list(slot_cases(2, 4, 3)) == [1]
    sampler = PatchSampler(cases, 6, 4, range(4), (8, 8, 8), 7, augment_cpu, settings, 1.0)
    images, labels = sampler.batch(step=0)
    assert all(np.any(labels[i] > 0) for i in range(4))  # foreground oversampling at 100%
    assert not np.array_equal(sampler.batch(step=1)[0], images)
