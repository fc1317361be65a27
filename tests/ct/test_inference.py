"""Test-time mirroring and fold ensembles of ct-segment."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medhpc.ct.inference import (mirror_sets, segment_volume,  # noqa: E402
                                 sliding_window_probabilities)
from medhpc.ct.unet import UNet3D, UNetConfig  # noqa: E402

PATCH = (8, 8, 8)


def tiny_model(seed):
    torch.manual_seed(seed)
    return UNet3D(UNetConfig(classes=3, widths=(4, 8))).eval()


def test_mirror_sets_are_every_combination_of_flips():
    assert mirror_sets((2, 0, 1)) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert mirror_sets(()) == [()]


def test_mirroring_averages_the_flipped_predictions_flipped_back():
    """On a one-window volume, the mirrored probabilities are the mean of the plain
    probabilities of each flipped image, flipped back."""
    model = tiny_model(0)
    image = np.random.default_rng(1).normal(size=PATCH).astype(np.float32)
    device = torch.device("cpu")
    mirrored = sliding_window_probabilities(model, image, PATCH, 3, device, 0.0,
                                            mirror_axes=(0, 1, 2))
    expected = np.mean([np.flip(sliding_window_probabilities(
        model, np.ascontiguousarray(np.flip(image, axes)), PATCH, 3, device, 0.0),
        tuple(a + 1 for a in axes)) for axes in mirror_sets((0, 1, 2))], axis=0)
    np.testing.assert_allclose(mirrored, expected, rtol=1e-5, atol=1e-6)
    plain = sliding_window_probabilities(model, image, PATCH, 3, device, 0.0)
    assert not np.allclose(mirrored, plain, atol=1e-4)  # an untrained net is not symmetric


def test_an_ensemble_takes_the_argmax_of_the_summed_probabilities():
    models = [tiny_model(2), tiny_model(3)]
    image = np.random.default_rng(4).normal(size=(12, 10, 9)).astype(np.float32)
    device = torch.device("cpu")
    summed = sum(sliding_window_probabilities(m, image, PATCH, 3, device, -1.0) for m in models)
    labels = segment_volume([(m, PATCH, False) for m in models], image, PATCH, 3, device, -1.0)
    np.testing.assert_array_equal(labels, np.argmax(summed, axis=0))
    alone = segment_volume(models[0], image, PATCH, 3, device, -1.0)
    np.testing.assert_array_equal(segment_volume([(models[0], PATCH, False)] * 2, image, PATCH,
                                                 3, device, -1.0), alone)


def _save_model(path, seed, classes, mirrored=True):
    from medhpc.runtime.checkpoint import plain_data

    model = tiny_model(seed)
    document = {"model": model.state_dict(), **plain_data({
        "network": model.config.to_dict(), "patch": list(PATCH), "classes": classes,
        "intensity": {"low": -100.0, "high": 200.0, "mean": 50.0, "std": 40.0},
        "spacing_mm": None, "amp": False, "mirrored": mirrored})}
    torch.save(document, path)
    return path


def test_fold_models_of_different_datasets_are_refused(tmp_path):
    from medhpc.ct.segment import Segmentation
    from medhpc.errors import InputError
    from medhpc.runtime.context import start_run

    paths = [_save_model(tmp_path / f"fold{index}.pt", index, classes)
             for index, classes in enumerate((["liver", "spleen"], ["liver", "kidneys"]))]
    (tmp_path / "images").mkdir()
    run = start_run("ct-segment", device="cpu", verbosity=-1)
    with pytest.raises(InputError, match="fold1.pt: its classes differ from .*fold0.pt"):
        Segmentation(run, paths, tmp_path / "images", tmp_path / "out").check()


def test_mirroring_a_model_trained_without_flips_is_refused(tmp_path):
    """Test-time mirroring averages views the network must have seen in training: on
    phantoms a model trained with --no-augment lost Dice with --tta (0.98 to 0.92 liver)."""
    from medhpc.ct.segment import Segmentation
    from medhpc.errors import InputError
    from medhpc.runtime.context import start_run

    path = _save_model(tmp_path / "plain.pt", 0, ["liver"], mirrored=False)
    (tmp_path / "images").mkdir()
    run = start_run("ct-segment", device="cpu", verbosity=-1)
    with pytest.raises(InputError, match="plain.pt: trained without mirroring"):
        Segmentation(run, path, tmp_path / "images", tmp_path / "out", tta=True).check()
