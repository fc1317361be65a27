"""``medhpc phantom``: deterministic test data with ground truth, per application."""

from __future__ import annotations

import click

from medhpc.cli.help import Command
from medhpc.cli.parsing import NumberList


@click.group()
def phantom():
    """Generate phantoms with ground truth (one subcommand per application)."""


@phantom.command("pet", cls=Command, example="""\
medhpc phantom pet --out pet-phantom --scanner small-test""")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for activity.nii.gz, mu_map.nii.gz and phantom.json.")
@click.option("--scanner", default="small-test", show_default=True,
              help="Preset name or TOML file: sets the default image grid.")
@click.option("--shape", type=NumberList(3, int), default=None,
              help="Image shape z,y,x [default: the scanner's grid].")
@click.option("--voxel-mm", type=NumberList(3), default=None,
              help="Voxel size x,y,z in mm [default: the scanner's grid].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the phantom's random shapes and fields.")
@click.option("--overwrite", is_flag=True, help="Replace the folder if it exists.")
def phantom_pet(out, scanner, shape, voxel_mm, seed, overwrite):
    """A NEMA image-quality-like phantom: 6 hot spheres (10-37 mm, 4:1) in a warm body with a
    lung insert, its mu-map (1/mm) and the sphere table."""
    from medhpc.parallel.comm import get_world
    from medhpc.phantoms.pet_files import write_pet_phantom

    world = get_world()
    summary = world.agree(lambda: write_pet_phantom(out, scanner, shape, voxel_mm, seed,
                                                    overwrite))
    if world.is_root:
        shape = "x".join(str(n) for n in reversed(summary["shape_zyx"]))
        click.echo(f"wrote {out}: activity and mu-map {shape} voxels of "
                   f"{'x'.join(f'{v:g}' for v in summary['voxel_mm'])} mm, "
                   f"{len(summary['spheres'])} spheres (phantom.json)", err=True)
