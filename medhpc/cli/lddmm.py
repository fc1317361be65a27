"""LDDMM subcommands: lddmm, lddmm-apply, phantom lddmm. Parse, validate, call."""

from __future__ import annotations

import click

from medhpc.cli.options import pass_run
from medhpc.cli.parsing import NumberList


@click.command("lddmm")
@click.option("--fixed", type=click.Path(), default=None, help="Fixed (target) image.")
@click.option("--moving", type=click.Path(), default=None,
              help="Moving (template) image, registered to the fixed one.")
@click.option("--pairs", type=click.Path(dir_okay=False), default=None,
              help="CSV of fixed,moving[,name] lines: many registrations over the ranks.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--metric", type=click.Choice(["ssd", "ncc", "lncc"]), default="ssd",
              show_default=True, help="Sum of squared differences, global or local NCC.")
@click.option("--radius", type=click.IntRange(min=1), default=2, show_default=True,
              help="Window radius of the local NCC (voxels).")
@click.option("--timesteps", type=click.IntRange(min=1), default=5, show_default=True,
              help="Time points of the velocity.")
@click.option("--alpha", type=click.FloatRange(min=0), default=0.5, show_default=True,
              help="Weight of the Laplacian in L = (-alpha Lap + gamma)^power (mm^2).")
@click.option("--gamma", type=click.FloatRange(min=0, min_open=True), default=1.0,
              show_default=True)
@click.option("--power", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--sigma", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Weight of the similarity: 1/sigma^2 (intensities are scaled to [0, 1]) "
                   "[default: 0.02 for ssd and ncc, 0.1 for lncc].")
@click.option("--levels", type=click.IntRange(min=1), default=3, show_default=True,
              help="Pyramid levels (each halves the grid).")
@click.option("--iterations", type=NumberList(None, int, values="non-negative"),
              default=None,
              help="Iterations per level, coarsest first (the last repeats) [default: 40 at "
                   "the coarsest level, 10 at the finest, 20 between].")
@click.option("--step", type=click.FloatRange(min=0, min_open=True), default=0.2,
              show_default=True, help="First step length of the gradient descent.")
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Stop a level when the energy falls by less than this share 3 times running.")
@click.option("--max-step-voxels", type=click.FloatRange(min=0.5), default=2.0, show_default=True,
              help="Longest semi-Lagrangian substep; sets the halo and the substeps.")
@click.option("--decomp", type=click.Choice(["slabs", "none", "auto"]), default="auto",
              show_default=True, help="slabs: all ranks share one registration along z.")
