"""Exceptions with the exit codes the command line maps them to.

Exit codes: 0 success, 1 runtime failure, 2 usage or input error, 130 interrupted.
"""

import errno

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_INPUT = 2
EXIT_INTERRUPTED = 130
# errors of the place written to, not of medhpc: reported as one line naming the output
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO})


class MedhpcError(Exception):
    """Base class of errors that medhpc reports as one line."""

    exit_code = EXIT_FAILURE


class InputError(MedhpcError):
    """Bad input: a missing, unreadable or inconsistent file or option (exit code 2).

    The message names the file, what is wrong and what was expected.
    """

    exit_code = EXIT_INPUT


class DeviceError(MedhpcError):
    """A requested device (for instance ``--device cuda``) is not available (exit code 2)."""

    exit_code = EXIT_INPUT


class OutputWriteError(MedhpcError):
    """An output could not be written (disk full, quota, read-only file system; exit code 1)."""


class OutputExistsError(InputError):
    """An output exists and ``--overwrite`` was not given (exit code 2)."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line (its whitespace runs collapsed)."""
    return " ".join(str(error).split())
