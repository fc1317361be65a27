"""Stage timing on every rank and the breakdown across ranks.

Each subcommand names its stages (``read``, ``forward``, ``allreduce`` ...) and
gives each a kind: ``io``, ``transfer`` (host/device copies), ``kernel``, ``compile``,
``comm`` or ``other``. At the end, :meth:`StageTimer.breakdown` gathers every
rank's totals (one small gather) and rank 0 prints the table and writes the JSON
that ``medhpc report`` draws.
"""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from pathlib import Path

KINDS = ("io", "transfer", "kernel", "comm", "compile", "other")
#: Where the time numba spends compiling kernels, or loading them from its cache, goes
#: (taken out of the stage that triggered it, so a first run does not inflate that stage).
COMPILE_STAGE = "compile kernels"


class CompileClock:
    """Seconds this process held numba's compiler lock (compiling kernels or loading them
    from the cache), and how many kernels it compiled; :meth:`install` starts listening."""

    def __init__(self):
        self.seconds = 0.0
        self.compiled = 0
        self.on_first_compile = None
        self._depth = 0
        self._start = 0.0
        self._installed = False

    def install(self) -> None:
        if self._installed:
            return
        try:
            from numba.core import event
        except ImportError:
            return
        clock = self

        class HoldsLock(event.Listener):
            def on_start(self, _):
                if clock._depth == 0:
                    clock._start = time.perf_counter()
                clock._depth += 1

            def on_end(self, _):
                clock._depth -= 1
                if clock._depth == 0:
                    clock.seconds += time.perf_counter() - clock._start

        class Compiles(event.Listener):
            def on_start(self, _):
                clock.compiled += 1
                if clock.compiled == 1 and clock.on_first_compile is not None:
                    clock.on_first_compile()

            def on_end(self, _):
                pass

        event.register("numba:compiler_lock", HoldsLock())
        event.register("numba:compile", Compiles())
        self._installed = True


COMPILE_CLOCK = CompileClock()


class StageTimer:
    """Accumulates wall time per named stage on one rank.

    Parameters
    ----------
    synchronize : callable, optional
        Called before reading the clock at a stage's start and end, so that
        asynchronous device work is charged to the right stage (for CUDA:
        ``numba.cuda.synchronize``).
    """

    def __init__(self, synchronize=None):
        self.synchronize = synchronize
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.kinds: dict[str, str] = {}
        self.started = time.perf_counter()
        self.peak_mb = 0.0
        self.peak_stage = ""
        self._depth = 0

    @contextmanager
    def stage(self, name: str, kind: str = "other"):
        """Time the enclosed block as stage ``name`` of ``kind``; compiling or loading
        kernels inside it is charged to :data:`COMPILE_STAGE` instead."""
        if self.synchronize is not None:
            self.synchronize()
        start, compile_before = time.perf_counter(), COMPILE_CLOCK.seconds
        self._depth += 1
        try:
            yield
        finally:
            if self.synchronize is not None:
                self.synchronize()
            self._depth -= 1
            compiling = COMPILE_CLOCK.seconds - compile_before
            self.add(name, max(0.0, time.perf_counter() - start - compiling), kind)
            if compiling > 0 and self._depth == 0:  # nested stages hold it once
                self.add(COMPILE_STAGE, compiling, "compile")
            peak = peak_memory_mb()
            if peak > self.peak_mb:
                self.peak_mb, self.peak_stage = peak, name

    def add(self, name: str, seconds: float, kind: str = "other") -> None:
        """Charge ``seconds`` to stage ``name``."""
        if kind not in KINDS:
            raise ValueError(f"unknown stage kind {kind!r}; expected one of {KINDS}")
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1
        self.kinds.setdefault(name, kind)

    def elapsed(self) -> float:
        """Seconds since the timer was created."""
        return time.perf_counter() - self.started

    def breakdown(self, world, command: str = "", extra: dict | None = None) -> dict | None:
        """Gather every rank's stages to rank 0 and return the breakdown there.

        Returns ``None`` on other ranks. The result holds, per stage, its kind,
        the seconds of every rank and their min/mean/max, and the share of the
        wall time (slowest rank) its mean took.
        """
        local = {"seconds": self.seconds, "calls": self.calls, "kinds": self.kinds,
                 "wall": self.elapsed(), "peak_memory_mb": peak_memory_mb(),
                 "peak_memory_stage": self.peak_stage}
        everyone = world.gather(local)
        if everyone is None:
            return None
        return build_breakdown(everyone, command=command, ranks=world.size,
                               nodes=world.node_count, extra=extra)


