"""Checkpoint and restart for iterative work, and a clean stop before a time limit.

A :class:`Checkpointer` saves the state of an iterative run every ``every``
iterations, and also as soon as the scheduler announces the end of the job
(``SIGTERM`` or ``SIGUSR1``). A run started with ``resume=True`` continues from
the saved iteration to the same result, bit for bit, as a run never stopped::

    rng = np.random.default_rng(seed)
    with Checkpointer(world, "run.ckpt.h5", every=10, resume=resume,
                      fingerprint={"iterations": n, "seed": seed}) as checkpointer:
        start, state = checkpointer.load() or (0, {"x": x0, "rng": rng_state(rng)})
        x = state["x"]
        restore_rng(rng, state["rng"])
        for iteration in range(start, n):
            x = step(x, rng)
            if checkpointer.due(iteration + 1):
                checkpointer.save(iteration + 1, {"x": x, "rng": rng_state(rng)})

After a stop signal, :meth:`Checkpointer.save` writes the checkpoint and raises
:class:`CheckpointStop`, which the command line maps to exit code 143
(:data:`EXIT_CHECKPOINT_STOP`).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from medhpc.errors import InputError, MedhpcError, one_line
from medhpc.io.atomic import atomic_path

EXIT_CHECKPOINT_STOP = 143
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
FORMAT_NAME = "medhpc-checkpoint"
FORMAT_VERSION = 1
HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf")
_METADATA_KEY = "__medhpc_checkpoint__"
_STATE_GROUP = "state"


class CheckpointStop(MedhpcError):
    """The run saved a checkpoint and stopped because a stop signal arrived.

    Exit code 143 (128 + SIGTERM), whichever of ``SIGTERM`` or ``SIGUSR1``
    arrived: the shell's code for "terminated", and distinct from success (0),
    so a job chain does not take the run for finished, and from failure (1)
    and bad input (2), so a job script can resubmit with ``--resume`` on 143.
    Every rank raises it at the same iteration, so it is marked ``agreed``:
    the command line prints it once and ends without aborting the MPI job.
    """

    exit_code = EXIT_CHECKPOINT_STOP

    def __init__(self, signum: int, iteration: int, path: Path, message: str | None = None):
        self.signum = signum
        self.iteration = iteration
        self.path = path
        self.agreed = True
        super().__init__(message or f"{signal.Signals(signum).name} received: stopped after "
                         f"iteration {iteration}, checkpoint saved to {path}; rerun with "
                         f"--resume to continue")

    def __reduce__(self):  # crosses ranks intact (the work queue sends failures to the root)
        return type(self), (self.signum, self.iteration, self.path, str(self))


class StoppedBeforeFirstIteration(MedhpcError):
    """A stop signal arrived before the first iteration ended (while the kernels compile,
    typically): there is nothing to save, so the run stops at once (exit code 143)."""

    exit_code = EXIT_CHECKPOINT_STOP

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"{signal.Signals(signum).name} received before the first iteration "
                         f"ended (kernels may still have been compiling): stopped with nothing "
                         f"to save; rerun to start again")

    def __reduce__(self):
        return type(self), (self.signum,)


def rng_state(generator: np.random.Generator) -> dict:
    """Return the state of ``generator``'s bit generator as a JSON-able dict."""
    return plain_data(generator.bit_generator.state)


def restore_rng(generator: np.random.Generator, state: dict) -> None:
    """Set ``generator`` to a state that :func:`rng_state` returned."""
    expected = type(generator.bit_generator).__name__
    if state.get("bit_generator") != expected:
        raise InputError(f"random generator state is for {state.get('bit_generator')!r}, "
                         f"not {expected!r}")
    generator.bit_generator.state = state


