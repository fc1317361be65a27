"""Process memory: hand large freed arrays back to the system at once.

glibc serves large blocks by ``mmap`` and returns them on ``free``, but it raises that
threshold (up to 32 MiB) each time such a block is freed, after which blocks of that size
come from the heap and stay resident once freed. A command that allocates and frees
field-sized scratch every iteration then holds far more than its live arrays (measured
with lddmm at 192^3 and 4 ranks: 90 MiB more on the middle ranks). A fixed threshold keeps
the resident memory at what the arrays need, for the cost of a page fault per page of a
new large array (no change in wall time measured there).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3
LARGE_BLOCK_BYTES = 4 << 20


def return_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes (no-op elsewhere, or when the
    user set ``MALLOC_MMAP_THRESHOLD_``). Returns whether the setting took effect."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
