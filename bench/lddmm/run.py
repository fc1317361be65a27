"""LDDMM benchmark: per-iteration cost against ardent, time to accuracy against dipy SyN and
SimpleITK demons, memory per rank.

One command (``python bench/lddmm/run.py``). Writes ``bench/results/lddmm-<date>.json`` and
prints Markdown tables for ``docs/performance.md``. Every registration runs in its own
process (``--worker``), which reports the CPU seconds (all ranks and threads) and wall
seconds of the registration itself, after the inputs are in memory.

1. Per iteration, on the phantom at 64^3 (and 128^3 with fewer repeats), one level, 5 time
   points: medhpc on 1 and 2 ranks against ardent 1.0.3 (pure NumPy Beg LDDMM). Bar: 20x.
2. Time to accuracy at 64^3 (and 128^3): grey- and white-matter Dice after warping the
   moving labels, share of voxels with det <= 0, CPU seconds: medhpc (defaults, 2 levels)
   against dipy SyN (SSD) and SimpleITK fast symmetric-forces demons. Bar: Dice at least
   dipy's in no more CPU time.
3. Peak memory per rank of ``medhpc lddmm`` at 1, 2 and 4 ranks (measured, and the plan's
   field memory).

Medians of ``--repeats`` runs (the first run of a medhpc configuration fills the JIT cache
and is not counted). Peers that do not import are reported as missing.
"""

from __future__ import annotations

import argparse
import json
import os
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
TIMESTEPS = 5
TISSUES = {"grey": 2, "white": 3}
ARDENT_PUBLISHED_S_PER_ITERATION = {64: 1.8, 128: 20.0}  # docs/lddmm notes, this machine type


def machine() -> dict:
    """CPU, cores, load and the versions this benchmark depends on."""
    return bench_machine(("medhpc", "numpy", "scipy", "numba", "mpi4py", "mpich", "ardent", "dipy", "SimpleITK"))


# -- workers (one registration each, in their own process) ----------------------------------
def _dice(labels, reference) -> dict:
    return {name: float(2 * np.sum((labels == k) & (reference == k))
                        / (np.sum(labels == k) + np.sum(reference == k)))
            for name, k in TISSUES.items()}


def _load(data: Path):
    import nibabel as nib

    def read(name):  # (z, y, x) like medhpc
        volume = np.asarray(nib.load(str(data / name)).dataobj)
        return np.ascontiguousarray(volume.transpose(2, 1, 0))

    return {name: read(f"{name}.nii.gz")
            for name in ("fixed", "moving", "fixed_labels", "moving_labels")}


def worker_medhpc(data: Path, mode: str, iterations: int) -> dict:
    """medhpc in this process (under mpiexec for several ranks)."""
    from contextlib import nullcontext

    from medhpc.lddmm import kernels_cpu
    from medhpc.lddmm.flows import Flows
    from medhpc.lddmm.run import read_inputs
    from medhpc.lddmm.settings import Settings
    from medhpc.lddmm.register import Registration
    from medhpc.lddmm.transform import sample
    from medhpc.parallel import device
    from medhpc.parallel.comm import get_world
    from medhpc.parallel.geometry import slab
    from medhpc.parallel.slabs import gather_volume

    world = get_world()
    device.set_threads(1)  # one thread per rank: ranks give the parallelism
    inputs = read_inputs(data / "fixed.nii.gz", data / "moving.nii.gz", "none", "minmax")
    if mode == "iterations":
        # per iteration against ardent: the same algorithm (Beg's time-varying LDDMM)
        settings = Settings(method="beg", metric="ssd", levels=1, iterations=(iterations,),
                            timesteps=TIMESTEPS, tolerance=0.0)
    else:
        settings = Settings()  # the command line's defaults
    spacing = tuple(inputs.fixed_geometry.spacing_mm[::-1])
    if mode == "iterations":
        # Load every compiled kernel in this process first, so that the timed run holds
        # only iterations (ardent, pure NumPy, has no such start-up).
        warm_up = Settings(method="beg", metric="ssd", levels=1, iterations=(1,),
                           timesteps=TIMESTEPS, tolerance=0.0)
        Registration(world, kernels_cpu, warm_up, inputs.fixed, inputs.moving, spacing,
                     lambda name, kind: nullcontext()).run()
    world.barrier()
    wall, cpu = time.perf_counter(), time.process_time()
    registration = Registration(world, kernels_cpu, settings, inputs.fixed, inputs.moving,
                                spacing, lambda name, kind: nullcontext())
    result = registration.run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    cpu_all = world.sum(cpu)
    wall = world.max(wall)
    steps = len(result.history) - len(result.stopped)
    report = {"tool": f"medhpc {world.size} rank(s)", "ranks": world.size,
              "iterations": steps, "wall_s": wall, "cpu_s": cpu_all}
    if mode == "iterations":
        return report if world.is_root else None
    flows = Flows(world, result.grid, kernels_cpu, settings.timesteps, settings.max_step_voxels,
                  lambda name, kind: nullcontext())
    determinant = flows.determinant(result.forward)
    owned = slab(result.grid.shape[0], world.size, world.rank, 0)
    interior = result.grid.slab.interior
    forward = gather_volume(world, np.ascontiguousarray(result.forward[:, interior]), owned)
    determinant = gather_volume(world, determinant, owned)
    if not world.is_root:
        return None
    images = _load(data)
    points = np.indices(forward.shape[1:], dtype=np.float32) + forward
    warped = sample(images["moving_labels"], points, "label")
    report.update(dice=_dice(warped, images["fixed_labels"]),
                  folded_percent=float(100 * np.mean(determinant <= 0)))
    return report


