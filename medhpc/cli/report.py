"""``medhpc report``: a picture of where the time went, per rank."""

from __future__ import annotations

import click

from medhpc.cli.help import command


@command(example="""\
medhpc report run1/timings.json run2/timings.json --title '1 rank' --title '4 ranks' \\
    --png scaling.png""")
@click.argument("timings", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--png", "out_png", required=True, type=click.Path(dir_okay=False),
              help="Picture to write: stacked stage times per rank.")
@click.option("--title", "titles", multiple=True, help="Panel title (once per TIMINGS file).")
@click.option("--overwrite", is_flag=True, help="Replace the picture if it exists.")
def report(timings, out_png, titles, overwrite):
    """Draw the stage breakdown of one TIMINGS.json (from --timings), or of two side by side
    (before and after) with the speed-up."""
    from medhpc.errors import InputError
    from medhpc.io.atomic import check_output_path
    from medhpc.parallel.comm import get_world
    from medhpc.report import load_breakdown, plot_breakdown

    def read():
        if len(timings) > 2:
            raise InputError(f"got {len(timings)} timing files; expected one, or two "
                             "(before, after)")
        check_output_path(out_png, overwrite, (".png",))
        return [load_breakdown(path) for path in timings]

    world = get_world()
    documents = world.agree(read)  # under mpiexec: one rank draws, every rank agrees
    if world.is_root:
        plot_breakdown(documents, out_png, titles=list(titles) or None, overwrite=overwrite)
        click.echo(f"wrote {out_png}", err=True)