def plain_data(value):
    """``value`` as plain Python data: dicts, lists, numbers, strings and None.

    NumPy arrays become nested lists, NumPy scalars Python numbers, paths strings and
    tuples lists, so the result is JSON text or a ``weights_only`` torch document.
    """
    if isinstance(value, dict):
        return {key: plain_data(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_data(item) for item in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def read_torch_document(path, expected: str) -> dict:
    """Read a torch file holding only tensors and plain data (``weights_only``).

    Anything else (a planted object, a foreign file) is refused unread, as one
    :class:`InputError` line naming ``path`` and what was ``expected``.
    """
    import pickle

    import torch

    try:
        document = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise InputError(f"{path}: holds objects other than tensors and plain data (refused "
                         f"unread); expected {expected}") from None
    except Exception as error:
        raise InputError(f"{path}: not readable ({type(error).__name__}: {one_line(error)}); "
                         f"expected {expected}") from None
    if not isinstance(document, dict):
        raise InputError(f"{path}: holds a {type(document).__name__}, not a dictionary; "
                         f"expected {expected}")
    return document


def write_torch_checkpoint(path, iteration: int, tensors: dict, state: dict,
                           fingerprint: dict) -> None:
    """Write a checkpoint of torch state atomically, loadable with ``weights_only=True``.

    Parameters
    ----------
    path : Path
        The ``.pt`` file.
    iteration : int
        How far the run got (its own unit: optimisation steps for ct-train).
    tensors : dict
        Tensors and the ``state_dict()`` of models, optimizers and scalers.
    state : dict
        Plain, JSON-able data (counters, histories).
    fingerprint : dict
        The run's parameters; :func:`read_torch_checkpoint` refuses other ones.
    """
    import torch

    document = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "iteration": int(iteration),
                "fingerprint": _normalised(fingerprint), "state": _normalised(state),
                "tensors": tensors}
    with atomic_path(path, overwrite=True, now=True) as tmp:
        torch.save(document, tmp)


def read_torch_checkpoint(path, fingerprint: dict, expected: str) -> tuple[int, dict, dict]:
    """Return ``(iteration, tensors, state)`` that :func:`write_torch_checkpoint` wrote.

    Raises :class:`InputError` (one line naming ``path`` and what was ``expected``)
    when the file is missing, holds objects other than tensors and plain data, is
    not a medhpc checkpoint, or was written by a run with another ``fingerprint``.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no checkpoint to resume from; run without --resume to "
                         f"start afresh")
    document = read_torch_document(path, expected)
    missing = {"format", "version", "iteration", "fingerprint", "state", "tensors"} - set(document)
    if missing or document["format"] != FORMAT_NAME:
        raise InputError(f"{path}: not a medhpc checkpoint ({', '.join(sorted(missing)) or 'format'}"
                         f" missing); expected {expected}")
    if document["version"] != FORMAT_VERSION:
        raise InputError(f"{path}: checkpoint format version {document['version']}, expected "
                         f"{FORMAT_VERSION}; run without --resume")
    difference = _describe_difference(document["fingerprint"], _normalised(fingerprint))
    if difference:
        raise InputError(f"{path}: checkpoint of a run with different parameters ({difference}); "
                         f"rerun with the same parameters or without --resume")
    return int(document["iteration"]), document["tensors"], document["state"]


class StopSignals:
    """Catches ``SIGTERM`` and ``SIGUSR1`` on this rank while it is open.

    A signal is recorded in :attr:`received`; while nothing could be saved yet
    (``raise_while_idle`` and :meth:`busy` not called) it raises
    :class:`StoppedBeforeFirstIteration` at once instead, so a run stops within
    seconds also while its kernels compile. Handlers are installed only in the main
    thread; :meth:`close` restores the previous ones. Several checkpointers of one run
    (one per frame, say) share one instance, so no signal falls between them.
    """

    def __init__(self, raise_while_idle: bool = True):
        self.received: int | None = None
        self._raise = raise_while_idle
        self._busy = False
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)

    def __enter__(self) -> "StopSignals":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def busy(self) -> None:
        """From now on a signal is recorded (there is state to save), not raised."""
        self._busy = True
        self._raise = False

    @contextmanager
    def at_once_until_busy(self):
        """Inside the block, a signal raises at once until :meth:`busy` is called (work
        that may compile kernels before it has anything to save); outside it, signals
        are recorded."""
        self._raise = not self._busy
        try:
            yield
        finally:
            self._raise = False

    def close(self) -> None:
        """Restore the signal handlers that were in place before."""
        for signum, previous in self._previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        if self._raise:
            raise StoppedBeforeFirstIteration(signum)
        self.received = signum


class Checkpointer:
    """Saves and restores the state of an iterative run; stops cleanly on a signal.

    :meth:`due` and :meth:`save` are collective: every rank calls them at the
    same iterations. Rank 0 writes the state it is given (gather distributed
    state there first); :meth:`load` gives every rank the same state.

    Stop-signal handlers are installed only when created in the main thread
    and with a ``path``; :meth:`close` (or leaving the ``with`` block) restores
    the previous handlers.

    Parameters
    ----------
    world : medhpc.parallel.comm.World
        The ranks that run the iteration together.
    path : str or Path or None
        The checkpoint file: ``.npz``, or HDF5 (``.h5``, ``.hdf5``, ``.hdf``).
        ``None`` disables checkpointing: :meth:`due` is always false and stop
        signals keep their previous handlers.
    every : int
        Save every ``every`` iterations; 0 saves only on a stop signal.
    resume : bool
        Whether :meth:`load` reads the checkpoint (otherwise the run starts afresh).
    fingerprint : dict, optional
        JSON-able parameters and input descriptions of the run; resuming from
        a checkpoint with a different fingerprint is refused.
    signals : StopSignals, optional
        The run's signal catcher, shared by several checkpointers (left open by
        :meth:`close`); by default each checkpointer with a ``path`` has its own.
    """

    def __init__(self, world, path, every: int = 0, resume: bool = False,
                 fingerprint: dict | None = None, signals: StopSignals | None = None):
        if every < 0:
            raise ValueError(f"every must be >= 0, not {every}")
        self.world = world
        self.path = None if path is None else Path(path)
        if self.path is not None and _format_of(self.path) is None:
            raise InputError(f"{self.path}: unknown checkpoint format; expected a name ending "
                             f"in .npz or {', '.join(HDF5_SUFFIXES)}")
        self.every = every
        self.resume = resume
        self.fingerprint = _normalised(fingerprint or {})
        self._agreed_signal = 0
        self.saved_iteration: int | None = None
        self._owns_signals = signals is None and self.path is not None
        self.signals = StopSignals() if self._owns_signals else signals

    # -- context --------------------------------------------------------------------------
    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Restore the signal handlers that were in place before (its own catcher only)."""
        if self._owns_signals:
            self.signals.close()

    @property
    def _received(self) -> int | None:
        return self.signals.received if self.signals is not None else None

    # -- queries --------------------------------------------------------------------------
    @property
    def stop_requested(self) -> bool:
        """True once a stop signal arrived on this rank or the ranks agreed to stop."""
        return self._received is not None or self._agreed_signal != 0

    def due(self, iteration: int) -> bool:
        """Whether to save after ``iteration``: every ``every`` iterations or after a stop signal.

        Collective: the ranks agree on a stop signal that any of them received,
        so they all save at the same iteration.
        """
        if self.path is None:
            return False
        if self.signals is not None:
            self.signals.busy()
        self._agreed_signal = self.world.max(self._received or 0)
        if self._agreed_signal:
            return True
        return self.every > 0 and iteration % self.every == 0

    # -- saving and loading ---------------------------------------------------------------
    def save(self, iteration: int, state: dict) -> None:
        """Write ``state`` after ``iteration`` atomically (rank 0's ``state``; collective).

        ``state`` maps names to NumPy arrays or JSON-able values. Raises
        :class:`CheckpointStop` after writing when the ranks agreed to stop.
        """
        if self.path is None:
            return
        self.world.agree(lambda: self._write(iteration, state))
        self.saved_iteration = iteration
        if self._agreed_signal:
            raise CheckpointStop(self._agreed_signal, iteration, self.path)

    def load(self) -> tuple[int, dict] | None:
        """Return ``(iteration, state)`` from the checkpoint when resuming, else ``None``.

        Raises :class:`InputError` when the checkpoint is missing, unreadable,
        or written by a run with a different fingerprint.
        """
        if self.path is None or not self.resume:
            return None
        return self.world.agree(self._read)

    def _write(self, iteration: int, state: dict) -> None:
        arrays, values, numpy_scalars = _split_state(state)
        metadata = json.dumps({
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "iteration": int(iteration),
            "fingerprint": self.fingerprint, "values": values, "numpy_scalars": numpy_scalars,
        })
        with atomic_path(self.path, overwrite=True, now=True) as tmp:
            if _format_of(self.path) == "npz":
                with open(tmp, "wb") as stream:
                    np.savez(stream, **{_METADATA_KEY: np.array(metadata)}, **arrays)
            else:
                import h5py

                with h5py.File(tmp, "w") as file:
                    file.attrs[_METADATA_KEY] = metadata
                    group = file.create_group(_STATE_GROUP)
                    for name, array in arrays.items():
                        group.create_dataset(name, data=array)

    def _read(self) -> tuple[int, dict]:
        if not self.path.exists():
            raise InputError(f"{self.path}: no checkpoint to resume from; "
                             f"run without --resume to start afresh")
        try:
            metadata, arrays = _read_file(self.path)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise InputError(f"{self.path}: not a readable medhpc checkpoint "
                             f"({type(exc).__name__}: {one_line(exc)})") from None
        difference = _describe_difference(metadata["fingerprint"], self.fingerprint)
        if difference:
            raise InputError(f"{self.path}: checkpoint of a run with different parameters "
                             f"({difference}); rerun with the same parameters or without --resume")
        state = dict(metadata["values"])
        for name, array in arrays.items():
            state[name] = array[()] if name in metadata["numpy_scalars"] else array
        return metadata["iteration"], state


