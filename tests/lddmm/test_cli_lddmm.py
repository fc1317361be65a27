"""The command line end to end: phantom, lddmm, lddmm-apply, pairs, orientation, bad input."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.io.geometry import ImageGeometry
from medhpc.io.images import write_image
from medhpc.lddmm.run import plan, read_inputs
from medhpc.lddmm.settings import Settings
from tests.helpers import run_medhpc as run_medhpc_threads

ONE_THREAD = {"NUMBA_NUM_THREADS": "1"}  # tiny grids: thread start-up would dominate


def run_medhpc(*args, **options):
    return run_medhpc_threads(*args, env=ONE_THREAD, **options)

FAST = ["--levels", "2", "--iterations", "12,6", "--timesteps", "4", "--quiet"]


def load(path):
    image = nib.load(str(path))
    return np.asarray(image.dataobj), image.affine


def dice(a, b, label):
    a, b = a == label, b == label
    return 2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b))


@pytest.fixture(scope="module")
def registered(phantom_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("lddmm-out")
    result = run_medhpc("lddmm", "--fixed", phantom_files / "fixed.nii.gz",
                        "--moving", phantom_files / "moving.nii.gz", "--out", out,
                        "--device", "cpu", *FAST, timeout=120)
    assert result.returncode == 0, result.stderr
    return out


def test_phantom_command_writes_a_pair_with_labels_and_truth(tmp_path):
    result = run_medhpc("phantom", "lddmm", "--out", tmp_path, "--shape", "16,20,18")
    assert result.returncode == 0, result.stderr
    fixed, affine = load(tmp_path / "fixed.nii.gz")
    labels, _ = load(tmp_path / "moving_labels.nii.gz")
    assert fixed.shape == (18, 20, 16)  # NIfTI keeps x first
    assert set(np.unique(labels)) == {0, 1, 2, 3}
    assert np.linalg.det(affine[:3, :3]) < 0 and abs(affine[0, 1]) > 0.1  # flipped, oblique
    info = json.loads((tmp_path / "phantom.json").read_text())
    assert info["shape_zyx"] == [16, 20, 18]


def test_registration_writes_every_output_on_the_fixed_grid(registered, phantom_files):
    _, fixed_affine = load(phantom_files / "fixed.nii.gz")
    for name in ("warped.nii.gz", "jacobian.nii.gz"):
        _, affine = load(registered / name)
        np.testing.assert_allclose(affine, fixed_affine, atol=1e-5)
    for name in ("forward_warp.nii.gz", "inverse_warp.nii.gz"):  # ITK displacement fields
        warp = nib.load(str(registered / name))
        assert warp.shape == load(phantom_files / "fixed.nii.gz")[0].shape + (1, 3)
        np.testing.assert_allclose(warp.affine, fixed_affine, atol=1e-5)
    from medhpc.lddmm.itk import read_affine

    affine = read_affine(registered / "affine.txt")  # the affine start: small for this pair
    np.testing.assert_allclose(affine[:3, :3], np.eye(3), atol=0.2)
    jacobian, _ = load(registered / "jacobian.nii.gz")
    log = json.loads((registered / "log.json").read_text())
    assert log["folded_share"] == 0.0 and jacobian.min() > 0
    assert log["inverse_consistency_mean_voxels"] < 0.05
    assert {"energy", "similarity", "regularity", "level"} <= set(log["history"][1])
    stages = {stage["name"] for stage in log["timings"]["stages"]}
    assert {"read inputs", "compose maps", "smoothing", "write outputs"} <= stages


def test_apply_warps_labels_to_the_fixed_labels(registered, phantom_files, tmp_path):
    out = tmp_path / "labels.nii.gz"
    result = run_medhpc("lddmm-apply", "--transform", registered / "transform.h5",
                        "--image", phantom_files / "moving_labels.nii.gz", "--out", out,
                        "--interp", "label")
    assert result.returncode == 0, result.stderr
    warped, _ = load(out)
    fixed, _ = load(phantom_files / "fixed_labels.nii.gz")
    moving, _ = load(phantom_files / "moving_labels.nii.gz")
    assert set(np.unique(warped)) <= {0, 1, 2, 3}
    assert dice(warped, fixed, 3) > dice(moving, fixed, 3) + 0.02
    back = tmp_path / "back.nii.gz"
    result = run_medhpc("lddmm-apply", "--transform", registered / "transform.h5",
                        "--image", phantom_files / "fixed_labels.nii.gz", "--out", back,
                        "--interp", "nearest", "--inverse")
    assert result.returncode == 0, result.stderr
    inverse_warped, _ = load(back)
    assert dice(inverse_warped, moving, 3) > dice(fixed, moving, 3) + 0.02


def oblique_pair(tmp_path):
    """One image stored on an oblique, flipped grid and again with its axes reversed."""
    from medhpc.phantoms.lddmm import make_phantom, phantom_geometry

    image = make_phantom((20, 22, 24), seed=4)["fixed"]
    geometry = phantom_geometry(image.shape, angle_deg=30.0)
    write_image(tmp_path / "fixed.nii.gz", image, geometry)
    flipped = image[::-1, :, ::-1]
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, image.shape[2] - 1
    flip[2, 2], flip[2, 3] = -1, image.shape[0] - 1
    write_image(tmp_path / "moving.nii.gz", np.ascontiguousarray(flipped),
                ImageGeometry(image.shape, geometry.affine @ flip))
    return image, geometry


def test_self_registration_under_flipped_oblique_grids_is_the_identity(tmp_path):
    image, geometry = oblique_pair(tmp_path)
    out = tmp_path / "out"
    result = run_medhpc("lddmm", "--fixed", tmp_path / "fixed.nii.gz", "--moving",
                        tmp_path / "moving.nii.gz", "--out", out, "--device", "cpu", *FAST)
    assert result.returncode == 0, result.stderr
    import h5py

    with h5py.File(out / "transform.h5", "r") as f:
        assert np.abs(f["forward_displacement_vox"][()]).max() < 1e-4
    warped, affine = load(out / "warped.nii.gz")
    np.testing.assert_allclose(affine, geometry.affine, atol=1e-5)
    np.testing.assert_allclose(warped.transpose(2, 1, 0), image, atol=1e-4)


@pytest.mark.parametrize("problem", ["4-D", "NaN", "constant", "garbage", "missing"])
def test_bad_inputs_are_one_line_input_errors(tmp_path, problem):
    geometry = ImageGeometry.from_spacing((8, 8, 8))
    good = np.random.default_rng(0).random((8, 8, 8)).astype(np.float32)
    write_image(tmp_path / "fixed.nii.gz", good, geometry)
    bad = tmp_path / "moving.nii.gz"
    if problem == "4-D":
        nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), str(bad))
    elif problem == "NaN":
        values = good.copy()
        values[3, 3, 3] = np.nan
        write_image(bad, values, geometry)
    elif problem == "constant":
        write_image(bad, np.ones((8, 8, 8), np.float32), geometry)
    elif problem == "garbage":
        bad.write_bytes(b"not an image at all")
    with pytest.raises(InputError) as error:
        read_inputs(tmp_path / "fixed.nii.gz", bad)
    assert "moving.nii.gz" in str(error.value) and "\n" not in str(error.value)


def test_bad_input_exits_2_with_one_message_and_no_output(tmp_path):
    (tmp_path / "fixed.nii.gz").write_bytes(b"broken")
    write_image(tmp_path / "moving.nii.gz", np.ones((8, 8, 8), np.float32),
                ImageGeometry.from_spacing((8, 8, 8)))
    result = run_medhpc("lddmm", "--fixed", tmp_path / "fixed.nii.gz", "--moving",
                        tmp_path / "moving.nii.gz", "--out", tmp_path / "out", ranks=2,
                        timeout=60)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "fixed.nii.gz" in line]
    assert len(lines) == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_plan_memory_falls_with_ranks(phantom_files):
    result = run_medhpc("lddmm", "--fixed", phantom_files / "fixed.nii.gz", "--moving",
                        phantom_files / "moving.nii.gz", "--out", "/nonexistent/x", "--dry-run",
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["decomposition"] == "slabs" and len(document["ranks_detail"]) == 1
    settings = Settings(method="beg", timesteps=10, levels=1, iterations=(1,))
    peaks = [max(share["memory_bytes"]["total"] for share in
                 plan(settings, (256, 256, 256), ranks, "slabs")["ranks_detail"])
             for ranks in (1, 2, 4)]
    halo_bytes = 9 * 2 * 3 * 256 * 256 * 4
    images = 2 * 256 ** 3 * 4
    for ranks, peak in zip((2, 4), peaks[1:]):
        assert peak <= (peaks[0] - images) / ranks * 1.01 + halo_bytes + images


def test_pairs_queue_from_stdin_writes_one_folder_per_pair_and_a_summary(phantom_files,
                                                                         tmp_path):
    table = (f"fixed,moving,name\nfixed.nii.gz,moving.nii.gz,a\nmoving.nii.gz,fixed.nii.gz,b\n"
             f"fixed.nii.gz,{tmp_path / 'missing.nii.gz'},c\n")  # relative to the working folder
    out = tmp_path / "out"
    result = run_medhpc("lddmm", "--pairs", "-", "--out", out, "--device", "cpu",
                        "--levels", "1", "--iterations", "4", "--timesteps", "3", "--quiet",
                        ranks=2, timeout=120, cwd=phantom_files, stdin=table)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.splitlines()  # what a pipeline reads: the paths written
    assert str(out / "summary.csv") in printed and str(out / "a" / "transform.h5") in printed
    assert all(Path(line).exists() for line in printed) and len(set(printed)) == len(printed)
    with open(out / "summary.csv") as stream:
        rows = {row["name"]: row for row in csv.DictReader(stream)}
    assert rows["a"]["status"] == rows["b"]["status"] == "ok"
    assert rows["c"]["status"] == "failed" and "missing.nii.gz" in rows["c"]["error"]
    for name in ("a", "b"):
        assert (out / name / "transform.h5").exists() and (out / name / "log.json").exists()


def test_a_full_disk_is_found_before_the_registration_and_leaves_nothing(phantom_files,
                                                                         tmp_path):
    from tests.helpers import tiny_filesystem

    with tiny_filesystem(tmp_path / "small", 256) as small:
        result = run_medhpc("lddmm", "--fixed", phantom_files / "fixed.nii.gz", "--moving",
                            phantom_files / "moving.nii.gz", "--out", small / "reg",
                            "--device", "cpu", "--levels", "1", "--iterations", "2", ranks=2,
                            timeout=120)
        assert result.returncode == 1, result.stderr
        lines = [line for line in result.stderr.splitlines() if "error" in line]
        assert len(lines) == 1 and "MiB free; the registration's outputs need about" in lines[0]
        assert "level" not in result.stderr and sorted(p.name for p in small.iterdir()) == []


def test_pairs_queue_where_every_pair_fails_exits_1_with_the_count(phantom_files, tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_text(f"{phantom_files / 'fixed.nii.gz'},{tmp_path / 'missing.nii.gz'},a\n"
                     f"{tmp_path / 'absent.nii.gz'},{phantom_files / 'moving.nii.gz'},b\n")
    out = tmp_path / "out"
    result = run_medhpc("lddmm", "--pairs", table, "--out", out, "--device", "cpu",
                        "--levels", "1", "--iterations", "2", "--quiet", ranks=2, timeout=120)
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "none of the 2 pairs registered" in lines[0]
    assert "missing.nii.gz" in lines[0] and "summary.csv" in lines[0]
    with open(out / "summary.csv") as stream:
        assert {row["status"] for row in csv.DictReader(stream)} == {"failed"}


def test_groups_of_ranks_share_each_pair(phantom_files, tmp_path):
    table = tmp_path / "pairs.csv"
    table.write_text(f"{phantom_files / 'fixed.nii.gz'},{phantom_files / 'moving.nii.gz'},a\n")
    out = tmp_path / "out"
    result = run_medhpc("lddmm", "--pairs", table, "--out", out, "--device", "cpu",
                        "--ranks-per-pair", "2", "--levels", "1", "--iterations", "3",
                        "--timesteps", "3", "--quiet", ranks=2, timeout=120)
    assert result.returncode == 0, result.stderr
    log = json.loads((out / "a" / "log.json").read_text())
    assert log["ranks"] == 2 and log["decomposition"] == "slabs"


def _output_arrays(folder):
    import h5py

    arrays = {name: load(folder / name)[0]
              for name in ("warped.nii.gz", "jacobian.nii.gz", "forward_warp.nii.gz",
                           "inverse_warp.nii.gz")}
    with h5py.File(folder / "transform.h5", "r") as f:
        for name in ("forward_displacement_vox", "inverse_displacement_vox", "velocity_vox"):
            arrays[name] = f[name][()]
    log = json.loads((folder / "log.json").read_text())
    arrays["summary"] = np.array([log[key] for key in (
        "folded_share", "jacobian_min", "jacobian_max", "inverse_consistency_mean_voxels",
        "inverse_consistency_max_voxels")])
    return arrays


def test_every_output_at_2_and_3_ranks_equals_one_rank(phantom_files, tmp_path):
    """Each rank writes its planes of every file: the files equal the one-rank files."""
    symmetric = ["--levels", "1", "--iterations", "8", "--radius", "2", "--quiet",
                 "--fluid-sigma", "1", "--diffusion-sigma", "0.5",
                 "--device", "cpu", "--initial-transform", "rigid", "--save-velocity"]
    arrays = {}
    for ranks in (1, 2, 3):
        out = tmp_path / f"r{ranks}"
        result = run_medhpc("lddmm", "--fixed", phantom_files / "fixed.nii.gz", "--moving",
                            phantom_files / "moving.nii.gz", "--out", out, "--decomp", "slabs",
                            *symmetric, ranks=None if ranks == 1 else ranks, timeout=180)
        assert result.returncode == 0, result.stderr
        arrays[ranks] = _output_arrays(out)
        assert not [p.name for p in out.iterdir() if p.name.startswith(".partial")]
    for ranks in (2, 3):
        for name, reference in arrays[1].items():
            np.testing.assert_allclose(arrays[ranks][name], reference, rtol=1e-5, atol=1e-5,
                                       err_msg=f"{name} at {ranks} ranks")


@pytest.mark.parametrize("settings, words", [
    (Settings(method="beg", metric="mi"), "--metric mi with --method beg"),
    (Settings(metric="ssd"), "--metric ssd with --method symmetric"),
    (Settings(metric="mi", bins=4), "--bins 4"),
    (Settings(metric="mi", bins=65), "--bins 65"),
    (Settings(metric="cc"), "--metric cc"),
])
def test_metric_settings_that_cannot_work_are_one_line_errors(settings, words):
    from medhpc.lddmm.run import check_settings

    with pytest.raises(InputError) as error:
        check_settings(Settings(**{**settings.__dict__, "levels": 2}), (16, 16, 16))
    assert words in str(error.value) and "\n" not in str(error.value)


def test_mutual_information_on_the_command_line(phantom_files, tmp_path):
    """--metric mi runs end to end: its affine start is by MI, its energy is -MI."""
    result = run_medhpc("lddmm", "--fixed", phantom_files / "fixed.nii.gz",
                        "--moving", phantom_files / "moving.nii.gz", "--out", tmp_path,
                        "--device", "cpu", "--metric", "mi", "--bins", "24", *FAST, timeout=120)
    assert result.returncode == 0, result.stderr
    log = json.loads((tmp_path / "log.json").read_text())
    assert log["settings"]["metric"] == "mi" and log["settings"]["bins"] == 24
    assert "mi_before" in log["initial"]
    assert all(entry["energy"] < 0 for entry in log["history"])
    assert log["folded_share"] == 0
