"""Models and checkpoints are read as tensors and plain data only: a planted object never runs."""

import pytest

from tests.helpers import PlantedObject, run_medhpc

torch = pytest.importorskip("torch")


def plant(path, marker):
    torch.save({"model": {}, "network": {}, "fingerprint": PlantedObject(marker)}, path)


def error_lines(done):
    return [line for line in done.stderr.splitlines() if "error:" in line]


def test_ct_segment_refuses_a_model_holding_objects(tiny_phantoms, tmp_path):
    images, _ = tiny_phantoms
    model, marker = tmp_path / "model.pt", tmp_path / "code-ran"
    plant(model, marker)
    done = run_medhpc("ct-segment", "--model", model, "--images", images / "case_000.nii.gz",
                      "--out", tmp_path / "out", "--threads", "1", "--device", "cpu",
                      ranks=2, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = error_lines(done)
    assert len(lines) == 1 and str(model) in lines[0] and "refused unread" in lines[0]
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_ct_register_refuses_a_model_holding_objects(tiny_phantoms, tmp_path):
    images, _ = tiny_phantoms
    model, marker = tmp_path / "model.pt", tmp_path / "code-ran"
    plant(model, marker)
    done = run_medhpc("ct-register", "--model", model, "--fixed", images / "case_000.nii.gz",
                      "--moving", images / "case_001.nii.gz", "--out", tmp_path / "out",
                      "--threads", "1", "--device", "cpu", timeout=120)
    assert done.returncode == 2, done.stderr
    lines = error_lines(done)
    assert len(lines) == 1 and str(model) in lines[0] and "refused unread" in lines[0]
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_ct_train_resume_refuses_a_checkpoint_holding_objects(tiny_dataset, tmp_path):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    out.mkdir()
    plant(out / "checkpoint.pt", marker)
    done = run_medhpc("ct-train", "--data", tiny_dataset, "--out", out, "--widths", "4,8",
                      "--patch", "16", "--folds", "1", "--epochs", "1", "--steps", "1",
                      "--threads", "1", "--device", "cpu", "--quiet", "--resume",
                      ranks=2, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = error_lines(done)
    assert len(lines) == 1 and "refused unread" in lines[0]
    assert not marker.exists()
    assert not (out / "model.pt").exists()
