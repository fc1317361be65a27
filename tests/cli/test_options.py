"""Shared options: flag > MEDHPC_* environment > --config table > default."""

import click
import pytest
from click.testing import CliRunner

from medhpc.cli.options import compute_options, load_config_table, run_settings
from medhpc.errors import InputError


@click.command("demo-command")
@click.option("--iterations", type=int, default=3)
@compute_options
def demo_command(iterations, **shared):
    settings = run_settings(shared)
    click.echo(f"{iterations} {settings['threads']} {settings['device']} {settings['verbosity']}")


@click.group()
def group():
    pass


group.add_command(demo_command)


def invoke(args, env=None):
    return CliRunner().invoke(group, ["demo-command", *args], env=env or {},
                              auto_envvar_prefix="MEDHPC")


def test_defaults():
    result = invoke([])
    assert result.output.split() == ["3", "None", "auto", "0"]


def test_config_then_environment_then_flag(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[demo-command]\niterations = 7\nthreads = 2\ndevice = 'cpu'\n")
    assert invoke(["--config", str(config)]).output.split()[:3] == ["7", "2", "cpu"]
    env = {"MEDHPC_THREADS": "5", "MEDHPC_DEMO_COMMAND_ITERATIONS": "9"}
    assert invoke(["--config", str(config)], env).output.split()[:2] == ["9", "5"]
    assert invoke(["--config", str(config), "--threads", "1", "--iterations", "4"],
                  env).output.split()[:2] == ["4", "1"]


def test_quiet_and_verbose():
    assert invoke(["--quiet"]).output.split()[3] == "-1"
    assert invoke(["-vv"]).output.split()[3] == "2"


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[demo-command\n")
    with pytest.raises(InputError, match="bad.toml: not valid TOML"):
        load_config_table(bad, "demo-command")
    with pytest.raises(InputError, match="not found"):
        load_config_table(tmp_path / "none.toml", "demo-command")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[demo-command]\nnot_an_option = 1\n")
    result = invoke(["--config", str(unknown)])
    assert isinstance(result.exception, InputError)
    assert "not_an_option" in str(result.exception)


def test_a_bad_config_is_reported_once_at_two_ranks(tmp_path):
    from tests.helpers import run_medhpc

    bad = tmp_path / "bad.toml"
    bad.write_text("[lddmm\n")
    done = run_medhpc("lddmm", "--config", bad, "--fixed", tmp_path / "f.nii.gz", "--moving",
                      tmp_path / "m.nii.gz", "--out", tmp_path / "out", ranks=2, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(lines) == 1 and "bad.toml: not valid TOML" in lines[0]
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
