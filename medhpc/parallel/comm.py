"""The world communicator: every MPI call that medhpc makes goes through here.

:func:`get_world` returns the process's :class:`World`. Under ``mpiexec`` it
wraps ``MPI.COMM_WORLD``; run plainly it is a world of one rank. When no MPI
library can be loaded at all, a serial stand-in with the same methods is used,
so every subcommand still runs.

Device buffers (objects with ``__cuda_array_interface__``) are passed to MPI
directly when the MPI library is CUDA-aware, and staged through host memory
otherwise (see :mod:`medhpc.parallel.device`).
"""

from __future__ import annotations

import os
import pickle
import socket
from typing import Any, Callable, Sequence

import numpy as np

_world: "World | None" = None


def _load_mpi():
    """Return ``mpi4py.MPI`` or ``None`` when no MPI library can be loaded."""
    if os.environ.get("MEDHPC_NO_MPI"):
        return None
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError):
        return None
    return MPI


class _SerialComm:
    """A one-rank communicator with the subset of mpi4py's API that medhpc uses."""

    def Get_rank(self) -> int:
        return 0

    def Get_size(self) -> int:
        return 1

    def bcast(self, obj, root=0):
        return obj

    def gather(self, obj, root=0):
        return [obj]

    def allgather(self, obj):
        return [obj]

    def allreduce(self, obj, op=None):
        return obj

    def Alltoallv(self, sendspec, recvspec):
        send, recv = sendspec[0], recvspec[0]
        np.copyto(recv.reshape(-1)[: send.size], send.reshape(-1))

    def Sendrecv(self, sendbuf, dest, sendtag=0, recvbuf=None, source=0, recvtag=0):
        np.copyto(recvbuf, sendbuf)

    def Barrier(self):
        pass

    def Split(self, color=0, key=0):
        return self

    def Abort(self, errorcode=1):
        os._exit(errorcode)