def worker_ardent(data: Path, iterations: int) -> dict:
    import ardent

    images = _load(data)
    transform = ardent.Transform()
    wall, cpu = time.perf_counter(), time.process_time()
    transform.register(images["moving"].astype(np.float64), images["fixed"].astype(np.float64),
                       template_resolution=1.0, target_resolution=1.0, multiscales=1,
                       num_iterations=iterations, num_affine_only_iterations=0,
                       num_rigid_affine_iterations=0, deformative_stepsize=0.5,
                       sigma_regularization=1e4, num_timesteps=TIMESTEPS, contrast_order=1)
    return {"tool": "ardent", "iterations": iterations, "wall_s": time.perf_counter() - wall,
            "cpu_s": time.process_time() - cpu}


def worker_dipy(data: Path) -> dict:
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import SSDMetric

    images = _load(data)
    static = images["fixed"].astype(np.float64)
    moving = images["moving"].astype(np.float64)
    wall, cpu = time.perf_counter(), time.process_time()
    mapping = SymmetricDiffeomorphicRegistration(SSDMetric(3), level_iters=[100, 100, 25]
                                                 ).optimize(static, moving)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    warped = mapping.transform(images["moving_labels"].astype(np.float64),
                               interpolation="nearest").round().astype(np.int16)
    folded = max(_folded_percent(mapping.forward), _folded_percent(mapping.backward))
    return {"tool": "dipy SyN (SSD)", "wall_s": wall, "cpu_s": cpu,
            "dice": _dice(warped, images["fixed_labels"]), "folded_percent": folded}


def _folded_percent(displacement_zyx_last) -> float:
    """Share of voxels with det(I + Du) <= 0 for a (z, y, x, 3) displacement in voxels."""
    u = np.moveaxis(np.asarray(displacement_zyx_last, np.float64), -1, 0)
    gradient = np.stack([np.stack(np.gradient(u[c]), axis=0) for c in range(3)])
    jacobian = np.moveaxis(gradient, (0, 1), (-2, -1)) + np.eye(3)
    return float(100 * np.mean(np.linalg.det(jacobian) <= 0))


def worker_demons(data: Path) -> dict:
    import SimpleITK as sitk

    images = _load(data)
    fixed = sitk.GetImageFromArray(images["fixed"].astype(np.float32))
    moving = sitk.GetImageFromArray(images["moving"].astype(np.float32))
    wall, cpu = time.perf_counter(), time.process_time()
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(100)
    demons.SetStandardDeviations(1.5)
    field = demons.Execute(fixed, moving)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    determinant = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    labels = sitk.GetImageFromArray(images["moving_labels"].astype(np.int16))
    warped = sitk.GetArrayFromImage(sitk.Resample(labels, fixed, transform,
                                                  sitk.sitkNearestNeighbor, 0))
    return {"tool": "SimpleITK fast symmetric demons", "wall_s": wall, "cpu_s": cpu,
            "dice": _dice(warped, images["fixed_labels"]),
            "folded_percent": float(100 * np.mean(determinant <= 0))}


