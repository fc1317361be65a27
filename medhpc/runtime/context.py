"""What every compute subcommand sets up before its work and reports after it.

:func:`start_run` resolves the device (the same verdict on every rank), binds a
GPU per rank, sets CPU threads per rank and starts the stage timer.
:meth:`Run.finish` gathers the stage breakdown, prints its table on rank 0 and
writes it as JSON when ``--timings`` asked for it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from medhpc import backend
from medhpc.io.atomic import check_output_path
from medhpc.parallel import device as devices
from medhpc.parallel.comm import World, get_world
from medhpc.runtime.log import Log
from medhpc.runtime.timing import COMPILE_CLOCK, StageTimer, format_breakdown, write_breakdown

FAIL_ON_RANK_VARIABLE = "MEDHPC_FAIL_ON_RANK"


class InjectedFailure(RuntimeError):
    """Raised on the rank named by ``MEDHPC_FAIL_ON_RANK`` (checks that jobs tear down)."""


@dataclass
class Run:
    """The run-time state a subcommand's algorithm receives."""

    command: str
    world: World
    device: str
    threads: int
    seed: int
    log: Log
    timer: StageTimer
    gpu: int | None = None
    timings_path: Path | None = None
    overwrite: bool = False
    dry_run: bool = False
    json_summary: bool = False
    summary: dict = field(default_factory=dict)
    breakdown: dict | None = None
    finished: bool = False
    exit_code: int = 0  # non-zero: the command finished, but some of its work failed

    def stage(self, name: str, kind: str = "other"):
        """Time a block as a named stage (see :class:`StageTimer`)."""
        return self.timer.stage(name, kind)

    def finish(self, extra: dict | None = None) -> dict | None:
        """Gather the breakdown; on rank 0 print the table and write ``--timings``.

        A run whose method does not call this (to keep the breakdown in its own log) is
        finished by :func:`~medhpc.cli.options.pass_run` when the subcommand returns.
        """
        self.finished = True
        info = {"device": self.device, "threads_per_rank": self.threads}
        info.update(extra or {})
        document = self.timer.breakdown(self.world, command=self.command, extra=info)
        self.breakdown = document
        if document is not None:
            self.log.info(format_breakdown(document))
            if self.timings_path is not None:
                write_breakdown(document, self.timings_path)
                self.log.info(f"timings written to {self.timings_path}")
        return document

    def print_plan(self, plan: dict) -> None:
        """Print a ``--dry-run`` plan as JSON on stdout (rank 0 only)."""
        if self.world.is_root:
            plan = {"command": self.command, "ranks": self.world.size,
                    "nodes": self.world.node_count, "device": self.device,
                    "threads_per_rank": self.threads, **plan}
            json.dump(plan, sys.stdout, indent=2, default=str)
            sys.stdout.write("\n")
            sys.stdout.flush()


def start_run(command: str, device: str = "auto", threads: int | None = None, seed: int = 0,
              verbosity: int = 0, timings: str | None = None, overwrite: bool = False,
              dry_run: bool = False, json_summary: bool = False,
              world: World | None = None) -> Run:
    """Set up a compute subcommand's run on this rank.

    The device is resolved on rank 0 and shared, so every rank takes the same
    path; with ``cuda`` each rank then binds the GPU of its node-local rank.
    """
    world = world or get_world()
    log = Log(world.rank, world.size, verbosity)
    resolved = world.agree(lambda: backend.resolve_device(device, notice=log.notice))
    gpu = devices.select_gpu(world.local_rank) if resolved == "cuda" else None
    timings_path = Path(timings) if timings else None
    if timings_path is not None and not dry_run:
        world.agree(lambda: check_output_path(timings_path, overwrite, suffixes=(".json",)))
    threads = devices.set_threads(devices.agreed_threads(world, threads))
    COMPILE_CLOCK.install()
    COMPILE_CLOCK.on_first_compile = lambda: log.info(
        f"compiling kernels (first run only; cached in {kernel_cache()})")
    timer = StageTimer(synchronize=backend.synchronizer(resolved))
    run = Run(command=command, world=world, device=resolved, threads=threads, seed=seed,
              log=log, timer=timer, gpu=gpu, overwrite=overwrite, dry_run=dry_run,
              json_summary=json_summary, timings_path=timings_path)
    _maybe_inject_failure(world)
    return run


def report_outputs(world: World | None, run: Run | None = None) -> None:
    """Print on stdout, from rank 0, what a script needs: the outputs every rank put in
    place, one path per line, or with ``--json`` one summary document.

    Collective over ``world`` (every rank calls it once the command has succeeded);
    logs and progress stay on stderr.
    """
    from medhpc.io.atomic import published_outputs
    from medhpc.runtime.runlog import dumps, run_document

    local = [str(path) for path in published_outputs()]
    gathered = world.gather(local) if world is not None else [local]
    if gathered is None or (run is not None and run.dry_run):
        return
    paths = list(dict.fromkeys(path for part in gathered for path in part))
    if run is not None and run.json_summary:
        wall = run.breakdown["wall_seconds"] if run.breakdown else None
        sys.stdout.write(dumps(run_document(run.command, {
            "status": "ok", "ranks": run.world.size, "device": run.device,
            "wall_seconds": wall, "outputs": paths, "summary": run.summary})))
    else:
        sys.stdout.writelines(path + "\n" for path in paths)
    sys.stdout.flush()


def kernel_cache() -> str:
    """Where numba keeps the compiled kernels."""
    folder = os.environ.get("NUMBA_CACHE_DIR")
    return folder if folder else f"the __pycache__ folders under {Path(__file__).parents[1]}"


def _maybe_inject_failure(world: World) -> None:
    """Raise :class:`InjectedFailure` on the rank named by ``MEDHPC_FAIL_ON_RANK``."""
    value = os.environ.get(FAIL_ON_RANK_VARIABLE, "").strip()
    if value.isdigit() and int(value) == world.rank:
        raise InjectedFailure(f"failure injected on rank {world.rank} by {FAIL_ON_RANK_VARIABLE}")