class World:
    """A communicator with the rank layout and the collectives medhpc needs.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm or None
        The communicator; ``None`` gives ``MPI.COMM_WORLD`` (or a serial world
        when no MPI library loads).
    """

    def __init__(self, comm=None):
        self.MPI = _load_mpi()
        if comm is None:
            comm = self.MPI.COMM_WORLD if self.MPI is not None else _SerialComm()
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.local_rank, self.local_size, self.node_index, self.node_count = self._node_layout()

    # -- layout ---------------------------------------------------------------------------
    @property
    def is_root(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    @property
    def has_mpi(self) -> bool:
        """True when a real MPI library is loaded (also for a one-rank run)."""
        return self.MPI is not None and not isinstance(self.comm, _SerialComm)

    def _node_layout(self) -> tuple[int, int, int, int]:
        """Return (node-local rank, ranks on this node, node index, number of nodes); note
        every rank's host name in :attr:`hosts`."""
        self.hosts = [socket.gethostname()] * self.size
        if not self.has_mpi or self.size == 1:
            return 0, 1, 0, 1
        local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED, key=self.rank)
        try:
            local_rank, local_size = local.Get_rank(), local.Get_size()
        finally:
            local.Free()
        hosts = self.hosts = self.comm.allgather(socket.gethostname())
        nodes = list(dict.fromkeys(hosts))
        return local_rank, local_size, nodes.index(hosts[self.rank]), len(nodes)

    def split(self, color: int, key: int | None = None) -> "World":
        """Return a sub-world of the ranks that pass the same ``color``."""
        sub = self.comm.Split(color, self.rank if key is None else key)
        return World(sub)

    # -- objects --------------------------------------------------------------------------
    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Broadcast a picklable object from ``root``."""
        return self.comm.bcast(obj, root=root) if self.size > 1 else obj

    def gather(self, obj: Any, root: int = 0) -> list | None:
        """Gather picklable objects to ``root`` (``None`` elsewhere)."""
        if self.size == 1:
            return [obj]
        return self.comm.gather(obj, root=root)

    def allgather(self, obj: Any) -> list:
        """Gather picklable objects on every rank."""
        return self.comm.allgather(obj) if self.size > 1 else [obj]

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.size > 1:
            self.comm.Barrier()

    # -- reductions -----------------------------------------------------------------------
    def _op(self, name: str):
        return getattr(self.MPI, name.upper()) if self.MPI is not None else None

    def allreduce_scalar(self, value, op: str = "sum"):
        """Reduce a Python scalar over all ranks: ``op`` is 'sum', 'min' or 'max'."""
        if op not in ("sum", "min", "max"):
            raise ValueError(f"unknown reduction {op!r}")
        if self.size == 1:
            return value
        return self.comm.allreduce(value, op=self._op(op))

    def sum(self, value):
        """Global sum of a scalar."""
        return self.allreduce_scalar(value, "sum")

    def min(self, value):
        """Global minimum of a scalar."""
        return self.allreduce_scalar(value, "min")

    def max(self, value):
        """Global maximum of a scalar."""
        return self.allreduce_scalar(value, "max")

    def allreduce_(self, array, op: str = "sum"):
        """Reduce ``array`` over all ranks in place and return it.

        ``array`` is a contiguous NumPy array or a CUDA device array; device
        arrays go to MPI directly when it is CUDA-aware and through host memory
        otherwise.
        """
        if self.size == 1:
            return array
        from medhpc.parallel import device

        with device.mpi_buffer(array, self, write_back=True) as buf:
            self.comm.Allreduce(self.MPI.IN_PLACE, buf, op=self._op(op))
        return array

    # -- agreement ------------------------------------------------------------------------
    def agree(self, check: Callable[[], Any], root: int = 0) -> Any:
        """Run ``check`` on ``root`` only and share its verdict with every rank.

        If ``check`` raises, every rank raises the same exception, marked
        ``agreed = True``, so no rank is left waiting in a later collective and
        the command line prints the message once.
        Returns ``check``'s result on every rank.
        """
        outcome = None
        if self.rank == root:
            try:
                outcome = ("ok", check())
            except Exception as exc:  # shared with the others, re-raised below
                outcome = ("error", exc)
        outcome = self.bcast(outcome, root=root)
        if outcome[0] == "error":
            exc = outcome[1]
            exc.agreed = True
            raise exc
        return outcome[1]

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""
        return bool(self.allreduce_scalar(int(bool(flag)), "max"))

    def agree_all(self, task: Callable[[], Any]) -> Any:
        """Run ``task`` on every rank; if it raises on any rank, raise on every rank.

        Every rank raises the exception of the lowest failing rank (the failing
        rank its own object), marked ``agreed = True`` like :meth:`agree`.
        Exceptions that cannot be pickled travel as a :class:`RuntimeError`
        with their message. Returns this rank's result of ``task``.
        """
        try:
            result, error = task(), None
        except Exception as exc:  # shared with the others, re-raised below
            result, error = None, exc
        if self.size == 1:
            failures = [error]
        else:
            failures = self.allgather(None if error is None else portable_exception(error))
        first = next((rank for rank, exc in enumerate(failures) if exc is not None), None)
        if first is None:
            return result
        exc = error if first == self.rank else failures[first]
        exc.agreed = True
        raise exc

    # -- exchanges ------------------------------------------------------------------------
    def sendrecv_(self, send, dest: int, recv, source: int, tag: int = 0) -> None:
        """Send ``send`` to ``dest`` while receiving into ``recv`` from ``source``."""
        from medhpc.parallel import device

        with device.mpi_buffer(send, self, write_back=False) as sbuf, \
                device.mpi_buffer(recv, self, write_back=True) as rbuf:
            self.comm.Sendrecv(sbuf, dest=dest, sendtag=tag, recvbuf=rbuf, source=source,
                               recvtag=tag)

    def send_(self, array: np.ndarray, dest: int, tag: int = 0) -> None:
        """Send a contiguous host array to ``dest`` (blocking)."""
        self.comm.Send(array, dest=dest, tag=tag)

    def recv_(self, array: np.ndarray, source: int, tag: int = 0) -> None:
        """Receive into a contiguous host array from ``source`` (blocking)."""
        self.comm.Recv(array, source=source, tag=tag)

    def alltoallv_(self, send: np.ndarray, send_counts: Sequence[int],
                   recv: np.ndarray, recv_counts: Sequence[int]) -> None:
        """All-to-all of variable-sized contiguous blocks (counts in elements)."""
        send_displ = np.concatenate([[0], np.cumsum(send_counts)[:-1]]).astype(np.int64)
        recv_displ = np.concatenate([[0], np.cumsum(recv_counts)[:-1]]).astype(np.int64)
        self.comm.Alltoallv([send, (list(send_counts), list(send_displ))],
                            [recv, (list(recv_counts), list(recv_displ))])

    def scatterv_(self, send: np.ndarray | None, counts: Sequence[int], recv: np.ndarray,
                  root: int = 0) -> None:
        """Scatter consecutive blocks of ``send`` (on ``root``) into each rank's ``recv``.

        ``counts[r]`` elements go to rank ``r``; ``send`` is only read on
        ``root`` (pass ``None`` elsewhere). Buffers are contiguous.
        """
        if self.size == 1:
            np.copyto(recv.reshape(-1), send.reshape(-1))
            return
        from medhpc.parallel import device

        displ = _displacements(counts)
        with device.mpi_buffer(recv, self, write_back=True) as rbuf:
            if self.rank == root:
                with device.mpi_buffer(send, self, write_back=False) as sbuf:
                    self.comm.Scatterv([sbuf, (list(counts), displ)], rbuf, root=root)
            else:
                self.comm.Scatterv(None, rbuf, root=root)

    def gatherv_(self, send: np.ndarray, recv: np.ndarray | None, counts: Sequence[int],
                 root: int = 0) -> None:
        """Gather each rank's contiguous ``send`` into consecutive blocks of ``recv`` on ``root``.

        ``counts[r]`` is the number of elements rank ``r`` sends; ``recv`` is
        only written on ``root`` (pass ``None`` elsewhere).
        """
        if self.size == 1:
            np.copyto(recv.reshape(-1), send.reshape(-1))
            return
        from medhpc.parallel import device

        displ = _displacements(counts)
        with device.mpi_buffer(send, self, write_back=False) as sbuf:
            if self.rank == root:
                with device.mpi_buffer(recv, self, write_back=True) as rbuf:
                    self.comm.Gatherv(sbuf, [rbuf, (list(counts), displ)], root=root)
            else:
                self.comm.Gatherv(sbuf, None, root=root)

    @property
    def proc_null(self) -> int:
        """The rank that stands for "no neighbour": exchanges with it do nothing."""
        return self.MPI.PROC_NULL if self.has_mpi else -1

    def send_obj(self, obj: Any, dest: int, tag: int = 0) -> None:
        """Send a picklable object to ``dest`` (blocking)."""
        self.comm.send(obj, dest=dest, tag=tag)

    def recv_obj(self, source: int | None = None, tag: int | None = None) -> tuple[Any, int, int]:
        """Receive a picklable object; ``None`` means any source / any tag.

        Returns ``(obj, source, tag)`` of the message received.
        """
        status = self.MPI.Status()
        obj = self.comm.recv(source=self.MPI.ANY_SOURCE if source is None else source,
                             tag=self.MPI.ANY_TAG if tag is None else tag, status=status)
        return obj, status.Get_source(), status.Get_tag()

    def iprobe(self, source: int | None = None, tag: int | None = None) -> bool:
        """True when a message from ``source`` with ``tag`` (``None``: any) is waiting."""
        if not self.has_mpi:
            return False
        return bool(self.comm.Iprobe(source=self.MPI.ANY_SOURCE if source is None else source,
                                     tag=self.MPI.ANY_TAG if tag is None else tag))

    def abort(self, code: int = 1) -> None:
        """End the whole job (every rank) with exit code ``code``."""
        self.comm.Abort(code)


def _displacements(counts: Sequence[int]) -> list[int]:
    """Start offsets of consecutive blocks of ``counts`` elements."""
    return [int(d) for d in np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)]


def portable_exception(exc: BaseException) -> BaseException:
    """Return ``exc`` if it survives pickling, else a :class:`RuntimeError` with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def get_world() -> World:
    """Return the process's :class:`World`, creating it on first use."""
    global _world
    if _world is None:
        _world = World()
    return _world