def peak_memory_mb() -> float:
    """This process's peak resident memory in MiB (0 where the platform does not say).

    On Linux the high-water mark of this program's own address space (``VmHWM``):
    ``ru_maxrss`` keeps, across ``exec``, the resident size of the process that
    forked it, so a small command started from a large one would report the
    parent's memory.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:
        return 0.0
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kilobytes / 1024.0 if platform.system() != "Darwin" else kilobytes / 2**20


def build_breakdown(per_rank: list[dict], command: str = "", ranks: int | None = None,
                    nodes: int = 1, extra: dict | None = None) -> dict:
    """Combine per-rank stage totals into the breakdown document (see :meth:`StageTimer.breakdown`)."""
    ranks = len(per_rank) if ranks is None else ranks
    names: list[str] = []
    kinds: dict[str, str] = {}
    for record in per_rank:
        for name in record["seconds"]:
            if name not in kinds:
                names.append(name)
                kinds[name] = record["kinds"][name]
    wall = max(record["wall"] for record in per_rank)
    stages = []
    for name in names:
        seconds = [record["seconds"].get(name, 0.0) for record in per_rank]
        calls = [record["calls"].get(name, 0) for record in per_rank]
        mean = sum(seconds) / len(seconds)
        stages.append({
            "name": name, "kind": kinds[name], "per_rank": seconds, "calls": calls,
            "min": min(seconds), "mean": mean, "max": max(seconds),
            "percent_of_wall": 100.0 * mean / wall if wall > 0 else 0.0,
        })
    document = {
        "command": command, "ranks": ranks, "nodes": nodes, "wall_seconds": wall,
        "wall_per_rank": [record["wall"] for record in per_rank],
        "peak_memory_mb_per_rank": [record.get("peak_memory_mb", 0.0) for record in per_rank],
        "peak_memory_stage_per_rank": [record.get("peak_memory_stage", "")
                                       for record in per_rank],
        "host": platform.node(), "stages": stages,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if extra:
        document.update(extra)
    return document


def format_breakdown(document: dict) -> str:
    """Return the breakdown as a text table: min/mean/max over ranks and % of wall time."""
    lines = [f"time per stage over {document['ranks']} rank(s), wall {document['wall_seconds']:.3f} s"
             + (f" [{document['command']}]" if document.get("command") else "")]
    header = f"  {'stage':<24}{'kind':<10}{'min s':>10}{'mean s':>10}{'max s':>10}{'% wall':>8}"
    lines.append(header)
    lines.append("  " + "-" * (len(header) - 2))
    accounted = 0.0
    for stage in document["stages"]:
        accounted += stage["mean"]
        lines.append(f"  {stage['name']:<24}{stage['kind']:<10}{stage['min']:>10.3f}"
                     f"{stage['mean']:>10.3f}{stage['max']:>10.3f}{stage['percent_of_wall']:>7.1f}%")
    wall = document["wall_seconds"]
    other = max(0.0, wall - accounted)
    lines.append(f"  {'(not in a stage)':<24}{'':<10}{'':>10}{other:>10.3f}{'':>10}"
                 f"{(100.0 * other / wall if wall > 0 else 0.0):>7.1f}%")
    memory = document.get("peak_memory_mb_per_rank") or []
    if memory:
        lines.append(f"  peak memory per rank: min {min(memory):.0f} MiB, max {max(memory):.0f} MiB")
    return "\n".join(lines)


def write_breakdown(document: dict, path) -> None:
    """Write the breakdown JSON atomically (the run documents' common head first)."""
    from medhpc.io.atomic import atomic_path
    from medhpc.runtime.runlog import dumps, run_document

    with atomic_path(path, overwrite=True) as tmp:
        tmp.write_text(dumps(run_document(document.get("command") or "", document)))
