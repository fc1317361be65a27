"""ct-train and ct-segment as a user runs them (subprocesses under mpiexec).

- 1 rank with batch 4 and 2 ranks with batch 2 each reach the same parameters (DDP and the
  flat MPI all-reduce);
- a run stopped by SIGTERM in the middle of an epoch and resumed ends where an
  uninterrupted run ends;
- on phantoms, 2 ranks reach validation Dice >= 0.85 for liver and kidneys, and
  ct-segment writes label maps on each input's grid with a Dice table.
"""

import json

import numpy as np
import pytest

from medhpc.io.nifti import read_nifti
from tests.ct.conftest import make_phantoms, prepare
from tests.helpers import run_medhpc

torch = pytest.importorskip("torch")

TINY = ("--widths", "4,8", "--patch", "16", "--folds", "1", "--threads", "1",
        "--device", "cpu", "--quiet")


def parameters(run_folder):
    document = torch.load(run_folder / "model.pt", map_location="cpu", weights_only=True)
    return document["model"]


def assert_same_parameters(a, b, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


def train(dataset, out, *options, ranks=None, env=None, timeout=120):
    return run_medhpc("ct-train", "--data", dataset, "--out", out, *TINY, *options,
                      ranks=ranks, env=env, timeout=timeout)


def test_two_ranks_with_half_batches_match_one_rank(tiny_dataset, tmp_path):
    steps = ("--epochs", "1", "--steps", "3")
    done = train(tiny_dataset, tmp_path / "one", *steps, "--batch", "4")
    assert done.returncode == 0, done.stderr
    reference = parameters(tmp_path / "one")
    for sync in ("ddp", "mpi"):
        done = train(tiny_dataset, tmp_path / sync, *steps, "--batch", "2", "--grad-sync", sync,
                     ranks=2)
        assert done.returncode == 0, done.stderr
        assert_same_parameters(parameters(tmp_path / sync), reference)
    from medhpc.ct.unet import UNet3D, UNetConfig

    torch.manual_seed(0)  # the initial parameters (--seed 0); training moved them
    initial = UNet3D(UNetConfig(widths=(4, 8))).state_dict()
    assert all(not torch.equal(initial[k], reference[k]) for k in reference if "weight" in k)


def test_resume_after_sigterm_mid_epoch_equals_an_uninterrupted_run(tiny_dataset, tmp_path):
    steps = ("--epochs", "2", "--steps", "3", "--batch", "2", "--optimizer", "adamw")
    done = train(tiny_dataset, tmp_path / "whole", *steps, ranks=2)
    assert done.returncode == 0, done.stderr
    stopped = train(tiny_dataset, tmp_path / "parts", *steps, ranks=2,
                    env={"MEDHPC_CT_SIGTERM_AFTER_STEP": "4"})
    assert stopped.returncode == 143, stopped.stderr
    assert "SIGTERM" in stopped.stderr and "--resume" in stopped.stderr
    assert (tmp_path / "parts" / "checkpoint.pt").exists()
    assert not (tmp_path / "parts" / "model.pt").exists()
    state = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)["state"]
    assert (state["epoch"], state["step"]) == (1, 1)  # in the middle of the second epoch
    resumed = train(tiny_dataset, tmp_path / "parts", *steps, "--resume", ranks=2)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_parameters(parameters(tmp_path / "parts"), parameters(tmp_path / "whole"),
                           rtol=0, atol=0)
    whole = json.loads((tmp_path / "whole" / "log.json").read_text())["epochs_run"]
    parts = json.loads((tmp_path / "parts" / "log.json").read_text())["epochs_run"]
    assert [r["loss"] for r in parts] == pytest.approx([r["loss"] for r in whole], rel=1e-6)
    changed = train(tiny_dataset, tmp_path / "parts", "--epochs", "2", "--steps", "4",
                    "--batch", "2", "--optimizer", "adamw", "--resume")
    assert changed.returncode == 2 and "different parameters" in changed.stderr
    assert "steps: checkpoint 3, now 4" in changed.stderr


@pytest.mark.timeout(900)
def test_phantom_training_on_two_ranks_reaches_dice_and_segments(tmp_path):
    images, labels = make_phantoms(tmp_path / "phantoms", 8, (48, 64, 64), seed=5)
    dataset = tmp_path / "data.h5"
    prepare(images, labels, dataset, clip_hu=(-100.0, 300.0))  # a soft-tissue window
    run = tmp_path / "run"
    done = run_medhpc("ct-train", "--data", dataset, "--out", run, "--widths", "8,16,32",
                      "--patch", "48", "--batch", "2", "--epochs", "6", "--steps", "40",
                      "--optimizer", "adamw", "--lr", "1e-2", "--no-augment", "--folds", "4",
                      "--threads", "1", "--device", "cpu", "--png", ranks=2, timeout=900)
    assert done.returncode == 0, done.stderr
    log = json.loads((run / "log.json").read_text())
    last = log["epochs_run"][-1]["dice"]
    assert last["liver"] >= 0.85 and last["kidneys"] >= 0.85, log["epochs_run"]
    assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "log.csv").read_text().startswith("epoch,loss,lr,patches_per_s")

    validation = [f"case_{i:03d}" for i in range(8)
                  if f"case_{i:03d}" not in _training_cases(dataset)]
    out = tmp_path / "segmented"
    done = run_medhpc("ct-segment", "--model", run / "model.pt",
                      *[a for name in validation for a in ("--images", images / f"{name}.nii.gz")],
                      "--labels", labels, "--out", out, "--threads", "1", "--device", "cpu",
                      ranks=2, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Dice per organ" in done.stderr
    table = json.loads((out / "dice.json").read_text())
    assert sorted(table["cases"]) == sorted(validation)
    liver, _, kidneys = table["all"]
    assert liver >= 0.85 and kidneys >= 0.85
    segmentation, geometry = read_nifti(out / f"{validation[0]}.nii.gz")
    _, source_geometry = read_nifti(images / f"{validation[0]}.nii.gz")
    assert geometry.same_grid(source_geometry) and segmentation.dtype == np.uint8


def _training_cases(dataset):
    from medhpc.ct.dataset import CtDataset
    from medhpc.ct.run import split_folds

    return split_folds(CtDataset(dataset).names, 4, 0)[0]
