"""ct under mpiexec (2, 3 and 4 ranks): each result equals the one-rank result computed here.

Run as ``mpiexec -n N python -m pytest --with-mpi -m mpi tests/ct``.
"""

import h5py
import numpy as np
import pytest

from medhpc.parallel.comm import World, _SerialComm, get_world
from medhpc.runtime.context import start_run

torch = pytest.importorskip("torch")

GLOBAL_BATCH = 12  # divisible by 2, 3 and 4 ranks


def shared_folder(tmp_path):
    """Rank 0's temporary folder, on every rank."""
    return get_world().bcast(tmp_path)


@pytest.mark.mpi
def test_prepare_over_ranks_equals_one_rank(tmp_path):
    from medhpc.ct.dataset import prepare_dataset
    from medhpc.phantoms.ct import write_ct_phantom

    world = get_world()
    folder = shared_folder(tmp_path)
    if world.is_root:
        write_ct_phantom(folder / "phantoms", 5, (12, 16, 16), seed=3)
    world.barrier()
    classes = ["liver", "spleen", "kidneys"]
    images, labels = folder / "phantoms" / "images", folder / "phantoms" / "labels"
    run = start_run("ct-prepare", device="cpu", threads=1, verbosity=-1, world=world)
    prepare_dataset(run, images, labels, folder / "ranks.h5", classes, (-500.0, 500.0))
    serial = start_run("ct-prepare", device="cpu", threads=1, verbosity=-1,
                       world=World(_SerialComm()))
    prepare_dataset(serial, images, labels, tmp_path / f"one{world.rank}.h5", classes,
                    (-500.0, 500.0))
    with h5py.File(folder / "ranks.h5") as ranks, h5py.File(tmp_path / f"one{world.rank}.h5") as one:
        assert dict(ranks.attrs) == dict(one.attrs)
        assert list(ranks["cases"]) == list(one["cases"])
        for name in one["cases"]:
            for item in ("image", "labels"):
                np.testing.assert_array_equal(ranks["cases"][name][item][()],
                                              one["cases"][name][item][()])
    world.barrier()


def batch_and_model():
    from medhpc.ct.unet import UNet3D, UNetConfig

    generator = torch.Generator().manual_seed(11)
    images = torch.randn(GLOBAL_BATCH, 1, 8, 8, 8, generator=generator)
    labels = torch.randint(0, 4, (GLOBAL_BATCH, 8, 8, 8), generator=generator)
    torch.manual_seed(5)
    return images, labels, UNet3D(UNetConfig(widths=(4, 8)))


def reference_gradients():
    from medhpc.ct.loss import dice_ce_loss

    images, labels, model = batch_and_model()
    dice_ce_loss(model(images), labels).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.mpi
@pytest.mark.parametrize("sync", ["ddp", "mpi"])
def test_gradients_averaged_over_ranks_equal_the_whole_batch(sync):
    from medhpc.ct import distributed
    from medhpc.ct.loss import dice_ce_loss

    torch.set_num_threads(1)
    world = get_world()
    ranks = distributed.rendezvous(world, "cpu")
    try:
        assert (ranks.rank, ranks.size, ranks.launcher) == (world.rank, world.size, "mpi")
        images, labels, model = batch_and_model()
        share = GLOBAL_BATCH // world.size
        mine = slice(world.rank * share, (world.rank + 1) * share)
        if sync == "ddp":
            network = torch.nn.parallel.DistributedDataParallel(model)
            dice_ce_loss(network(images[mine]), labels[mine]).backward()
        else:
            dice_ce_loss(model(images[mine]), labels[mine]).backward()
            distributed.FlatGradientSync(world, model.parameters())()
        expected = reference_gradients()
        for name, parameter in model.named_parameters():
            torch.testing.assert_close(parameter.grad, expected[name], rtol=1e-4, atol=1e-6,
                                       msg=name)
    finally:
        distributed.shutdown(world, ranks)


@pytest.mark.mpi
def test_validation_dice_from_counts_summed_over_ranks():
    from medhpc.ct import distributed
    from medhpc.ct.loss import confusion_counts, dice_from_counts
    from medhpc.parallel.geometry import block_range

    world = get_world()
    rng = np.random.default_rng(8)
    truths = [rng.integers(0, 3, (6, 7, 8)) for _ in range(5)]
    predictions = [np.where(rng.random(t.shape) < 0.8, t, rng.integers(0, 3, t.shape))
                   for t in truths]
    start, stop = block_range(5, world.size, world.rank)
    counts = sum((confusion_counts(predictions[i], truths[i], 2) for i in range(start, stop)),
                 np.zeros((2, 3)))
    ranks = distributed.Ranks(world.rank, world.size, world.local_rank, "mpi")
    total = distributed.reduce_sum(world, ranks, counts)
    expected = sum(confusion_counts(p, t, 2) for p, t in zip(predictions, truths))
    np.testing.assert_array_equal(total, expected)
    np.testing.assert_allclose(dice_from_counts(total), dice_from_counts(expected))


def test_the_store_address_is_the_override_the_loopback_or_the_routed_interface(monkeypatch):
    from types import SimpleNamespace

    from medhpc.ct import distributed

    one_node = SimpleNamespace(node_count=1, hosts=["n1", "n1"])
    two_nodes = SimpleNamespace(node_count=2, hosts=["n1", "n1", "n2"])
    monkeypatch.delenv(distributed.MASTER_ADDRESS_VARIABLE, raising=False)
    assert distributed.master_address(one_node) == "127.0.0.1"
    asked = []
    monkeypatch.setattr(distributed, "routed_address",
                        lambda host: asked.append(host) or "10.1.2.3")
    assert distributed.master_address(two_nodes) == "10.1.2.3" and asked == ["n2"]
    monkeypatch.setenv(distributed.MASTER_ADDRESS_VARIABLE, "192.168.7.1")
    assert distributed.master_address(two_nodes) == "192.168.7.1"


def test_the_routed_address_towards_this_host_is_a_local_one():
    from medhpc.ct import distributed

    assert distributed.routed_address("127.0.0.1") == "127.0.0.1"
