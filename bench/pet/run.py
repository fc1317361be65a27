"""PET benchmark: projector throughput, a peer side by side, OSEM strong scaling, memory.

One command (``make bench`` or ``python bench/pet/run.py``). Writes
``bench/results/pet-<date>.json`` and prints Markdown tables for
``docs/performance.md``.

1. Joseph projector on one subset of ``ge-dmi-4ring`` (8 of 272 views, 4.30 M LORs;
   215 x 215 x 71 image at 2.78 mm): forward and back, non-TOF and TOF, M LORs/s per
   core with one thread, and with every core. Bar (published, parallelproj 1.10.2 C/OpenMP,
   1 core, same problem): 0.56 M LORs/s forward, 0.28 back.
2. The same kind of work side by side with ``skimage.transform.radon`` (215 x 215 image,
   272 angles) in this run, with their agreement as an accuracy cross-check.
3. One OSEM iteration (34 subsets) of a 4-ring slice of the DMI (1.8 M LORs, 215 x 215 x 7)
   at 1 and 2 ranks (views and planes), stage breakdown and peak memory per rank.
4. List mode: the same slice's counts as events (``pet-simulate --listmode``); one list-mode
   OSEM iteration (34 subsets by event order) at 1 rank x 1 thread and 2 ranks x 1 thread,
   events/s per core of the iteration's kernels, beside the sinogram iteration of the same
   counts in the same run.
5. Scatter: single-scatter simulation on the ge-dmi-4ring with the NEMA-like phantom on its
   default grid (215 x 215 x 71 at 2.78 mm): the SSS samples, and their interpolation to 8
   views (scaled to all 272), CPU-seconds with 1 thread.
6. Axial compression: one subset (8 views) of the DMI up to ring difference 27 at span 1
   (1224 planes) and span 11 (263 planes summing the same 1224 ring pairs): forward and back
   CPU-seconds with 1 thread, and the cost of summing the ring pairs into planes (and of
   its adjoint) within them.

Every time is the median of ``--repeats`` runs after one warm-up run (JIT compilation).
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
BAR_FORWARD = 0.56
BAR_BACK = 0.28


def machine() -> dict:
    """CPU, cores, load and the versions this benchmark depends on."""
    return bench_machine(("medhpc", "numpy", "numba", "scikit-image", "mpi4py", "mpich", "h5py"))


def median_time(function, repeats: int, clock=time.perf_counter) -> float:
    """Median time of ``function()`` by ``clock`` (wall; ``time.process_time``: this
    process's CPU-seconds) over ``repeats`` runs, after one warm-up."""
    function()
    times = []
    for _ in range(repeats):
        start = clock()
        function()
        times.append(clock() - start)
    return statistics.median(times)


def dmi_subset_projector(tof: bool, lors_limit: int | None = None):
    from medhpc.io.geometry import ImageGeometry
    from medhpc.pet.projector import JosephProjector
    from medhpc.pet.projector import tof_spec
    from medhpc.pet.scanner import load_scanner, lor_endpoints, subset_views

    scanner = load_scanner("ge-dmi-4ring-tof" if tof else "ge-dmi-4ring")
    grid = ImageGeometry.from_spacing((71, 215, 215), 2.78)
    xstart, xend = lor_endpoints(scanner, views=subset_views(scanner.n_views, 34, 0))
    xstart, xend = xstart.reshape(-1, 3), xend.reshape(-1, 3)
    if lors_limit is not None:
        pick = np.linspace(0, len(xstart) - 1, lors_limit).astype(np.int64)
        xstart, xend = xstart[pick], xend[pick]
    projector = JosephProjector(xstart, xend, grid.shape, grid.origin_mm, grid.spacing_mm,
                                tof=tof_spec(scanner) if tof else None)
    return projector, grid


def tof_sensitivity(repeats: int, tof_lors: int) -> dict:
    """The TOF sensitivity image of one DMI TOF subset, one thread: the factors repeated in
    every bin and back-projected bin by bin, against one pass with the bins' weight sums
    (``JosephProjector.back_every_bin``), beside the non-TOF back projection."""
    import numba

    from medhpc.pet.projector import JosephProjector

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    projector, _ = dmi_subset_projector(True, tof_lors)
    plain = JosephProjector(projector.xstart, projector.xend, projector.image_shape,
                            projector.origin_mm, projector.voxel_mm)
    factors = np.random.default_rng(0).uniform(0.5, 1.0, projector.n_lors).astype(np.float32)
    repeated = np.repeat(factors, projector.tof.bins).reshape(projector.shape_out)
    cpu = time.process_time
    bin_by_bin = median_time(lambda: projector.back(repeated), repeats, cpu)
    one_pass = median_time(lambda: projector.back_every_bin(factors), repeats, cpu)
    non_tof = median_time(lambda: plain.back(factors), repeats, cpu)
    reference, fast = projector.back(repeated), projector.back_every_bin(factors)
    numba.set_num_threads(threads)
    return {"lors": projector.n_lors, "tof_bins": projector.tof.bins,
            "bin_by_bin_cpu_s": bin_by_bin, "one_pass_cpu_s": one_pass, "non_tof_cpu_s": non_tof,
            "speedup": bin_by_bin / one_pass,
            "max_relative_difference": float(np.abs(fast - reference).max() / reference.max())}


def baseline_kernels(revision: str, folder: Path):
    """``medhpc.pet.kernels_cpu`` as it was at git ``revision``, imported from ``folder``."""
    import importlib.util

    source = subprocess.run(["git", "show", f"{revision}:medhpc/pet/kernels_cpu.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = folder / "baseline_kernels_cpu.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_kernels_cpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def baseline_tof_rows(revision: str, projector, image, repeats: int) -> list[dict]:
    """The TOF kernels of ``revision`` (one kernel width for all LORs, the signature before
    per-LOR kernels) on the same LORs and image, results compared with today's."""
    cpu = time.process_time
    tof = projector.tof
    geometry = (projector.xstart, projector.xend, projector.origin_mm, projector.voxel_mm)
    kernel = (tof.bin_mm, tof.sigma_mm, tof.cutoff_sigmas)
    with tempfile.TemporaryDirectory() as folder:
        old = baseline_kernels(revision, Path(folder))
        values = np.zeros(projector.shape_out, np.float32)
        old.joseph_forward_tof(image, *geometry, *kernel, values)
        back = np.zeros(projector.image_shape, np.float32)
        old.joseph_back_tof(values, *geometry, *kernel, back)
        forward_s = median_time(lambda: old.joseph_forward_tof(image, *geometry, *kernel,
                                                               values), repeats, cpu)
        back_s = median_time(lambda: old.joseph_back_tof(values, *geometry, *kernel,
                                                         np.zeros_like(back)), repeats, cpu)
    forward_today, back_today = projector.forward(image), projector.back(values)
    n = projector.n_lors
    return [{"kernel": f"TOF, kernels of {revision}", "lors": n, "tof_bins": tof.bins,
             "forward_cpu_s": forward_s, "back_cpu_s": back_s,
             "forward_mlors_per_cpu_s": n / forward_s / 1e6,
             "back_mlors_per_cpu_s": n / back_s / 1e6,
             "forward_max_relative_difference": float(
                 np.abs(forward_today - values).max() / np.abs(values).max()),
             "back_max_relative_difference": float(
                 np.abs(back_today - back).max() / np.abs(back).max())}]


def tof_kernel_cost(repeats: int, tof_lors: int, baseline: str | None = None) -> list[dict]:
    """TOF forward and back projection of one DMI TOF subset, one thread, median CPU-s: one
    kernel for every LOR, and each LOR its own width and offset (a timing calibration: CTR
    within +-10 %, offsets up to +-1.5 bins), beside the non-TOF projection of the same LORs
    and, with ``baseline``, the TOF kernels of that git revision."""
    import numba

    from medhpc.phantoms.pet import nema_iq_phantom
    from medhpc.pet.projector import JosephProjector, LorTofKernels

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    shared, grid = dmi_subset_projector(True, tof_lors)
    rng = np.random.default_rng(0)
    n, tof = shared.n_lors, shared.tof
    calibrated = LorTofKernels(tof.sigma_mm * rng.uniform(0.9, 1.1, n),
                               tof.bin_mm * rng.uniform(-1.5, 1.5, n))
    geometry = (shared.xstart, shared.xend, shared.image_shape, shared.origin_mm,
                shared.voxel_mm)
    projectors = {"non-TOF": JosephProjector(*geometry), "TOF, one kernel": shared,
                  "TOF, per-LOR kernels": JosephProjector(*geometry, tof=tof,
                                                          tof_kernels=calibrated)}
    image = nema_iq_phantom(grid.shape, grid.spacing_mm)["activity"]
    cpu = time.process_time
    rows = []
    for name, projector in projectors.items():
        values = projector.forward(image)
        forward = median_time(lambda: projector.forward(image), repeats, cpu)
        back = median_time(lambda: projector.back(values), repeats, cpu)
        rows.append({"kernel": name, "lors": n, "tof_bins": 1 if projector.tof is None else
                     tof.bins, "forward_cpu_s": forward, "back_cpu_s": back,
                     "forward_mlors_per_cpu_s": n / forward / 1e6,
                     "back_mlors_per_cpu_s": n / back / 1e6})
    if baseline:
        rows += baseline_tof_rows(baseline, shared, image, repeats)
    numba.set_num_threads(threads)
    for row in rows:
        row["forward_vs_non_tof"] = row["forward_cpu_s"] / rows[0]["forward_cpu_s"]
        row["back_vs_non_tof"] = row["back_cpu_s"] / rows[0]["back_cpu_s"]
    return rows


def projector_throughput(repeats: int, tof_lors: int) -> list[dict]:
    import numba

    from medhpc.phantoms.pet import nema_iq_phantom

    rows = []
    all_threads = numba.config.NUMBA_NUM_THREADS
    for tof in (False, True):
        projector, grid = dmi_subset_projector(tof, tof_lors if tof else None)
        image = nema_iq_phantom(grid.shape, grid.spacing_mm)["activity"]
        values = projector.forward(image)
        for threads in sorted({1, all_threads}):
            numba.set_num_threads(threads)
            forward = median_time(lambda: projector.forward(image), repeats)
            back = median_time(lambda: projector.back(values), repeats)
            for direction, seconds, bar in (("forward", forward, BAR_FORWARD),
                                            ("back", back, BAR_BACK)):
                rate = projector.n_lors / seconds / 1e6
                rows.append({"direction": direction, "tof": tof, "threads": threads,
                             "lors": projector.n_lors, "seconds": seconds,
                             "mlors_per_s": rate, "mlors_per_s_per_core": rate / threads,
                             "bar_per_core": None if tof else bar,
                             "ratio_to_bar": None if tof else rate / threads / bar})
        numba.set_num_threads(all_threads)
    return rows


def radon_side_by_side(repeats: int) -> dict:
    """Joseph on radon's own 2-D geometry vs ``skimage.transform.radon``, same image."""
    import numba
    from skimage.data import shepp_logan_phantom
    from skimage.transform import radon, resize

    from medhpc.pet.projector import JosephProjector

    size, angles = 215, 272
    image = resize(shepp_logan_phantom(), (size, size), anti_aliasing=True).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    centre = size // 2
    image[(xx - centre) ** 2 + (yy - centre) ** 2 > (size // 2) ** 2] = 0.0
    theta = np.linspace(0.0, 180.0, angles, endpoint=False)
    # radon's line for angle t at offset s (pixels): centre + s (cos, -sin) + u (sin, cos), (x, y)
    radians = np.deg2rad(theta)
    offsets = np.arange(size) - centre
    cos, sin = np.cos(radians)[None, :], np.sin(radians)[None, :]
    base_x = centre + offsets[:, None] * cos
    base_y = centre + offsets[:, None] * -sin
    reach = float(size)
    xstart = np.stack([base_x - reach * sin, base_y - reach * cos, np.zeros_like(base_x)], -1)
    xend = np.stack([base_x + reach * sin, base_y + reach * cos, np.zeros_like(base_x)], -1)
    projector = JosephProjector(xstart.reshape(-1, 3), xend.reshape(-1, 3), (1, size, size),
                                np.zeros(3), np.ones(3))
    volume = image[None]
    numba.set_num_threads(1)
    ours_seconds = median_time(lambda: projector.forward(volume), repeats)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    radon_seconds = median_time(lambda: radon(image, theta=theta, circle=True), repeats)
    ours = projector.forward(volume).reshape(size, angles)
    reference = radon(image, theta=theta, circle=True)
    inner = np.abs(offsets) < size // 2 - 2
    difference = np.linalg.norm(ours[inner] - reference[inner]) / np.linalg.norm(reference[inner])
    lines = size * angles
    return {"lines": lines, "medhpc_seconds": ours_seconds, "skimage_radon_seconds": radon_seconds,
            "medhpc_mlines_per_s": lines / ours_seconds / 1e6,
            "skimage_mlines_per_s": lines / radon_seconds / 1e6,
            "speedup_vs_skimage": radon_seconds / ours_seconds,
            "relative_l2_difference": float(difference)}


SLICE_SCANNER = """[scanner]
name = "dmi-4ring-slice"
crystals_per_ring = 544
rings = 4
radius_mm = 380.56
ring_spacing_mm = 5.56
crystal_size_mm = 4.0
radial_trim = 65
max_ring_difference = 3
"""


def medhpc(*args, ranks=None, env=None):
    command = [sys.executable, "-m", "medhpc", *map(str, args)]
    if ranks is not None:
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *command]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr}")
    return result


def osem_scaling(repeats: int, folder: Path) -> list[dict]:
    scanner = folder / "dmi-4ring-slice.toml"
    scanner.write_text(SLICE_SCANNER)
    phantom = folder / "phantom"
    medhpc("phantom", "pet", "--out", phantom, "--shape", "7,215,215", "--voxel-mm", "2.78",
           "--overwrite")
    sinogram = folder / "sino.h5"
    medhpc("pet-simulate", "--activity", phantom / "activity.nii.gz", "--mu-map",
           phantom / "mu_map.nii.gz", "--scanner", scanner, "--counts", "5e7", "--out",
           sinogram, "--overwrite", "--quiet")
    cores = os.cpu_count() or 1
    cases = [("views", 1, 1), ("views", 1, cores), ("views", 2, 1), ("planes", 2, 1)]
    rows = []
    for decomp, ranks, threads in cases:
        walls, documents = [], []
        for attempt in range(repeats + 1):
            timings = folder / f"t-{decomp}-{ranks}-{threads}-{attempt}.json"
            medhpc("pet-recon", "--sinogram", sinogram, "--out", folder / "r.nii.gz",
                   "--iterations", 1, "--subsets", 34, "--decomp", decomp, "--threads", threads,
                   "--timings", timings, "--overwrite", "--quiet", "--device", "cpu",
                   ranks=ranks)
            document = json.loads(timings.read_text())
            if attempt > 0:  # the first run fills the JIT cache
                walls.append(document["wall_seconds"])
                documents.append(document)
        middle = documents[int(np.argsort(walls)[len(walls) // 2])]
        stages = {s["name"]: round(s["mean"], 3) for s in middle["stages"]}
        rows.append({"decomposition": decomp, "ranks": ranks, "threads_per_rank": threads,
                     "wall_seconds_median": statistics.median(walls), "walls": walls,
                     "stage_mean_seconds": stages,
                     "peak_memory_mb_per_rank": middle["peak_memory_mb_per_rank"]})
    base = rows[0]["wall_seconds_median"]
    for row in rows:
        row["speedup_vs_1_rank_1_thread"] = base / row["wall_seconds_median"]
    return rows


def listmode_throughput(repeats: int, folder: Path, counts: float) -> dict:
    scanner = folder / "dmi-4ring-slice.toml"
    scanner.write_text(SLICE_SCANNER)
    phantom = folder / "phantom"
    medhpc("phantom", "pet", "--out", phantom, "--shape", "7,215,215", "--voxel-mm", "2.78",
           "--overwrite")
    inputs = ("--activity", phantom / "activity.nii.gz", "--mu-map", phantom / "mu_map.nii.gz",
              "--scanner", scanner, "--counts", counts, "--overwrite", "--quiet")
    events, sinogram = folder / "events.h5", folder / "sino.h5"
    medhpc("pet-simulate", *inputs, "--listmode", "--duration-s", 60, "--out", events)
    medhpc("pet-simulate", *inputs, "--out", sinogram)
    import h5py

    with h5py.File(events) as h5:
        n_events = int(h5["events/crystal1"].shape[0])
    kernels = ("forward project", "back project", "ratio", "likelihood", "update")
    rows = []
    for label, data, ranks in (("list mode", ("--listmode", events), 1),
                               ("list mode", ("--listmode", events), 2),
                               ("sinogram (views)", ("--sinogram", sinogram), 1)):
        walls, documents = [], []
        for attempt in range(repeats + 1):
            timings = folder / f"lm-{ranks}-{attempt}.json"
            medhpc("pet-recon", *data, "--out", folder / "r.nii.gz", "--iterations", 1,
                   "--subsets", 34, "--threads", 1, "--timings", timings, "--overwrite",
                   "--quiet", "--device", "cpu", ranks=ranks)
            document = json.loads(timings.read_text())
            if attempt > 0:  # the first run fills the JIT cache
                walls.append(document["wall_seconds"])
                documents.append(document)
        middle = documents[int(np.argsort(walls)[len(walls) // 2])]
        stages = {s["name"]: s["mean"] for s in middle["stages"]}
        iteration_s = sum(stages.get(name, 0.0) for name in kernels)
        rows.append({"data": label, "ranks": ranks, "threads_per_rank": 1,
                     "wall_seconds_median": statistics.median(walls),
                     "iteration_kernel_seconds": iteration_s,
                     "sensitivity_seconds": stages.get("sensitivity", 0.0),
                     "read_seconds": stages.get("read events", stages.get("read sinogram", 0.0)),
                     "items": n_events if label == "list mode" else 1_806_080,
                     "items_per_s_per_core": (n_events if label == "list mode" else 1_806_080)
                     / iteration_s / ranks,
                     "peak_memory_mb_per_rank": middle["peak_memory_mb_per_rank"]})
    return {"events": n_events, "lors": 544 // 2 * (544 + 1 - 130) * 16, "rows": rows}


def scatter_timing(repeats: int) -> dict:
    import numba

    from medhpc.pet.projector import axis_aligned_grid
    from medhpc.pet.scanner import default_image_grid, load_scanner
    from medhpc.pet.scatter import (interpolate_to_sinogram, sampled_bins, scatter_points,
                                    single_scatter)
    from medhpc.pet.settings import ScatterSettings
    from medhpc.io.geometry import ImageGeometry
    from medhpc.phantoms.pet import nema_iq_phantom

    scanner = load_scanner("ge-dmi-4ring")
    shape, voxel = default_image_grid(scanner)
    phantom = nema_iq_phantom(shape, voxel)
    grid = ImageGeometry.from_spacing(shape, voxel, origin_mm=phantom["origin_mm"])
    origin, spacing = axis_aligned_grid(grid, "phantom")
    activity = phantom["activity"].astype(np.float32)
    mu = phantom["mu_map"].astype(np.float32)
    settings = ScatterSettings()
    numba.set_num_threads(1)
    result = {}

    def estimate():
        result["samples"] = single_scatter(scanner, activity, origin, spacing, mu, origin,
                                           spacing, settings)

    sss = median_time(estimate, repeats, clock=time.process_time)
    bins, values = result["samples"]
    views = np.arange(8)
    interpolation = median_time(lambda: interpolate_to_sinogram(scanner, bins, values, views),
                                repeats, clock=time.process_time)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    sampled = sampled_bins(scanner, settings)
    points = len(scatter_points(mu, origin, spacing, settings)[0])
    return {"scatter_points": points,
            "sampled_lors": int(len(sampled.radial) * len(sampled.views) * len(sampled.rings) ** 2),
            "sss_cpu_s": sss, "interpolation_8_views_cpu_s": interpolation,
            "interpolation_all_views_cpu_s": interpolation * scanner.n_views / 8,
            "lors": scanner.n_lors}


def span_timing(repeats: int) -> list[dict]:
    import dataclasses

    import numba

    from medhpc.pet.projector import sinogram_projector
    from medhpc.pet.scanner import default_image_grid, load_scanner, subset_views

    dmi = load_scanner("ge-dmi-4ring")
    span1 = dataclasses.replace(dmi, max_ring_difference=27)
    shape, voxel = default_image_grid(dmi)
    origin = -0.5 * (np.array(shape[::-1]) - 1) * np.array(voxel)
    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    views = subset_views(dmi.n_views, 34, 0)
    numba.set_num_threads(1)
    rows = []
    for scanner in (span1, dataclasses.replace(span1, span=11)):
        projector = sinogram_projector(scanner, shape, origin, voxel, views=views)
        projection = projector.forward(image)
        row = {"span": scanner.span, "planes": scanner.n_planes,
               "ring_pairs": scanner.n_ring_pairs, "bins": projector.n_lors,
               "forward_cpu_s": median_time(lambda: projector.forward(image), repeats,
                                            clock=time.process_time),
               "back_cpu_s": median_time(lambda: projector.back(projection), repeats,
                                         clock=time.process_time)}
        if scanner.span > 1:
            members = projector.inner.forward(image)
            row["sum_cpu_s"] = median_time(lambda: projector._sum(members), repeats,
                                           clock=time.process_time)
            row["repeat_cpu_s"] = median_time(
                lambda: projector._repeat(projection, projector.shape_out), repeats,
                clock=time.process_time)
        rows.append(row)
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    return rows


def markdown(results: dict) -> str:
    lines = ["### Projector, one ge-dmi-4ring subset, 215 x 215 x 71 at 2.78 mm", "",
             "| direction | TOF | threads | LORs | median s | M LORs/s | per core | bar per core | ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in results["projector"]:
        bar = f"{row['bar_per_core']:.2f}" if row["bar_per_core"] else "-"
        ratio = f"{row['ratio_to_bar']:.2f}x" if row["ratio_to_bar"] else "-"
        lines.append(f"| {row['direction']} | {'yes' if row['tof'] else 'no'} | {row['threads']} | "
                     f"{row['lors']:,} | {row['seconds']:.3f} | {row['mlors_per_s']:.3f} | "
                     f"{row['mlors_per_s_per_core']:.3f} | {bar} | {ratio} |")
    sensitivity = results.get("tof_sensitivity")
    if sensitivity:
        lines += ["", f"### TOF sensitivity, one ge-dmi-4ring-tof subset ({sensitivity['lors']:,} "
                      f"LORs, {sensitivity['tof_bins']} bins), 1 thread, median CPU-s", "",
                  "| bin by bin | one pass | non-TOF back projection | speed-up | max rel. difference |",
                  "| --- | --- | --- | --- | --- |",
                  f"| {sensitivity['bin_by_bin_cpu_s']:.3f} | {sensitivity['one_pass_cpu_s']:.3f} | "
                  f"{sensitivity['non_tof_cpu_s']:.3f} | {sensitivity['speedup']:.2f}x | "
                  f"{sensitivity['max_relative_difference']:.1e} |"]
    if results.get("tof_kernels"):
        first = results["tof_kernels"][0]
        lines += ["", f"### TOF kernel cost, one ge-dmi-4ring-tof subset ({first['lors']:,} LORs), "
                      "1 thread, median CPU-s", "",
                  "| kernel | bins | forward s | back s | forward M LORs/CPU-s | "
                  "back M LORs/CPU-s | forward / non-TOF | back / non-TOF |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in results["tof_kernels"]:
            lines.append(f"| {row['kernel']} | {row['tof_bins']} | {row['forward_cpu_s']:.3f} | "
                         f"{row['back_cpu_s']:.3f} | {row['forward_mlors_per_cpu_s']:.3f} | "
                         f"{row['back_mlors_per_cpu_s']:.3f} | {row['forward_vs_non_tof']:.1f}x | "
                         f"{row['back_vs_non_tof']:.1f}x |")
        today, old = results["tof_kernels"][1], results["tof_kernels"][-1]
        if "forward_max_relative_difference" in old:
            lines += ["", f"{today['kernel']} against {old['kernel']}: forward "
                          f"{old['forward_cpu_s'] / today['forward_cpu_s']:.2f}x, back "
                          f"{old['back_cpu_s'] / today['back_cpu_s']:.2f}x faster; results equal "
                          f"to {old['forward_max_relative_difference']:.1e} / "
                          f"{old['back_max_relative_difference']:.1e} relative"]
    radon = results.get("radon")
    if radon:
        lines += ["", "### Side by side with skimage.transform.radon (2-D, 215 x 215, 272 angles, 1 thread)",
                  "", "| | medhpc Joseph | skimage radon |", "| --- | --- | --- |",
                  f"| median s | {radon['medhpc_seconds']:.4f} | {radon['skimage_radon_seconds']:.4f} |",
                  f"| M lines/s | {radon['medhpc_mlines_per_s']:.3f} | {radon['skimage_mlines_per_s']:.3f} |",
                  f"| speed-up | {radon['speedup_vs_skimage']:.1f}x | 1x |",
                  f"| relative L2 difference | {radon['relative_l2_difference']:.4f} | |"]
    if results.get("osem"):
        lines += ["", "### One OSEM iteration (34 subsets), 4-ring DMI slice: 1.8 M LORs, 215 x 215 x 7",
                  "", "| decomposition | ranks | threads/rank | median wall s | speed-up | forward s | back s | allreduce s | peak MiB per rank |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in results["osem"]:
            stages = row["stage_mean_seconds"]
            memory = "/".join(f"{m:.0f}" for m in row["peak_memory_mb_per_rank"])
            lines.append(f"| {row['decomposition']} | {row['ranks']} | {row['threads_per_rank']} | "
                         f"{row['wall_seconds_median']:.2f} | {row['speedup_vs_1_rank_1_thread']:.2f}x | "
                         f"{stages.get('forward project', 0):.2f} | {stages.get('back project', 0):.2f} | "
                         f"{stages.get('allreduce', 0):.3f} | {memory} |")
    listmode = results.get("listmode")
    if listmode:
        lines += ["", f"### List-mode OSEM, one iteration (34 subsets), 4-ring DMI slice: "
                      f"{listmode['events']:,} events ({listmode['lors']:,} LORs), 1 thread per rank",
                  "", "| data | ranks | median wall s | iteration kernels s (mean per rank) | "
                      "events or LORs /s per core | sensitivity s | read s | peak MiB per rank |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in listmode["rows"]:
            memory = "/".join(f"{m:.0f}" for m in row["peak_memory_mb_per_rank"])
            lines.append(f"| {row['data']} | {row['ranks']} | {row['wall_seconds_median']:.2f} | "
                         f"{row['iteration_kernel_seconds']:.2f} | "
                         f"{row['items_per_s_per_core'] / 1e6:.2f} M | "
                         f"{row['sensitivity_seconds']:.2f} | {row['read_seconds']:.2f} | {memory} |")
    scatter = results.get("scatter")
    if scatter:
        lines += ["", "### Single-scatter simulation, ge-dmi-4ring, NEMA-like phantom 215 x 215 x 71, "
                      "1 thread, median CPU-s", "",
                  "| scatter points | sampled LORs | SSS s | interpolation to 8 views s | "
                  "interpolation to all 146 M LORs s (scaled) |", "| --- | --- | --- | --- | --- |",
                  f"| {scatter['scatter_points']:,} | {scatter['sampled_lors']:,} | "
                  f"{scatter['sss_cpu_s']:.2f} | {scatter['interpolation_8_views_cpu_s']:.2f} | "
                  f"{scatter['interpolation_all_views_cpu_s']:.1f} |"]
    if results.get("span"):
        lines += ["", "### Axial compression, one DMI subset (8 views) up to ring difference 27, "
                      "1 thread, median CPU-s", "",
                  "| span | planes | ring pairs | bins | forward s | back s | sum into planes s | "
                  "its adjoint s |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in results["span"]:
            lines.append(f"| {row['span']} | {row['planes']} | {row['ring_pairs']} | "
                         f"{row['bins']:,} | {row['forward_cpu_s']:.2f} | {row['back_cpu_s']:.2f} | "
                         f"{row.get('sum_cpu_s', 0):.3f} | {row.get('repeat_cpu_s', 0):.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tof-lors", type=int, default=100_000,
                        help="LORs of the subset used for the TOF timing (TOF is slower).")
    parser.add_argument("--tof-baseline", default=None,
                        help="tof-kernels: also time the TOF kernels of this git revision "
                             "(e.g. 7a516a6) on the same LORs.")
    parser.add_argument("--listmode-counts", type=float, default=5e6,
                        help="Counts (events) of the list-mode part.")
    parser.add_argument("--parts",
                        default="projector,tof-kernels,tof-sensitivity,radon,osem,listmode,"
                                "scatter,span",
                        help="Comma-separated parts to run (default: all).")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    results = {"machine": machine(), "repeats": args.repeats, "projector": []}
    if "projector" in parts:
        print("projector throughput ...", file=sys.stderr)
        results["projector"] = projector_throughput(args.repeats, args.tof_lors)
    if "tof-kernels" in parts:
        print("TOF kernel cost ...", file=sys.stderr)
        results["tof_kernels"] = tof_kernel_cost(args.repeats, args.tof_lors,
                                                 args.tof_baseline)
    if "tof-sensitivity" in parts:
        print("TOF sensitivity ...", file=sys.stderr)
        results["tof_sensitivity"] = tof_sensitivity(args.repeats, args.tof_lors)
    if "radon" in parts:
        print("skimage radon side by side ...", file=sys.stderr)
        results["radon"] = radon_side_by_side(args.repeats)
    if "osem" in parts:
        print("OSEM strong scaling ...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as folder:
            results["osem"] = osem_scaling(args.repeats, Path(folder))
    if "listmode" in parts:
        print("list-mode OSEM ...", file=sys.stderr)
        with tempfile.TemporaryDirectory() as folder:
            results["listmode"] = listmode_throughput(args.repeats, Path(folder),
                                                      args.listmode_counts)
    if "scatter" in parts:
        print("single-scatter simulation ...", file=sys.stderr)
        results["scatter"] = scatter_timing(args.repeats)
    if "span" in parts:
        print("axial compression ...", file=sys.stderr)
        results["span"] = span_timing(args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"pet-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\nresults: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