def run_worker(*args, ranks=None, timeout=1800) -> dict | None:
    """Run ``--worker ...`` in a fresh process; the child's CPU seconds are measured inside."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", *map(str, args)]
    if ranks is not None:
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *command]
    env = dict(os.environ, OMP_NUM_THREADS=str(os.cpu_count() or 1))
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        print(f"worker {' '.join(map(str, args))} failed:\n{result.stderr[-2000:]}",
              file=sys.stderr)
        return None
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def medians(reports: list[dict]) -> dict:
    reports = [r for r in reports if r]
    if not reports:
        return {}
    out = dict(reports[0])
    for key in ("wall_s", "cpu_s"):
        out[key] = statistics.median(r[key] for r in reports)
        out[f"{key}_runs"] = [r[key] for r in reports]
    return out


# -- parts -----------------------------------------------------------------------------------
def phantom(folder: Path, n: int) -> Path:
    from medhpc.phantoms.lddmm import write_lddmm_phantom

    data = folder / f"phantom{n}"
    write_lddmm_phantom(data, (n, n, n), seed=0, overwrite=True)
    return data


def per_iteration(data: Path, n: int, repeats: int, skip_ardent: bool) -> list[dict]:
    iterations = 10 if n <= 64 else 5
    rows = []
    for ranks in (1, 2):
        run_worker("medhpc", data, "iterations", 2, ranks=ranks)  # JIT cache
        report = medians([run_worker("medhpc", data, "iterations", iterations, ranks=ranks)
                          for _ in range(repeats)])
        rows.append(report)
    if not skip_ardent:
        ardent_iterations = 5 if n <= 64 else 2
        rows.append(medians([run_worker("ardent", data, ardent_iterations)
                             for _ in range(max(1, repeats - 1))]) or
                    {"tool": "ardent", "missing": True})
    for row in rows:
        if row.get("iterations"):
            row["wall_s_per_iteration"] = row["wall_s"] / row["iterations"]
            row["cpu_s_per_iteration"] = row["cpu_s"] / row["iterations"]
    ardent = next((r for r in rows if r.get("tool") == "ardent" and "wall_s" in r), None)
    reference = (ardent["wall_s_per_iteration"] if ardent
                 else ARDENT_PUBLISHED_S_PER_ITERATION.get(n))
    for row in rows:
        if "wall_s_per_iteration" in row and reference:
            row["speedup_vs_ardent"] = reference / row["wall_s_per_iteration"]
            row["ardent_reference"] = "measured" if ardent else "published note"
    return rows


def time_to_accuracy(data: Path, repeats: int) -> list[dict]:
    rows = []
    run_worker("medhpc", data, "accuracy", 0, ranks=1)  # JIT cache
    for ranks in (1, 2):
        rows.append(medians([run_worker("medhpc", data, "accuracy", 0, ranks=ranks)
                             for _ in range(repeats)]))
    for tool in ("dipy", "demons"):
        rows.append(medians([run_worker(tool, data) for _ in range(repeats)]) or
                    {"tool": tool, "missing": True})
    return rows


def memory_per_rank(data: Path, folder: Path) -> list[dict]:
    from medhpc.lddmm.run import plan
    from medhpc.lddmm.settings import Settings

    rows = []
    shape = None
    for ranks in (1, 2, 4):
        timings = folder / f"memory-{ranks}.json"
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks),
                   sys.executable, "-m", "medhpc", "lddmm", "--fixed", data / "fixed.nii.gz",
                   "--moving", data / "moving.nii.gz", "--out", folder / f"memory-{ranks}",
                   "--levels", "1", "--iterations", "3", "--timesteps", "10", "--overwrite",
                   "--quiet", "--device", "cpu", "--decomp", "slabs", "--timings", timings]
        result = subprocess.run(list(map(str, command)), capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stderr[-2000:], file=sys.stderr)
            continue
        document = json.loads(timings.read_text())
        if shape is None:
            import nibabel as nib

            shape = nib.load(str(data / "fixed.nii.gz")).shape[::-1]
        estimate = plan(Settings(timesteps=10, levels=1, iterations=(3,)), shape, ranks, "slabs")
        rows.append({"ranks": ranks, "peak_mb_per_rank": document["peak_memory_mb_per_rank"],
                     "fields_mb_per_rank_estimate": [
                         share["memory_bytes"]["total"] / 2 ** 20
                         for share in estimate["ranks_detail"]]})
    return rows


def markdown(results: dict) -> str:
    lines = []
    for n, rows in results["per_iteration"].items():
        lines += ["", f"Per iteration, {n}^3, one level, {TIMESTEPS} time points:", "",
                  "| tool | iterations | wall s / it | CPU s / it | x ardent (wall) |",
                  "| --- | --- | --- | --- | --- |"]
        for row in rows:
            if "wall_s_per_iteration" not in row:
                lines.append(f"| {row.get('tool')} | missing | | | |")
                continue
            speed = row.get("speedup_vs_ardent")
            lines.append(f"| {row['tool']} | {row['iterations']} | "
                         f"{row['wall_s_per_iteration']:.3f}"
                         f" | {row['cpu_s_per_iteration']:.3f} | "
                         f"{'' if speed is None else f'{speed:.1f}'} |")
    for n, rows in results["accuracy"].items():
        lines += ["", f"Time to accuracy, {n}^3:", "",
                  "| tool | CPU s | wall s | Dice grey | Dice white | % det <= 0 |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for row in rows:
            if "dice" not in row:
                lines.append(f"| {row.get('tool')} | missing | | | | |")
                continue
            folded = row.get("folded_percent")
            lines.append(f"| {row['tool']} | {row['cpu_s']:.1f} | {row['wall_s']:.1f} | "
                         f"{row['dice']['grey']:.3f} | {row['dice']['white']:.3f} | "
                         f"{'n/a' if folded is None else f'{folded:.3f}'} |")
    if results.get("memory"):
        lines += ["", f"Peak memory per rank, {results['memory_grid']}^3, 10 time points:", "",
                  "| ranks | measured peak MiB per rank | field estimate MiB per rank |",
                  "| --- | --- | --- |"]
        for row in results["memory"]:
            measured = "/".join(f"{m:.0f}" for m in row["peak_mb_per_rank"])
            estimate = "/".join(f"{m:.0f}" for m in row["fields_mb_per_rank_estimate"])
            lines.append(f"| {row['ranks']} | {measured} | {estimate} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="64,128", help="phantom sizes (the first gets "
                        "--repeats runs, larger ones one run)")
    parser.add_argument("--skip-ardent", action="store_true")
    parser.add_argument("--memory-grid", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        tool, data, *rest = args.worker
        data = Path(data)
        if tool == "medhpc":
            report = worker_medhpc(data, rest[0], int(rest[1]))
        elif tool == "ardent":
            report = worker_ardent(data, int(rest[0]))
        elif tool == "dipy":
            report = worker_dipy(data)
        else:
            report = worker_demons(data)
        if report is not None:
            print(json.dumps(report))
        return 0
    results = {"machine": machine(), "repeats": args.repeats, "per_iteration": {},
               "accuracy": {}, "memory_grid": args.memory_grid}
    sizes = [int(s) for s in args.sizes.split(",") if s]
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        data = {n: phantom(folder, n) for n in sorted(set(sizes + [args.memory_grid]))}
        for index, n in enumerate(sizes):
            repeats = args.repeats if index == 0 else 1
            results["per_iteration"][n] = per_iteration(data[n], n, repeats, args.skip_ardent)
            results["accuracy"][n] = time_to_accuracy(data[n], repeats)
            print(markdown(results), file=sys.stderr)
        results["memory"] = memory_per_rank(data[args.memory_grid], folder)
    results["machine"]["load_average_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"lddmm-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\nresults: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
