"""World: the serial stand-in, agreement on errors, reductions and exchanges under MPI."""

import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.parallel.comm import World, _SerialComm, get_world, portable_exception
from tests.parallel import WORLD_KINDS, FakeDeviceArray, make_world, set_cuda_aware


@pytest.fixture(params=WORLD_KINDS)
def world(request):
    return make_world(request.param)


def test_serial_world_has_one_rank():
    world = World(_SerialComm())
    assert (world.rank, world.size, world.local_rank, world.node_count) == (0, 1, 0, 1)
    assert world.is_root and not world.has_mpi
    assert world.bcast("x") == "x"
    assert world.gather(3) == [3] and world.allgather(3) == [3]
    assert world.sum(2.5) == 2.5 and world.min(4) == 4 and world.max(4) == 4
    assert world.any(True) and not world.any(False)
    world.barrier()
    data = np.arange(4.0)
    assert world.allreduce_(data) is data
    np.testing.assert_array_equal(data, np.arange(4.0))
    with pytest.raises(ValueError):
        world.allreduce_scalar(1, "prod")


def test_scalar_reductions(world):
    assert world.sum(world.rank + 1) == world.size * (world.size + 1) // 2
    assert world.min(world.rank) == 0
    assert world.max(world.rank) == world.size - 1
    assert world.any(world.rank == world.size - 1)
    assert not world.any(False)


def test_object_collectives(world):
    assert world.bcast({"rank": world.rank}) == {"rank": 0}
    assert world.allgather(world.rank) == list(range(world.size))
    gathered = world.gather(world.rank * 2)
    if world.is_root:
        assert gathered == [2 * r for r in range(world.size)]
    else:
        assert gathered is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_allreduce_in_place(world, dtype):
    data = np.full((3, 4), world.rank + 1, dtype=dtype)
    out = world.allreduce_(data, "sum")
    assert out is data
    np.testing.assert_array_equal(data, np.full((3, 4), world.size * (world.size + 1) // 2))
    data = np.full(5, world.rank, dtype=dtype)
    world.allreduce_(data, "max")
    np.testing.assert_array_equal(data, np.full(5, world.size - 1))


@pytest.mark.parametrize("aware", [False, True], ids=["staging", "pass-through"])
def test_allreduce_of_device_array(world, monkeypatch, aware):
    set_cuda_aware(monkeypatch, aware)
    device_array = FakeDeviceArray(np.full(6, world.rank + 1.0))
    world.allreduce_(device_array)
    np.testing.assert_array_equal(device_array.host,
                                  np.full(6, world.size * (world.size + 1) / 2))
    if world.size > 1:
        staged = device_array.counter["to_host"] + device_array.counter["to_device"]
        assert (staged == 0) == aware


def test_agree_shares_root_error(world):
    def check():
        raise InputError("bad input")

    with pytest.raises(InputError, match="bad input") as info:
        world.agree(check)
    assert getattr(info.value, "agreed", False)
    assert world.agree(lambda: 42) == 42


def test_agree_all_raises_everywhere_when_one_rank_fails(world):
    failing = world.size - 1

    def task():
        if world.rank == failing:
            raise InputError(f"rank {world.rank} cannot read")
        return world.rank

    with pytest.raises(InputError, match=f"rank {failing} cannot read") as info:
        world.agree_all(task)
    assert info.value.agreed
    assert world.agree_all(lambda: world.rank * 3) == world.rank * 3


def test_agree_all_sends_unpicklable_errors_as_runtime_error(world):
    class Local(Exception):
        def __reduce__(self):
            raise TypeError("not picklable")

    def task():
        if world.rank == world.size - 1:
            raise Local("odd")

    expected = Local if world.size == 1 else (RuntimeError if world.rank != world.size - 1
                                              else Local)
    with pytest.raises(expected):
        world.agree_all(task)
    assert isinstance(portable_exception(Local("x")), RuntimeError)


def test_scatterv_and_gatherv(world):
    counts = [2 * r + 1 for r in range(world.size)]
    total = sum(counts)
    send = np.arange(total, dtype=np.float64) if world.is_root else None
    recv = np.empty(counts[world.rank])
    world.scatterv_(send, counts, recv)
    start = sum(counts[:world.rank])
    np.testing.assert_array_equal(recv, np.arange(start, start + counts[world.rank]))
    gathered = np.empty(total) if world.is_root else None
    world.gatherv_(recv * 2, gathered, counts)
    if world.is_root:
        np.testing.assert_array_equal(gathered, 2 * np.arange(total))


def test_alltoallv_moves_blocks(world):
    send_counts = [world.rank + r + 1 for r in range(world.size)]
    recv_counts = [r + world.rank + 1 for r in range(world.size)]
    send = np.concatenate([np.full(c, 100 * world.rank + r) for r, c in enumerate(send_counts)])
    recv = np.empty(sum(recv_counts), dtype=send.dtype)
    world.alltoallv_(send, send_counts, recv, recv_counts)
    expected = np.concatenate([np.full(c, 100 * r + world.rank)
                               for r, c in enumerate(recv_counts)])
    np.testing.assert_array_equal(recv, expected)


def test_sendrecv_ring(world):
    right, left = (world.rank + 1) % world.size, (world.rank - 1) % world.size
    received = np.empty(3)
    world.sendrecv_(np.full(3, float(world.rank)), right, received, left, tag=7)
    np.testing.assert_array_equal(received, np.full(3, float(left)))


@pytest.mark.mpi(min_size=2)
def test_point_to_point_objects():
    world = get_world()
    if world.rank == 1:
        world.send_obj({"hello": [1, 2]}, dest=0, tag=11)
    if world.rank == 0:
        obj, source, tag = world.recv_obj(tag=11)
        assert (obj, source, tag) == ({"hello": [1, 2]}, 1, 11)
        assert not world.iprobe(tag=11)
    world.barrier()


@pytest.mark.mpi(min_size=2)
def test_proc_null_exchange_does_nothing():
    world = get_world()
    received = np.full(2, -1.0)
    world.sendrecv_(np.zeros(2), world.proc_null, received, world.proc_null)
    np.testing.assert_array_equal(received, [-1.0, -1.0])


def test_get_world_is_cached():
    assert get_world() is get_world()
