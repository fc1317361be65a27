"""Options every compute subcommand shares, and the ``--config`` file.

Precedence: command-line flag > ``MEDHPC_*`` environment variable > the
subcommand's table in ``--config FILE.toml`` > built-in default. Click applies
flag > environment > ``default_map`` > default; ``--config`` is eager and fills
``default_map`` before the other options are read.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import click

from medhpc.errors import InputError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def default_of(settings, name: str):
    """The default of field ``name`` of the settings dataclass ``settings``.

    Every default that decides a result lives in an application's ``settings.py``; the
    command line reads it from there and never repeats it.
    """
    for item in dataclasses.fields(settings):
        if item.name == name:
            if item.default is not dataclasses.MISSING:
                return item.default
            return item.default_factory()
    raise KeyError(f"{settings.__name__} has no setting {name!r}")


def load_config_table(path, command: str) -> dict:
    """Return the ``[command]`` table of a TOML config file with keys as option names.

    Keys may use dashes or underscores (``--psf-fwhm-mm`` is ``psf_fwhm_mm`` or
    ``psf-fwhm-mm``). A file without that table gives an empty mapping.
    """
    path = Path(path)
    try:
        with open(path, "rb") as stream:
            document = tomllib.load(stream)
    except FileNotFoundError:
        raise InputError(f"{path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc}); expected one table per subcommand") from None
    table = document.get(command, {})
    if not isinstance(table, dict):
        raise InputError(f"{path}: [{command}] must be a table of option = value")
    return {key.replace("-", "_"): value for key, value in table.items()}


def _apply_config(ctx: click.Context, param: click.Parameter, value):
    if value is None:
        return None
    from medhpc.parallel.comm import get_world

    def read():
        table = load_config_table(value, ctx.info_name)
        known = {p.name for p in ctx.command.params}
        unknown = sorted(set(table) - known)
        if unknown:
            raise InputError(f"{value}: [{ctx.info_name}] has unknown option(s) "
                             f"{', '.join(unknown)}; see 'medhpc {ctx.info_name} --help'")
        return table

    table = get_world().agree(read)  # every rank parses the same arguments; rank 0 reads
    ctx.default_map = {**(ctx.default_map or {}), **table}
    return value


def compute_options(function):
    """Add the shared options of compute subcommands to a click command."""
    options = [
        click.option("--config", type=click.Path(dir_okay=False), callback=_apply_config,
                     is_eager=True, expose_value=False,
                     help="TOML file with a table of options per subcommand."),
        click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="auto",
                     envvar="MEDHPC_DEVICE", show_default=True,
                     help="Where kernels run; 'auto' uses the rank's GPU when there is one."),
        click.option("--threads", type=int, default=None, envvar="MEDHPC_THREADS",
                     help="CPU threads per rank [default: cores / ranks on the node]."),
        click.option("--seed", type=int, default=0, envvar="MEDHPC_SEED", show_default=True,
                     help="Seed of every random stream."),
        click.option("--timings", type=click.Path(dir_okay=False), default=None,
                     envvar="MEDHPC_TIMINGS",
                     help="Write the per-rank stage breakdown as JSON (see 'medhpc report')."),
        click.option("--dry-run", is_flag=True,
                     help="Print the decomposition plan and per-rank memory as JSON; touch nothing."),
        click.option("--overwrite", is_flag=True, help="Replace outputs that exist."),
        click.option("--json", "json_summary", is_flag=True,
                     help="Print one JSON summary on stdout (outputs, wall time, results) "
                          "instead of the written paths, one per line."),
        click.option("-v", "--verbose", count=True, help="More detail; -vv makes every rank talk."),
        click.option("--quiet", is_flag=True, help="Only errors and notices."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def run_settings(kwargs: dict) -> dict:
    """Pop the shared options from a command's keyword arguments for ``start_run``."""
    verbose = kwargs.pop("verbose")
    quiet = kwargs.pop("quiet")
    return {
        "device": kwargs.pop("device"), "threads": kwargs.pop("threads"),
        "seed": kwargs.pop("seed"), "timings": kwargs.pop("timings"),
        "dry_run": kwargs.pop("dry_run"), "overwrite": kwargs.pop("overwrite"),
        "json_summary": kwargs.pop("json_summary"),
        "verbosity": -1 if quiet else verbose,
    }


def pass_run(command_name: str):
    """Decorator: turn the shared options into a started :class:`~medhpc.runtime.context.Run`.

    The decorated function receives ``run`` as its first argument and the
    subcommand's own options as keywords. Every run that computed ends here the same
    way: finished once (time breakdown and ``--timings``) unless the method already did,
    and returned, so that :func:`~medhpc.cli.main.run` reports its outputs on stdout.
    """
    def decorate(function):
        @functools.wraps(function)
        def wrapper(**kwargs):
            from medhpc.runtime.context import start_run

            run = start_run(command_name, **run_settings(kwargs))
            function(run, **kwargs)
            if not run.dry_run and not run.finished:
                run.finish()
            return run
        return compute_options(wrapper)
    return decorate
