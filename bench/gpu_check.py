"""Check every CUDA kernel against its CPU twin and time it, then time subcommands on the GPU.

Run through ``bench/gpu_check.sh`` on a machine with one NVIDIA GPU (it installs nothing
from the network). Three parts:

1. accuracy: each entry of :data:`CHECKS` builds fresh random inputs of a small size, runs
   the CPU twin (``medhpc/<pkg>/<stem>_cpu.py``) and the CUDA twin (``<stem>_cuda.py``,
   same launcher name and signature) and reports the relative error
   ``max |cuda - cpu| / max |cpu|``;
2. kernel timing: the CUDA twin again at a realistic size, median of several runs timed
   with CUDA events (device-side);
3. subcommands and the projector: ``medhpc pet-recon --device cuda`` on a simulated
   small-test sinogram (wall time and its stage breakdown), and the Joseph projector on one
   subset of ``ge-dmi-4ring`` (215 x 215 x 71 at 2.78 mm), forward and back, non-TOF and TOF,
   in million LORs per second.

A new kernel is one more :class:`Check` in :data:`CHECKS`, or in what
``checks(Check)`` of ``bench/<application>/gpu_checks.py`` returns. Writes ``gpu_check.json`` and
``gpu_check.txt`` to ``$OUT`` (else ``bench/results/``). Without a GPU it says so and exits 0;
``NUMBA_ENABLE_CUDASIM=1 python bench/gpu_check.py --smoke`` runs parts 1-2 at tiny sizes in
numba's CUDA simulator (a test does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
GE_DMI_IMAGE = (71, 215, 215)  # z, y, x
GE_DMI_VOXEL_MM = 2.78


# -- the table of checks ----------------------------------------------------------------------
@dataclass
class Check:
    """One CUDA kernel and its CPU twin.

    ``make(rng, size)`` returns the launcher's arguments (host arrays and scalars) for a
    problem of ``size`` ("check": small enough for the CPU, "time": realistic, "smoke": tiny
    for the simulator). ``outputs`` are the indices of the arguments the launcher writes
    (compared and timed); an empty tuple compares the launcher's return value.
    ``work(args)`` gives the number of items processed (for the rate column).
    """

    name: str
    package: str
    stem: str
    function: str
    make: Callable
    outputs: tuple = ()
    tolerance: float = 1e-5
    work: Callable = field(default=lambda args: 0)
    unit: str = "items"


def _image(rng, shape):
    return (rng.random(shape, dtype=np.float32) + 0.1).astype(np.float32)


SIZES = {
    # name: (image shape z,y,x, flat measurement count, LOR count)
    "smoke": ((3, 5, 6), 64, 12),
    "check": ((16, 32, 32), 20_000, 4_000),
    "time": (GE_DMI_IMAGE, 415 * 34 * 1296, 415 * 34 * 1296),
}


def _measurements(rng, size):
    n = SIZES[size][1]
    measured = rng.poisson(3.0, n).astype(np.float32)
    projection = rng.random(n, dtype=np.float32) + 0.1
    multiplicative = rng.random(n, dtype=np.float32) + 0.5
    additive = rng.random(n, dtype=np.float32) * 0.1
    return [measured, projection, multiplicative, additive, 1]


def _lors(rng, shape, n, voxel_mm):
    """Random LORs: pairs of points on a cylinder around the image (most cross it)."""
    nz, ny, nx = shape
    radius = 0.6 * max(nx * voxel_mm[0], ny * voxel_mm[1])
    half_z = 0.5 * nz * voxel_mm[2]
    ends = []
    for _ in range(2):
        angle = rng.uniform(0, 2 * np.pi, n)
        z = rng.uniform(-half_z, half_z, n)
        ends.append(np.stack([radius * np.cos(angle), radius * np.sin(angle), z], axis=1)
                    .astype(np.float32))
    return ends


def _projector_geometry(size):
    shape = SIZES[size][0]
    voxel = np.array([GE_DMI_VOXEL_MM] * 3 if size == "time" else [4.0, 4.0, 2.0],
                     dtype=np.float32)
    origin = (-(np.array(shape[::-1], dtype=np.float32) - 1) / 2 * voxel).astype(np.float32)
    return shape, origin, voxel


def _ge_dmi_lors(subsets=8):
    """End points of subset 0 of ge-dmi-4ring (415 x 34 views x 1296 planes)."""
    from medhpc.pet.scanner import load_scanner, lor_endpoints, subset_views

    scanner = load_scanner("ge-dmi-4ring")
    xstart, xend = lor_endpoints(scanner, views=subset_views(scanner.n_views, subsets, 0))
    return xstart.reshape(-1, 3), xend.reshape(-1, 3)


def _projector_inputs(rng, size, tof_bins, back):
    shape, origin, voxel = _projector_geometry(size)
    if size == "time":
        xstart, xend = _ge_dmi_lors()
    else:
        xstart, xend = _lors(rng, shape, SIZES[size][2], voxel)
    n = xstart.shape[0]
    values_shape = (n,) if tof_bins == 1 else (n, tof_bins)
    if tof_bins == 1:
        tof = ()
    else:
        tof = _lor_tof_kernels(rng, n, size, voxel)
    if back:
        values = rng.random(values_shape, dtype=np.float32)
        return [values, xstart, xend, origin, voxel, *tof, np.zeros(shape, np.float32)]
    return [_image(rng, shape), xstart, xend, origin, voxel, *tof,
            np.zeros(values_shape, np.float32)]


def _lor_tof_kernels(rng, n, size, voxel):
    """(bin_mm, sigma_mm, offset_mm, cutoff): each LOR its own kernel, as from a timing
    calibration (CTR spread +-10 %, offsets up to +-1.5 bin)."""
    if size == "time":
        bin_mm, sigma_mm = 25.371, 24.5  # ge-dmi-4ring-tof: 385 ps CTR
    else:
        bin_mm, sigma_mm = float(voxel[0]) * 3.0, float(voxel[0]) * 2.5  # small image
    sigma = (sigma_mm * rng.uniform(0.9, 1.1, n)).astype(np.float32)
    offset = (bin_mm * rng.uniform(-1.5, 1.5, n)).astype(np.float32)
    return bin_mm, sigma, offset, 3.0


def _lor_count(args):
    return args[1].shape[0]


def _summed_tof_inputs(rng, size):
    """joseph_back_tof_summed: one value per LOR, the TOF binning as for joseph_back_tof."""
    values, xstart, xend, origin, voxel, image = _projector_inputs(rng, size, 1, back=True)
    bins = 29 if size == "time" else 7
    tof = _projector_inputs(rng, size, bins, back=True)[5:9]
    return [values, xstart, xend, origin, voxel, bins, *tof, image]


def _member_inputs(rng, size, repeat):
    """sum_members / repeat_members: span-11-like planes of 1 to 6 ring pairs, 8 views of
    the DMI's 415 radial bins as rows at the timing size."""
    rows = {"smoke": 6, "check": 400, "time": 415 * 8}[size]
    counts = 1 + np.arange({"smoke": 5, "check": 40, "time": 263}[size]) % 6
    first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    planes, members = len(counts), int(first[-1])
    if repeat:
        plane_of = np.repeat(np.arange(planes, dtype=np.int64), counts)
        return [rng.random((rows, planes, 1), dtype=np.float32), plane_of,
                np.zeros((rows, members, 1), np.float32)]
    return [rng.random((rows, members, 1), dtype=np.float32), first,
            np.zeros((rows, planes, 1), np.float32)]


