"""Checkpoint/restart: resuming gives the uninterrupted result, bit for bit."""

import os
import signal
import threading

import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.parallel.comm import get_world
from medhpc.runtime import checkpoint as checkpoint_module
from medhpc.runtime.checkpoint import (EXIT_CHECKPOINT_STOP, Checkpointer, CheckpointStop,
                                       restore_rng, rng_state)

ITERATIONS = 12
SEED = 20240611


def noisy_fixed_point(world, path, every=0, resume=False, signal_at=None, signal_rank=0,
                      stop_signal=signal.SIGTERM, iterations=ITERATIONS):
    """A toy iteration x <- cos(x) + noise, coupled across ranks by a global sum."""
    rng = np.random.default_rng(SEED)
    x = np.linspace(0.0, 1.0, 16)
    start = 0
    with Checkpointer(world, path, every=every, resume=resume,
                      fingerprint={"iterations": iterations, "seed": SEED}) as checkpointer:
        loaded = checkpointer.load()
        if loaded is not None:
            start, state = loaded
            x = state["x"]
            restore_rng(rng, state["rng"])
        for iteration in range(start, iterations):
            if iteration == signal_at and world.rank == signal_rank:
                os.kill(os.getpid(), stop_signal)
            x = np.cos(x) + 0.1 * rng.standard_normal(x.shape) + 1e-3 * world.sum(float(x[0]))
            if checkpointer.due(iteration + 1):
                checkpointer.save(iteration + 1, {"x": x, "rng": rng_state(rng),
                                                  "iteration": iteration + 1})
    return x


def saved_iteration(path):
    with Checkpointer(get_world(), path, resume=True,
                      fingerprint={"iterations": ITERATIONS, "seed": SEED}) as checkpointer:
        return checkpointer.load()[0]


@pytest.mark.parametrize("name", ["run.h5", "run.npz"])
def test_resume_after_signal_matches_uninterrupted_run(tmp_path, name):
    world = get_world()
    path = tmp_path / name
    expected = noisy_fixed_point(world, None)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(CheckpointStop) as stop:
        noisy_fixed_point(world, path, every=5, signal_at=7)
    assert stop.value.exit_code == EXIT_CHECKPOINT_STOP and stop.value.agreed
    assert stop.value.iteration == 8 and "SIGTERM" in str(stop.value)
    assert signal.getsignal(signal.SIGTERM) is handler_before
    assert saved_iteration(path) == 8
    resumed = noisy_fixed_point(world, path, every=5, resume=True)
    np.testing.assert_array_equal(resumed, expected)


def test_saves_every_k_iterations(tmp_path):
    path = tmp_path / "run.h5"
    noisy_fixed_point(get_world(), path, every=5)
    assert saved_iteration(path) == 10


def test_sigusr1_also_stops(tmp_path):
    with pytest.raises(CheckpointStop, match="SIGUSR1"):
        noisy_fixed_point(get_world(), tmp_path / "run.npz", signal_at=2,
                          stop_signal=signal.SIGUSR1)


def test_state_round_trip(tmp_path):
    state = {"volume": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
             "flags": np.array([True, False]), "step": np.float32(0.25), "alpha": 0.1,
             "history": [1.5, 2.5], "label": "lddmm", "rng": rng_state(np.random.default_rng(1))}
    for name in ("state.h5", "state.npz"):
        with Checkpointer(get_world(), tmp_path / name, resume=True) as checkpointer:
            checkpointer.save(3, state)
            iteration, loaded = checkpointer.load()
        assert iteration == 3 and set(loaded) == set(state)
        np.testing.assert_array_equal(loaded["volume"], state["volume"])
        assert loaded["volume"].dtype == np.float32
        assert loaded["step"] == state["step"] and isinstance(loaded["step"], np.float32)
        assert loaded["history"] == state["history"] and loaded["rng"] == state["rng"]


def test_rng_helpers_other_bit_generator():
    generator = np.random.Generator(np.random.MT19937(5))
    saved = rng_state(generator)
    first = generator.random(4)
    restore_rng(generator, saved)
    np.testing.assert_array_equal(generator.random(4), first)
    with pytest.raises(InputError, match="MT19937"):
        restore_rng(np.random.default_rng(), saved)


def test_fingerprint_mismatch_refused(tmp_path):
    path = tmp_path / "run.h5"
    noisy_fixed_point(get_world(), path, every=4)
    with pytest.raises(InputError, match=r"different parameters \(iterations: checkpoint 12, now 20\)"):
        noisy_fixed_point(get_world(), path, every=4, resume=True, iterations=20)


@pytest.mark.parametrize("name", ["run.h5", "run.npz"])
def test_corrupt_or_missing_checkpoint_refused(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(InputError, match="no checkpoint to resume from"):
        noisy_fixed_point(get_world(), path, resume=True)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="not a readable medhpc checkpoint") as error:
        noisy_fixed_point(get_world(), path, resume=True)
    assert "\n" not in str(error.value)


