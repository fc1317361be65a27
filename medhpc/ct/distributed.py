"""torch.distributed for ranks launched by mpiexec/srun (or torchrun), and gradient sync.

Under MPI the rank layout comes from medhpc's :class:`~medhpc.parallel.comm.World`;
rank 0 opens torch's TCP store on a port the system chooses (no probe-then-release race),
on the loopback interface when every rank is on one node, else on every interface, and
broadcasts its address: ``MEDHPC_MASTER_ADDR`` when set (the interface the site wants, e.g.
the high-speed network's), else the address of rank 0's interface that routes to the other
nodes. Every rank then joins a process group on that store, gloo on the CPU and NCCL on
GPUs. The pip torch wheel has no MPI backend, hence this rendezvous. Under torchrun (``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` set, one MPI rank) the
environment is used as it is.

Gradients are averaged either by DDP (bucketed all-reduce overlapped with the
backward pass) or by one flat all-reduce through the World (``--grad-sync mpi``).
:func:`shutdown` destroys the process group and then waits at an MPI barrier:
without the barrier, gloo under mpiexec sometimes aborts at exit.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass
class Ranks:
    """Where this process sits: rank, size, node-local rank, and who launched it."""

    rank: int
    size: int
    local_rank: int
    launcher: str  # "mpi", "torchrun" or "single"
    backend: str | None = None


MASTER_ADDRESS_VARIABLE = "MEDHPC_MASTER_ADDR"
RENDEZVOUS_TIMEOUT_S = 300


def routed_address(peer_host: str) -> str:
    """This host's address on the interface that routes to ``peer_host`` (no packet is sent:
    a UDP socket's connect only picks the route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((peer_host, 9))
        return probe.getsockname()[0]


def master_address(world) -> str:
    """The address the other ranks reach rank 0's store at (called on rank 0)."""
    if os.environ.get(MASTER_ADDRESS_VARIABLE):
        return os.environ[MASTER_ADDRESS_VARIABLE]
    if world.node_count == 1:
        return "127.0.0.1"
    hosts = world.hosts
    other = next(host for host in hosts if host != hosts[0])
    return routed_address(other)


def torchrun_environment() -> bool:
    """True when torchrun (or another env:// launcher) set the rendezvous variables."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES) and \
        int(os.environ["WORLD_SIZE"]) > 1


def rendezvous(world, device: str) -> Ranks:
    """Join a torch.distributed process group over this job's ranks (no group for 1 rank)."""
    backend = "nccl" if device == "cuda" else "gloo"
    if world.size == 1 and torchrun_environment():
        dist.init_process_group(backend, init_method="env://")
        return Ranks(dist.get_rank(), dist.get_world_size(),
                     int(os.environ.get("LOCAL_RANK", 0)), "torchrun", backend)
    if world.size == 1:
        return Ranks(0, 1, 0, "single")
    timeout = datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S)
    store, address = None, None
    if world.is_root:
        host = master_address(world)
        bind = "127.0.0.1" if host.startswith("127.") else "0.0.0.0"
        store = dist.TCPStore(bind, 0, world.size, True, timeout=timeout,
                              wait_for_workers=False)
        address = (host, store.port)
    host, port = world.bcast(address)
    if store is None:
        store = dist.TCPStore(host, port, world.size, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size,
                            timeout=timeout)
    return Ranks(world.rank, world.size, world.local_rank, "mpi", backend)


def shutdown(world, ranks: Ranks) -> None:
    """Leave the process group, then wait for every MPI rank."""
    if dist.is_initialized():
        dist.destroy_process_group()
    world.barrier()


class FlatGradientSync:
    """Average gradients over the ranks with one MPI all-reduce of all of them, flattened."""

    def __init__(self, world, parameters):
        self.world = world
        self.parameters = [p for p in parameters if p.requires_grad]

    def __call__(self) -> None:
        if self.world.size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
        flat = torch.cat([g.reshape(-1) for g in grads]).detach()
        device = flat.device
        buffer = np.ascontiguousarray(flat.cpu().numpy()) if device.type == "cpu" else flat
        if device.type == "cpu":
            self.world.allreduce_(buffer)
            flat = torch.from_numpy(buffer)
        else:
            from numba import cuda

            self.world.allreduce_(cuda.as_cuda_array(flat))
        flat = flat.to(device) / self.world.size
        offset = 0
        for p in self.parameters:
            n = p.numel()
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.copy_(flat[offset: offset + n].view_as(p))
            offset += n


def reduce_sum(world, ranks: Ranks, array: np.ndarray) -> np.ndarray:
    """Sum a float64 array over the ranks (MPI, or torch.distributed under torchrun)."""
    array = np.ascontiguousarray(array, dtype=np.float64)
    if ranks.launcher == "torchrun":
        tensor = torch.from_numpy(array.copy())
        if ranks.backend == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()
    return world.allreduce_(array)


def reduce_max(world, ranks: Ranks, value: float) -> float:
    """Maximum of a scalar over the ranks."""
    return float(reduce_max_array(world, ranks, np.array([value]))[0])


def reduce_max_array(world, ranks: Ranks, array) -> np.ndarray:
    array = np.ascontiguousarray(array, dtype=np.float64)
    if ranks.launcher == "torchrun":
        tensor = torch.from_numpy(array.copy())
        if ranks.backend == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.cpu().numpy()
    return world.allreduce_(array, op="max")
