"""The serial-section phantom: deterministic, ground truth consistent, CLI."""

import numpy as np
from scipy import ndimage

from medhpc.phantoms.tnr import TnrPhantomSettings, heldout_error, make_tnr_phantom, read_truth
from tests.helpers import run_medhpc

SMALL = TnrPhantomSettings(sections=4, size=64, heldout=16, seed=5)


def test_phantom_is_deterministic_and_its_truth_is_consistent():
    first, second = make_tnr_phantom(SMALL), make_tnr_phantom(SMALL)
    np.testing.assert_array_equal(first["sections"], second["sections"])
    other = make_tnr_phantom(TnrPhantomSettings(sections=4, size=64, heldout=16, seed=6))
    assert not np.array_equal(first["sections"], other["sections"])
    # held-out observed positions map back to the true points through the stored maps
    for i in range(4):
        observed = first["heldout_observed"][i]
        mapped = np.stack([ndimage.map_coordinates(first["maps"][i, ..., c],
                                                   [observed[:, 0], observed[:, 1]], order=1)
                           for c in range(2)], axis=1)
        assert np.abs(mapped - first["heldout_true"][i]).max() < 0.05


def test_error_of_the_exact_inverse_is_zero_and_identity_is_the_distortion():
    phantom = make_tnr_phantom(SMALL)
    truth = {k: phantom[k] for k in ("heldout_true", "heldout_observed")}
    # a displacement equal to (observed - true) at the held-out points: zero error
    exact = np.zeros((2, 4, 64, 64))
    for i in range(4):
        rows, cols = np.round(phantom["heldout_true"][i]).astype(int).T
        exact[:, i, rows, cols] = (phantom["heldout_observed"][i] - np.stack([rows, cols], 1)).T
    truth_rounded = dict(truth, heldout_true=np.round(phantom["heldout_true"]))
    assert heldout_error(exact, truth_rounded)["mean_px"] < 1e-6
    assert heldout_error(np.zeros((2, 4, 64, 64)), truth)["mean_px"] > 0.3


def test_phantom_command(tmp_path):
    result = run_medhpc("phantom", "tnr", "--out", tmp_path / "p", "--sections", "3", "--size",
                        "64", "--blank", "1", timeout=60)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "p" / "sections").glob("*.png"))) == 3
    assert read_truth(tmp_path / "p" / "truth.h5")["heldout_true"].shape == (3, 64, 2)
    again = run_medhpc("phantom", "tnr", "--out", tmp_path / "p", "--sections", "2", timeout=60)
    assert again.returncode == 2 and again.stderr.count("expected") == 1
