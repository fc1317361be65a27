"""CT subcommands: ct-prepare, ct-train, ct-segment, ct-register, and ``phantom ct``.

Parse, validate, call. PyTorch is imported only inside ct-train and ct-segment.
"""

from __future__ import annotations

import click

from medhpc.cli.help import command
from medhpc.cli.options import default_of, pass_run
from medhpc.cli.parsing import NumberList, NumberListOrWord
from medhpc.ct.settings import DEFAULT_LR, GRAD_SYNCS, OPTIMIZERS, TASKS, TrainSettings
from medhpc.errors import InputError

DEFAULT_CLASSES = "liver,spleen,kidneys"


def _default(name):
    return default_of(TrainSettings, name)


def _class_names(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise click.BadParameter("expected comma-separated class names")
    return names


@command("ct", example="""\
medhpc phantom ct --out ct-phantom --cases 10""")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for images/case_NNN.nii.gz, labels/case_NNN.nii.gz and phantom.json.")
@click.option("--cases", type=int, default=10, show_default=True, help="Number of cases.")
@click.option("--shape", type=NumberList(3, int), default=None,
              help="Volume shape z,y,x [default: 64,96,96 over 360x360x200 mm].")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the phantom's random shapes and fields.")
@click.option("--overwrite", is_flag=True, help="Replace files that exist.")
def phantom_ct(out, cases, shape, seed, overwrite):
    """CT-like abdominal volumes (body, fat, liver, spleen, kidneys, spine in HU with noise,
    different anatomy per case) with label maps (1 liver, 2 spleen, 3 kidneys)."""
    from pathlib import Path

    from medhpc.io.atomic import check_output_free
    from medhpc.parallel.comm import get_world
    from medhpc.phantoms.ct import write_ct_phantom

    world = get_world()

    def check():
        if not overwrite:
            check_output_free(Path(out) / "phantom.json", overwrite)
        if cases < 1:
            raise click.BadParameter(f"{cases}: expected at least 1", param_hint="--cases")

    world.agree(check)
    summary = world.agree_all(lambda: write_ct_phantom(out, cases, shape, seed, overwrite, world))
    if world.is_root:
        click.echo(f"wrote {out}: {cases} case(s) of "
                   f"{'x'.join(str(n) for n in reversed(summary['shape_zyx']))} voxels at "
                   f"{'x'.join(f'{v:g}' for v in summary['spacing_mm'])} mm, classes "
                   f"{', '.join(summary['classes'])}", err=True)


@command("ct-prepare", example="""\
medhpc ct-prepare --images ct/images --labels ct/labels --out ct/dataset.h5""")
@click.option("--images", required=True, type=click.Path(exists=True),
              help="Folder of CT images: NIfTI files and/or one folder per DICOM series.")
@click.option("--labels", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of label maps named like the images (<case>.nii.gz).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HDF5 dataset.")
@click.option("--classes", default=DEFAULT_CLASSES, show_default=True,
              help="Names of labels 1..n; labels above n are refused.")
@click.option("--spacing-mm", type=NumberListOrWord(3, metavar="x,y,z|auto"), default=None,
              help="Resample to this voxel size x,y,z in mm, or to the target spacing planned "
                   "from the cases (auto: median, finer on a coarse slice axis) [default: keep "
                   "each case's grid].")
@click.option("--clip-hu", type=NumberList(2, values="any", increasing=True, metavar="low,high"),
              default=None,
              help="Clip values to low,high HU [default: keep them].")
@pass_run("ct-prepare")
def ct_prepare(run, images, labels, out, classes, spacing_mm, clip_hu):
    """Convert CT volumes (NIfTI, or DICOM series sorted along the slice normal, in HU) and
    label maps into one chunked HDF5 dataset keeping each case's geometry; cases are spread
    over the ranks."""
    from medhpc.ct.dataset import prepare_dataset

    class_names = _class_names(classes)
    if run.dry_run:
        from medhpc.ct.dataset import find_cases

        cases = run.world.agree(lambda: find_cases(images, labels))
        run.print_plan({"cases": len(cases), "classes": class_names,
                        "spacing_mm": spacing_mm, "clip_hu": clip_hu})
        return
    summary = prepare_dataset(run, images, labels, out, class_names, clip_hu, spacing_mm)
    spacing = summary["spacing_mm"]
    stored = "each case's own grid" if spacing is None else \
        "x".join(f"{v:.3g}" for v in spacing) + " mm"
    run.log.info(f"wrote {out}: {summary['cases']} case(s), {summary['labelled']} labelled; "
                 f"foreground HU {summary['intensity']['low']:.0f}..."
                 f"{summary['intensity']['high']:.0f}; stored at {stored}, target spacing "
                 f"{'x'.join(f'{v:.3g}' for v in summary['target_spacing_mm'])} mm")


def _require_torch(run, command: str) -> None:
    """End with one line (exit 2) on every rank when PyTorch is not installed."""
    def check():
        try:
            import torch  # noqa: F401
        except ImportError:
            raise InputError(f"{command} needs PyTorch: pip install 'medhpc[train]' (CPU build) "
                             "or install your site's CUDA build of torch first") from None
    run.world.agree(check)


@command("ct-train", example="""\
mpiexec -n 4 medhpc ct-train --data ct/dataset.h5 --out ct/run --epochs 100 --png""")
@click.option("--data", required=True, type=click.Path(dir_okay=False),
              help="Dataset written by ct-prepare.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder: model.pt, checkpoint.pt, log.json, log.csv (curves.png).")
@click.option("--task", type=click.Choice(TASKS), default=_default("task"), show_default=True,
              help="Organ segmentation, or deformable registration between cases (a velocity "
                   "field by local NCC and diffusion; Dice of warped labels when labelled); "
                   "ct-register applies a registration model.")
@click.option("--smoothness", type=click.FloatRange(min=0), default=_default("smoothness"),
              show_default=True, help="Registration: weight of the diffusion regulariser.")
@click.option("--label-weight", type=click.FloatRange(min=0), default=_default("label_weight"),
              show_default=True,
              help="Registration: weight of the warped-label Dice term (labelled datasets).")
@click.option("--epochs", type=click.IntRange(min=1), default=_default("epochs"), show_default=True,
              help="Passes of --steps optimiser steps each, validated after each.")
@click.option("--steps", type=click.IntRange(min=1), default=_default("steps"), show_default=True,
              help="Optimisation steps per epoch.")
@click.option("--patch", type=NumberList(3, int), default=None,
              help="Patch z,y,x [default: planned from --gpu-mem-gb].")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Patches per rank per step [default: planned].")
@click.option("--widths", type=str, default=None,
              help="Channels per U-Net stage; the count sets the depth [default: planned: "
                   "32 doubling to 320 for a GPU plan, 8 doubling to 64 on a CPU, as many "
                   "stages as the patch allows].")
@click.option("--deep-supervision", is_flag=True, help="Loss on every decoder level.")
@click.option("--optimizer", type=click.Choice(OPTIMIZERS), default=_default("optimizer"),
              show_default=True, help="SGD Nesterov (momentum 0.99) or AdamW; poly LR decay.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Initial learning rate [default: "
                   + ", ".join(f"{rate:g} {name}" for name, rate in DEFAULT_LR.items()) + "].")
@click.option("--grad-sync", type=click.Choice(GRAD_SYNCS), default=_default("grad_sync"),
              show_default=True,
              help="Average gradients with DDP or one flat MPI all-reduce.")
@click.option("--gpu-mem-gb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Memory budget per GPU for the plan [default: 16 on GPU, 4 on CPU].")
@click.option("--amp/--no-amp", default=None, help="Mixed precision [default: planned].")
@click.option("--checkpointing/--no-checkpointing", default=None,
              help="Activation checkpointing [default: planned].")
@click.option("--folds", type=click.IntRange(min=1), default=_default("folds"), show_default=True,
              help="Cross-validation folds the cases are split into (1: train on all).")
@click.option("--fold", type=click.IntRange(min=0), default=_default("fold"), show_default=True,
              help="Which fold is held out for validation (0 to --folds - 1).")
@click.option("--no-augment", is_flag=True, help="Crop patches without augmentation.")
@click.option("--resume", is_flag=True, help="Continue from RUN/checkpoint.pt.")
@click.option("--png", is_flag=True, help="Also plot the loss and Dice curves.")
@click.option("--sweep", type=click.Path(dir_okay=False), default=None,
              help="TOML file of configurations ([grid] and/or [[configuration]]); each "
                   "runs into OUT/<name>/, summary in OUT/sweep.csv and sweep.jsonl.")
@click.option("--ranks-per-run", type=click.IntRange(min=1), default=1, show_default=True,
              help="With --sweep: ranks per configuration (groups run side by side).")
@pass_run("ct-train")
def ct_train(run, data, out, task, smoothness, label_weight, epochs, steps, patch, batch, widths,
             deep_supervision, optimizer, lr, grad_sync, gpu_mem_gb, amp, checkpointing, folds,
             fold, no_augment, resume, png, sweep, ranks_per_run):
    """Train a 3-D U-Net for organ segmentation or for deformable registration between
    cases, data-parallel over the ranks (gloo on CPU, NCCL on GPU), with a memory plan,
    validation (Dice per organ; for registration also NCC and folding) and checkpoints."""
    _require_torch(run, "ct-train")
    from medhpc.ct.run import Training

    width_list = None
    if widths is not None:
        try:
            width_list = tuple(int(w) for w in widths.split(","))
        except ValueError:
            raise click.BadParameter(f"{widths!r}: expected comma-separated integers",
                                     param_hint="--widths") from None
        if not width_list or min(width_list) < 1:
            raise click.BadParameter(f"{widths!r}: expected positive integers",
                                     param_hint="--widths")
    settings = TrainSettings(task=task, smoothness=smoothness, label_weight=label_weight,
                             epochs=epochs, steps=steps, batch=batch, patch=patch,
                             widths=width_list, deep_supervision=deep_supervision,
                             optimizer=optimizer, lr=lr, grad_sync=grad_sync, amp=amp,
                             checkpointing=checkpointing, gpu_mem_gb=gpu_mem_gb, folds=folds,
                             fold=fold, augment=not no_augment, seed=run.seed)
    if sweep is None:
        Training(run, data, out, settings, resume=resume, png=png).execute()
        return
    from medhpc.ct.sweep import read_sweep, run_sweep

    configurations = run.world.agree(lambda: read_sweep(sweep))
    records = run_sweep(run, data, out, settings, configurations, ranks_per_run,
                        resume=resume, png=png)
    failed = [r["name"] for r in records if r["status"] != "ok"]
    run.summary.update(configurations=len(records), failed=failed)
    run.exit_code = 1 if failed else 0


@command("ct-segment", example="""\
mpiexec -n 4 medhpc ct-segment --model ct/run/model.pt --images new_scans/ \\
    --out segmentations/""")
@click.option("--model", "model_paths", required=True, multiple=True,
              type=click.Path(dir_okay=False),
              help="RUN/model.pt written by ct-train; repeat it for an ensemble of fold models "
                   "(their probabilities are averaged).")
@click.option("--images", required=True, multiple=True, type=click.Path(exists=True),
              help="A folder of images (NIfTI files, DICOM series folders), or image files; "
                   "repeatable.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for <case>.nii.gz label maps (and dice.csv/json with --labels).")
@click.option("--labels", type=click.Path(exists=True, file_okay=False), default=None,
              help="Reference label maps (<case>.nii.gz): print per-organ Dice.")
@click.option("--batch", type=click.IntRange(min=1), default=2, show_default=True,
              help="Windows per forward pass.")
@click.option("--tta", is_flag=True,
              help="Test-time mirroring: average every window over its 8 flips (8x the time).")
@click.option("--postprocess/--no-postprocess", default=True, show_default=True,
              help="Keep only the largest connected component of the classes where ct-train's "
                   "validation showed it helps (stored in the model).")
@click.option("--dicom-seg", is_flag=True,
              help="Also write <case>.seg.dcm, a DICOM Segmentation referencing each input "
                   "DICOM series (needs the dicom extra: highdicom).")
@click.option("--png", is_flag=True,
              help="Also write <case>.png: axial, coronal and sagittal overlays (and the "
                   "reference with --labels).")
@pass_run("ct-segment")
def ct_segment(run, model_paths, images, out, labels, batch, tta, postprocess, dicom_seg, png):
    """Segment CT volumes by sliding windows with Gaussian blending, cases over the ranks;
    label maps on each input's own grid."""
    _require_torch(run, "ct-segment")
    from medhpc.ct.segment import Segmentation

    sources = images[0] if len(images) == 1 else list(images)
    Segmentation(run, list(model_paths), sources, out, labels, batch, tta=tta,
                 postprocess=postprocess, dicom_seg=dicom_seg, png=png).execute()


@command("ct-register", example="""\
medhpc ct-register --model ct/registration/model.pt --fixed a.nii.gz --moving b.nii.gz \\
    --out a_to_b""")
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False),
              help="RUN/model.pt written by ct-train --task registration.")