def test_crash_while_saving_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "run.npz"
    checkpointer = Checkpointer(get_world(), path, resume=True)
    checkpointer.save(1, {"x": np.zeros(3)})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.np, "savez", crash)
    with pytest.raises(OSError):
        checkpointer.save(2, {"x": np.ones(3)})
    monkeypatch.undo()
    assert checkpointer.load()[0] == 1
    assert [entry.name for entry in tmp_path.iterdir()] == ["run.npz"]
    checkpointer.close()


def test_unknown_suffix_and_disabled_checkpointing(tmp_path):
    with pytest.raises(InputError, match="unknown checkpoint format"):
        Checkpointer(get_world(), tmp_path / "run.txt")
    handler_before = signal.getsignal(signal.SIGTERM)
    with Checkpointer(get_world(), None, every=1, resume=True) as checkpointer:
        assert signal.getsignal(signal.SIGTERM) is handler_before
        assert not checkpointer.due(1) and checkpointer.load() is None


def test_handlers_installed_only_in_main_thread(tmp_path):
    handler_before = signal.getsignal(signal.SIGUSR1)
    created = []
    thread = threading.Thread(target=lambda: created.append(
        Checkpointer(get_world(), tmp_path / "run.h5")))
    thread.start()
    thread.join()
    assert created and signal.getsignal(signal.SIGUSR1) is handler_before
    with Checkpointer(get_world(), tmp_path / "run.h5"):
        assert signal.getsignal(signal.SIGUSR1) is not handler_before
    assert signal.getsignal(signal.SIGUSR1) is handler_before


@pytest.mark.mpi(min_size=2)
def test_signal_on_one_rank_stops_all_ranks_at_same_iteration(mpi_tmp_path):
    world = get_world()
    path = mpi_tmp_path / "run.h5"
    expected = noisy_fixed_point(world, None)
    stopped_at = None
    try:
        noisy_fixed_point(world, path, every=100, signal_at=5, signal_rank=world.size - 1)
    except CheckpointStop as stop:
        stopped_at = stop.iteration
    assert world.allgather(stopped_at) == [6] * world.size
    assert saved_iteration(path) == 6
    resumed = noisy_fixed_point(world, path, every=100, resume=True)
    np.testing.assert_array_equal(resumed, expected)
    gathered = world.allgather(resumed)
    for other in gathered[1:]:
        np.testing.assert_array_equal(other, gathered[0])


def test_a_stop_signal_before_the_first_iteration_stops_at_once(tmp_path):
    """While the kernels compile there is nothing to save: the run ends at the signal."""
    from medhpc.runtime.checkpoint import StoppedBeforeFirstIteration

    with Checkpointer(get_world(), tmp_path / "state.h5", every=0) as checkpointer:
        with pytest.raises(StoppedBeforeFirstIteration) as stopped:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                sum(range(100))
        assert stopped.value.exit_code == EXIT_CHECKPOINT_STOP
        assert not (tmp_path / "state.h5").exists()
        checkpointer.due(1)  # once iterating, a signal is deferred to the next save
        os.kill(os.getpid(), signal.SIGTERM)
        assert checkpointer.stop_requested


def test_torch_checkpoint_round_trip_and_refusals(tmp_path):
    torch = pytest.importorskip("torch")
    from medhpc.runtime.checkpoint import read_torch_checkpoint, write_torch_checkpoint

    path = tmp_path / "state.pt"
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    write_torch_checkpoint(path, 7, {"model": model.state_dict(),
                                     "optimizer": optimizer.state_dict()},
                           {"epoch": 1, "history": [{"loss": 0.5}]}, {"steps": 3, "seed": 0})
    iteration, tensors, state = read_torch_checkpoint(path, {"steps": 3, "seed": 0}, "a test")
    assert iteration == 7 and state == {"epoch": 1, "history": [{"loss": 0.5}]}
    assert all(torch.equal(tensors["model"][k], v) for k, v in model.state_dict().items())
    with pytest.raises(InputError, match="steps: checkpoint 3, now 4"):
        read_torch_checkpoint(path, {"steps": 4, "seed": 0}, "a test")
    with pytest.raises(InputError, match="no checkpoint to resume from"):
        read_torch_checkpoint(tmp_path / "absent.pt", {}, "a test")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(InputError, match="foreign.pt: not a medhpc checkpoint"):
        read_torch_checkpoint(tmp_path / "foreign.pt", {}, "a test")
    torch.save({"object": threading.Lock}, tmp_path / "planted.pt")  # not loadable as weights
    with pytest.raises(InputError, match="refused unread"):
        read_torch_checkpoint(tmp_path / "planted.pt", {}, "a test")
