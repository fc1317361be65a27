"""Rank-tagged messages and progress on stderr.

Rank 0 speaks; other ranks stay quiet unless ``-vv`` asks for every rank.
Messages are tagged ``[rank r/N]`` when the world has more than one rank.
"""

from __future__ import annotations

import sys
import time


class Log:
    """Messages of one rank.

    Parameters
    ----------
    rank, size : int
        This rank and the world size.
    verbosity : int
        -1 quiet (errors only), 0 normal, 1 verbose (``-v``), 2 every rank (``-vv``).
    stream : file-like
        Where messages go (stderr by default).
    prefix : str
        Put before every message (a sweep's configuration name).
    """

    def __init__(self, rank: int = 0, size: int = 1, verbosity: int = 0, stream=None,
                 prefix: str = ""):
        self.rank = rank
        self.size = size
        self.verbosity = verbosity
        self.stream = stream if stream is not None else sys.stderr
        self.prefix = prefix

    @property
    def tag(self) -> str:
        """The prefix of this rank's messages."""
        return self.prefix + (f"[rank {self.rank}/{self.size}] " if self.size > 1 else "")

    def _speaks(self, level: int) -> bool:
        if self.verbosity < level:
            return False
        return self.rank == 0 or self.verbosity >= 2

    def _write(self, text: str) -> None:
        self.stream.write(f"{self.tag}{text}\n")
        self.stream.flush()

    def info(self, text: str) -> None:
        """A normal message (hidden by ``--quiet``)."""
        if self._speaks(0):
            self._write(text)

    def notice(self, text: str) -> None:
        """A message worth seeing even with ``--quiet`` (root only)."""
        if self.rank == 0 or self.verbosity >= 2:
            self._write(text)

    def debug(self, text: str) -> None:
        """A detail shown with ``-v``."""
        if self._speaks(1):
            self._write(text)

    def status(self, text: str, every_s: float = 10.0) -> None:
        """Show where a long loop stands (rank 0): in place on a terminal, otherwise one
        line at most every ``every_s`` seconds, so batch logs stay short."""
        if self.rank != 0 or self.verbosity < 0:
            return
        interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        now = time.perf_counter()
        if interactive:
            self.stream.write(f"\r{self.tag}{text}\033[K")
            self.stream.flush()
            self._status_shown = True
        elif now - getattr(self, "_status_written", float("-inf")) >= every_s:
            self._status_written = now
            self._write(text)

    def end_status(self) -> None:
        """End an in-place status line (a newline on a terminal)."""
        if getattr(self, "_status_shown", False):
            self.stream.write("\n")
            self.stream.flush()
            self._status_shown = False

    def progress(self, iterable, total: int | None = None, desc: str = ""):
        """Yield from ``iterable`` while rank 0 shows progress.

        On a terminal a bar redraws in place; otherwise (batch jobs) a line is
        written at most every 10 s and at the end, so job logs stay short.
        """
        if total is None:
            total = len(iterable) if hasattr(iterable, "__len__") else None
        show = self.counter(desc)
        count = 0
        for item in iterable:
            yield item
            count += 1
            show(count, total)
        show.end()

    def counter(self, desc: str) -> "ProgressCounter":
        """A callable ``show(done, total)`` for work counted elsewhere (a work queue, say),
        drawn like :meth:`progress`; call its ``end()`` when the work is over."""
        return ProgressCounter(self, desc)

    def _draw(self, desc, count, total, elapsed, interactive) -> None:
        if total:
            filled = int(30 * count / total)
            eta = elapsed / count * (total - count) if count else 0.0
            text = (f"{desc} [{'#' * filled}{'.' * (30 - filled)}] {count}/{total} "
                    f"{elapsed:.1f} s, {eta:.1f} s left")
        else:
            text = f"{desc} {count} done, {elapsed:.1f} s"
        if interactive:
            self.stream.write(f"\r{self.tag}{text}")
            self.stream.flush()
        else:
            self._write(text)


class ProgressCounter:
    """Draws ``done`` of ``total`` for :meth:`Log.counter` (rank 0, not with ``--quiet``)."""

    def __init__(self, log: Log, desc: str):
        self.log = log
        self.desc = desc
        self.show = log.rank == 0 and log.verbosity >= 0
        self.interactive = self.show and hasattr(log.stream, "isatty") and log.stream.isatty()
        self.started = self.last = time.perf_counter()
        self.drawn = False

    def __call__(self, done: int, total: int | None) -> None:
        if not self.show:
            return
        now = time.perf_counter()
        if self.interactive or now - self.last >= 10.0 or done == total:
            self.last = now
            self.drawn = True
            self.log._draw(self.desc, done, total, now - self.started, self.interactive)

    def end(self) -> None:
        """End the bar's line on a terminal."""
        if self.interactive and self.drawn:
            self.log.stream.write("\n")
            self.log.stream.flush()
            self.drawn = False
