"""The PET subcommands as a user runs them: outputs, plans and bad input."""

import json

import h5py
import nibabel as nib
import numpy as np
import pytest

from medhpc.io.geometry import ImageGeometry
from medhpc.io.images import read_image
from medhpc.io.nifti import write_nifti
from tests.helpers import run_medhpc


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_pet")
    phantom = folder / "phantom"
    result = run_medhpc("phantom", "pet", "--out", phantom, "--shape", "15,32,32",
                        "--voxel-mm", "4,4,2")
    assert result.returncode == 0, result.stderr
    sinogram = folder / "sino.h5"
    result = run_medhpc("pet-simulate", "--activity", phantom / "activity.nii.gz", "--mu-map",
                        phantom / "mu_map.nii.gz", "--scanner", "small-test", "--counts", "1e6",
                        "--out", sinogram, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    return folder, phantom, sinogram


def test_recon_at_two_ranks_writes_image_log_picture_and_timings(tiny):
    folder, _, sinogram = tiny
    out = folder / "recon.nii.gz"
    result = run_medhpc("pet-recon", "--sinogram", sinogram, "--out", out, "--iterations", "2",
                        "--subsets", "4", "--png", "--timings", folder / "timings.json",
                        "--device", "cpu", ranks=2)
    assert result.returncode == 0, result.stderr
    assert out.exists() and (folder / "recon.png").exists()
    assert sorted(result.stdout.splitlines()) == sorted(  # stdout: the paths written, no more
        str(path) for path in (out, folder / "recon.png", folder / "recon.json",
                               folder / "timings.json"))
    log = json.loads((folder / "recon.json").read_text())
    assert log["schema_version"] == 1 and log["command"] == "pet-recon"
    # the data were simulated from the phantom: the picture and log compare with it
    assert log["truth"]["path"] == str((folder / "phantom" / "activity.nii.gz").resolve())
    assert 0 < log["truth"]["nrmse"] < 1
    assert len(log["truth"]["nema"]["contrast_recovery"]) == 6
    assert len(log["log_likelihood_per_subiteration"]) == 8
    assert log["timings"]["ranks"] == 2
    timings = json.loads((folder / "timings.json").read_text())
    names = {stage["name"] for stage in timings["stages"]}
    assert {"forward project", "back project", "allreduce", "read sinogram", "write"} <= names
    assert "time per stage over 2 rank(s)" in result.stderr
    picture = folder / "timings.png"
    result = run_medhpc("report", folder / "timings.json", "--png", picture)
    assert result.returncode == 0 and picture.read_bytes()[:4] == b"\x89PNG"
    again = run_medhpc("pet-recon", "--sinogram", sinogram, "--out", out, "--device", "cpu")
    assert again.returncode == 2 and "exists" in again.stderr


def test_json_prints_one_summary_of_the_run_on_stdout(tiny):
    folder, _, sinogram = tiny
    out = folder / "summary.h5"
    result = run_medhpc("pet-recon", "--sinogram", sinogram, "--out", out, "--iterations", "1",
                        "--subsets", "2", "--json", "--quiet", "--device", "cpu", ranks=2)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["schema_version"] == 1 and summary["status"] == "ok"
    assert summary["command"] == "pet-recon" and summary["ranks"] == 2
    assert summary["outputs"] == [str(out), str(folder / "summary.json")]
    assert summary["summary"]["iterations"] == 1 and summary["wall_seconds"] > 0
    assert np.isfinite(summary["summary"]["log_likelihood"])


@pytest.mark.parametrize("command, name", [("pet-recon", "r.png"), ("pet-simulate", "s.nii.gz")])
def test_an_output_name_of_the_wrong_format_is_refused_before_any_work(tiny, command, name):
    folder, phantom, sinogram = tiny
    inputs = (("--sinogram", sinogram) if command == "pet-recon" else
              ("--activity", phantom / "activity.nii.gz", "--scanner", "small-test"))
    out = folder / name
    result = run_medhpc(command, *inputs, "--out", out, "--device", "cpu", ranks=2)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and f"{out}: unsupported file name" in lines[0]
    assert "stage" not in result.stderr and not out.exists()


def test_listmode_simulation_on_a_span3_scanner_is_refused_before_any_work(tiny):
    from tests.pet.conftest import SPAN_SCANNER

    folder, phantom, _ = tiny
    scanner = folder / "span3.toml"
    scanner.write_text(SPAN_SCANNER.format(span=3))
    out = folder / "events.h5"
    result = run_medhpc("pet-simulate", "--activity", phantom / "activity.nii.gz", "--scanner",
                        scanner, "--listmode", "--out", out, "--device", "cpu")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "span 3" in lines[0] and "span-1 scanner" in lines[0]
    assert "stage" not in result.stderr and not out.exists()


def test_dry_run_prints_the_plan_and_touches_nothing(tiny):
    folder, _, sinogram = tiny
    result = run_medhpc("pet-recon", "--sinogram", sinogram, "--out", folder / "dry.nii.gz",
                        "--dry-run", "--decomp", "views", "--subsets", "4", ranks=3)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["decomposition"] == "views" and plan["ranks"] == 3
    assert len(plan["ranks_detail"]) == 3
    assert all(share["memory"]["total_bytes"] > 0 for share in plan["ranks_detail"])
    assert not (folder / "dry.nii.gz").exists()


def test_pet_geometry_writes_lor_end_points(tmp_path):
    out = tmp_path / "lors.h5"
    result = run_medhpc("pet-geometry", "--scanner", "small-test", "--out", out)
    assert result.returncode == 0, result.stderr
    with h5py.File(out) as h5:
        assert h5["xstart"].shape == (63, 48, 64, 3)
        radius = np.hypot(h5["xstart"][..., 0], h5["xstart"][..., 1])
        assert np.allclose(radius, 120.0, atol=1e-3)


def broken_copy(source, target, change):
    with h5py.File(source) as src, h5py.File(target, "w") as dst:
        for key, value in src.attrs.items():
            dst.attrs[key] = value
        for name in src:
            data = src[name][...]
            data = change(name, data)
            if data is not None:
                dst.create_dataset(name, data=data)


def expect_input_error(result, *words):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("case, change, words", [
    ("shape", lambda n, d: d[:, :-1] if n == "prompts" else d, ["prompts", "shape"]),
    ("nan", lambda n, d: np.where(np.arange(d.size).reshape(d.shape) == 5, np.nan, d)
     if n == "prompts" else d, ["NaN"]),
    ("negative", lambda n, d: -d if n == "additive" else d, ["negative"]),
    ("missing", lambda n, d: None if n == "multiplicative" else d, ["multiplicative", "missing"]),
])
def test_bad_sinograms_are_rejected_at_two_ranks(tiny, tmp_path, case, change, words):
    _, _, sinogram = tiny
    broken = tmp_path / f"{case}.h5"
    broken_copy(sinogram, broken, change)
    out = tmp_path / "out.nii.gz"
    result = run_medhpc("pet-recon", "--sinogram", broken, "--out", out, "--iterations", "1",
                        "--subsets", "2", "--device", "cpu", ranks=2)
    expect_input_error(result, f"{case}.h5", *words)
    assert not out.exists()


def test_mu_map_on_another_grid_is_rejected(tiny, tmp_path):
    _, phantom, _ = tiny
    other = tmp_path / "mu.nii.gz"
    write_nifti(other, np.zeros((15, 16, 16), np.float32),
                ImageGeometry.from_spacing((15, 16, 16), (8.0, 8.0, 2.0)))
    out = tmp_path / "s.h5"
    result = run_medhpc("pet-simulate", "--activity", phantom / "activity.nii.gz", "--mu-map",
                        other, "--scanner", "small-test", "--out", out, ranks=2)
    expect_input_error(result, "mu.nii.gz", "does not match")
    assert not out.exists()


def test_unknown_scanner_and_missing_activity(tmp_path):
    result = run_medhpc("pet-simulate", "--activity", tmp_path / "none.nii.gz", "--scanner",
                        "small-test", "--out", tmp_path / "s.h5")
    expect_input_error(result, "none.nii.gz")
    result = run_medhpc("pet-geometry", "--scanner", "no-such-scanner", "--out", tmp_path / "g.h5")
    expect_input_error(result, "no-such-scanner")


def test_planes_on_a_grid_without_the_rebinned_planes_is_rejected(tiny, tmp_path):
    _, _, sinogram = tiny
    out = tmp_path / "planes.nii.gz"
    result = run_medhpc("pet-recon", "--sinogram", sinogram, "--out", out, "--decomp", "planes",
                        "--image-shape", "10,32,32", "--device", "cpu", ranks=2)
    expect_input_error(result, "sino.h5", "--decomp planes", "rebinned")
    assert not out.exists()


@pytest.fixture(scope="module")
def events(tiny):
    folder, phantom, _ = tiny
    path = folder / "events.h5"
    result = run_medhpc("pet-simulate", "--activity", phantom / "activity.nii.gz", "--mu-map",
                        phantom / "mu_map.nii.gz", "--scanner", "small-test", "--counts", "2e5",
                        "--listmode", "--duration-s", "60", "--out", path, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "events over 60 s" in result.stderr
    return path


def test_listmode_recon_at_two_ranks_writes_frames_picture_and_timings(tiny, events):
    folder = tiny[0]
    out = folder / "frames.nii.gz"
    result = run_medhpc("pet-recon", "--listmode", events, "--out", out, "--iterations", "1",
                        "--subsets", "2", "--time-windows", "0:30,30:60", "--png", "--timings",
                        folder / "lm_timings.json", "--device", "cpu", ranks=2)
    assert result.returncode == 0, result.stderr
    image = nib.load(out)
    assert image.shape == (32, 32, 15, 2)
    assert (folder / "frames.png").exists()
    names = {s["name"] for s in json.loads((folder / "lm_timings.json").read_text())["stages"]}
    assert {"read events", "event geometry", "sensitivity", "forward project", "back project",
            "allreduce"} <= names
    plan = run_medhpc("pet-recon", "--listmode", events, "--out", folder / "p.nii.gz",
                      "--time-windows", "0:30,30:60", "--dry-run", ranks=3)
    document = json.loads(plan.stdout)
    assert document["decomposition"] == "events" and len(document["ranks_detail"]) == 3
    assert sum(document["events_per_window"]) == sum(
        sum(rank["events_per_window"]) for rank in document["ranks_detail"])


def test_listmode_bad_inputs_are_one_line_and_write_nothing(tiny, events, tmp_path):
    folder, _, sinogram = tiny
    out = tmp_path / "x.nii.gz"
    header = tmp_path / "scan.cdh"
    header.write_text("Data filename: scan.cdf\nNumber of events: 1\nData mode: list-mode\n"
                      "Data type: PET\nDuration (s): 1\n")
    (tmp_path / "scan.cdf").write_bytes(b"\0" * 12)
    cases = [(("--listmode", header), ["scan.cdh", "--scanner"]),
             (("--listmode", header, "--scanner", "small-test", "--factors", events),
              ["events.h5", "not a medhpc sinogram"]),
             (("--listmode", events, "--time-windows", "70:80"), ["starts after"]),
             (("--listmode", header, "--scanner", "small-test", "--subsets", "2"),
              ["1 events in the window", "one per subset"]),
             (("--listmode", events, "--sinogram", sinogram), ["one of --sinogram and --listmode"]),
             (("--sinogram", sinogram, "--time-windows", "0:1"), ["--time-windows goes with"]),
             (("--listmode", events, "--norm", sinogram), ["--norm goes with --sinogram"]),
             (("--sinogram", sinogram, "--norm", events), ["events.h5", "--norm holds"])]
    for arguments, words in cases:
        result = run_medhpc("pet-recon", "--subsets", "1", *arguments, "--out", out,
                            "--device", "cpu", ranks=2)
        assert result.returncode == 2, result.stderr
        lines = [line for line in result.stderr.splitlines() if "rror" in line]
        assert len(lines) == 1, result.stderr
        for word in words:
            assert word in lines[0], lines[0]
        assert not out.exists()


def test_a_truth_on_another_grid_is_refused_before_work(tiny, tmp_path):
    _, _, sinogram = tiny
    other = tmp_path / "truth.nii.gz"
    write_nifti(other, np.zeros((15, 16, 16), np.float32),
                ImageGeometry.from_spacing((15, 16, 16), (8.0, 8.0, 2.0)))
    out = tmp_path / "r.nii.gz"
    result = run_medhpc("pet-recon", "--sinogram", sinogram, "--out", out, "--truth", other,
                        "--device", "cpu", ranks=2)
    expect_input_error(result, "truth.nii.gz", "does not match")
    assert not out.exists()


def test_pet_scatter_at_two_ranks_and_its_bad_inputs(tiny, tmp_path):
    folder, phantom, sinogram = tiny
    out = tmp_path / "scatter.h5"
    result = run_medhpc("pet-scatter", "--sinogram", sinogram, "--activity",
                        phantom / "activity.nii.gz", "--mu-map", phantom / "mu_map.nii.gz",
                        "--out", out, "--device", "cpu", ranks=2)
    assert result.returncode == 0, result.stderr
    with h5py.File(out) as h5:
        assert h5["scatter"].shape == (63, 48, 64) and h5.attrs["tail_bins"] > 0
    recon = tmp_path / "r.nii.gz"
    result = run_medhpc("pet-recon", "--sinogram", sinogram, "--scatter", out, "--out", recon,
                        "--iterations", "1", "--subsets", "2", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    hu = tmp_path / "hu.nii.gz"
    mu, grid = read_image(phantom / "mu_map.nii.gz")
    write_nifti(hu, mu * 1e5, grid)
    for arguments, words in [(("--mu-map", hu), ["hu.nii.gz", "1/cm or HU"]),
                             (("--mu-map", phantom / "mu_map.nii.gz", "--window-kev", "520,650"),
                              ["--window-kev", "low < 511 < high (keV)"])]:
        bad = tmp_path / "bad.h5"
        result = run_medhpc("pet-scatter", "--sinogram", sinogram, "--activity",
                            phantom / "activity.nii.gz", *arguments, "--out", bad,
                            "--device", "cpu", ranks=2)
        expect_input_error(result, *words)
        assert not bad.exists()


def test_scatter_iterations_loop_and_keep_the_estimate(tiny, tmp_path):
    folder, phantom, sinogram = tiny
    out = tmp_path / "loop.nii.gz"
    result = run_medhpc("pet-recon", "--sinogram", sinogram, "--mu-map", phantom / "mu_map.nii.gz",
                        "--scatter-iterations", "2", "--out", out, "--iterations", "1",
                        "--subsets", "2", "--device", "cpu", ranks=2)
    assert result.returncode == 0, result.stderr
    assert "scatter loop 2/2" in result.stderr
    log = json.loads((tmp_path / "loop.json").read_text())
    assert len(log["scatter_loops"]) == 2
    assert (tmp_path / "loop.scatter.h5").exists()
    assert not (tmp_path / "loop.scatter-loop.h5").exists()
    result = run_medhpc("pet-recon", "--sinogram", sinogram, "--scatter-iterations", "1",
                        "--out", tmp_path / "x.nii.gz", "--device", "cpu")
    assert result.returncode == 2 and "--mu-map" in result.stderr


def test_a_tof_calibration_without_tof_data_is_one_line_before_work(tiny, tmp_path):
    folder, phantom, sinogram = tiny
    from medhpc.pet.timing import write_timing_calibration

    calibration = tmp_path / "timing.h5"
    write_timing_calibration(calibration, np.zeros((8, 96)))
    out = tmp_path / "x.nii.gz"
    result = run_medhpc("pet-recon", "--sinogram", sinogram, "--tof-calibration", calibration,
                        "--out", out, "--device", "cpu", ranks=2)
    expect_input_error(result, str(calibration), "have no TOF")
    assert not out.exists()
    out = tmp_path / "x.h5"
    result = run_medhpc("pet-simulate", "--activity", phantom / "activity.nii.gz", "--scanner",
                        "small-test", "--tof-calibration", calibration, "--out", out,
                        "--device", "cpu")
    expect_input_error(result, "--tof-calibration", "add --tof")
    assert not out.exists()