CHECKS = [
    Check("gaussian convolve_axis", "medhpc.filters", "kernels", "convolve_axis",
          lambda rng, size: [_image(rng, SIZES[size][0]),
                             np.array([0.05, 0.25, 0.4, 0.25, 0.05], np.float32), 2,
                             np.zeros(SIZES[size][0], np.float32)],
          outputs=(3,), work=lambda args: args[0].size, unit="voxels"),
    Check("em_ratio", "medhpc.pet", "em", "em_ratio",
          lambda rng, size: _measurements(rng, size) + [np.zeros(SIZES[size][1], np.float32)],
          outputs=(5,), work=lambda args: args[0].size, unit="bins"),
    Check("poisson_log_likelihood", "medhpc.pet", "em", "poisson_log_likelihood",
          _measurements, tolerance=1e-4, work=lambda args: args[0].size, unit="bins"),
    Check("listmode_log_likelihood", "medhpc.pet", "em", "listmode_log_likelihood",
          lambda rng, size: _measurements(rng, size)[1:4], tolerance=1e-4,
          work=lambda args: args[0].size, unit="events"),
    Check("image_dot", "medhpc.pet", "em", "image_dot",
          lambda rng, size: [_image(rng, SIZES[size][0]), _image(rng, SIZES[size][0])],
          tolerance=1e-4, work=lambda args: args[0].size, unit="voxels"),
    Check("bsrem_update", "medhpc.pet", "em", "bsrem_update",
          lambda rng, size: [_image(rng, SIZES[size][0]), _image(rng, SIZES[size][0]),
                             _image(rng, SIZES[size][0]) + 0.5, _image(rng, SIZES[size][0]),
                             0.3, 0.7],
          outputs=(0,), tolerance=1e-4, work=lambda args: args[0].size, unit="voxels"),
    Check("em_update", "medhpc.pet", "em", "em_update",
          lambda rng, size: [_image(rng, SIZES[size][0]), _image(rng, SIZES[size][0]),
                             _image(rng, SIZES[size][0])],
          outputs=(0,), work=lambda args: args[0].size, unit="voxels"),
    Check("rdp_gradient", "medhpc.pet", "em", "rdp_gradient",
          lambda rng, size: [_image(rng, SIZES[size][0]), 2.0, 1e-3,
                             np.zeros(SIZES[size][0], np.float32)],
          outputs=(3,), tolerance=1e-4, work=lambda args: args[0].size, unit="voxels"),
    Check("osl_denominator", "medhpc.pet", "em", "osl_denominator",
          lambda rng, size: [_image(rng, SIZES[size][0]), _image(rng, SIZES[size][0]) - 0.5, 0.3,
                             np.zeros(SIZES[size][0], np.float32)],
          outputs=(3,), work=lambda args: args[0].size, unit="voxels"),
    Check("joseph_forward", "medhpc.pet", "kernels", "joseph_forward",
          lambda rng, size: _projector_inputs(rng, size, 1, back=False),
          outputs=(5,), tolerance=1e-4, work=_lor_count, unit="LORs"),
    Check("joseph_back", "medhpc.pet", "kernels", "joseph_back",
          lambda rng, size: _projector_inputs(rng, size, 1, back=True),
          outputs=(5,), tolerance=1e-4, work=_lor_count, unit="LORs"),
    Check("joseph_forward_tof", "medhpc.pet", "kernels", "joseph_forward_tof",
          lambda rng, size: _projector_inputs(rng, size, 29 if size == "time" else 7, back=False),
          outputs=(9,), tolerance=1e-4, work=_lor_count, unit="LORs"),
    Check("joseph_back_tof", "medhpc.pet", "kernels", "joseph_back_tof",
          lambda rng, size: _projector_inputs(rng, size, 29 if size == "time" else 7, back=True),
          outputs=(9,), tolerance=1e-4, work=_lor_count, unit="LORs"),
    Check("joseph_back_tof_summed", "medhpc.pet", "kernels", "joseph_back_tof_summed",
          _summed_tof_inputs, outputs=(10,), tolerance=1e-4, work=_lor_count, unit="LORs"),
    Check("sum_members", "medhpc.pet", "kernels", "sum_members",
          lambda rng, size: _member_inputs(rng, size, repeat=False), outputs=(2,),
          tolerance=1e-5, work=lambda args: args[2].size, unit="bins"),
    Check("repeat_members", "medhpc.pet", "kernels", "repeat_members",
          lambda rng, size: _member_inputs(rng, size, repeat=True), outputs=(2,),
          work=lambda args: args[2].size, unit="bins"),
]



