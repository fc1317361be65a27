"""Slab volumes: halos, scatter/gather and HDF5 slabs equal the one-rank result exactly."""

import os

import h5py
import numpy as np
import pytest

from medhpc.errors import InputError, OutputExistsError
from medhpc.parallel.geometry import slab as slab_of
from medhpc.parallel.geometry import block_range
from medhpc.parallel.slabs import (BOUNDARIES, allocate_slab, exchange_halos, fetch_planes,
                                   gather_volume, parts_folder, read_slab_hdf5, scatter_planes,
                                   scatter_volume, stream_to_root, write_slabs_hdf5, z_axis_of)
from tests.parallel import (WORLD_KINDS, FakeDeviceArray, make_world, set_cuda_aware,
                            shared_tmp_dir)

PAD_MODE = {"zero": "constant", "replicate": "edge", "periodic": "wrap"}


@pytest.fixture(params=WORLD_KINDS)
def world(request):
    return make_world(request.param)


def test_volume(shape, dtype=np.float64) -> np.ndarray:
    return (np.arange(int(np.prod(shape))) % 251 + 1).reshape(shape).astype(dtype)


test_volume.__test__ = False


def padded(volume, halo, boundary):
    """The one-rank reference: the volume with ``halo`` planes added along z."""
    z_axis = z_axis_of(volume.ndim)
    pad = [(0, 0)] * volume.ndim
    pad[z_axis] = (halo, halo)
    return np.pad(volume, pad, mode=PAD_MODE[boundary])


def expected_local(volume, slab, boundary):
    z_axis = z_axis_of(volume.ndim)
    return np.take(padded(volume, slab.halo, boundary),
                   range(slab.start, slab.stop + 2 * slab.halo), axis=z_axis)


def local_with_garbage_halos(volume, world, halo):
    """This rank's owned planes of ``volume`` with 255 (never a test value) in the halos."""
    z_axis = z_axis_of(volume.ndim)
    local, slab = allocate_slab(world, volume.shape, halo, volume.dtype)
    local[...] = 255
    owned = np.take(volume, range(slab.start, slab.stop), axis=z_axis)
    index = (slice(None),) * z_axis + (slab.interior,)
    local[index] = owned
    return local, slab


def cases(world):
    """(global shape, halo) pairs, uneven over ``world`` where possible."""
    return [((7, 4, 3), 1), ((2 * world.size + 1, 3, 2), 2), ((2, 7, 3, 4), 1),
            ((3, 2 * world.size + 1, 2, 3), 2)]


def test_allocate_slab_shapes(world):
    local, slab = allocate_slab(world, (7, 4, 3), halo=1, dtype=np.float32)
    assert slab == slab_of(7, world.size, world.rank, 1)
    assert local.shape == (slab.local_nz, 4, 3) and local.dtype == np.float32
    assert not local.any()
    local, slab = allocate_slab(world, (2, 2 * world.size + 1, 4, 3), halo=2, dtype=np.int16)
    assert local.shape == (2, slab.owned + 4, 4, 3)
    with pytest.raises(ValueError):
        allocate_slab(world, (7, 4), halo=1)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_exchange_halos_matches_padding(world, boundary):
    for shape, halo in cases(world):
        volume = test_volume(shape)
        local, slab = local_with_garbage_halos(volume, world, halo)
        assert exchange_halos(world, local, slab, boundary) is local
        np.testing.assert_array_equal(local, expected_local(volume, slab, boundary))


def test_exchange_without_halo_is_a_no_op(world):
    local, slab = allocate_slab(world, (5, 2, 2), halo=0, dtype=np.float64)
    local[...] = 3.0
    exchange_halos(world, local, slab, "periodic")
    assert (local == 3.0).all()


