"""Decomposition geometry: who owns what, computed without communication.

Every function here is pure: any rank can compute any other rank's share from
``(n, size, rank)`` alone. Nothing in this module imports MPI.

Splits are balanced blocks: the first ``n % size`` ranks get one item more.
When there are more ranks than items, the last ranks get empty ranges
(``start == stop``); callers that cannot use idle ranks check
:func:`require_items_per_rank`.
"""

from __future__ import annotations

from dataclasses import dataclass

from medhpc.errors import InputError


def block_range(n: int, size: int, rank: int) -> tuple[int, int]:
    """Return ``[start, stop)`` of ``rank``'s block of an axis of length ``n``.

    Parameters
    ----------
    n : int
        Number of items along the axis (>= 0).
    size : int
        Number of ranks (>= 1).
    rank : int
        The rank, ``0 <= rank < size``.

    Returns
    -------
    tuple of int
        ``(start, stop)``; empty when ``rank`` gets no items.
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a world of {size} ranks")
    if n < 0:
        raise ValueError(f"axis length must be >= 0, got {n}")
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    stop = start + base + (1 if rank < extra else 0)
    return start, stop


def block_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """Return every rank's ``[start, stop)`` for an axis of length ``n``."""
    return [block_range(n, size, r) for r in range(size)]


def block_counts(n: int, size: int) -> list[int]:
    """Return the number of items each rank owns."""
    return [stop - start for start, stop in block_ranges(n, size)]


def owner_of(index: int, n: int, size: int) -> int:
    """Return the rank whose block holds item ``index`` of an axis of length ``n``."""
    if not 0 <= index < n:
        raise ValueError(f"index {index} outside [0, {n})")
    base, extra = divmod(n, size)
    cut = extra * (base + 1)
    if index < cut:
        return index // (base + 1)
    return extra + (index - cut) // base


def cyclic_items(n: int, size: int, rank: int) -> range:
    """Return the items ``rank`` owns in a cyclic (round-robin) split."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank {rank} is not in a world of {size} ranks")
    return range(rank, n, size)


def require_items_per_rank(n: int, size: int, what: str, minimum: int = 1) -> None:
    """Raise :class:`InputError` unless every rank gets at least ``minimum`` of ``n`` items.

    Used by decompositions that cannot leave ranks idle (for example z-slabs
    whose halo must come from a real neighbour).
    """
    if n < minimum * size:
        raise InputError(
            f"cannot split {n} {what} over {size} ranks: each rank needs at least "
            f"{minimum}; run with at most {max(1, n // max(minimum, 1))} ranks"
        )


@dataclass(frozen=True)
class Slab:
    """One rank's slab of a volume split along its z axis (axis 0), with halos.

    Attributes
    ----------
    nz : int
        Length of the global z axis.
    start, stop : int
        The owned planes ``[start, stop)``.
    halo : int
        Ghost planes held on each side. Every rank holds them on both sides,
        also at the volume ends, where the boundary condition fills them.
    """

    nz: int
    start: int
    stop: int
    halo: int

    @property
    def owned(self) -> int:
        """Number of owned planes."""
        return self.stop - self.start

    @property
    def local_nz(self) -> int:
        """Number of planes held locally, halos included."""
        return self.owned + 2 * self.halo

    @property
    def interior(self) -> slice:
        """Slice of the owned planes inside the local array."""
        return slice(self.halo, self.halo + self.owned)

    @property
    def read_start(self) -> int:
        """First global plane held locally (negative at the lower end)."""
        return self.start - self.halo

    @property
    def read_stop(self) -> int:
        """One past the last global plane held locally (beyond ``nz`` at the upper end)."""
        return self.stop + self.halo


def slab(nz: int, size: int, rank: int, halo: int = 0) -> Slab:
    """Return ``rank``'s :class:`Slab` of a z axis of length ``nz``.

    Parameters
    ----------
    nz : int
        Global number of z planes.
    size, rank : int
        World size and the rank asked about.
    halo : int
        Ghost planes on each side.

    Notes
    -----
    Halo planes must come from neighbours' owned planes, so every rank must own
    at least ``halo`` planes (checked by :func:`check_slab_split`).
    """
    if halo < 0:
        raise ValueError("halo must be >= 0")
    start, stop = block_range(nz, size, rank)
    return Slab(nz=nz, start=start, stop=stop, halo=halo)


def check_slab_split(nz: int, size: int, halo: int) -> None:
    """Raise :class:`InputError` if ``nz`` planes cannot be split into slabs with ``halo``."""
    require_items_per_rank(nz, size, "z planes", minimum=max(1, halo))


def slabs(nz: int, size: int, halo: int = 0) -> list[Slab]:
    """Return every rank's :class:`Slab`."""
    return [slab(nz, size, r, halo) for r in range(size)]


def neighbours(size: int, rank: int, periodic: bool) -> tuple[int | None, int | None]:
    """Return the ranks below and above ``rank`` along z (``None`` at an open end)."""
    below = rank - 1 if rank > 0 else (size - 1 if periodic else None)
    above = rank + 1 if rank < size - 1 else (0 if periodic else None)
    return below, above
