"""Dynamic PET: frame-by-frame OSEM against low-rank NMF on the same noisy frames.

One command (``python bench/pet/dynamic.py``). The NEMA-like phantom (small-test scanner,
40 x 40 x 15 at 4 x 4 x 2 mm) with two kinetic components (spheres take up, background
washes out; :func:`medhpc.phantoms.pet.dynamic_phantom`), ``--frames`` frames of
``--counts`` each, ``--seeds`` noise realisations. For each method: the RMSE of the regional
time-activity curves (every sphere with voxels, and the background) and the voxel NRMSE of
the frames against the truth, each after one least-squares scale, mean over seeds. Writes
``bench/results/pet-dynamic-<date>.json`` and prints a Markdown table.
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

OSEM = [(1, 0.0), (2, 0.0), (4, 0.0), (8, 0.0), (2, 6.0), (4, 6.0)]
NMF = [(2, 2, 0.0), (2, 4, 0.0), (2, 8, 0.0), (3, 4, 0.0), (2, 2, 6.0), (3, 4, 6.0)]
# (components, iterations, post-filter mm)


def main(argv=None) -> int:
    from medhpc.io.geometry import ImageGeometry
    from medhpc.parallel.comm import World, _SerialComm
    from medhpc.pet.osem import ReconSettings
    from medhpc.pet.run import PetRecon
    from medhpc.pet.scanner import load_scanner
    from medhpc.pet.simulate import Simulation, write_simulation
    from medhpc.phantoms.pet import dynamic_phantom, nema_iq_phantom, sphere_masks
    from medhpc.runtime.context import start_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=6)
    parser.add_argument("--counts", type=float, default=5e4, help="Counts per frame (mean).")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)

    def run():
        return start_run("bench", device="cpu", verbosity=-1, world=World(_SerialComm()))

    shape, voxel = (15, 40, 40), (4.0, 4.0, 2.0)
    phantom = nema_iq_phantom(shape, voxel)
    truth, _ = dynamic_phantom(phantom, args.frames)
    grid = ImageGeometry.from_spacing(shape, voxel, origin_mm=phantom["origin_mm"])
    scanner = load_scanner("small-test")
    masks = [mask for mask in sphere_masks(phantom) if mask.sum() > 0]
    masks.append(phantom["background_mask"])
    body = phantom["activity"] > 0

    def curves(frames):
        return np.array([[frame[mask].mean() for frame in frames] for mask in masks])

    def scaled_error(estimate, reference):
        scale = np.sum(estimate * reference) / np.sum(estimate * estimate)
        return float(np.linalg.norm(scale * estimate - reference) / np.linalg.norm(reference))

    true_curves = curves(truth)
    rows = {}
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(args.seeds):
            sinogram = Path(folder) / f"dynamic{seed}.h5"
            simulation = Simulation(run(), scanner, truth, phantom["mu_map"].astype(np.float32),
                                    grid, args.counts, True, 0.2, False)
            write_simulation(sinogram, scanner, grid, simulation.execute(seed=seed), False, True,
                             {})
            cases = [(f"OSEM {it} it x 8, post-filter {post:g} mm", ReconSettings(
                iterations=it, subsets=8, postfilter_fwhm_mm=post), "frames")
                for it, post in OSEM]
            cases += [(f"NMF K={k}, {it} it x 8, post-filter {post:g} mm", ReconSettings(
                algorithm="nmf", iterations=it, subsets=8, components=k,
                postfilter_fwhm_mm=post), "auto") for k, it, post in NMF]
            for label, settings, decomp in cases:
                start = time.process_time()
                frames, _ = PetRecon(run(), sinogram, Path(folder) / "x.nii.gz", settings,
                                     decomp=decomp).compute()
                seconds = time.process_time() - start
                row = rows.setdefault(label, {"curve_rmse": [], "voxel_nrmse": [], "cpu_s": []})
                row["curve_rmse"].append(scaled_error(curves(frames), true_curves))
                row["voxel_nrmse"].append(scaled_error(frames[:, body], truth[:, body]))
                row["cpu_s"].append(seconds)
    lines = [f"### Dynamic phantom, {args.frames} frames of {args.counts:g} counts, "
             f"{args.seeds} noise realisations (means)", "",
             "| method | regional curve RMSE | voxel NRMSE | CPU s |", "| --- | --- | --- | --- |"]
    for label, row in rows.items():
        lines.append(f"| {label} | {np.mean(row['curve_rmse']):.3f} | "
                     f"{np.mean(row['voxel_nrmse']):.3f} | {np.mean(row['cpu_s']):.1f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"pet-dynamic-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"machine": bench_machine(("medhpc", "numpy", "numba")),
                                "frames": args.frames, "counts": args.counts,
                                "seeds": args.seeds, "rows": rows}, indent=2))
    print("\n".join(lines))
    print(f"\nresults: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
