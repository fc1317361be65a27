"""start_run checks its own options on rank 0 before any work: one line, printed once."""

import os

import pytest

from tests.helpers import run_medhpc


@pytest.fixture
def pair(tmp_path):
    done = run_medhpc("phantom", "lddmm", "--out", tmp_path / "ph", "--shape", "16", ranks=1,
                      timeout=120)
    assert done.returncode == 0, done.stderr
    return tmp_path / "ph" / "fixed.nii.gz", tmp_path / "ph" / "moving.nii.gz"


def error_lines(done):
    return [line for line in done.stderr.splitlines() if "error" in line]


def test_out_of_range_threads_are_refused_once_at_two_ranks(pair, tmp_path):
    done = run_medhpc("lddmm", "--fixed", pair[0], "--moving", pair[1], "--out", tmp_path / "out",
                      "--threads", "-3", ranks=2, timeout=120)
    assert done.returncode == 2, done.stderr
    assert error_lines(done) == ["medhpc: error: --threads -3: expected CPU threads per rank "
                                 f"from 1 to the {os.cpu_count()} cores of this node"]
    assert not (tmp_path / "out").exists()


def test_info_refuses_out_of_range_threads_once_at_two_ranks():
    done = run_medhpc("info", "--threads", "0", ranks=2, timeout=120)
    assert done.returncode == 2, done.stderr
    assert error_lines(done) == ["medhpc: error: --threads 0: expected CPU threads per rank "
                                 f"from 1 to the {os.cpu_count()} cores of this node"]


def test_timings_that_exist_are_refused_before_the_registration(pair, tmp_path):
    timings = tmp_path / "t.json"
    timings.write_text("{}")
    done = run_medhpc("lddmm", "--fixed", pair[0], "--moving", pair[1], "--out", tmp_path / "out",
                      "--timings", timings, ranks=2, timeout=120)
    assert done.returncode == 2, done.stderr
    assert error_lines(done) == [
        f"medhpc: error: {timings}: output exists; pass --overwrite to replace it"]
    assert timings.read_text() == "{}" and not (tmp_path / "out").exists()