def test_exchange_rejects_thin_slabs_and_bad_arguments(world):
    halo = 2
    nz = halo * world.size - 1
    slab = slab_of(nz, world.size, world.rank, halo)
    local = np.zeros((slab.local_nz, 2, 2))
    with pytest.raises(InputError, match="z planes"):
        exchange_halos(world, local, slab)
    local, slab = allocate_slab(world, (7, 2, 2), halo=1, dtype=np.float64)
    with pytest.raises(ValueError, match="boundary"):
        exchange_halos(world, local, slab, "mirror")
    with pytest.raises(ValueError, match="planes"):
        exchange_halos(world, local[1:], slab)
    wide = np.zeros((slab.local_nz, 2, 4))
    with pytest.raises(ValueError, match="contiguous"):
        exchange_halos(world, wide[..., ::2], slab)
    with pytest.raises(ValueError, match="contiguous"):
        exchange_halos(world, FakeDeviceArray(wide)[..., ::2], slab)


@pytest.mark.parametrize("aware", [False, True], ids=["staging", "pass-through"])
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_exchange_halos_of_device_arrays(world, monkeypatch, aware, boundary):
    set_cuda_aware(monkeypatch, aware)
    for shape, halo in cases(world):
        volume = test_volume(shape, np.float32)
        host, slab = local_with_garbage_halos(volume, world, halo)
        exchange_halos(world, FakeDeviceArray(host), slab, boundary)
        np.testing.assert_array_equal(host, expected_local(volume, slab, boundary))


@pytest.mark.parametrize("dtype", [np.float32, np.int32, np.complex128])
def test_scatter_then_gather_round_trip(world, dtype):
    for root in sorted({0, world.size - 1}):
        for shape, halo in cases(world):
            volume = test_volume(shape, dtype)
            for boundary in BOUNDARIES:
                local, slab = scatter_volume(world, volume if world.rank == root else None,
                                             halo=halo, root=root, boundary=boundary)
                assert local.dtype == dtype
                assert slab == slab_of(volume.shape[z_axis_of(volume.ndim)], world.size,
                                       world.rank, halo)
                np.testing.assert_array_equal(local, expected_local(volume, slab, boundary))
            gathered = gather_volume(world, local, slab, root=root)
            if world.rank == root:
                assert gathered.dtype == dtype
                np.testing.assert_array_equal(gathered, volume)
            else:
                assert gathered is None


def test_scatter_without_volume_fails_everywhere(world):
    with pytest.raises(InputError, match="root needs"):
        scatter_volume(world, None, halo=1)
    with pytest.raises(InputError, match="root needs"):
        scatter_volume(world, np.zeros((3, 3)) if world.is_root else None)


def test_scatter_of_too_few_planes_fails_everywhere(world):
    volume = np.zeros((world.size - 1 if world.size > 1 else 1, 2, 2))
    halo = 0 if world.size > 1 else 2
    with pytest.raises(InputError, match="z planes"):
        scatter_volume(world, volume if world.is_root else None, halo=halo)


# -- HDF5 --------------------------------------------------------------------------------------
def write_volume(world, path, volume, halo=1, **options):
    local, slab = local_with_garbage_halos(volume, world, halo)
    write_slabs_hdf5(world, path, "volume", local, slab, **options)


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_hdf5_write_then_read_round_trip(world, dtype):
    with shared_tmp_dir(world) as folder:
        for number, (shape, halo) in enumerate(cases(world)):
            volume = test_volume(shape, dtype)
            path = folder / f"volume-{number}.h5"
            attrs = {"spacing_mm": np.array([2.0, 1.0, 1.0]), "units": "Bq/ml"}
            write_volume(world, path, volume, attrs=attrs)
            if world.is_root:
                assert sorted(os.listdir(folder)) == sorted(
                    name for n in range(number + 1)
                    for name in (f"volume-{n}.h5", f"volume-{n}.h5.parts"))
                with h5py.File(path, "r") as file:
                    assert file["volume"].is_virtual
                    np.testing.assert_array_equal(file["volume"][...], volume)
                    np.testing.assert_array_equal(file["volume"].attrs["spacing_mm"],
                                                  attrs["spacing_mm"])
                    assert file["volume"].attrs["units"] == "Bq/ml"
            for boundary in BOUNDARIES:
                local, slab = read_slab_hdf5(world, path, "volume", halo, boundary)
                assert local.dtype == dtype
                np.testing.assert_array_equal(local, expected_local(volume, slab, boundary))
            world.barrier()


