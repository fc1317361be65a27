"""LDDMM subcommands: lddmm, lddmm-apply, phantom lddmm. Parse, validate, call."""

from __future__ import annotations

import click

from medhpc.cli.help import command
from medhpc.cli.options import default_of, pass_run
from medhpc.cli.parsing import NumberList
from medhpc.lddmm.settings import (DEFAULT_SIGMA, DEFAULT_UPDATE_VOXELS, MAX_BINS, MIN_BINS,
                                    Settings)


def _default(name):
    return default_of(Settings, name)


def _per_metric(table: dict) -> str:
    """A per-metric defaults table as help text."""
    return ", ".join(f"{value:g} for {metric}" for metric, value in table.items())


def _iterations_default() -> str:
    *coarse, finest = _default("iterations")
    return ", ".join(str(count) for count in coarse) + f", then {finest} per finer level"


@command("lddmm", example="""\
mpiexec -n 4 medhpc lddmm --fixed t1_atlas.nii.gz --moving t1_subject.nii.gz \\
    --out reg/ --timings reg/timings.json
medhpc lddmm-apply --transform reg/transform.h5 --image labels.nii.gz \\
    --interp label --out labels_on_atlas.nii.gz
find subjects -name 't1.nii.gz' | sed 's|^|atlas.nii.gz,|' | \\
    mpiexec -n 8 medhpc lddmm --pairs - --out group/ | grep transform.h5""")
@click.option("--fixed", type=click.Path(), default=None, help="Fixed (target) image.")
@click.option("--moving", type=click.Path(), default=None,
              help="Moving (template) image, registered to the fixed one.")
@click.option("--pairs", type=click.Path(dir_okay=False), default=None,
              help="CSV of fixed,moving[,name] lines (- reads them from stdin): many "
                   "registrations over the ranks.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--initial-transform", default="affine", show_default=True,
              help="Start: affine or rigid (registered first by global correlation, by "
                   "mutual information with --metric mi), none, "
                   "or a file: ITK .txt/.tfm/.mat affine or a 4x4 text matrix (world RAS mm, "
                   "fixed to moving).")
@click.option("--fixed-mask", type=click.Path(), default=None,
              help="Mask on the fixed grid: only voxels inside it drive the registration.")
@click.option("--moving-mask", type=click.Path(), default=None,
              help="Mask on the moving image: its outside is left out of the similarity.")
@click.option("--normalise", type=click.Choice(["percentile", "histogram", "minmax"]),
              default="percentile", show_default=True,
              help="Intensities: 0.5-99.5 percentiles of the foreground to [0, 1]; histogram "
                   "also matches the moving histogram to the fixed one; minmax scales min-max.")
@click.option("--method", type=click.Choice(["symmetric", "beg"]), default=_default("method"),
              show_default=True,
              help="symmetric: stationary velocity, both images pulled half-way, local "
                   "correlation; beg: time-varying velocity by gradient descent (Beg et al.).")
@click.option("--metric", type=click.Choice(["lncc", "mi", "ncc", "ssd"]),
              default=_default("metric"), show_default=True,
              help="Similarity: local NCC, mutual information (multimodal pairs, e.g. T1 to "
                   "T2 or CT to MR), global NCC or squared differences (symmetric takes lncc "
                   "or mi; beg takes lncc, ncc or ssd).")
@click.option("--bins", type=click.IntRange(MIN_BINS, MAX_BINS), default=_default("bins"),
              show_default=True,
              help="Histogram bins of the mutual information per image (--metric mi; the "
                   "normalised intensities [0, 1] span bins - 3 bin widths).")
@click.option("--radius", type=click.IntRange(min=1), default=_default("radius"),
              show_default=True, help="Window radius of the local NCC (voxels of each level).")
@click.option("--fluid-sigma", type=click.FloatRange(min=0), default=_default("fluid_sigma_mm"),
              show_default=True, help="Gaussian sigma of each update (mm; symmetric).")
@click.option("--diffusion-sigma", type=click.FloatRange(min=0),
              default=_default("diffusion_sigma_mm"), show_default=True,
              help="Gaussian sigma applied to the velocity after each update (mm; symmetric).")
@click.option("--update-voxels", type=click.FloatRange(min=0, min_open=True),
              default=None,
              help="Longest update of one iteration (voxels of the level; symmetric) "
                   f"[default: {_per_metric(DEFAULT_UPDATE_VOXELS)}].")
@click.option("--timesteps", type=click.IntRange(min=1), default=_default("timesteps"),
              show_default=True, help="Time points of the velocity (beg).")
@click.option("--alpha", type=click.FloatRange(min=0), default=_default("alpha"),
              show_default=True,
              help="Weight of the Laplacian in L = (-alpha Lap + gamma)^power (mm^2; beg).")
@click.option("--gamma", type=click.FloatRange(min=0, min_open=True), default=_default("gamma"),
              show_default=True, help="Identity weight in L (beg).")
