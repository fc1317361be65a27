"""tnr-register benchmark: matching throughput beside OpenCV, end to end at 1 and 2 ranks,
accuracy on the phantom beside pystackreg.

One command (``python bench/tnr/run.py``). Writes ``bench/results/tnr-<date>.json`` and
prints Markdown tables for ``docs/performance.md``.

1. Matching, one core: a batch of 64 x 64 patches, each searched in a +/-64 px window
   (192 x 192), textured random images. medhpc's ``zncc_scores`` (FFT correlation,
   integral-image normalisation) beside OpenCV ``matchTemplate`` (TM_CCOEFF_NORMED) on the
   same patches in the same run, with their largest difference; both pinned to one thread.
2. End to end: ``medhpc tnr-register`` on a phantom stack (``--e2e-sections`` sections of
   ``--e2e-size``^2 px, RGB PNG), matching at half resolution, final warp at full resolution
   (``--full-res``), at 1 and 2 ranks: wall time and time per stage.
3. Accuracy on the phantom (``--accuracy-sections`` of ``--accuracy-size``^2): mean error
   at the held-out points for none / pairwise / tnr at several sigma, and pystackreg
   (rigid, each section to the previous one) as an outside baseline.

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
OPENCV_NOTE_MS = 0.29  # the note's per-patch time of OpenCV on one core (another machine)


def machine() -> dict:
    """CPU, cores, load and the versions this benchmark depends on."""
    return bench_machine(("medhpc", "numpy", "scipy", "numba", "opencv-python-headless", "pystackreg", "mpi4py", "h5py"))


def _median_time(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matching_throughput(repeats: int, batch: int) -> dict:
    """Per-patch time of medhpc's ZNCC and OpenCV's matcher, one thread each."""
    import cv2
    import numba
    from scipy import ndimage

    from medhpc.tnr import kernels_cpu

    numba.set_num_threads(1)
    cv2.setNumThreads(1)
    rng = np.random.default_rng(0)
    patch, search = 64, 64
    window = patch + 2 * search
    image = ndimage.gaussian_filter(rng.standard_normal((2048, 2048)), 2.0).astype(np.float32)
    corners = rng.integers(0, 2048 - window, (batch, 2))
    windows = np.stack([image[y:y + window, x:x + window] for y, x in corners])
    offsets = rng.integers(0, window - patch, (batch, 2))
    templates = np.stack([w[y:y + patch, x:x + patch] + 0.3 * rng.standard_normal((patch, patch))
                          for w, (y, x) in zip(windows, offsets)]).astype(np.float32)
    span = window - patch + 1
    ours = np.zeros((batch, span, span), np.float32)
    theirs = np.zeros_like(ours)

    def run_ours():
        kernels_cpu.zncc_scores(templates, windows, ours)

    def run_opencv():
        for b in range(batch):
            theirs[b] = cv2.matchTemplate(windows[b], templates[b], cv2.TM_CCOEFF_NORMED)

    seconds_ours = _median_time(run_ours, repeats)
    seconds_opencv = _median_time(run_opencv, repeats)
    found = np.array([np.unravel_index(np.argmax(s), s.shape) for s in ours])
    return {"patch": patch, "search": search, "batch": batch, "threads": 1,
            "medhpc_ms_per_patch": 1e3 * seconds_ours / batch,
            "opencv_ms_per_patch": 1e3 * seconds_opencv / batch,
            "speedup_vs_opencv": seconds_opencv / seconds_ours,
            "max_abs_difference": float(np.abs(ours - theirs).max()),
            "peaks_found": int(np.count_nonzero(np.all(found == offsets, axis=1))),
            "opencv_note_ms_per_patch": OPENCV_NOTE_MS}


def _medhpc(*args, ranks: int = 1, timeout: float = 3000) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "medhpc", *map(str, args)]
    if ranks > 1:
        command = [str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *command]
    env = dict(os.environ, MEDHPC_THREADS="1" if ranks > 1 else os.environ.get("MEDHPC_THREADS", ""))
    if not env["MEDHPC_THREADS"]:
        env.pop("MEDHPC_THREADS")
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return result


def end_to_end(folder: Path, repeats: int, sections: int, size: int, ranks_list) -> dict:
    """Wall time and stages of tnr-register at 1 and 2 ranks."""
    from medhpc.phantoms.tnr import TnrPhantomSettings, write_tnr_phantom

    start = time.perf_counter()
    write_tnr_phantom(folder / "stack", TnrPhantomSettings(sections=sections, size=size, seed=7),
                      overwrite=True)
    made = time.perf_counter() - start
    options = ["--input", folder / "stack" / "sections", "--downsample", "2", "--patch", "64",
               "--search", "32", "--grid", "48", "--full-res", "--device", "cpu", "--overwrite",
               "--quiet"]
    rows = []
    for ranks in ranks_list:
        walls, stage_runs = [], []
        for attempt in range(repeats + 1):
            timings = folder / f"timings-{ranks}.json"
            begin = time.perf_counter()
            _medhpc("tnr-register", *options, "--out", folder / f"v{ranks}.h5", "--timings",
                    timings, ranks=ranks)
            wall = time.perf_counter() - begin
            if attempt == 0:
                continue  # warm-up: JIT cache, file cache
            walls.append(wall)
            stage_runs.append({row["name"]: row["max"]
                               for row in json.loads(timings.read_text())["stages"]})
        names = stage_runs[0].keys()
        rows.append({"ranks": ranks, "wall_s": statistics.median(walls),
                     "walls": walls,
                     "stages_max_over_ranks_s": {n: statistics.median(r.get(n, 0.0)
                                                                      for r in stage_runs)
                                                 for n in names}})
    return {"sections": sections, "size": size, "phantom_seconds": made,
            "options": [str(o) for o in options[2:]], "runs": rows}


def _pystackreg_error(folder: Path, truth: dict, count: int, size: int) -> dict:
    from PIL import Image
    from pystackreg import StackReg

    from medhpc.phantoms.tnr import heldout_error
    from medhpc.tnr.preprocess import stain_channel

    stack = np.stack([stain_channel(np.asarray(Image.open(p)), "hematoxylin")
                      for p in sorted((folder / "sections").glob("*.png"))])
    registration = StackReg(StackReg.RIGID_BODY)
    start = time.perf_counter()
    matrices = registration.register_stack(stack, reference="previous")
    seconds = time.perf_counter() - start
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    displacement = np.zeros((2, count, size, size))
    for i, matrix in enumerate(matrices):
        # pystackreg's matrices act on (x, y, 1) and map output pixels to input pixels
        x_in = matrix[0, 0] * xx + matrix[0, 1] * yy + matrix[0, 2]
        y_in = matrix[1, 0] * xx + matrix[1, 1] * yy + matrix[1, 2]
        displacement[0, i], displacement[1, i] = y_in - yy, x_in - xx
    check = registration.transform(stack[count // 2], matrices[count // 2])
    from scipy import ndimage

    ours = ndimage.map_coordinates(stack[count // 2], [yy + displacement[0, count // 2],
                                                       xx + displacement[1, count // 2]], order=3)
    agreement = float(np.abs(check - ours)[16:-16, 16:-16].mean() / (stack.std() + 1e-9))
    return {"mean_px": heldout_error(displacement, truth)["mean_px"], "seconds": seconds,
            "convention_check": agreement}


def accuracy(folder: Path, sections: int, size: int, sigmas) -> dict:
    """Held-out error of none / pairwise / tnr(sigma) and pystackreg on one phantom."""
    import h5py

    from medhpc.phantoms.tnr import TnrPhantomSettings, heldout_error, read_truth, write_tnr_phantom

    phantom = folder / "accuracy"
    write_tnr_phantom(phantom, TnrPhantomSettings(sections=sections, size=size, seed=11),
                      overwrite=True)
    truth = read_truth(phantom / "truth.h5")
    rows = [{"method": "identity (no registration)",
             "mean_px": heldout_error(np.zeros((2, sections, size, size)), truth)["mean_px"]}]
    options = ["--input", phantom / "sections", "--patch", "48", "--search", "16", "--grid",
               "24", "--device", "cpu", "--overwrite", "--quiet"]
    runs = [("none", None), ("pairwise", None)] + [("tnr", s) for s in sigmas]
    for mode, sigma in runs:
        out = folder / f"acc-{mode}-{sigma}.h5"
        fields = folder / f"acc-{mode}-{sigma}-fields.h5"
        extra = ["--sigma", sigma] if sigma is not None else []
        start = time.perf_counter()
        _medhpc("tnr-register", *options, "--mode", mode, *extra, "--out", out, "--fields",
                fields)
        seconds = time.perf_counter() - start
        with h5py.File(fields, "r") as h5:
            displacement = h5["displacement"][()]
        error = heldout_error(displacement, truth)
        name = f"tnr sigma={sigma:g}" if sigma is not None else (
            "none (rigid chain)" if mode == "none" else "pairwise")
        rows.append({"method": name, "mean_px": error["mean_px"],
                     "end_sections_px": float(np.mean(error["per_section_px"][:2]
                                                      + error["per_section_px"][-2:])),
                     "seconds": seconds})
    try:
        rows.append({"method": "pystackreg rigid, previous", **_pystackreg_error(
            phantom, truth, sections, size)})
    except ImportError as error:
        rows.append({"method": "pystackreg", "skipped": str(error)})
    return {"sections": sections, "size": size, "rows": rows}


def markdown(results: dict) -> str:
    lines = []
    m = results.get("matching")
    if m:
        lines += ["| matcher (1 core, 64^2 patch, +/-64 px) | ms per patch | patches/s |",
                  "| --- | ---: | ---: |",
                  f"| medhpc zncc_scores (FFT + integral images) | {m['medhpc_ms_per_patch']:.3f} "
                  f"| {1e3 / m['medhpc_ms_per_patch']:.0f} |",
                  f"| OpenCV matchTemplate TM_CCOEFF_NORMED | {m['opencv_ms_per_patch']:.3f} "
                  f"| {1e3 / m['opencv_ms_per_patch']:.0f} |",
                  "", f"medhpc / OpenCV speed: {m['speedup_vs_opencv']:.2f}x; largest score "
                  f"difference {m['max_abs_difference']:.1e}; {m['peaks_found']}/{m['batch']} "
                  "planted peaks found.", ""]
    e = results.get("end_to_end")
    if e:
        names = list(e["runs"][0]["stages_max_over_ranks_s"])
        lines += [f"End to end, {e['sections']} sections of {e['size']}^2 RGB: "
                  + " ".join(e["options"]), "",
                  "| ranks | wall s | " + " | ".join(names) + " |",
                  "| ---: | ---: | " + " | ".join("---:" for _ in names) + " |"]
        for row in e["runs"]:
            stages = row["stages_max_over_ranks_s"]
            lines.append(f"| {row['ranks']} | {row['wall_s']:.1f} | "
                         + " | ".join(f"{stages.get(n, 0.0):.2f}" for n in names) + " |")
        lines.append("")
    a = results.get("accuracy")
    if a:
        lines += [f"Accuracy, phantom {a['sections']} sections of {a['size']}^2 (held-out "
                  "points, px):", "", "| method | mean error px | end sections px |",
                  "| --- | ---: | ---: |"]
        for row in a["rows"]:
            if "mean_px" in row:
                end = row.get("end_sections_px")
                lines.append(f"| {row['method']} | {row['mean_px']:.2f} | "
                             f"{'' if end is None else f'{end:.2f}'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=256, help="patches in the matching test")
    parser.add_argument("--e2e-sections", type=int, default=64)
    parser.add_argument("--e2e-size", type=int, default=1024)
    parser.add_argument("--e2e-repeats", type=int, default=None,
                        help="repeats of the end-to-end runs [--repeats]")
    parser.add_argument("--accuracy-sections", type=int, default=48)
    parser.add_argument("--accuracy-size", type=int, default=256)
    parser.add_argument("--sigmas", default="1,2,4,16")
    parser.add_argument("--parts", default="matching,e2e,accuracy")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    results = {"machine": machine(), "repeats": args.repeats}
    if "matching" in parts:
        results["matching"] = matching_throughput(args.repeats, args.batch)
        print(json.dumps(results["matching"]), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="tnr-bench-") as scratch:
        if "e2e" in parts:
            results["end_to_end"] = end_to_end(Path(scratch), args.e2e_repeats or args.repeats,
                                               args.e2e_sections, args.e2e_size, (1, 2))
            print(json.dumps(results["end_to_end"]), file=sys.stderr)
        if "accuracy" in parts:
            results["accuracy"] = accuracy(Path(scratch), args.accuracy_sections,
                                           args.accuracy_size,
                                           [float(s) for s in args.sigmas.split(",")])
    results["machine"]["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tnr-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\nresults: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
