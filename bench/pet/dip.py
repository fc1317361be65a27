"""Deep image prior against OSEM with post-filters: contrast recovery at matched background
variability on the NEMA-like phantom at low counts, several noise realisations, same run.

One command (``python bench/pet/dip.py``). The NEMA-like phantom (small-test scanner,
40 x 40 x 15 at 4 x 4 x 2 mm, hot spheres 4:1) simulated with attenuation and 20% randoms at
``--counts`` counts, ``--seeds`` noise realisations. Methods: OSEM (4 subsets) over a grid of
iterations x Gaussian post-filters; BSREM with the relative difference prior over ``beta``;
DIP from seeded noise and DIP from the attenuation map (an anatomical image holding body and
lung but no sphere) over iteration counts. For each setting: contrast recovery (CR) and
background variability (BV) per sphere (NEMA NU 2 ROIs, :func:`medhpc.phantoms.pet.
nema_analysis`), averaged over the spheres with at least 2 voxels across and over the seeds,
and seconds per reconstruction. The summary compares each DIP point with OSEM's CR-BV front:
the highest OSEM CR (any iterations, any post-filter) whose BV is at most the DIP point's.
Writes ``bench/results/pet-dip-<date>.json`` and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.machine import machine as bench_machine  # noqa: E402

OSEM_ITERATIONS = (1, 2, 3, 4, 6, 8)
POSTFILTERS_MM = (0.0, 4.0, 6.0, 8.0, 10.0)
RDP_BETAS = (0.01, 0.03, 0.1, 0.3)
DIP_ITERATIONS = (5, 10, 20)


def front(points: list[dict], bv: float) -> dict | None:
    """The point of ``points`` with the highest CR among those with BV <= ``bv``."""
    below = [p for p in points if p["bv"] <= bv]
    return max(below, key=lambda p: p["cr"]) if below else None


def main(argv=None) -> int:
    from medhpc.io.geometry import ImageGeometry
    from medhpc.io.nifti import write_nifti
    from medhpc.parallel.comm import World, _SerialComm
    from medhpc.pet.osem import ReconSettings
    from medhpc.pet.run import PetRecon
    from medhpc.pet.scanner import load_scanner
    from medhpc.pet.simulate import Simulation, write_simulation
    from medhpc.phantoms.pet import nema_analysis, nema_iq_phantom
    from medhpc.runtime.context import start_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=float, default=3e5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dip-iterations", default=",".join(map(str, DIP_ITERATIONS)))
    parser.add_argument("--dip-lr", type=float, default=1e-2)
    parser.add_argument("--sources", default="noise,mu-map", help="DIP inputs to compare.")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    def run():
        return start_run("bench", device="cpu", threads=args.threads, verbosity=-1,
                         world=World(_SerialComm()))

    shape, voxel = (15, 40, 40), (4.0, 4.0, 2.0)
    phantom = nema_iq_phantom(shape, voxel)
    grid = ImageGeometry.from_spacing(shape, voxel, origin_mm=phantom["origin_mm"])
    scanner = load_scanner("small-test")
    spheres = [i for i, s in enumerate(phantom["spheres"]) if s["diameter_mm"] >= 2 * voxel[0]]
    configurations = (
        [("OSEM", f"{it} it, {fwhm:g} mm", ReconSettings(iterations=it, subsets=4,
                                                          postfilter_fwhm_mm=fwhm), None)
         for it in OSEM_ITERATIONS for fwhm in POSTFILTERS_MM]
        + [("BSREM-RDP", f"beta {beta:g}", ReconSettings(algorithm="bsrem", iterations=8,
                                                         subsets=4, rdp_beta=beta), None)
           for beta in RDP_BETAS]
        + [(f"DIP ({source})", f"{it} it", ReconSettings(algorithm="dip", iterations=it,
                                                         subsets=4, dip_lr=args.dip_lr), source)
           for source in args.sources.split(",")
           for it in map(int, args.dip_iterations.split(","))])
    results = {"machine": bench_machine(("medhpc", "torch", "numpy", "numba")),
               "counts": args.counts, "seeds": args.seeds, "spheres_mm": [
                   phantom["spheres"][i]["diameter_mm"] for i in spheres], "points": []}
    measured = {name: [] for name in {(c[0], c[1]) for c in configurations}}
    seconds = {name: [] for name in measured}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        prior = folder / "mu_map.nii.gz"
        write_nifti(prior, phantom["mu_map"].astype(np.float32), grid)
        for seed in range(args.seeds):
            simulation = Simulation(run(), scanner, phantom["activity"][None].astype(np.float32),
                                    phantom["mu_map"].astype(np.float32), grid, args.counts,
                                    True, 0.2, False)
            sinogram = folder / f"seed{seed}.h5"
            write_simulation(sinogram, scanner, grid, simulation.execute(seed=100 + seed),
                             False, True, {})
            for method, label, settings, source in configurations:
                started = time.perf_counter()
                recon = PetRecon(run(), sinogram, folder / "x.nii.gz", settings,
                                 prior=prior if source == "mu-map" else None)
                image, _ = recon.compute()
                seconds[(method, label)].append(time.perf_counter() - started)
                analysis = nema_analysis(image, phantom)
                measured[(method, label)].append(
                    (np.mean([analysis["contrast_recovery"][i] for i in spheres]),
                     np.mean([analysis["background_variability"][i] for i in spheres])))
            print(f"seed {seed} done", file=sys.stderr, flush=True)
    for method, label, _, _ in configurations:
        values = np.array(measured[(method, label)])
        results["points"].append({"method": method, "setting": label,
                                  "cr": float(values[:, 0].mean()),
                                  "bv": float(values[:, 1].mean()),
                                  "seconds": float(np.median(seconds[(method, label)]))})
    osem = [p for p in results["points"] if p["method"] == "OSEM"]
    results["comparison"] = []
    for point in results["points"]:
        if point["method"] == "OSEM":
            continue
        best = front(osem, point["bv"])
        results["comparison"].append({**point, "osem_best": best})
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"pet-dip-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(markdown(results))
    print(f"\nresults: {path}", file=sys.stderr)
    return 0


def markdown(results: dict) -> str:
    lines = ["| method | setting | CR | BV | s / recon |", "|---|---|---|---|---|"]
    for p in results["points"]:
        lines.append(f"| {p['method']} | {p['setting']} | {p['cr']:.3f} | {p['bv']:.3f} | "
                     f"{p['seconds']:.1f} |")
    lines += ["", "| method | setting | CR | BV | best OSEM at BV <= this | its CR |",
              "|---|---|---|---|---|---|"]
    for p in results["comparison"]:
        best = p["osem_best"]
        lines.append(f"| {p['method']} | {p['setting']} | {p['cr']:.3f} | {p['bv']:.3f} | "
                     + (f"{best['setting']} | {best['cr']:.3f} |" if best else "none | - |"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
