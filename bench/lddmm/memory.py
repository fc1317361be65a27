"""Memory per rank of ``medhpc lddmm`` against its own plan, and ANTs beside it.

One command::

    python bench/lddmm/memory.py [--size 192] [--ranks 1,2,4] [--iterations DEFAULT]
        [--no-ants]

The pair: nilearn's MNI152 T1 template at 1 mm (real anatomy, shipped inside nilearn),
centred in a ``size``^3 grid, and the same image through a smooth random warp (Gaussian-
smoothed noise, up to 3 voxels). For every rank count, ``medhpc lddmm --dry-run`` gives the
plan (every rank's arrays at its peak, ``ranks_detail[r].peak_bytes``) and a real run at the
default settings (``--threads 1``) gives each rank's measured peak resident memory
(``VmHWM``, from ``--timings``) and the stage in which it was reached. The runtime's own
memory (Python, numpy, numba with its compiled kernels, MPI) is measured the same way on
a 32^3 block average of the pair (its arrays are negligible there): the **fixed cost**.
The bar: every rank's measured peak within 15% of plan + fixed cost.

ANTs (antspyx, ``SyNOnly``, ANTsPy's default iterations, one thread) registers the same
pair in its own process, which reports its peak resident memory: the one-process peer.

Writes ``bench/results/lddmm-memory-<date>.json`` (machine, versions, every row) and prints
a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.lddmm.realbrain import ONE_THREAD  # noqa: E402
from bench.machine import machine as bench_machine  # noqa: E402
MIB = 2 ** 20
BAR = 0.15

ANTS_SCRIPT = """
import sys, ants
fixed, moving = ants.image_read(sys.argv[1]), ants.image_read(sys.argv[2])
ants.registration(fixed, moving, type_of_transform="SyNOnly", outprefix=sys.argv[3])
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        print(float(line.split()[1]) / 1024.0)
"""


def make_pair(folder: Path, size: int) -> Path:
    """The MNI152 1 mm template centred in ``size``^3, and a smoothly warped copy."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_template
    from scipy import ndimage

    data = np.asarray(load_mni152_template(resolution=1).get_fdata(), np.float32)
    fixed = np.zeros((size,) * 3, np.float32)
    source, target = [], []
    for n in data.shape:
        if n >= size:
            start = (n - size) // 2
            source.append(slice(start, start + size))
            target.append(slice(0, size))
        else:
            start = (size - n) // 2
            source.append(slice(0, n))
            target.append(slice(start, start + n))
    fixed[tuple(target)] = data[tuple(source)]
    rng = np.random.default_rng(0)
    points = np.indices(fixed.shape, dtype=np.float32)
    for axis in range(3):
        noise = ndimage.gaussian_filter(rng.standard_normal(fixed.shape).astype(np.float32), 12)
        points[axis] += 3.0 * noise / np.abs(noise).max()
    moving = ndimage.map_coordinates(fixed, points, order=1).astype(np.float32)
    affine = np.eye(4)
    affine[:3, 3] = -size / 2.0
    for name, image in (("fixed", fixed), ("moving", moving)):
        nib.save(nib.Nifti1Image(image, affine), folder / f"{name}.nii.gz")
        block = image[: size // 6 * 6, : size // 6 * 6, : size // 6 * 6]
        small = block.reshape(size // 6, 6, size // 6, 6, size // 6, 6).mean(axis=(1, 3, 5))
        small_affine = np.diag([6.0, 6.0, 6.0, 1.0])
        small_affine[:3, 3] = affine[:3, 3]
        nib.save(nib.Nifti1Image(small.astype(np.float32), small_affine),
                 folder / f"{name}-small.nii.gz")
    return folder


def medhpc(folder: Path, out: Path, ranks: int, *extra, small=False) -> subprocess.CompletedProcess:
    suffix = "-small" if small else ""
    command = [sys.executable, "-m", "medhpc", "lddmm", "--fixed", folder / f"fixed{suffix}.nii.gz",
               "--moving", folder / f"moving{suffix}.nii.gz", "--out", out, "--device", "cpu",
               "--threads", "1", "--overwrite", "--quiet", *extra]
    if ranks > 1:
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *command]
    env = dict(os.environ, **ONE_THREAD)
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"medhpc failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def measured(folder: Path, work: Path, ranks: int, small=False, iterations=None) -> dict:
    out = work / f"run-{ranks}{'-small' if small else ''}"
    timings = work / f"timings-{ranks}{'-small' if small else ''}.json"
    extra = ["--timings", timings] + (["--iterations", iterations] if iterations else [])
    if small:
        extra += ["--levels", "1", "--iterations", "3"]
    start = time.perf_counter()
    medhpc(folder, out, ranks, *extra, small=small)
    wall = time.perf_counter() - start
    document = json.loads(timings.read_text())
    return {"peak_mib": document["peak_memory_mb_per_rank"],
            "peak_stage": document.get("peak_memory_stage_per_rank"), "wall_s": wall}


def planned(folder: Path, work: Path, ranks: int, iterations=None) -> dict:
    extra = ["--dry-run"] + (["--iterations", iterations] if iterations else [])
    result = medhpc(folder, work / f"plan-{ranks}", ranks, *extra)
    return json.loads(result.stdout)


def ants_peak(folder: Path, work: Path) -> dict | None:
    try:
        import ants  # noqa: F401
    except ImportError:
        return None
    env = dict(os.environ, **ONE_THREAD)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", ANTS_SCRIPT, str(folder / "fixed.nii.gz"),
                             str(folder / "moving.nii.gz"), str(work / "ants-")],
                            capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        return None
    return {"peak_mib": float(result.stdout.split()[-1]),
            "wall_s": time.perf_counter() - start}