@click.option("--fixed", type=click.Path(), default=None,
              help="Fixed (target) CT: NIfTI file or DICOM series folder.")
@click.option("--moving", type=click.Path(), default=None,
              help="Moving CT, registered onto the fixed one.")
@click.option("--pairs", type=click.Path(dir_okay=False), default=None,
              help="CSV of fixed,moving[,name] (as lddmm --pairs; '-' reads stdin): pairs "
                   "over the ranks, outputs in OUT/<name>/.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for transform.h5 (lddmm-apply reads it), the ITK warps, "
                   "warped.nii.gz and jacobian.nii.gz.")
@click.option("--moving-labels", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Label map of the moving image: also write warped_labels.nii.gz.")
@click.option("--fixed-labels", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Label map of the fixed image: Dice of the warped labels (dice.json).")
@click.option("--refine", type=click.IntRange(min=0), default=0, show_default=True,
              help="Refine the network's velocity for each pair by this many Adam iterations "
                   "of the NCC + diffusion loss on the fixed grid (0: the network alone).")
@pass_run("ct-register")
def ct_register(run, model_path, fixed, moving, pairs, out, moving_labels, fixed_labels,
                refine):
    """Register CT volumes with a trained registration network (one forward pass per pair,
    a diffeomorphism by scaling and squaring), writing the same transform files as lddmm."""
    _require_torch(run, "ct-register")
    from medhpc.ct.register import Registration

    if pairs is not None:
        if fixed is not None or moving is not None:
            raise click.UsageError("give --fixed and --moving, or --pairs, not both")
        if moving_labels is not None or fixed_labels is not None:
            raise click.UsageError("--moving-labels/--fixed-labels: for one pair "
                                   "(--fixed, --moving); with --pairs use lddmm-apply")
        from medhpc.lddmm.run import read_pairs

        pair_list = run.world.agree(lambda: read_pairs(pairs))
    elif fixed is None or moving is None:
        raise click.UsageError("expected --fixed and --moving, or --pairs")
    else:
        pair_list = [{"fixed": fixed, "moving": moving, "name": None}]
    Registration(run, model_path, pair_list, out, moving_labels, fixed_labels,
                 refine).execute()


COMMANDS = [ct_prepare, ct_train, ct_segment, ct_register]
PHANTOM_COMMANDS = [phantom_ct]