@click.option("--ranks-per-pair", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --pairs: ranks that share each registration (slabs).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Save a checkpoint every K iterations (always on SIGTERM/SIGUSR1).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
@click.option("--save-velocity", is_flag=True, help="Also store the velocity fields.")
@pass_run("lddmm")
def lddmm(run, fixed, moving, pairs, out, metric, radius, timesteps, alpha, gamma, power, sigma,
          levels,
          iterations, step, tolerance, max_step_voxels, decomp, ranks_per_pair, checkpoint_every,
          resume, save_velocity):
    """Register a moving image to a fixed one with LDDMM (time-varying velocity, Beg et al.),
    spreading the fields over the ranks in z-slabs, or register many pairs."""
    from medhpc.errors import InputError
    from medhpc.lddmm.optimise import Settings
    from medhpc.lddmm.pairs import register_one, register_pairs

    def check_inputs():
        if (pairs is None) == (fixed is None or moving is None) or (
                pairs is not None and (fixed or moving)):
            raise InputError("give --fixed and --moving, or --pairs (not both)")

    run.world.agree(check_inputs)
    from medhpc.lddmm.similarity import DEFAULT_SIGMA

    sigma = DEFAULT_SIGMA[metric] if sigma is None else sigma
    if iterations is None:
        iterations = (40,) + (20,) * (levels - 2) + ((10,) if levels > 1 else ())
    settings = Settings(metric=metric, sigma=sigma, timesteps=timesteps, alpha=alpha, gamma=gamma,
                        power=power, levels=levels, iterations=tuple(iterations), step=step,
                        tolerance=tolerance, max_step_voxels=max_step_voxels, radius=radius)
    options = dict(decomp=decomp, resume=resume, checkpoint_every=checkpoint_every,
                   save_velocity=save_velocity)
    if pairs is None:
        register_one(run, settings, fixed, moving, out, **options)
    else:
        register_pairs(run, settings, pairs, out, ranks_per_pair=ranks_per_pair, **options)


@click.command("lddmm-apply")
@click.option("--transform", required=True, type=click.Path(),
              help="lddmm's transform.h5 (displacements in fixed-grid voxels, world affine).")
@click.option("--image", "images", multiple=True, type=click.Path(),
              help="Image or label map to warp (NIfTI, HDF5, TIFF; repeatable). Default: an "
                   "image of the moving space, written on the fixed grid.")
@click.option("--out", "outs", multiple=True, type=click.Path(dir_okay=False),
              help="Warped image, one per --image in the same order (repeatable).")
@click.option("--points", multiple=True, type=click.Path(dir_okay=False),
              help="CSV of points x,y,z in world mm, RAS as in NIfTI (extra columns kept, "
                   "header row optional; repeatable; ITK/ANTs point CSVs are LPS: negate x "
                   "and y). Default: points of the fixed space mapped to the moving space.")
@click.option("--points-out", "points_outs", multiple=True, type=click.Path(dir_okay=False),
              help="Mapped points CSV (x,y,z world RAS mm, the other columns and header "
                   "kept), one per --points in the same order (repeatable).")
@click.option("--out-dir", type=click.Path(file_okay=False), default=None,
              help="Instead of --out and --points-out: write every output into this folder "
                   "under its input's file name.")
@click.option("--interp", multiple=True, type=click.Choice(["linear", "nearest", "label"]),
              help="Image interpolation: once for every image, or once per --image in the "
                   "same order [default: linear]. label: per-label linear weights, most "
                   "likely label kept.")
@click.option("--inverse", is_flag=True,
              help="The other way: images of the fixed space onto the moving grid, points of "
                   "the moving space to the fixed space.")
@click.option("--overwrite", is_flag=True, help="Replace outputs that exist.")
def lddmm_apply(transform, images, outs, points, points_outs, out_dir, interp, inverse,
                overwrite):
    """Warp images or label maps and map point lists with a transform written by lddmm
    (the world affine and the LDDMM displacement, composed).

    Forward, a fixed-space point p maps to the moving-space point T A_F (y + u(y)) with
    y = A_F^-1 p (u interpolated trilinearly, T the world affine); --inverse maps a
    moving-space point m to A_F (y + w(y)) with y = A_F^-1 T^-1 m.

    \b
    Example:
      medhpc lddmm-apply --transform reg/transform.h5 \\
        --image moving_labels.nii.gz --interp label --out labels_on_fixed.nii.gz \\
        --image moving_t2.nii.gz --interp linear --out t2_on_fixed.nii.gz \\
        --points fixed_landmarks.csv --points-out landmarks_on_moving.csv
    """
    from medhpc.lddmm.pairs import apply_command
    from medhpc.parallel.comm import get_world

    world = get_world()
    message = world.agree(lambda: apply_command(transform, images, outs, interp, inverse,
                                                overwrite, points, points_outs, out_dir))
    if world.is_root:
        click.echo(message, err=True)


@click.command("lddmm")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for fixed/moving images, labels, true_transform.h5, phantom.json.")
@click.option("--shape", type=NumberList(3, int), default="64", show_default=True,
              help="Grid z,y,x (one number: a cube).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace files that exist.")
def phantom_lddmm(out, shape, seed, overwrite):
    """A brain-like pair (4 tissue labels) related by a known smooth diffeomorphism."""
    from medhpc.parallel.comm import get_world
    from medhpc.phantoms.lddmm import write_lddmm_phantom

    world = get_world()
    summary = world.agree(lambda: write_lddmm_phantom(out, shape, seed, overwrite))
    if world.is_root:
        size = "x".join(str(n) for n in reversed(summary["shape_zyx"]))
        click.echo(f"wrote {out}: fixed and moving {size} voxels with tissue labels, "
                   f"deformation up to {summary['amplitude_voxels']:.2g} voxels "
                   f"(true_transform.h5)", err=True)


COMMANDS = [lddmm, lddmm_apply]
PHANTOM_COMMANDS = [phantom_lddmm]
