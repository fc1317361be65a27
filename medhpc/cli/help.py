"""``--help`` of every subcommand: options in groups, then an example.

Groups: inputs and outputs, method, parallel, run. An option's group is found from its
name (the shared run and parallel options, and the usual output names) or, failing
that, from its type (paths are inputs or outputs); the rest is the method.
"""

from __future__ import annotations

import click

GROUPS = ("Inputs and outputs", "Method", "Parallel", "Run")
_NAMED = {
    "Parallel": {"device", "threads", "decomp", "ranks_per_pair", "batch_per_rank"},
    "Run": {"config", "seed", "timings", "dry_run", "overwrite", "json_summary", "verbose",
            "quiet", "checkpoint_every", "resume"},
    "Inputs and outputs": {"out", "outs", "png", "log_path", "fields", "save_velocity",
                           "points", "points_outs", "out_dir", "level", "full_res", "tile",
                           "compression", "sensitivity_cache", "images", "source"},
}


def option_group(parameter: click.Parameter) -> str:
    """The help group of ``parameter``."""
    if "--help" in getattr(parameter, "opts", ()):
        return "Run"
    for group, names in _NAMED.items():
        if parameter.name in names:
            return group
    if isinstance(parameter.type, (click.Path, click.File)):
        return "Inputs and outputs"
    return "Method"


class Command(click.Command):
    """A subcommand whose help lists its options by group and ends with an example.

    Parameters
    ----------
    example : str
        Command lines shown under "Example:" at the end of ``--help``.
    """

    def __init__(self, *args, example: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.example = example

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows: dict[str, list] = {group: [] for group in GROUPS}
        for parameter in self.get_params(ctx):
            row = parameter.get_help_record(ctx)
            if row is not None:
                rows[option_group(parameter)].append(row)
        for group in GROUPS:
            if rows[group]:
                with formatter.section(group):
                    formatter.write_dl(rows[group])

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_epilog(ctx, formatter)
        if self.example:
            formatter.write_paragraph()
            formatter.write_text("Example:")
            with formatter.indentation():
                for line in self.example.strip("\n").splitlines():
                    formatter.write(f"{'':>{formatter.current_indent}}{line}\n")


def command(name: str | None = None, **kwargs):
    """``click.command`` with grouped options and an ``example=`` (see :class:`Command`)."""
    return click.command(name, cls=Command, **kwargs)
