"""``medhpc info``: what this job runs on (job scripts print it first)."""

from __future__ import annotations

import json
import sys

import click

from medhpc.cli.help import command

@command(example="""\
mpiexec -n 4 medhpc info --json""")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead of text.")
@click.option("--threads", type=int, default=None, envvar="MEDHPC_THREADS",
              help="Threads per rank to report [default: cores / ranks on the node].")
def info(as_json, threads):
    """Versions, MPI library, ranks and nodes, GPUs per rank, threads and HDF5 support."""
    from medhpc.environment import describe_environment
    from medhpc.parallel.comm import get_world

    world = get_world()
    document = describe_environment(world, threads)
    if not world.is_root:
        return
    if as_json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(format_environment(document))


def format_environment(document: dict) -> str:
    """Render :func:`~medhpc.environment.describe_environment` as text."""
    lines = [f"medhpc {document['medhpc']} on Python {document['python']} ({document['platform']})"]
    lines.append("packages: " + ", ".join(f"{name} {version}"
                                          for name, version in document["packages"].items()))
    mpi = document["mpi"]
    lines.append(f"MPI: {mpi['library']} (MPI {mpi['standard']}), CUDA-aware: "
                 f"{'yes' if mpi['cuda_aware'] else 'no'}")
    lines.append(f"ranks: {document['ranks']} on {document['nodes']} node(s)")
    lines.append(f"numba: threading layer {document['numba']['threading_layer']}, "
                 f"threads per rank {document['numba']['threads_per_rank']}")
    lines.append(f"HDF5 {document['hdf5']['version']}, h5py MPI support: "
                 f"{'yes' if document['hdf5']['mpi'] else 'no'}")
    for entry in document["placement"]:
        gpu = "no GPU" if entry["gpu"] is None else f"GPU {entry['gpu']}"
        lines.append(f"  rank {entry['rank']}: {entry['host']} local rank {entry['local_rank']}, "
                     f"{gpu}, {entry['threads']} thread(s)")
    return "\n".join(lines) + "\n"
