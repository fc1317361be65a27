"""List inputs (a pairs table, a list of slides) from a file or, given as ``-``, from stdin."""

from __future__ import annotations

import io
import sys
from pathlib import Path

from medhpc.errors import InputError

STDIN = "-"


def is_stdin(source) -> bool:
    """Whether ``source`` names the standard input (``-``)."""
    return str(source) == STDIN


def read_list_text(source) -> tuple[str, Path, str]:
    """The text of a list input, the folder its relative paths start from, and its name
    for messages.

    A file's relative paths start from the file's folder; those read from stdin (``-``)
    from the working folder, as a shell pipeline (``find ... | medhpc ...``) gives them.
    Read it on one rank (inside the agreement): under ``mpiexec`` only rank 0 has stdin.
    """
    if is_stdin(source):
        return sys.stdin.read(), Path(), "stdin"
    path = Path(source)
    if path.is_dir():
        raise InputError(f"{path}: is a folder; expected a text list, one entry per line")
    try:
        return path.read_text(encoding="utf-8"), path.parent, str(path)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file; expected a UTF-8 list, one entry per "
                         "line") from None


def list_stream(text: str) -> io.StringIO:
    """``text`` as a stream for readers such as :func:`csv.reader`."""
    return io.StringIO(text, newline="")
