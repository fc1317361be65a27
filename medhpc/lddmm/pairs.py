"""Entry points of the commands: one pair, many pairs (groups of ranks), lddmm-apply."""

from __future__ import annotations

from pathlib import Path

from medhpc.errors import InputError, MedhpcError
from medhpc.io.atomic import publish_together
from medhpc.lddmm.run import PairRegistration, plan, read_inputs, read_pairs, write_summary
from medhpc.lddmm.settings import Settings
from medhpc.parallel.work import map_items
from medhpc.runtime.memory import return_large_blocks


def register_one(run, settings: Settings, fixed, moving, out, decomp="auto", resume=False,
                 checkpoint_every=0, save_velocity=False, initial_transform="affine",
                 normalise="percentile", fixed_mask=None, moving_mask=None) -> None:
    """``medhpc lddmm --fixed --moving --out``: one registration over all ranks."""
    return_large_blocks()
    job = PairRegistration(run, run.world, settings, fixed, moving, out, decomp=decomp,
                           resume=resume, checkpoint_every=checkpoint_every,
                           save_velocity=save_velocity, overwrite=run.overwrite,
                           initial_transform=initial_transform, normalise=normalise,
                           fixed_mask=fixed_mask, moving_mask=moving_mask)
    if run.dry_run:
        inputs, mode = job.prepare()
        spacing = tuple(inputs.fixed_geometry.spacing_mm[::-1])
        run.print_plan(plan(job.settings, inputs.fixed_geometry.shape, run.world.size, mode,
                            spacing, inputs.moving_geometry.shape,
                            bool(fixed_mask or moving_mask)))
        return
    with publish_together():  # the outputs, the log and --timings appear together or not at all
        summary = job.execute()
        document = run.finish({"decomposition": job.decomp})
        if run.world.is_root:
            job.write_log(document)
    run.summary.update(summary or {})
    if run.world.is_root:
        run.log.info(f"registered {moving} to {fixed}: energy {summary['energy']:.6g}, "
                     f"{100 * summary['folded_share']:.3g}% voxels with det <= 0, "
                     f"inverse consistency {summary['inverse_consistency_mean_voxels']:.3g} "
                     f"voxels; outputs in {out}")


def register_pairs(run, settings: Settings, pairs_path, out, ranks_per_pair=1, decomp="auto",
                   resume=False, checkpoint_every=0, save_velocity=False,
                   initial_transform="affine", normalise="percentile") -> None:
    """``medhpc lddmm --pairs``: groups of ``ranks_per_pair`` ranks take pairs from a queue.

    Rank 0 of each group takes part in the queue; the others of its group follow
    their leader's pairs. ``summary.csv`` in ``out`` lists every pair.
    """
    return_large_blocks()
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
                               save_velocity=save_velocity, overwrite=run.overwrite,
                               initial_transform=initial_transform, normalise=normalise)
        summary = job.execute()
        job.write_log(None)
        return summary

    def lead(index):
        if ranks_per_pair > 1:
            group.bcast(index)
        return _attempt(run_pair, index)

    results = None
    if group.rank == 0:
        show = run.log.counter("pairs registered")
        outcomes = map_items(leaders, list(range(len(pairs))), lead, schedule="dynamic",
                             gather_to="root", progress=show)
        show.end()
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
    rows = []
    if world.is_root and results is not None:
        for pair, (summary, error) in zip(pairs, results):
            row = {"name": pair["name"], "fixed": str(pair["fixed"]),
                   "moving": str(pair["moving"]), "status": "ok" if error is None else "failed",
                   "error": error or ""}
            row.update(summary or {})
            rows.append(row)
        write_summary(out, rows, run.overwrite)
        failed = sum(1 for row in rows if row["status"] != "ok")
        run.summary.update(pairs=len(rows), registered=len(rows) - failed, failed=failed)
        run.log.info(f"{len(rows) - failed} of {len(rows)} pairs registered; summary in "
                     f"{out / 'summary.csv'}")

    def every_pair_failed():
        failures = [row for row in rows if row["status"] != "ok"]
        if rows and len(failures) == len(rows):
            raise MedhpcError(f"none of the {len(rows)} pairs registered (first: "
                              f"{failures[0]['error']}); summary in {out / 'summary.csv'}")

    world.agree(every_pair_failed)


def _attempt(register, index):
    """``(summary, None)``, or ``(None, message)`` when the pair's inputs are bad."""
    try:
        return register(index), None
    except InputError as exc:
        return None, str(exc)


