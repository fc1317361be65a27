"""Work items: results in input order for every schedule, errors reach every rank."""

import time

import pytest

from medhpc.parallel.comm import get_world
from medhpc.parallel.work import SCHEDULES, map_items, static_items
from tests.parallel import WORLD_KINDS, make_world


@pytest.fixture(params=WORLD_KINDS)
def world(request):
    return make_world(request.param)


@pytest.mark.parametrize("n", [0, 1, 5, 11])
@pytest.mark.parametrize("schedule", ["block", "cyclic"])
def test_static_items_cover_every_item_once(world, n, schedule):
    mine = static_items(world, n, schedule)
    everyone = world.allgather(mine)
    assert sorted(i for items in everyone for i in items) == list(range(n))
    if schedule == "block":
        assert mine == sorted(mine) and (not mine or mine[-1] - mine[0] == len(mine) - 1)
    else:
        assert all(i % world.size == world.rank for i in mine)
    with pytest.raises(ValueError):
        static_items(world, n, "dynamic")


@pytest.mark.parametrize("n", [0, 1, 4, 13])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_results_in_input_order(world, schedule, n):
    items = [f"case-{i}" for i in range(n)]
    expected = [(item, len(item)) for item in items]
    assert map_items(world, items, lambda item: (item, len(item)), schedule) == expected
    for root in sorted({0, world.size - 1}):
        result = map_items(world, items, lambda item: (item, len(item)), schedule, root=root,
                           gather_to="root")
        assert result == (expected if world.rank == root else None)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_progress_counts_every_finished_item(world, schedule):
    seen = []
    map_items(world, list(range(9)), lambda item: item, schedule,
              progress=lambda done, total: seen.append((done, total)))
    if schedule == "dynamic" or world.size == 1:
        expected = [(k, 9) for k in range(1, 10)] if world.rank == 0 else []
    else:
        mine = len(static_items(world, 9, schedule))
        expected = [(k, mine) for k in range(1, mine + 1)]
    assert seen == expected


def test_bad_options_are_rejected(world):
    with pytest.raises(ValueError, match="schedule"):
        map_items(world, [1], str, schedule="guided")
    with pytest.raises(ValueError, match="gather_to"):
        map_items(world, [1], str, gather_to="none")


@pytest.mark.parametrize("gather_to", ["all", "root"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_an_error_on_one_item_reaches_every_rank(world, schedule, gather_to):
    def fn(item):
        if item in (5, 9):
            raise ValueError(f"item {item} is broken")
        return item

    with pytest.raises(ValueError, match="item 5 is broken") as info:
        map_items(world, list(range(12)), fn, schedule, gather_to=gather_to)
    if world.size > 1:
        assert info.value.agreed
    assert map_items(world, [1, 2], lambda x: x + 1, schedule) == [2, 3]


class Unpicklable(Exception):
    def __reduce__(self):
        raise TypeError("cannot pickle")


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_unpicklable_errors_and_results_do_not_hang(world, schedule):
    def bad_error(item):
        if item == 2:
            raise Unpicklable("local only")
        return item

    with pytest.raises((Unpicklable, RuntimeError), match="local only"):
        map_items(world, list(range(6)), bad_error, schedule)
    if world.size > 1:
        with pytest.raises(RuntimeError, match="cannot be sent"):
            map_items(world, list(range(6)), lambda item: (lambda: item), schedule)


@pytest.mark.mpi(min_size=3)
def test_dynamic_schedule_balances_unequal_costs():
    world = get_world()
    costs = [0.6] + [0.02] * 12

    def work(cost):
        time.sleep(cost)
        return world.rank

    owners = map_items(world, costs, work, schedule="dynamic")
    slow_owner = owners[0]
    assert slow_owner != 0  # with more than two ranks the root only hands out items
    assert owners.count(slow_owner) <= 3
    assert 0 not in owners