def _format_of(path: Path) -> str | None:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return "npz"
    return "hdf5" if suffix in HDF5_SUFFIXES else None


def _normalised(value):
    """``value`` as it reads back from JSON (tuples become lists ...)."""
    try:
        return json.loads(json.dumps(plain_data(value)))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint values must be JSON-able: {exc}") from None


def _split_state(state: dict) -> tuple[dict, dict, list]:
    """Separate NumPy arrays and scalars from JSON-able values."""
    arrays, values, numpy_scalars = {}, {}, []
    for name, value in state.items():
        if not isinstance(name, str) or not name or "/" in name or name == _METADATA_KEY:
            raise ValueError(f"bad checkpoint state name {name!r}")
        if isinstance(value, (np.ndarray, np.generic)):
            array = np.asarray(value)
            if array.dtype.hasobject:
                raise TypeError(f"checkpoint array {name!r} has object dtype")
            arrays[name] = array
            if isinstance(value, np.generic):
                numpy_scalars.append(name)
        else:
            values[name] = _normalised(value)
    return arrays, values, numpy_scalars


def _read_file(path: Path) -> tuple[dict, dict]:
    if _format_of(path) == "npz":
        with np.load(path, allow_pickle=False) as archive:
            metadata = _parse_metadata(str(archive[_METADATA_KEY]))
            arrays = {name: archive[name] for name in archive.files if name != _METADATA_KEY}
    else:
        import h5py

        with h5py.File(path, "r") as file:
            metadata = _parse_metadata(file.attrs[_METADATA_KEY])
            arrays = {name: dataset[()] for name, dataset in file[_STATE_GROUP].items()}
    return metadata, arrays


def _parse_metadata(text) -> dict:
    if isinstance(text, bytes):
        text = text.decode()
    metadata = json.loads(text)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise ValueError("no medhpc checkpoint metadata")
    if metadata.get("version") != FORMAT_VERSION:
        raise ValueError(f"format version {metadata.get('version')}, expected {FORMAT_VERSION}")
    for key in ("iteration", "fingerprint", "values", "numpy_scalars"):
        if key not in metadata:
            raise ValueError(f"metadata lacks {key!r}")
    return metadata


def _describe_difference(saved: dict, current: dict) -> str:
    """Name the fingerprint entries that differ ('' when equal)."""
    if saved == current:
        return ""
    parts = []
    for key in sorted(set(saved) | set(current), key=str):
        if saved.get(key, "<absent>") != current.get(key, "<absent>"):
            parts.append(f"{key}: checkpoint {_short(saved.get(key, '<absent>'))}, "
                         f"now {_short(current.get(key, '<absent>'))}")
    return "; ".join(parts)


def _short(value, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
