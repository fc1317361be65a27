"""``medhpc compile``: compile every application's kernels once, before the first job."""

from __future__ import annotations

import click

from medhpc.cli.help import command
from medhpc.runtime.warmup import APPS


@command("compile", example="""\
medhpc compile                       # every application, CPU kernels
medhpc compile --app pet --app lddmm --device cuda""")
@click.option("--app", "apps", multiple=True, type=click.Choice(APPS),
              help="Application whose kernels to compile (repeatable) [default: all].")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Which twins to compile: the CPU kernels, or the CUDA ones (needs a GPU).")
@click.option("--quiet", is_flag=True, help="Only errors and notices.")
def compile_kernels(apps, device, quiet):
    """Fill numba's kernel cache (NUMBA_CACHE_DIR, else beside the package) by running each
    application's subcommands on tiny inputs, so no job compiles on its ranks. Run it once
    per CPU model (and once with --device cuda on a GPU node), without mpiexec."""
    from medhpc.errors import InputError
    from medhpc.parallel.comm import get_world
    from medhpc.runtime.context import kernel_cache
    from medhpc.runtime.log import Log
    from medhpc.runtime.warmup import warm_up

    world = get_world()

    def check():
        if world.size > 1:
            raise InputError(f"medhpc compile runs on one rank (got {world.size}); run it "
                             "without mpiexec: the ranks of later jobs share the cache")

    world.agree(check)
    log = Log(0, 1, -1 if quiet else 0)
    apps = list(apps) or list(APPS)
    if "ct" in apps:
        try:
            import torch  # noqa: F401
        except ImportError:
            log.notice("ct skipped: ct-train needs PyTorch (pip install 'medhpc[train]')")
            apps.remove("ct")
    seconds = warm_up(apps, device, log)
    log.info(f"kernels of {', '.join(apps)} compiled in {sum(seconds.values()):.0f} s; "
             f"cached in {kernel_cache()}")
