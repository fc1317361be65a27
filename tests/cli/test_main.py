"""The command line: help, version, info, exit codes and job-wide failure handling."""

import json

from medhpc import __version__
from tests.helpers import run_medhpc


def test_help_lists_every_subcommand_with_one_line():
    result = run_medhpc("--help")
    assert result.returncode == 0
    for name in ("info", "phantom", "report", "pet-geometry", "pet-simulate", "pet-recon"):
        assert name in result.stdout


def commands(group=None, prefix="medhpc"):
    """Every subcommand as ``(full name, click command)``, those of groups included."""
    import click

    from medhpc.cli.main import cli

    for name, command in (group or cli).commands.items():
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", command


def test_every_option_of_every_subcommand_has_help_text():
    import click

    missing = [f"{name} --{option.name.replace('_', '-')}"
               for name, command in commands() for option in command.params
               if isinstance(option, click.Option) and not option.help]
    assert missing == []


def test_every_subcommand_groups_its_options_and_ends_with_an_example_it_can_run():
    import re

    import click

    from medhpc.cli.help import GROUPS

    for name, command in commands():
        words = name.split()[1:]
        text = command.get_help(click.Context(command, info_name=" ".join(words)))
        headings = [line[:-1] for line in text.splitlines() if line.endswith(":")
                    and not line.startswith(" ")]
        assert headings[-1] == "Example", name
        assert set(headings[:-1]) <= set(GROUPS) and "Run" in headings, (name, headings)
        options = {opt for parameter in command.params for opt in parameter.opts}
        lines = command.example.replace("\\\n", " ").splitlines()
        calls = [part.split("medhpc ", 1)[1] for line in lines for part in line.split("|")
                 if "medhpc " in part]
        mine = [call for call in calls if call.split()[:len(words)] == words]
        assert mine, f"{name}: its example does not run it"
        for call in mine:
            unknown = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", call)) - options
            assert not unknown, f"{name} example: {sorted(unknown)}"


def test_version():
    result = run_medhpc("--version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_unknown_option_is_a_usage_error():
    result = run_medhpc("info", "--no-such-option")
    assert result.returncode == 2
    assert "no-such-option" in result.stderr


def test_info_json_serial():
    result = run_medhpc("info", "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["ranks"] == 1
    assert document["medhpc"] == __version__
    assert "numba" in document["packages"]


def test_info_json_at_four_ranks_reports_the_device_plan():
    result = run_medhpc("info", "--json", ranks=4, timeout=120)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["ranks"] == 4
    assert document["nodes"] == 1
    assert [entry["rank"] for entry in document["placement"]] == [0, 1, 2, 3]
    assert sorted(entry["local_rank"] for entry in document["placement"]) == [0, 1, 2, 3]
    assert "MPI" in document["mpi"]["library"] or "MPICH" in document["mpi"]["library"]
    assert document["mpi"]["cuda_aware"] is False
    assert all(entry["threads"] >= 1 for entry in document["placement"])


def test_injected_failure_on_one_of_four_ranks_ends_the_job(tmp_path):
    # the other three ranks wait in a collective: only a job-wide abort ends the run
    # before the subprocess timeout (a hang fails the test)
    result = run_medhpc("pet-recon", "--sinogram", tmp_path / "missing.h5", "--out",
                        tmp_path / "x.nii.gz", ranks=4, timeout=60,
                        env={"MEDHPC_FAIL_ON_RANK": "2", "MPIEXEC_TIMEOUT": "120"})
    assert result.returncode != 0
    assert "failure injected on rank 2" in result.stderr


def test_bad_input_is_one_line_once_with_exit_code_2(tmp_path):
    result = run_medhpc("pet-recon", "--sinogram", tmp_path / "missing.h5", "--out",
                        tmp_path / "x.nii.gz", ranks=2, timeout=120)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    assert "missing.h5" in errors[0] and "not found" in errors[0]
    assert not (tmp_path / "x.nii.gz").exists()
