"""CT correspondence benchmark: ct-train --task registration + ct-register against lddmm on
the same held-out phantom pairs, in the same run.

One command: ``python bench/ct/registration.py``. Writes
``bench/results/ct-registration-<date>.json`` and prints a Markdown table for
``docs/ct.md`` / ``docs/performance.md``.

1. ``phantom ct``: ``--cases`` CT-like abdominal volumes (different anatomy per case) with
   liver, spleen and kidney labels; ``ct-prepare`` at ``--train-spacing`` (the network's grid).
2. ``ct-train --task registration`` on the training fold's ordered pairs (local NCC +
   diffusion + warped-label Dice), 2 ranks, one thread each.
3. On every ordered pair of the held-out fold: ``ct-register`` (the network on the model's
   grid, the transform on the fixed image's grid), ``ct-register --refine 10`` (plus 10
   Adam iterations on the pair's velocity on the fixed grid) and ``lddmm`` with its defaults
   (affine start, then the symmetric diffeomorphic stage), each over all pairs in one
   ``--pairs`` process with 2 threads; every method's moving labels are warped onto the
   fixed image by ``lddmm-apply --interp label`` through its ``transform.h5`` and compared
   with the fixed labels. Reported per method: Dice per organ pooled over pairs, the median
   of the per-pair mean Dice, the largest share of voxels with ``det(I + Du) <= 0``, and wall
   and CPU seconds (user + system of the process tree) per pair: the process's total over
   the number of pairs, start-up included. Training is reported separately: it is paid once.

Phantoms are generated here; they say how the two methods compare on the same pairs, not
how either does on patients.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.machine import machine as bench_machine  # noqa: E402

CLASSES = ("liver", "spleen", "kidneys")


def machine() -> dict:
    return bench_machine(("medhpc", "torch", "numpy", "numba", "mpi4py", "mpich", "h5py"))


def medhpc(*args, ranks=None, threads=None):
    """Run medhpc; return (wall seconds, CPU seconds of the process tree)."""
    command = [sys.executable, "-m", "medhpc", *map(str, args)]
    if threads is not None:
        command += ["--threads", str(threads)]
    if ranks is not None:
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *command]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def counts(warped: np.ndarray, reference: np.ndarray) -> np.ndarray:
    from medhpc.ct.loss import confusion_counts

    return confusion_counts(warped, reference, len(CLASSES))


def folded_share(jacobian_path: Path) -> float:
    from medhpc.io.nifti import read_nifti

    return float(np.mean(read_nifti(jacobian_path)[0] <= 0))


def evaluate(pairs, images: Path, labels: Path, model: Path, folder: Path, threads: int,
             refine: int):
    """Per pair and method: counts, folding; per method: wall and CPU seconds per pair.

    Each method runs once over all pairs (its ``--pairs`` mode, one process: start-up paid
    once, as a user would run a cohort); each method's moving labels are warped through
    its transform.h5 by ``lddmm-apply --interp label``.
    """
    from medhpc.io.nifti import read_nifti

    table = folder / "pairs.csv"
    table.write_text("fixed,moving,name\n" + "".join(
        f"{images / f'{f}.nii.gz'},{images / f'{m}.nii.gz'},{m}-{f}\n" for m, f in pairs))
    methods = {"medhpc ct-register": ("ct-register", "--model", model),
               f"medhpc ct-register --refine {refine}": ("ct-register", "--model", model,
                                                           "--refine", refine),
               "medhpc lddmm (defaults)": ("lddmm",)}
    timing, rows = {}, []
    for index, (method, command) in enumerate(methods.items()):
        out = folder / f"method{index}"
        wall, cpu = medhpc(*command, "--pairs", table, "--out", out, "--device", "cpu",
                           "--quiet", threads=threads)
        timing[method] = (wall / len(pairs), cpu / len(pairs))
        for moving, fixed in pairs:
            pair = out / f"{moving}-{fixed}"
            medhpc("lddmm-apply", "--transform", pair / "transform.h5", "--image",
                   labels / f"{moving}.nii.gz", "--out", pair / "warped_labels.nii.gz",
                   "--interp", "label")
            reference = read_nifti(labels / f"{fixed}.nii.gz")[0]
            rows.append({"pair": f"{moving}->{fixed}", "method": method,
                         "counts": counts(read_nifti(pair / "warped_labels.nii.gz")[0],
                                          reference),
                         "folded": folded_share(pair / "jacobian.nii.gz"),
                         "wall_s": timing[method][0], "cpu_s": timing[method][1]})
        print(f"{method}: {timing[method][0]:.1f} s per pair", file=sys.stderr, flush=True)
    for moving, fixed in pairs:
        rows.append({"pair": f"{moving}->{fixed}", "method": "none (identity)",
                     "counts": counts(read_nifti(labels / f"{moving}.nii.gz")[0],
                                      read_nifti(labels / f"{fixed}.nii.gz")[0]),
                     "folded": 0.0, "wall_s": 0.0, "cpu_s": 0.0})
    return rows


def dice(counts_array) -> np.ndarray:
    from medhpc.ct.loss import dice_from_counts

    return dice_from_counts(np.asarray(counts_array, np.float64))


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        pooled = dice(sum(np.asarray(r["counts"]) for r in mine))
        table.append({"method": method, "pairs": len(mine),
                      "dice": dict(zip(CLASSES, map(float, pooled))),
                      "median_pair_mean_dice": float(statistics.median(
                          np.nanmean(dice(r["counts"])) for r in mine)),
                      "folded_share_max": float(max(r["folded"] for r in mine)),
                      "wall_s_per_pair": float(statistics.median(r["wall_s"] for r in mine)),
                      "cpu_s_per_pair": float(statistics.median(r["cpu_s"] for r in mine))})
    return table


def markdown(results: dict) -> str:
    lines = ["| method | liver | spleen | kidneys | median pair Dice | folded voxels (max) "
             "| wall s / pair | CPU s / pair |", "|---|---|---|---|---|---|---|---|"]
    for row in results["summary"]:
        d = row["dice"]
        lines.append(f"| {row['method']} | {d['liver']:.3f} | {d['spleen']:.3f} | "
                     f"{d['kidneys']:.3f} | {row['median_pair_mean_dice']:.3f} | "
                     f"{row['folded_share_max']:.2g} | {row['wall_s_per_pair']:.1f} | "
                     f"{row['cpu_s_per_pair']:.1f} |")
    training = results["training"]
    lines.append(f"\nTraining (once): {training['wall_s']:.0f} s wall on "
                 f"{training['ranks']} ranks, {training['cpu_s']:.0f} CPU s, "
                 f"{training['steps']} steps of {training['global_batch']} pairs; "
                 f"{results['pairs']} held-out ordered pairs of {results['cases']} phantoms "
                 f"({results['shape']} voxels, network grid {results['train_spacing_mm']} mm).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--shape", default="32,48,48", help="Phantom shape z,y,x.")
    parser.add_argument("--train-spacing", default="15,15,12.5",
                        help="ct-prepare --spacing-mm x,y,z of the network's grid.")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--widths", default="16,32")
    parser.add_argument("--patch", default="16,24,24")
    parser.add_argument("--threads", type=int, default=2, help="Threads per registration.")
    parser.add_argument("--max-pairs", type=int, default=12)
    parser.add_argument("--refine", type=int, default=10,
                        help="ct-register --refine iterations of the refined column.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    from medhpc.ct.dataset import CtDataset
    from medhpc.ct.run import split_folds
    from medhpc.phantoms.ct import write_ct_phantom

    shape = tuple(int(v) for v in args.shape.split(","))
    results = {"machine": machine(), "cases": args.cases, "shape": args.shape,
               "train_spacing_mm": args.train_spacing, "folds": args.folds}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        write_ct_phantom(folder / "phantoms", args.cases, shape, seed=3)
        images, labels = folder / "phantoms" / "images", folder / "phantoms" / "labels"
        dataset = folder / "data.h5"
        medhpc("ct-prepare", "--images", images, "--labels", labels, "--out", dataset,
               "--clip-hu", "-200,300", "--spacing-mm", args.train_spacing, "--quiet")
        run = folder / "run"
        batch = 2
        wall, cpu = medhpc("ct-train", "--task", "registration", "--data", dataset, "--out", run,
                           "--widths", args.widths, "--patch", args.patch, "--batch", batch,
                           "--epochs", args.epochs, "--steps", args.steps, "--optimizer",
                           "adamw", "--lr", "1e-2", "--no-augment", "--folds", args.folds,
                           "--device", "cpu", "--quiet", ranks=2, threads=1)
        log = json.loads((run / "log.json").read_text())
        results["training"] = {"wall_s": wall, "cpu_s": cpu, "ranks": 2,
                               "steps": args.epochs * args.steps, "global_batch": 2 * batch,
                               "validation": log["epochs_run"][-1]}
        _, held_out = split_folds(CtDataset(dataset).names, args.folds, 0)
        pairs = [(m, f) for m in held_out for f in held_out if m != f][:args.max_pairs]
        results["pairs"] = len(pairs)
        rows = evaluate(pairs, images, labels, run / "model.pt", folder, args.threads,
                        args.refine)
    results["rows"] = [{**r, "counts": np.asarray(r["counts"]).tolist()} for r in rows]
    results["summary"] = summarise(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"ct-registration-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\nresults: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