def test_hdf5_virtual_dataset_reads_from_another_folder(world, monkeypatch):
    volume = test_volume((7, 3, 2))
    with shared_tmp_dir(world) as folder:
        path = folder / "sub" / "v.h5"
        write_volume(world, path, volume, chunks=None, compression=None)
        monkeypatch.chdir("/")
        local, slab = read_slab_hdf5(world, path, "volume", halo=0)
        np.testing.assert_array_equal(local, volume[slab.start:slab.stop])
        world.barrier()


def test_hdf5_refuses_existing_output_unless_overwrite(world):
    first, second = test_volume((7, 3, 2)), -test_volume((7, 3, 2))
    with shared_tmp_dir(world) as folder:
        path = folder / "v.h5"
        write_volume(world, path, first)
        with pytest.raises(OutputExistsError):
            write_volume(world, path, second)
        world.barrier()
        assert not any(name.startswith(".partial") for name in os.listdir(folder))
        write_volume(world, path, second, overwrite=True)
        local, slab = read_slab_hdf5(world, path, "volume")
        np.testing.assert_array_equal(local, second[slab.start:slab.stop])
        assert parts_folder(path).is_dir()
        world.barrier()


def test_hdf5_read_errors_reach_every_rank(world):
    with shared_tmp_dir(world) as folder:
        with pytest.raises(InputError, match="cannot open"):
            read_slab_hdf5(world, folder / "missing.h5", "volume")
        path = folder / "v.h5"
        write_volume(world, path, test_volume((7, 3, 2)))
        with pytest.raises(InputError, match="no dataset"):
            read_slab_hdf5(world, path, "other")
        with pytest.raises(InputError, match="z planes"):
            read_slab_hdf5(world, path, "volume", halo=8)
        world.barrier()


@pytest.mark.parametrize("nz", [2, 11])
def test_scatter_planes_then_fetch_any_range(world, nz):
    """Every rank asks for its own range (beyond the ends too) and gets the whole's planes;
    a volume thinner than the ranks leaves some ranks without planes."""
    volume = test_volume((nz, 3, 4), np.float32)
    owned = scatter_planes(world, volume if world.is_root else None)
    start, stop = block_range(nz, world.size, world.rank)
    np.testing.assert_array_equal(owned, volume[start:stop])
    lo, hi = world.rank - 2, world.rank + 5
    window = fetch_planes(world, owned, nz, lo, hi)
    np.testing.assert_array_equal(window, volume[max(lo, 0):min(hi, nz)])
    everything = fetch_planes(world, owned, nz, 0, nz)
    np.testing.assert_array_equal(everything, volume)


def test_stream_to_root_hands_over_every_block_in_z_order(world):
    volume = test_volume((9, 2, 3), np.float32)
    owned = scatter_planes(world, volume if world.is_root else None)
    seen = []
    stream_to_root(world, owned, 9, lambda start, stop, planes: seen.append(
        (start, stop, planes.copy())))
    if world.is_root:
        assert [s[:2] for s in seen] == [r for r in [block_range(9, world.size, k)
                                                     for k in range(world.size)] if r[1] > r[0]]
        np.testing.assert_array_equal(np.concatenate([s[2] for s in seen]), volume)
    else:
        assert seen == []


def test_stream_to_root_failure_reaches_every_rank(world):
    owned = scatter_planes(world, test_volume((6, 2, 2)) if world.is_root else None)

    def full_disk(start, stop, planes):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        stream_to_root(world, owned, 6, full_disk if world.is_root else None)
    world.barrier()
