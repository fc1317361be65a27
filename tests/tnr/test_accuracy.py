"""On the phantom: error at held-out points (never matched) against the ground truth."""

import json

import numpy as np
import pytest

from medhpc.phantoms.tnr import heldout_error, read_truth
from tests.tnr.conftest import SETTINGS, register


@pytest.fixture(scope="module")
def errors(phantom_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tnr_accuracy")
    truth = read_truth(phantom_folder / "truth.h5")
    result = {"identity": heldout_error(np.zeros((2, 12, 128, 128)), truth)["mean_px"]}
    for mode in ("none", "pairwise", "tnr"):
        settings = SETTINGS.__class__(**{**SETTINGS.__dict__, "mode": mode})
        displacement, volume = register(phantom_folder / "sections", folder / f"{mode}.h5",
                                        settings)
        assert volume.shape == (3, 12, 128, 128) and volume.dtype == np.uint8
        result[mode] = heldout_error(displacement, truth)["mean_px"]
        result[f"{mode}_log"] = json.loads((folder / f"{mode}.json").read_text())
    return result


def test_tnr_beats_pairwise_and_none(errors):
    assert errors["tnr"] <= 0.5 * errors["pairwise"], errors
    assert errors["tnr"] < errors["none"], errors
    assert errors["tnr"] < errors["identity"], errors


def test_pairwise_straightens_the_curved_anatomy(errors):
    # the rigid chain and pairwise registration both pull the drifting anatomy straight
    assert errors["pairwise"] > errors["identity"]
    assert errors["none"] > errors["identity"]


def test_log_reports_matches_rejections_and_histogram(errors):
    log = errors["tnr_log"]
    assert len(log["pairs"]) == 11
    assert all(row["accepted"] >= 0.4 * row["patches"] > 0 for row in log["pairs"])
    assert abs(sum(log["rejection_rates"].values()) - 1.0) < 1e-9
    assert sum(log["ncc_histogram"]["counts"]) == sum(row["patches"] for row in log["pairs"])
    assert log["flagged_sections"] == {}
    stages = {row["name"] for row in log["timings"]["stages"]}
    assert "match patches" in stages and "warp" in stages
