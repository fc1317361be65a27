"""tnr-register accuracy on stacks cut from real anatomy, beside the peers, in one run.

One command (``python bench/tnr/accuracy.py``; ``--quick`` for one CI-sized stack). For each
stack of ``bench/tnr/realistic.py`` (nilearn's MNI152, several seeds, cut directions and
damage; written to a temporary folder) it scores, at the held-out points (section px of the
canvas, one rigid transform common to the stack removed):

- no registration, pystackreg RIGID_BODY to the previous section, OpenCV ECC (Euclidean,
  3 levels) chained, at the working levels ``--peer-downsample`` (each peer's best is the
  bar);
- ``medhpc tnr-register`` (a fresh process each, one thread) in the modes ``none`` (rigid
  chain), ``pairwise`` and ``tnr`` at several ``--sigma``, at ``--downsample``;

with the CPU-seconds of each (medhpc: of its process, kernel compilation included; peers:
``time.process_time`` of the registration), the error at the first/last three sections
against the middle, and the sections medhpc flagged against the truth's damaged,
restained and mirrored sections. Writes ``bench/results/tnr-accuracy-<date>.json`` and
prints Markdown tables for ``docs/performance.md`` and ``docs/tnr.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.machine import machine as bench_machine  # noqa: E402
from bench.tnr import realistic  # noqa: E402

STACKS = (
    {"seed": 0, "axis": 2},
    {"seed": 1, "axis": 1},
    {"seed": 2, "axis": 0, "flipped": 1},
)
QUICK = ({"seed": 0, "axis": 2, "sections": 12, "size": 256},)
MODES = (("none", None, "rigid"), ("pairwise", None, "rigid"), ("tnr", 2.0, "rigid"),
         ("tnr", 3.0, "rigid"), ("tnr", 5.0, "rigid"), ("tnr", 8.0, "rigid"),
         ("tnr", 3.0, "affine"))


def medhpc_command() -> list[str]:
    executable = Path(sys.executable).with_name("medhpc")
    return [str(executable)] if executable.exists() else [sys.executable, "-m", "medhpc"]


def run_medhpc(folder: Path, out: Path, mode: str, sigma, downsample: int, patch: int,
               search: int, grid: int, placement: str = "rigid") -> dict:
    """One tnr-register process; its CPU-seconds, wall time, error and flags."""
    fields = out.with_name(out.stem + "-fields.h5")
    command = medhpc_command() + [
        "tnr-register", "--input", str(folder / "sections"), "--out", str(out),
        "--fields", str(fields), "--mode", mode, "--downsample", str(downsample),
        "--patch", str(patch), "--search", str(search), "--grid", str(grid),
        "--placement", placement, "--threads", "1", "--device", "cpu", "--overwrite",
        "--quiet"]
    if sigma is not None:
        command += ["--sigma", str(sigma)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True,
                               env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stderr}")
    with h5py.File(fields, "r") as h5:
        displacement = h5["displacement"][()]
    truth = realistic_truth(folder)
    row = {"method": f"medhpc {mode}" + (f" (sigma {sigma:g})" if sigma is not None else "")
           + (f" {placement} placement" if placement != "rigid" else ""),
           "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
           "wall_s": wall}
    row.update(realistic.score(displacement, truth, downsample))
    log = json.loads(out.with_suffix(".json").read_text())
    row["flagged"] = {int(k): v["reasons"][0].split(":")[0].split(" (")[0] for k, v in
                      log["flagged_sections"].items()}
    row["mirrored_pairs"] = [r["pair"] for r in log["pairs"] if r.get("mirrored")]
    return row


def realistic_truth(folder: Path) -> dict:
    from medhpc.phantoms.tnr import read_truth

    return read_truth(folder / "truth.h5")


def bench_stack(spec: dict, args, scratch: Path) -> dict:
    settings = {"sections": args.sections, "size": args.size, **spec}
    name = "stack-" + "-".join(f"{k}{v}" for k, v in sorted(spec.items()))
    folder = scratch / name
    began = time.perf_counter()
    stack = realistic.make_stack(**settings)
    realistic.write_stack(folder, stack)
    print(f"{name}: {settings['sections']} x {settings['size']}^2, slices "
          f"{stack['settings']['slices']}, made in {time.perf_counter() - began:.0f} s; torn "
          f"{stack['torn']}, missing {stack['missing']}, restained {stack['restained']}, "
          f"mirrored {stack['flipped']}", file=sys.stderr, flush=True)
    truth = realistic_truth(folder)
    rows = []
    for factor in ([] if args.no_peers else args.peer_downsample):
        for row in realistic.run_peers(folder / "sections", truth, factor):
            if row["method"].startswith("(shared)"):
                continue
            row["method"] = f"{row['method']} (downsample {factor})"
            rows.append(row)
    scale = settings["size"] / 1024
    patch, search, grid = (max(16, int(round(v * scale * 2 / args.downsample)))
                           for v in (64, 32, 32))
    modes = [m for m in MODES if not args.modes or f"{m[0]}:{m[1]}:{m[2]}" in args.modes]
    for mode, sigma, placement in modes:
        rows.append(run_medhpc(folder, scratch / f"{name}-{mode}-{sigma}-{placement}.h5",
                               mode, sigma, args.downsample, patch, search, grid, placement))
        print(f"  {rows[-1]['method']}: {rows[-1]['mean_px']:.2f} px, "
              f"{rows[-1]['cpu_s']:.1f} CPU-s", file=sys.stderr, flush=True)
    return {"name": name, "settings": settings, "slices": stack["settings"]["slices"],
            "torn": stack["torn"], "missing": stack["missing"],
            "restained": stack["restained"], "mirrored": stack["flipped"],
            "medhpc_working": {"downsample": args.downsample, "patch": patch,
                               "search": search, "grid": grid},
            "rows": rows}


def table(result: dict) -> str:
    lines = [f"**{result['name']}** (slices {result['slices']}; torn {result['torn']}, missing "
             f"{result['missing']}, restained {result['restained']}, mirrored "
             f"{result['mirrored']})", "",
             "| method | mean px | ends px | middle px | ends/middle | CPU-s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["rows"]:
        ratio = row["ends_px"] / row["middle_px"] if row["middle_px"] else float("nan")
        lines.append(f"| {row['method']} | {row['mean_px']:.2f} | {row['ends_px']:.2f} | "
                     f"{row['middle_px']:.2f} | {ratio:.2f} | {row.get('cpu_s', 0):.1f} |")
    peers = [r for r in result["rows"] if r["method"].startswith(("pystackreg", "ECC", "OpenCV"))]
    best_peer = min(peers, key=lambda r: r["mean_px"]) if peers else None
    tnr = [r for r in result["rows"] if r["method"].startswith("medhpc tnr")]
    if best_peer and tnr:
        default = next((r for r in tnr if "sigma 3" in r["method"]), tnr[0])
        lines += ["", f"medhpc tnr (sigma 3) / best peer ({best_peer['method']}): "
                      f"{default['mean_px'] / best_peer['mean_px']:.2f}; flagged: "
                      f"{default['flagged']}; mirrored pairs found: "
                      f"{default['mirrored_pairs']}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one CI-sized stack")
    parser.add_argument("--sections", type=int, default=36)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--downsample", type=int, default=2, help="medhpc's working level")
    parser.add_argument("--peer-downsample", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--modes", nargs="*", default=None,
                        help="only these medhpc runs, as mode:sigma:placement (tnr:3.0:rigid)")
    parser.add_argument("--no-peers", action="store_true", help="skip the peers")
    args = parser.parse_args(argv)
    stacks = QUICK if args.quick else STACKS
    if args.quick:
        args.downsample, args.peer_downsample = 1, [1]
    results = []
    with tempfile.TemporaryDirectory(prefix="tnr-accuracy-") as scratch:
        for spec in stacks:
            results.append(bench_stack(spec, args, Path(scratch)))
            print(table(results[-1]) + "\n", flush=True)
    document = {"benchmark": "tnr accuracy on real-anatomy stacks",
                "machine": bench_machine(("medhpc", "numpy", "scipy", "numba", "nilearn",
                                          "pystackreg", "opencv-python-headless")),
                "date": time.strftime("%Y-%m-%d %H:%M"), "stacks": results}
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"tnr-accuracy-{time.strftime('%Y%m%d-%H%M')}.json"
    path.write_text(json.dumps(document, indent=2, default=str))
    print(f"results in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