@click.option("--power", type=click.IntRange(min=1), default=_default("power"),
              show_default=True, help="Power of L (beg).")
@click.option("--sigma", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Weight of the similarity: 1/sigma^2 (beg) "
                   f"[default: {_per_metric(DEFAULT_SIGMA)}].")
@click.option("--step", type=click.FloatRange(min=0, min_open=True), default=_default("step"),
              show_default=True, help="First step length of the gradient descent (beg).")
@click.option("--levels", type=click.IntRange(min=0), default=_default("levels"),
              show_default=True,
              help="Pyramid levels (each halves the grid); 0: coarsest voxel about 8 mm.")
@click.option("--iterations", type=NumberList(None, int, values="non-negative"),
              default=None, help="Iterations per level, coarsest first (the last repeats) "
                                 f"[default: {_iterations_default()}].")
@click.option("--tolerance", type=click.FloatRange(min=0), default=_default("tolerance"),
              show_default=True,
              help="Stop a level when the energy falls by less than this share (over 5 "
                   "iterations for symmetric, 3 in a row for beg); 0: never.")
@click.option("--max-step-voxels", type=click.FloatRange(min=0.5),
              default=_default("max_step_voxels"), show_default=True,
              help="Longest semi-Lagrangian substep (voxels); sets the halo and the substeps.")
@click.option("--decomp", type=click.Choice(["slabs", "none", "auto"]), default="auto",
              show_default=True, help="slabs: all ranks share one registration along z.")
@click.option("--ranks-per-pair", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --pairs: ranks that share each registration (slabs).")
@click.option("--checkpoint-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="Save a checkpoint every K iterations (always on SIGTERM/SIGUSR1).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
@click.option("--save-velocity", is_flag=True, help="Also store the velocity fields.")
@pass_run("lddmm")
def lddmm(run, fixed, moving, pairs, out, initial_transform, fixed_mask, moving_mask, normalise,
          method, metric, bins, radius, fluid_sigma, diffusion_sigma, update_voxels, timesteps,
          alpha, gamma, power, sigma, step, levels, iterations, tolerance, max_step_voxels,
          decomp, ranks_per_pair, checkpoint_every, resume, save_velocity):
    """Register a moving image to a fixed one: an affine start, then a diffeomorphism
    (symmetric stationary velocity with local correlation or mutual information, or Beg's
    time-varying LDDMM), spreading the fields over the ranks in z-slabs, or register many
    pairs."""
    from medhpc.errors import InputError
    from medhpc.lddmm.pairs import register_one, register_pairs

    def check_inputs():
        if (pairs is None) == (fixed is None or moving is None) or (
                pairs is not None and (fixed or moving)):
            raise InputError("give --fixed and --moving, or --pairs (not both)")
        if pairs is not None and (fixed_mask or moving_mask):
            raise InputError("--fixed-mask/--moving-mask go with --fixed and --moving, not "
                             "--pairs")

    run.world.agree(check_inputs)
    settings = Settings(method=method, metric=metric, sigma=sigma, timesteps=timesteps,
                        alpha=alpha, gamma=gamma, power=power, levels=levels,
                        iterations=tuple(iterations) if iterations else _default("iterations"),
                        step=step, tolerance=tolerance, max_step_voxels=max_step_voxels,
                        radius=radius, fluid_sigma_mm=fluid_sigma,
                        diffusion_sigma_mm=diffusion_sigma, update_voxels=update_voxels,
                        bins=bins)
    options = dict(decomp=decomp, resume=resume, checkpoint_every=checkpoint_every,
                   save_velocity=save_velocity, initial_transform=initial_transform,
                   normalise=normalise)
    if pairs is None:
        register_one(run, settings, fixed, moving, out, fixed_mask=fixed_mask,
                     moving_mask=moving_mask, **options)
    else:
        register_pairs(run, settings, pairs, out, ranks_per_pair=ranks_per_pair, **options)


@command("lddmm-apply", example="""\
medhpc lddmm-apply --transform reg/transform.h5 \\
    --image moving_labels.nii.gz --interp label --out labels_on_fixed.nii.gz \\
    --image moving_t2.nii.gz --interp linear --out t2_on_fixed.nii.gz \\
    --points fixed_landmarks.csv --points-out landmarks_on_moving.csv""")
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
    """
    from medhpc.lddmm.pairs import apply_command
    from medhpc.parallel.comm import get_world

    world = get_world()
    message = world.agree(lambda: apply_command(transform, images, outs, interp, inverse,
                                                overwrite, points, points_outs, out_dir))
    if world.is_root:
        click.echo(message, err=True)


@command("lddmm", example="""\
medhpc phantom lddmm --out lddmm-phantom --shape 64""")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for fixed/moving images, labels, true_transform.h5, phantom.json.")
@click.option("--shape", type=NumberList(3, int), default="64", show_default=True,
              help="Grid z,y,x (one number: a cube).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the phantom's random shapes and fields.")
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
