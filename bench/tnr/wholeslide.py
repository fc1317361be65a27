"""tnr-register whole-slide benchmark: streamed full-resolution warp of pyramidal JPEG slides.

One command (``python bench/tnr/wholeslide.py``). For every ``--sizes`` side it writes a
stack of ``--sections`` synthetic pyramidal JPEG OME-TIFF slides (tiles made by a
generator, so writing stays in a few tiles of memory), then runs
``medhpc tnr-register --full-res`` (matching at ``--downsample``, output a pyramidal JPEG
OME-TIFF in tiles of ``--tile``) at each of ``--ranks``, and records the wall time, the time
per stage, the peak resident memory per rank and the plan's memory estimate per rank.
Writes ``bench/results/tnr-wholeslide-<date>.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.machine import machine as bench_machine  # noqa: E402


def run_register(slides: Path, out: Path, ranks: int, downsample: int, tile: int) -> dict:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    command = [sys.executable, "-m", "medhpc", "tnr-register", "--input", str(slides),
               "--out", str(out), "--full-res", "--downsample", str(downsample),
               "--tile", str(tile), "--device", "cpu", "--overwrite", "--quiet"]
    if ranks > 1:
        command = [str(mpiexec), "-n", str(ranks), *command]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(result.stderr)
    log = json.loads(out.with_name(out.name.replace(".ome.tif", ".json")).read_text())
    stages = {}
    for row in log["timings"]["stages"]:
        stages[row["name"]] = round(row["max"], 2)
    return {"ranks": ranks, "wall_s": round(wall, 1), "stages_max_s": stages,
            "peak_rss_mb_per_rank": log["memory"]["peak_rss_mb_per_rank"],
            "plan_mb_per_rank": log["memory"]["plan_mb_per_rank"],
            "levels_read": sorted({(r["level"], r["block"]) for r in log["levels_read"].values()}),
            "wall_seconds_in_run": round(log["timings"]["wall_seconds"], 1),
            "working_shape": log["working_shape"], "output_shape": log["output_shape"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16384,40960")
    parser.add_argument("--sections", type=int, default=3)
    parser.add_argument("--downsample", type=int, default=32)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--ranks", default="1,2")
    parser.add_argument("--scratch", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    from medhpc.phantoms.wholeslide import SlideStackSettings, write_slide_stack
    from medhpc.runtime.timing import peak_memory_mb

    results = {"machine": bench_machine(("medhpc", "numpy", "numba", "tifffile", "imagecodecs",
                                         "zarr", "mpi4py")),
               "sections": args.sections, "downsample": args.downsample, "tile": args.tile,
               "cases": []}
    scratch = Path(tempfile.mkdtemp(prefix="tnr-wsi-", dir=args.scratch))
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            slides = scratch / f"slides-{size}"
            start = time.perf_counter()
            write_slide_stack(slides, SlideStackSettings(sections=args.sections, size=size,
                                                         tile=512, shift_px=size / 200))
            case = {"size": size, "generate_s": round(time.perf_counter() - start, 1),
                    "generator_peak_rss_mb": round(peak_memory_mb(), 1),
                    "input_mb": round(sum(p.stat().st_size for p in slides.iterdir()) / 2**20, 1),
                    "runs": []}
            print(json.dumps(case), file=sys.stderr)
            for ranks in (int(r) for r in args.ranks.split(",")):
                out = scratch / f"out-{size}-{ranks}.ome.tif"
                run = run_register(slides, out, ranks, args.downsample, args.tile)
                run["output_mb"] = round(sum(p.stat().st_size for p in
                                             out.with_name(out.name + ".parts").iterdir())
                                         / 2**20, 1)
                case["runs"].append(run)
                print(json.dumps(run), file=sys.stderr)
                shutil.rmtree(out.with_name(out.name + ".parts"), ignore_errors=True)
            results["cases"].append(case)
            shutil.rmtree(slides, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["machine"]["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"tnr-wholeslide-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print("| size | ranks | wall s | read s | warp s | write s | peak MiB/rank | plan MiB/rank |")
    print("|---|---|---|---|---|---|---|---|")
    for case in results["cases"]:
        for run in case["runs"]:
            s = run["stages_max_s"]
            print(f"| {case['size']}^2 | {run['ranks']} | {run['wall_s']} | "
                  f"{s.get('read sections', 0)} | {s.get('warp', 0)} | {s.get('write volume', 0)} |"
                  f" {max(run['peak_rss_mb_per_rank'])} | {max(run['plan_mb_per_rank'])} |")
    print(f"\nresults: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
