"""Entry points of the commands: one pair, many pairs (groups of ranks), lddmm-apply."""

from __future__ import annotations

from pathlib import Path

from medhpc.errors import InputError
from medhpc.lddmm.job import PairRegistration, plan, read_inputs, read_pairs, write_summary
from medhpc.lddmm.optimise import Settings
from medhpc.parallel.work import map_items


def register_one(run, settings: Settings, fixed, moving, out, decomp="auto", resume=False,
                 checkpoint_every=0, save_velocity=False) -> None:
    """``medhpc lddmm --fixed --moving --out``: one registration over all ranks."""
    job = PairRegistration(run, run.world, settings, fixed, moving, out, decomp=decomp,
                           resume=resume, checkpoint_every=checkpoint_every,
                           save_velocity=save_velocity, overwrite=run.overwrite)
    if run.dry_run:
        inputs, mode = job.prepare()
        run.print_plan(plan(settings, inputs.fixed.shape, run.world.size, mode))
        return
    summary = job.execute()
    document = run.finish({"decomposition": job.decomp})
    if run.world.is_root:
        job.write_log(document)
        run.log.info(f"registered {moving} to {fixed}: energy {summary['energy']:.6g}, "
                     f"{100 * summary['folded_share']:.3g}% voxels with det <= 0, "
                     f"inverse consistency {summary['inverse_consistency_mean_voxels']:.3g} "
                     f"voxels; outputs in {out}")


def register_pairs(run, settings: Settings, pairs_path, out, ranks_per_pair=1, decomp="auto",
                   resume=False, checkpoint_every=0, save_velocity=False) -> None:
    """``medhpc lddmm --pairs``: groups of ``ranks_per_pair`` ranks take pairs from a queue.

    Rank 0 of each group takes part in the queue; the others of its group follow
    their leader's pairs. ``summary.csv`` in ``out`` lists every pair.
    """
    world = run.world
    out = Path(out)

    def validated():
        if world.size % ranks_per_pair:
            raise InputError(f"--ranks-per-pair {ranks_per_pair} does not divide the "
                             f"{world.size} ranks; expected a divisor")
        from medhpc.io.atomic import check_output_free

        check_output_free(out / "summary.csv", run.overwrite)
        return read_pairs(pairs_path)

    pairs = world.agree(validated)
    if run.dry_run:
        run.print_plan({"pairs": len(pairs), "ranks_per_pair": ranks_per_pair,
                        "groups": world.size // ranks_per_pair})
        return
    group = world.split(world.rank // ranks_per_pair)
    leaders = world.split(0 if group.rank == 0 else 1)

    def run_pair(index):
        pair = pairs[index]
        job = PairRegistration(run, group, settings, pair["fixed"], pair["moving"],
                               out / pair["name"], decomp="slabs" if ranks_per_pair > 1 else decomp,
                               resume=resume, checkpoint_every=checkpoint_every,
                               save_velocity=save_velocity, overwrite=run.overwrite)
        summary = job.execute()
        job.write_log(None)
        return summary

    def lead(index):
        if ranks_per_pair > 1:
            group.bcast(index)
        return _attempt(run_pair, index)

    results = None
    if group.rank == 0:
        outcomes = map_items(leaders, list(range(len(pairs))),
                             lead, schedule="dynamic",
                             gather_to="root")
        if ranks_per_pair > 1:
            group.bcast(None)
        results = outcomes
    else:
        while True:
            index = group.bcast(None)
            if index is None:
                break
            _attempt(run_pair, index)
    run.finish({"pairs": len(pairs), "ranks_per_pair": ranks_per_pair})
    if world.is_root and results is not None:
        rows = []
        for pair, (summary, error) in zip(pairs, results):
            row = {"name": pair["name"], "fixed": str(pair["fixed"]),
                   "moving": str(pair["moving"]), "status": "ok" if error is None else "failed",
                   "error": error or ""}
            row.update(summary or {})
            rows.append(row)
        write_summary(out, rows, run.overwrite)
        failed = sum(1 for row in rows if row["status"] != "ok")
        run.log.info(f"{len(rows) - failed} of {len(rows)} pairs registered; summary in "
                     f"{out / 'summary.csv'}")


def _attempt(register, index):
    """``(summary, None)``, or ``(None, message)`` when the pair's inputs are bad."""
    try:
        return register(index), None
    except InputError as exc:
        return None, str(exc)


def apply_command(transform_path, image_path, out, interpolation, inverse, overwrite) -> str:
    """``medhpc lddmm-apply``: warp one image; return the line to print."""
    import numpy as np

    from medhpc.io.atomic import check_output_free
    from medhpc.io.images import read_image, write_image
    from medhpc.lddmm.transform import apply_transform, read_transform

    check_output_free(out, overwrite)
    transform = read_transform(transform_path)
    image, geometry = read_image(image_path, ndim=3)
    if interpolation == "label" and not np.all(np.equal(np.mod(image, 1), 0)):
        raise InputError(f"{image_path}: --interp label needs integer labels; the image has "
                         f"fractional values (use linear)")
    warped, grid = apply_transform(transform, image, geometry, interpolation, inverse)
    write_image(out, warped, grid, overwrite=overwrite)
    return f"wrote {out}: {grid.describe()}, {interpolation} interpolation" + (
        " (inverse)" if inverse else "")


__all__ = ["register_one", "register_pairs", "apply_command", "read_inputs"]
