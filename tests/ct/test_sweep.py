"""ct-train --sweep: configurations on groups of ranks, failures recorded, not fatal."""

import json

import pytest

from medhpc.ct.sweep import read_sweep
from medhpc.errors import InputError
from tests.helpers import run_medhpc

pytest.importorskip("torch")

TINY = ("--widths", "4,8", "--folds", "1", "--epochs", "1", "--steps", "2", "--threads", "1",
        "--device", "cpu")


def test_a_grid_and_listed_configurations_make_named_runs(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text('[grid]\nlr = [0.01, 0.003]\nwidths = [[4, 8], [8, 16]]\n\n'
                    '[[configuration]]\noptimizer = "adamw"\npatch = 16\n')
    configurations = read_sweep(path)
    assert len(configurations) == 5
    assert configurations[0].changes == {"optimizer": "adamw", "patch": (16, 16, 16)}
    assert configurations[1].changes == {"lr": 0.01, "widths": (4, 8)}
    assert configurations[4].name == "c004-lr0.003-widths8.16"
    assert len({c.name for c in configurations}) == 5


@pytest.mark.parametrize("text, message", [
    ("[grid]\nlearning_rate = [0.1]\n", "learning_rate unknown"),
    ("[grid]\nlr = 0.1\n", "expected a non-empty list"),
    ("[grid]\nwidths = [\"wide\"]\n", "expected a list of integers"),
    ("[runs]\nlr = [0.1]\n", "unknown table(s) runs"),
    ("", "no configurations"),
    ("[grid\n", "not a TOML file"),
])
def test_a_bad_sweep_file_is_one_line_naming_it(tmp_path, text, message):
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    with pytest.raises(InputError, match="sweep.toml") as error:
        read_sweep(path)
    assert message in str(error.value)


def test_a_failed_configuration_leaves_the_other_group_to_finish(tiny_dataset, tmp_path):
    """Two groups of one rank: the patch of c001 does not fit the network, c000 trains."""
    sweep = tmp_path / "sweep.toml"
    sweep.write_text("[grid]\npatch = [16, 17]\n")
    out = tmp_path / "sweep"
    done = run_medhpc("ct-train", "--data", tiny_dataset, "--out", out, "--sweep", sweep,
                      "--ranks-per-run", "1", *TINY, ranks=2, timeout=180)
    assert done.returncode == 1, done.stderr
    records = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok", "failed"]
    assert records[0]["group"] == 0 and records[1]["group"] == 1
    assert "expected multiples of 2,2,2" in records[1]["error"]
    assert (out / records[0]["name"] / "model.pt").exists()
    assert not (out / records[1]["name"] / "model.pt").exists()
    assert "1 of 2 configuration(s) finished; failed: c001-patch17.17.17" in done.stderr
    assert str(out / records[0]["name"] / "model.pt") in done.stdout
    assert "c001-patch17.17.17,failed" in (out / "sweep.csv").read_text()


def test_ranks_that_do_not_split_into_groups_are_refused(tiny_dataset, tmp_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text("[grid]\npatch = [16]\n")
    done = run_medhpc("ct-train", "--data", tiny_dataset, "--out", tmp_path / "s", "--sweep",
                      sweep, "--ranks-per-run", "2", *TINY, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "--ranks-per-run 2" in lines[0]


def test_one_group_of_two_ranks_runs_its_configurations_one_after_the_other(tiny_dataset,
                                                                             tmp_path):
    """The process group is joined and left once per configuration."""
    sweep = tmp_path / "sweep.toml"
    sweep.write_text("[grid]\nlr = [0.01, 0.003]\n")
    out = tmp_path / "sweep"
    done = run_medhpc("ct-train", "--data", tiny_dataset, "--out", out, "--sweep", sweep,
                      "--ranks-per-run", "2", "--patch", "16", *TINY, ranks=2, timeout=180)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
    assert [(r["status"], r["ranks"], r["group"]) for r in records] == [("ok", 2, 0)] * 2
    assert "2 of 2 configuration(s) finished" in done.stderr


def test_a_sweep_run_again_into_its_folder_is_refused_before_training(tiny_dataset, tmp_path):
    sweep = tmp_path / "sweep.toml"
    sweep.write_text("[grid]\npatch = [16]\n")
    out = tmp_path / "sweep"
    first = run_medhpc("ct-train", "--data", tiny_dataset, "--out", out, "--sweep", sweep,
                       *TINY, timeout=120)
    assert first.returncode == 0, first.stderr
    before = (out / "sweep.jsonl").read_text()
    again = run_medhpc("ct-train", "--data", tiny_dataset, "--out", out, "--sweep", sweep,
                       *TINY, timeout=120)
    assert again.returncode == 2
    lines = [line for line in again.stderr.splitlines() if "error:" in line]
    assert len(lines) == 1 and "sweep.jsonl: output exists" in lines[0]
    assert (out / "sweep.jsonl").read_text() == before