def _application_checks() -> list:
    """The checks of ``bench/<application>/gpu_checks.py``: each defines ``checks(Check)``
    returning a list of :class:`Check` (given the class, so it need not import this script)."""
    import importlib.util

    found = []
    for path in sorted(Path(__file__).resolve().parent.glob("*/gpu_checks.py")):
        spec = importlib.util.spec_from_file_location(f"gpu_checks_{path.parent.name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        found.extend(module.checks(Check))
    return found


CHECKS += _application_checks()

# -- running one check ------------------------------------------------------------------------
def _launchers(check: Check):
    from medhpc import backend

    cpu = getattr(backend.kernels(check.package, "cpu", check.stem), check.function)
    gpu = getattr(backend.kernels(check.package, "cuda", check.stem), check.function)
    return cpu, gpu


def _to_device(args):
    from numba import cuda

    return [cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in args]


def _host_copies(args):
    return [a.copy() if isinstance(a, np.ndarray) else a for a in args]


def relative_error(result, reference) -> float:
    result = np.asarray(result, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    scale = float(np.max(np.abs(reference))) if reference.size else 0.0
    difference = float(np.max(np.abs(result - reference))) if reference.size else 0.0
    return difference / scale if scale > 0 else difference


def compare(check: Check, size: str, seed: int) -> dict:
    """Run both twins on the same fresh random inputs; return the worst relative error."""
    cpu, gpu = _launchers(check)
    args = check.make(np.random.default_rng(seed), size)
    cpu_args, gpu_args = _host_copies(args), _to_device(args)
    cpu_return = cpu(*cpu_args)
    gpu_return = gpu(*gpu_args)
    if check.outputs:
        errors = [relative_error(gpu_args[i].copy_to_host(), cpu_args[i]) for i in check.outputs]
    else:
        errors = [relative_error(gpu_return, cpu_return)]
    error = max(errors)
    return {"relative_error": error, "tolerance": check.tolerance,
            "ok": bool(np.isfinite(error) and error <= check.tolerance)}


def time_kernel(check: Check, size: str, seed: int, repeats: int) -> dict:
    """Median device time (CUDA events) of the CUDA twin at ``size``."""
    from numba import cuda

    _, gpu = _launchers(check)
    args = check.make(np.random.default_rng(seed), size)
    gpu_args = _to_device(args)
    gpu(*gpu_args)  # compile and warm up
    cuda.synchronize()
    times = []
    for _ in range(repeats):
        if SIMULATOR:  # the simulator has no events: host timing
            begin = time.perf_counter()
            gpu(*gpu_args)
            times.append(time.perf_counter() - begin)
            continue
        start, stop = cuda.event(), cuda.event()
        start.record()
        gpu(*gpu_args)
        stop.record()
        stop.synchronize()
        times.append(cuda.event_elapsed_time(start, stop) / 1e3)
    median = statistics.median(times)
    items = check.work(args)
    return {"median_s": median, "runs": repeats, "items": items, "unit": check.unit,
            "clock": "host (simulator)" if SIMULATOR else "CUDA events",
            "rate_per_s": items / median if median > 0 else None}


# -- subcommands ------------------------------------------------------------------------------
def _medhpc(*args, timeout=300):
    env = dict(os.environ)
    env.pop("NUMBA_ENABLE_CUDASIM", None)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "medhpc", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)
    return done, time.perf_counter() - started


def time_pet_recon(folder: Path) -> dict:
    """pet-simulate + pet-recon --device cuda on the small-test scanner (wall and stages)."""
    steps = [("phantom", ["phantom", "pet", "--out", folder / "phantom"]),
             ("pet-simulate", ["pet-simulate", "--activity", folder / "phantom/activity.nii.gz",
                               "--mu-map", folder / "phantom/mu_map.nii.gz", "--scanner",
                               "small-test", "--counts", "2e7", "--device", "cuda",
                               "--out", folder / "sinogram.h5"])]
    result = {}
    for name, args in steps:
        done, wall = _medhpc(*args)
        if done.returncode != 0:
            return {"ok": False, "failed": name, "stderr": done.stderr[-3000:]}
        result[f"{name}_wall_s"] = wall
    walls = []
    for run in range(3):
        timings = folder / f"timings-{run}.json"
        done, wall = _medhpc("pet-recon", "--sinogram", folder / "sinogram.h5", "--out",
                             folder / "recon.nii.gz", "--iterations", 3, "--subsets", 8,
                             "--device", "cuda", "--timings", timings, "--overwrite")
        if done.returncode != 0:
            return {"ok": False, "failed": "pet-recon", "stderr": done.stderr[-3000:], **result}
        walls.append(wall)
    result.update({"ok": True, "pet_recon_wall_s": walls,
                   "pet_recon_median_s": statistics.median(walls[1:]),
                   "note": "the first run includes JIT compilation (numba cache in a temp dir)",
                   "pet_recon_stages": json.loads(timings.read_text())})
    return result


# -- driver -----------------------------------------------------------------------------------
def gpu_description() -> dict | None:
    """The GPU numba sees, or None without one (the simulator counts as one)."""
    try:
        from numba import cuda
    except ImportError:
        return None
    if SIMULATOR:
        return {"name": "numba CUDA simulator", "compute_capability": None}
    try:
        if not cuda.is_available() or len(cuda.gpus) == 0:
            return None
        device = cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
        return {"name": name, "compute_capability": list(device.compute_capability),
                "driver": ".".join(map(str, cuda.cudadrv.driver.driver.get_version()))}
    except Exception:  # no driver, broken driver
        return None


def _format_table(results: dict) -> str:
    lines = [f"GPU: {results['gpu']['name'] if results['gpu'] else 'none'}; mode {results['mode']}",
             f"{'kernel':26s} {'rel. error':>11s} {'ok':>4s} {'median ms':>10s} {'rate':>18s}"]
    for entry in results["kernels"]:
        acc, timing = entry.get("accuracy", {}), entry.get("timing", {})
        error = f"{acc['relative_error']:.2e}" if "relative_error" in acc else "-"
        ok = ("yes" if acc.get("ok") else "NO") if acc else "-"
        median = f"{timing['median_s'] * 1e3:.3f}" if "median_s" in timing else "-"
        rate = (f"{timing['rate_per_s'] / 1e6:.1f} M {timing['unit']}/s"
                if timing.get("rate_per_s") else "-")
        note = f"  ({entry['error']})" if "error" in entry else ""
        lines.append(f"{entry['name']:26s} {error:>11s} {ok:>4s} {median:>10s} {rate:>18s}{note}")
    recon = results.get("pet_recon")
    if recon:
        if recon.get("ok"):
            lines.append(f"pet-recon --device cuda (small-test, 3 it x 8 subsets): median "
                         f"{recon['pet_recon_median_s']:.2f} s wall (runs "
                         f"{', '.join(f'{w:.2f}' for w in recon['pet_recon_wall_s'])})")
        else:
            lines.append(f"pet-recon --device cuda: FAILED at {recon.get('failed')}")
    lines.append(f"total {results['elapsed_s']:.1f} s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, no subcommands (for the CUDA simulator)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per kernel")
    parser.add_argument("--only", default=None, help="comma-separated check names")
    parser.add_argument("--seed", type=int, default=None, help="default: fresh inputs each run")
    parser.add_argument("--no-subcommands", action="store_true")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="skip remaining timings after this many seconds")
    options = parser.parse_args(argv)

    started = time.perf_counter()
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    seed = options.seed if options.seed is not None else int.from_bytes(os.urandom(4), "little")
    gpu = gpu_description()
    results = {"gpu": gpu, "mode": "smoke" if options.smoke else "full", "seed": seed,
               "python": platform.python_version(), "simulator": SIMULATOR, "kernels": []}
    if gpu is None:
        message = ("gpu_check: no CUDA GPU usable here (no NVIDIA driver/GPU, or numba-cuda "
                   "missing): nothing checked. Run it on a GPU node, or in the simulator: "
                   "NUMBA_ENABLE_CUDASIM=1 python bench/gpu_check.py --smoke")
        print(message)
        results.update({"skipped": message, "elapsed_s": time.perf_counter() - started})
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")
        return 0
    if SIMULATOR and not options.smoke:
        print("gpu_check: the CUDA simulator only runs --smoke", file=sys.stderr)
        return 2

    check_size, time_size = ("smoke", "smoke") if options.smoke else ("check", "time")
    repeats = options.repeats or (2 if options.smoke else 5)
    wanted = set(options.only.split(",")) if options.only else None
    failures = 0
    for index, check in enumerate(CHECKS):
        if wanted and check.name not in wanted and check.function not in wanted:
            continue
        entry = {"name": check.name, "module": f"{check.package}.{check.stem}_cuda",
                 "function": check.function}
        try:
            entry["accuracy"] = compare(check, check_size, seed + index)
            failures += not entry["accuracy"]["ok"]
            if time.perf_counter() - started < options.budget_s:
                entry["timing"] = time_kernel(check, time_size, seed + index, repeats)
            else:
                entry["timing"] = {"skipped": "time budget spent"}
        except ImportError as exc:
            entry["error"] = f"not available: {exc}"
        except Exception as exc:  # report and go on with the other kernels
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()
            failures += 1
        results["kernels"].append(entry)
        print(f"{check.name}: {entry.get('accuracy', entry.get('error'))}", flush=True)

    if not (options.smoke or options.no_subcommands):
        if time.perf_counter() - started < options.budget_s:
            with tempfile.TemporaryDirectory(prefix="medhpc-gpu-check-") as folder:
                results["pet_recon"] = time_pet_recon(Path(folder))
            failures += not results["pet_recon"].get("ok", False)
        else:
            results["pet_recon"] = {"ok": False, "failed": "time budget spent"}
        results["projector_ge_dmi_subset"] = {
            entry["name"]: {"M_LORs_per_s": entry["timing"]["rate_per_s"] / 1e6,
                            "median_s": entry["timing"]["median_s"],
                            "lors": entry["timing"]["items"]}
            for entry in results["kernels"]
            if entry["name"].startswith("joseph") and entry.get("timing", {}).get("rate_per_s")}
        results["projector_image"] = {"shape_zyx": list(GE_DMI_IMAGE),
                                      "voxel_mm": GE_DMI_VOXEL_MM, "subset": "0 of 8 (34 views)"}

    results["failures"] = failures
    results["elapsed_s"] = time.perf_counter() - started
    table = _format_table(results)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "gpu_check.txt").write_text(table)
    print(table, end="")
    print(f"results in {out}/gpu_check.json and gpu_check.txt")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
