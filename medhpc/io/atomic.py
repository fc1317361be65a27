"""Outputs appear complete or not at all: write under a temporary name, then rename."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from medhpc.errors import InputError, OutputExistsError

PARTIAL_PREFIX = ".partial-"


def check_output_free(path, overwrite: bool) -> None:
    """Raise :class:`OutputExistsError` if ``path`` exists and ``overwrite`` is false."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: output exists; pass --overwrite to replace it")


def check_output_path(path, overwrite: bool, suffixes: tuple = ()) -> None:
    """Check, before any work, that ``path`` can be written as an output file.

    Raises :class:`InputError` (one line naming the path) when its name does not end in
    one of ``suffixes`` (any, when empty), it is a folder, it exists and ``overwrite``
    is false, or the folder it would be created in is not a writable folder.
    """
    path = Path(path)
    if suffixes and not path.name.lower().endswith(tuple(suffixes)):
        raise InputError(f"{path}: unsupported file name; expected a name ending in "
                         f"{' or '.join(suffixes)}")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; expected a file name")
    check_output_free(path, overwrite)
    folder = path.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; cannot write {path} there")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{folder}: folder is not writable; cannot write {path}")


def partial_name(path) -> Path:
    """Return the temporary name ``path`` is written under (same folder, same extension)."""
    path = Path(path)
    return path.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-{path.name}")


@contextmanager
def atomic_path(path, overwrite: bool = False):
    """Yield a temporary path to write; rename it to ``path`` when the block succeeds.

    The temporary file sits in the same folder (so the rename is atomic) and
    keeps the extension (so format libraries recognise it). On an exception it
    is removed and ``path`` is left untouched. Works for files and folders.
    """
    path = Path(path)
    check_output_free(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_name(path)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.is_dir() and not path.is_symlink() and tmp.is_dir():
        shutil.rmtree(path)
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