def apply_outputs(images, outs, points, points_outs, out_dir=None,
                  interpolations=()) -> list[dict]:
    """What ``lddmm-apply`` reads and writes: one ``{kind, input, out, interpolation}`` per
    ``--image`` (kind ``image``) and per ``--points`` (kind ``points``), in that order.

    Each ``--image`` pairs with the ``--out`` at its place and each ``--points`` with the
    ``--points-out`` at its place; ``out_dir`` instead writes every output in that folder
    under its input's file name. ``interpolations``: none (linear), one for every image or
    one per image.
    """
    from medhpc.io.images import split_dataset

    images, outs, points, points_outs = ([value] if isinstance(value, (str, Path)) else
                                         list(value or ())
                                         for value in (images, outs, points, points_outs))
    interpolations = ([interpolations] if isinstance(interpolations, str) else
                      list(interpolations or ())) or ["linear"]
    if not images and not points:
        raise InputError("nothing to map; expected at least one --image or --points")
    if out_dir is not None:
        if outs or points_outs:
            raise InputError("--out-dir with --out or --points-out; expected either --out-dir "
                             "or one --out per --image and one --points-out per --points")
        outs = [Path(out_dir) / split_dataset(path)[0].name for path in images]
        points_outs = [Path(out_dir) / Path(path).name for path in points]
    for inputs, outputs, option, out_option in ((images, outs, "--image", "--out"),
                                                (points, points_outs, "--points",
                                                 "--points-out")):
        if len(inputs) != len(outputs):
            raise InputError(f"{len(inputs)} {option} and {len(outputs)} {out_option}; "
                             f"expected one {out_option} per {option}, in the same order")
    if len(interpolations) not in (1, len(images)):
        raise InputError(f"{len(interpolations)} --interp for {len(images)} --image; expected "
                         f"one for every image or one per --image, in the same order")
    if len(interpolations) == 1:
        interpolations = interpolations * len(images)
    jobs = [{"kind": "image", "input": Path(i), "out": Path(o), "interpolation": interp}
            for i, o, interp in zip(images, outs, interpolations)]
    jobs += [{"kind": "points", "input": Path(i), "out": Path(o), "interpolation": None}
             for i, o in zip(points, points_outs)]
    seen = {}
    for job in jobs:
        key = job["out"].resolve()
        if key in seen:
            raise InputError(f"{job['out']}: the output of both {seen[key]} and {job['input']}"
                             f"; expected one output file per input")
        if key == job["input"].resolve():
            raise InputError(f"{job['out']}: the output is its own input; expected another "
                             f"file or folder")
        seen[key] = job["input"]
    return jobs


def apply_command(transform_path, images, outs, interpolations, inverse, overwrite,
                  points=(), points_outs=(), out_dir=None) -> str:
    """``medhpc lddmm-apply``: warp images and map point lists; return the lines to print.

    Every output is checked free and every point list read before anything is written;
    the images are then read, warped and written one at a time.
    """
    import numpy as np

    from medhpc.io.atomic import check_output_free
    from medhpc.io.images import image_format, read_image, split_dataset, write_image
    from medhpc.io.points import read_world_points, write_world_points
    from medhpc.lddmm.transform import apply_transform, map_world_points, read_transform

    jobs = apply_outputs(images, outs, points, points_outs, out_dir, interpolations)
    for job in jobs:
        check_output_free(job["out"], overwrite)
        if job["kind"] == "image":
            source = split_dataset(job["input"])[0]
            image_format(source)
            image_format(split_dataset(job["out"])[0])
            if not source.is_file():
                raise InputError(f"{source}: image not found; expected an existing image "
                                 f"to warp")
        else:
            job["table"] = read_world_points(job["input"])
    transform = read_transform(transform_path)
    direction = " (inverse)" if inverse else ""
    lines = []
    for job in jobs:
        if job["kind"] == "points":
            moved, inside = map_world_points(transform, job["table"].xyz, inverse)
            write_world_points(job["out"], job["table"], moved, overwrite=overwrite)
            outside = int(np.count_nonzero(~inside))
            lines.append(f"wrote {job['out']}: {len(moved)} points "
                         f"{'moving -> fixed' if inverse else 'fixed -> moving'} space"
                         + (f", {outside} outside the fixed grid (nearest border displacement)"
                            if outside else ""))
            continue
        image, geometry = read_image(job["input"], ndim=3)
        interpolation = job["interpolation"]
        if interpolation == "label" and not np.all(np.equal(np.mod(image, 1), 0)):
            raise InputError(f"{job['input']}: --interp label needs integer labels; the image "
                             f"has fractional values (use linear)")
        warped, grid = apply_transform(transform, image, geometry, interpolation, inverse)
        write_image(job["out"], warped, grid, overwrite=overwrite)
        lines.append(f"wrote {job['out']}: {grid.describe()}, {interpolation} "
                     f"interpolation{direction}")
    return "\n".join(lines)


__all__ = ["register_one", "register_pairs", "apply_command", "apply_outputs", "read_inputs"]