def markdown(results: dict) -> str:
    fixed = results["fixed_cost_mib"]
    lines = [f"Peak memory per rank, `medhpc lddmm` defaults, {results['size']}^3 (MNI152 1 mm "
             f"in the grid), fixed cost {fixed:.0f} MiB per process (measured):", "",
             "| ranks | rank | plan (arrays) MiB | plan + fixed MiB | measured MiB | "
             "measured / (plan + fixed) | peak reached in | wall s |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for row in results["rows"]:
        for rank, (plan, peak, stage) in enumerate(zip(row["plan_mib"], row["peak_mib"],
                                                       row["peak_stage"] or [""] * 99)):
            lines.append(f"| {row['ranks']} | {rank} | {plan:.0f} | {plan + fixed:.0f} | "
                         f"{peak:.0f} | {peak / (plan + fixed):.2f} | {stage} | "
                         f"{row['wall_s']:.1f} |")
    if results.get("ants"):
        ants = results["ants"]
        lines += ["", f"ANTs SyNOnly (antspyx, one process, one thread), same pair: "
                      f"{ants['peak_mib']:.0f} MiB peak, {ants['wall_s']:.1f} s wall."]
    verdict = all(abs(ratio - 1.0) <= BAR for row in results["rows"] for ratio in row["ratios"])
    lines += ["", f"Bar (every rank within {BAR:.0%} of plan + fixed cost): "
                  f"{'met' if verdict else 'not met'}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=192)
    parser.add_argument("--ranks", default="1,2,4")
    parser.add_argument("--iterations", default=None,
                        help="medhpc --iterations (default: medhpc's own)")
    parser.add_argument("--no-ants", action="store_true")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lddmm-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    folder = make_pair(work, args.size)
    medhpc(folder, work / "warm-up", 1, "--levels", "1", "--iterations", "2", small=True)
    fixed_cost = max(measured(folder, work, 1, small=True)["peak_mib"])
    rows = []
    for ranks in [int(r) for r in args.ranks.split(",")]:
        plan = planned(folder, work, ranks, args.iterations)
        plan_mib = [share["peak_bytes"] / MIB for share in plan["ranks_detail"]]
        run = measured(folder, work, ranks, iterations=args.iterations)
        rows.append({"ranks": ranks, "plan_mib": plan_mib, **run,
                     "ratios": [peak / (p + fixed_cost)
                                for peak, p in zip(run["peak_mib"], plan_mib)],
                     "plan": plan})
        print(f"{ranks} ranks: plan {[round(p) for p in plan_mib]} MiB + {fixed_cost:.0f}, "
              f"measured {[round(p) for p in run['peak_mib']]} MiB", file=sys.stderr)
    results = {"machine": bench_machine(("medhpc", "numpy", "scipy", "numba", "mpi4py", "mpich",
                                         "nibabel", "nilearn", "antspyx")),
               "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "size": args.size,
               "iterations": args.iterations, "fixed_cost_mib": fixed_cost, "rows": rows,
               "ants": None if args.no_ants else ants_peak(folder, work)}
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"lddmm-memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(markdown(results))
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
