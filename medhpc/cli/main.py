"""The ``medhpc`` command: subcommands, exit codes and job-wide failure handling.

Exit codes: 0 success, 1 runtime failure, 2 usage or input error, 130 interrupted.

An error that every rank agreed on (input validation runs once and its verdict
is shared) is printed once by rank 0 and every rank exits with its code. Any
other exception on any rank ends the whole MPI job at once (``MPI_Abort``), so a
failure never leaves the other ranks waiting in a collective.
"""

from __future__ import annotations

import os
import sys
import traceback

import click

from medhpc import __version__
from medhpc.errors import (EXIT_FAILURE, EXIT_INPUT, EXIT_INTERRUPTED, WRITE_ERRNOS,
                           MedhpcError)


class _Group(click.Group):
    """Keeps subcommands in the order they were added in ``--help``."""

    def list_commands(self, ctx):
        return list(self.commands)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "auto_envvar_prefix": "MEDHPC",
                                           "max_content_width": 100})
@click.version_option(__version__, prog_name="medhpc")
def cli():
    """MPI-parallel medical image processing: run any subcommand as
    `mpiexec -n N medhpc SUBCOMMAND ...` or plainly on one rank.

    Exit codes: 0 success, 1 runtime failure, 2 usage or input error, 130 interrupted.
    """


# Application command modules: each lists its subcommands in ``COMMANDS`` and may add
# ``PHANTOM_COMMANDS`` to ``medhpc phantom``; heavy or optional dependencies are imported
# inside the commands, so ``--help`` stays fast and complete. Absent modules are skipped.
APPLICATION_MODULES = ("pet", "lddmm", "tnr", "ct")


def _register():
    import importlib

    from medhpc.cli import compile as compile_module
    from medhpc.cli import info, phantom, report

    cli.add_command(info.info)
    cli.add_command(compile_module.compile_kernels)
    cli.add_command(phantom.phantom)
    cli.add_command(report.report)
    for name in APPLICATION_MODULES:
        try:
            module = importlib.import_module(f"medhpc.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"medhpc.cli.{name}":
                continue
            raise
        for command in getattr(module, "COMMANDS", ()):
            cli.add_command(command)
        for command in getattr(module, "PHANTOM_COMMANDS", ()):
            phantom.phantom.add_command(command)


_register()


def _world_or_none():
    from medhpc.parallel import comm

    return comm._world


def _end_job(code: int, message: str, exc: BaseException | None) -> None:
    """Report an error and exit, aborting the MPI job when other ranks may be waiting."""
    world = _world_or_none()
    agreed = exc is not None and getattr(exc, "agreed", False)
    size = world.size if world is not None else 1
    rank = world.rank if world is not None else 0
    if agreed:
        if rank == 0:
            sys.stderr.write(f"medhpc: error: {message}\n")
        sys.stderr.flush()
        sys.exit(code)
    tag = f"[rank {rank}/{size}] " if size > 1 else ""
    sys.stderr.write(f"{tag}medhpc: error: {message}\n")
    sys.stderr.flush()
    if size > 1 and world.has_mpi:
        import time

        time.sleep(0.2)  # let the launcher forward this rank's last lines before the abort
        world.abort(code)
    sys.exit(code)


def run(argv=None) -> None:
    """Console entry point: run the command line and map outcomes to exit codes."""
    try:
        result = cli.main(args=argv, prog_name="medhpc", standalone_mode=False)
        from medhpc.runtime.context import Run, report_outputs

        if isinstance(result, Run):
            report_outputs(result.world, result)
            if result.exit_code:
                sys.exit(result.exit_code)
        else:
            report_outputs(_world_or_none())
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        from medhpc.parallel.comm import get_world

        if get_world().rank == 0:  # every rank parses the same arguments
            exc.show()
        sys.exit(EXIT_INPUT)
    except click.exceptions.Abort:
        _end_job(EXIT_INTERRUPTED, "interrupted", None)
    except KeyboardInterrupt:
        _end_job(EXIT_INTERRUPTED, "interrupted", None)
    except MedhpcError as exc:
        _end_job(exc.exit_code, str(exc), exc)
    except Exception as exc:
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:  # the disk, not medhpc
            _end_job(EXIT_FAILURE, f"{exc.filename or 'an output'}: cannot be written "
                                   f"({os.strerror(exc.errno)})", exc)
        traceback.print_exc()
        _end_job(EXIT_FAILURE, f"{type(exc).__name__}: {exc}", exc)
    sys.exit(0)
