"""Decomposition geometry: pure functions, checked serially against brute force."""

import pytest

from medhpc.errors import InputError
from medhpc.parallel.geometry import (Slab, block_counts, block_range, block_ranges,
                                      check_slab_split, cyclic_items, neighbours, owner_of,
                                      require_items_per_rank, slab, slabs)

SPLITS = [(n, size) for n in (0, 1, 5, 7, 12, 13) for size in (1, 2, 3, 4, 8, 16)]


@pytest.mark.parametrize("n,size", SPLITS)
def test_blocks_tile_the_axis_in_order_and_balance(n, size):
    ranges = block_ranges(n, size)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (_, stop), (start, _) in zip(ranges, ranges[1:]):
        assert stop == start
    counts = block_counts(n, size)
    assert sum(counts) == n
    assert max(counts) - min(counts) <= 1
    assert counts == sorted(counts, reverse=True)  # the first ranks get the extra items


def test_uneven_split_gives_extra_items_to_first_ranks():
    assert block_ranges(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert block_counts(10, 4) == [3, 3, 2, 2]


def test_more_ranks_than_items_leaves_last_ranks_empty():
    assert block_ranges(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert block_counts(0, 3) == [0, 0, 0]


@pytest.mark.parametrize("n,size", [s for s in SPLITS if s[0] > 0])
def test_owner_of_agrees_with_block_range(n, size):
    for index in range(n):
        start, stop = block_range(n, size, owner_of(index, n, size))
        assert start <= index < stop


def test_owner_of_rejects_outside_index():
    with pytest.raises(ValueError):
        owner_of(5, 5, 2)
    with pytest.raises(ValueError):
        owner_of(-1, 5, 2)


def test_block_range_rejects_bad_arguments():
    with pytest.raises(ValueError):
        block_range(5, 2, 2)
    with pytest.raises(ValueError):
        block_range(5, 0, 0)
    with pytest.raises(ValueError):
        block_range(-1, 2, 0)


@pytest.mark.parametrize("n,size", SPLITS)
def test_cyclic_items_partition_round_robin(n, size):
    owned = [list(cyclic_items(n, size, rank)) for rank in range(size)]
    assert sorted(i for items in owned for i in items) == list(range(n))
    for rank, items in enumerate(owned):
        assert all(i % size == rank for i in items)
    with pytest.raises(ValueError):
        cyclic_items(n, size, size)


def test_slab_properties():
    s = slab(7, 3, 1, halo=2)
    assert s == Slab(nz=7, start=3, stop=5, halo=2)
    assert s.owned == 2 and s.local_nz == 6
    assert s.interior == slice(2, 4)
    assert (s.read_start, s.read_stop) == (1, 7)
    lowest = slab(7, 3, 0, halo=2)
    assert lowest.read_start == -2
    assert slab(7, 3, 2, halo=2).read_stop == 9
    assert [x.owned for x in slabs(7, 3, 1)] == [3, 2, 2]
    with pytest.raises(ValueError):
        slab(7, 3, 0, halo=-1)


def test_neighbours_open_and_periodic():
    assert neighbours(3, 0, periodic=False) == (None, 1)
    assert neighbours(3, 2, periodic=False) == (1, None)
    assert neighbours(3, 0, periodic=True) == (2, 1)
    assert neighbours(3, 2, periodic=True) == (1, 0)
    assert neighbours(1, 0, periodic=False) == (None, None)
    assert neighbours(1, 0, periodic=True) == (0, 0)


def test_require_items_per_rank_message_names_the_limit():
    require_items_per_rank(8, 4, "z planes", minimum=2)
    with pytest.raises(InputError) as info:
        require_items_per_rank(7, 4, "z planes", minimum=2)
    message = str(info.value)
    assert "7 z planes" in message and "4 ranks" in message
    assert "at least 2" in message and "at most 3 ranks" in message


def test_check_slab_split_needs_halo_planes_per_rank():
    check_slab_split(7, 3, halo=2)
    with pytest.raises(InputError):
        check_slab_split(7, 4, halo=2)
    with pytest.raises(InputError):
        check_slab_split(2, 3, halo=0)
