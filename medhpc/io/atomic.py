"""Outputs appear complete or not at all: write under a temporary name, then rename."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from medhpc.errors import WRITE_ERRNOS, InputError, OutputExistsError, OutputWriteError

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
    folder = _nearest_existing(path.absolute().parent)
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder; cannot write {path} there")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{folder}: folder is not writable; cannot write {path}")


def check_free_space(folder, needed_bytes: int, what: str = "the outputs") -> None:
    """Raise :class:`OutputWriteError` before any work when the file system that would hold
    ``folder`` has less than ``needed_bytes`` free."""
    folder = _nearest_existing(Path(folder).absolute())
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed_bytes:
        raise OutputWriteError(f"{folder}: {free / 2**20:.1f} MiB free; {what} need about "
                               f"{needed_bytes / 2**20:.1f} MiB (free space or write elsewhere)")


def _nearest_existing(folder: Path) -> Path:
    """``folder``, or its nearest ancestor that exists (where it would be created)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def partial_name(path) -> Path:
    """Return the temporary name ``path`` is written under (same folder, same extension)."""
    path = Path(path)
    return path.with_name(f"{PARTIAL_PREFIX}{os.getpid()}-{path.name}")


# renames deferred by publish_together (None: publish at once)
_pending: list | None = None
# outputs this process put in place, in order (checkpoints and other run state left out)
_published: list[Path] = []


def record_output(path) -> None:
    """Note ``path`` as an output of this run (writers that rename outputs themselves)."""
    path = Path(path)
    if path not in _published:
        _published.append(path)


@contextmanager
def unreported():
    """Outputs put in place inside the block are scratch work: not reported on stdout."""
    count = len(_published)
    try:
        yield
    finally:
        del _published[count:]


def published_outputs() -> list[Path]:
    """The outputs this process has put in place so far, in order."""
    return list(_published)


@contextmanager
def publish_together():
    """Publish every :func:`atomic_path` output of the block together at its end.

    Inside the block each output stays under its temporary name; when the block ends
    they are all renamed into place, and on an exception all are removed, so a failed
    run never leaves a mix of new and old files. Blocks nest (the outermost publishes).
    Checkpoints and other state meant to survive a failure use ``atomic_path(now=True)``.
    """
    global _pending
    outer, mine = _pending, []
    _pending = mine
    try:
        yield
    except BaseException:
        _pending = outer
        for move in mine:
            _remove(move[0])
        raise
    _pending = outer
    if outer is not None:
        outer.extend(mine)
        return
    for move in mine:
        _publish(*move)


@contextmanager
def atomic_path(path, overwrite: bool = False, now: bool = False, output: bool = True):
    """Yield a temporary path to write; rename it to ``path`` when the block succeeds.

    The temporary file sits in the same folder (so the rename is atomic) and
    keeps the extension (so format libraries recognise it). On an exception it
    is removed and ``path`` is left untouched; a write that fails for want of
    space or permission becomes one :class:`~medhpc.errors.OutputWriteError`
    line naming ``path``. Works for files and folders. Inside
    :func:`publish_together` the rename waits for the end of that block unless
    ``now``. ``output=False`` marks an intermediate file (a rank's part), not reported
    among the command's outputs.
    """
    path = Path(path)
    check_output_free(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    tmp = partial_name(path)
    _remove(tmp)  # never write through a file or link planted under the temporary name
    try:
        yield tmp
    except OSError as error:
        _remove(tmp)
        if error.errno not in WRITE_ERRNOS:
            raise
        failure = OutputWriteError(f"{path}: cannot be written ({os.strerror(error.errno)}); "
                                   f"no partial file was left")
        failure.agreed = getattr(error, "agreed", False)
        raise failure from None
    except BaseException:
        _remove(tmp)
        raise
    if now:
        _publish(tmp, path, False)
    else:
        publish((tmp, path, output))


def publish(*moves) -> None:
    """Put staged outputs in place, for writers that stage outputs themselves.

    Each move is ``(tmp, path)`` or ``(tmp, path, is_output)`` (``False``: a companion
    such as a parts folder, not reported as an output). Inside :func:`publish_together`
    the renames wait for the end of the block; otherwise they happen now, in order.
    """
    if _pending is not None:
        new = {move[1]: move[0] for move in moves}
        for move in _pending:  # an output written again in the block: only the last counts
            if move[1] in new and move[0] != new[move[1]]:
                _remove(move[0])
        _pending[:] = [move for move in _pending if move[1] not in new]
        _pending.extend(tuple(move) for move in moves)
        return
    for move in moves:
        _publish(*move)


def pending_path(path) -> Path:
    """Where ``path`` can be read and appended to now: its temporary name while its
    publication waits for the end of a :func:`publish_together` block, else ``path``."""
    path = Path(path)
    for move in _pending or ():
        if move[1] == path:
            return move[0]
    return path


def remove_stale_partials(path) -> None:
    """Remove temporary files of ``path`` left by processes of this host that have ended."""
    path = Path(path)
    try:
        siblings = list(path.parent.glob(f"{PARTIAL_PREFIX}*-{path.name}"))
    except OSError:
        return
    for sibling in siblings:
        pid = sibling.name[len(PARTIAL_PREFIX):-len(path.name) - 1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            _remove(sibling)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: Path, path: Path, output: bool = True) -> None:
    if path.is_dir() and not path.is_symlink():  # a folder output, or one a file replaces
        shutil.rmtree(path)
    elif tmp.is_dir() and (path.exists() or path.is_symlink()):  # a folder replaces a file
        path.unlink()
    os.replace(tmp, path)
    inside = [k for k, written in enumerate(_published) if tmp in written.parents]
    for k in inside:  # files written inside a folder output now sit in the folder
        _published[k] = path / _published[k].relative_to(tmp)
    if output and not inside:
        record_output(path)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()
