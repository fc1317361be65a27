"""medhpc's training plans beside nnU-Net v2's for the same anisotropic CT data, same run.

Three synthetic CT cases of 200 x 512 x 512 voxels at 2.5 x 0.8 x 0.8 mm (the phantom
anatomy of ``medhpc phantom ct`` drawn on that grid) are planned by ``medhpc ct-train
--dry-run --gpu-mem-gb G`` and by ``nnUNetv2_extract_fingerprint`` +
``nnUNetv2_plan_experiment -gpu_memory_target G``, for G = 8, 16 and 32 GB. nnU-Net is a
peer installed beside the project, never a dependency (``pip install --no-deps nnunetv2
dynamic-network-architectures acvl-utils batchgenerators`` after torch, then ``blosc2``).

    python bench/ct/plans.py            # about 3-5 minutes
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from bench.machine import machine  # noqa: E402

SHAPE_ZYX = (200, 512, 512)
SPACING_XYZ = (0.8, 0.8, 2.5)
CASES = 3
BUDGETS_GB = (8, 16, 32)
CLASSES = ("liver", "spleen", "kidneys")


def write_cases(folder: Path) -> tuple[Path, Path]:
    from medhpc.io.geometry import ImageGeometry
    from medhpc.io.nifti import write_nifti
    from medhpc.phantoms.ct import make_case

    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True)
    labels.mkdir()
    geometry = ImageGeometry.from_spacing(SHAPE_ZYX, SPACING_XYZ)
    for index in range(CASES):
        hu, label_map = make_case(SHAPE_ZYX, np.random.default_rng([7, index]))
        write_nifti(images / f"case_{index:03d}.nii.gz", hu.astype(np.int16), geometry)
        write_nifti(labels / f"case_{index:03d}.nii.gz", label_map, geometry)
    return images, labels


def medhpc_plans(images: Path, labels: Path, work: Path) -> tuple[dict, float]:
    data = work / "medhpc.h5"
    cpu = 0.0
    commands = [["ct-prepare", "--images", images, "--labels", labels, "--out", data]]
    commands += [["ct-train", "--data", data, "--out", work / f"run{g}", "--dry-run",
                  "--device", "cpu", "--folds", "1", "--gpu-mem-gb", str(g)]
                 for g in BUDGETS_GB]
    outputs = []
    for command in commands:
        before = os.times()
        done = subprocess.run([sys.executable, "-m", "medhpc", *map(str, command), "--quiet"],
                              capture_output=True, text=True, timeout=1800)
        after = os.times()
        cpu += (after.children_user - before.children_user) + \
            (after.children_system - before.children_system)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        outputs.append(done.stdout)
    plans = {}
    for g, text in zip(BUDGETS_GB, outputs[1:]):
        plan = json.loads(text)
        memory, network = plan["memory_plan"], plan["memory_plan"]["network"]
        plans[g] = {"patch": memory["patch"], "batch": memory["batch"],
                    "stages": len(network["widths"]), "widths": network["widths"],
                    "strides": network["strides"], "kernels": network["kernels"],
                    "spacing_zyx": plan["dataset"]["target_spacing_zyx"],
                    "estimated_gb": memory["estimated_gb"],
                    "lowres": None if plan["lowres"] is None else {
                        "spacing_zyx": plan["lowres"]["spacing_mm"][::-1],
                        "patch": plan["lowres"]["plan"]["patch"]}}
    return plans, cpu


def nnunet_plans(images: Path, labels: Path, work: Path) -> tuple[dict, float]:
    raw = work / "nnUNet_raw" / "Dataset501_Phantom"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    for path in sorted(images.glob("*.nii.gz")):
        name = path.name[: -len(".nii.gz")]
        (raw / "imagesTr" / f"{name}_0000.nii.gz").symlink_to(path)
        (raw / "labelsTr" / path.name).symlink_to(labels / path.name)
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{c: i + 1 for i, c in enumerate(CLASSES)}},
        "numTraining": CASES, "file_ending": ".nii.gz"}))
    env = {**os.environ, "nnUNet_raw": str(work / "nnUNet_raw"),
           "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
           "nnUNet_results": str(work / "nnUNet_results"), "OMP_NUM_THREADS": "1"}
    bin_dir = Path(sys.executable).parent
    commands = [[bin_dir / "nnUNetv2_extract_fingerprint", "-d", "501", "-np", "1"]]
    commands += [[bin_dir / "nnUNetv2_plan_experiment", "-d", "501", "-gpu_memory_target",
                  str(g), "-overwrite_plans_name", f"plans_{g}gb"] for g in BUDGETS_GB]
    cpu = 0.0
    for command in commands:
        before = os.times()
        done = subprocess.run([str(c) for c in command], capture_output=True, text=True,
                              env=env, timeout=3600)
        after = os.times()
        cpu += (after.children_user - before.children_user) + \
            (after.children_system - before.children_system)
        if done.returncode != 0:
            raise RuntimeError(done.stdout[-1500:] + done.stderr[-1500:])
    plans = {}
    for g in BUDGETS_GB:
        document = json.loads((work / "nnUNet_preprocessed" / "Dataset501_Phantom"
                               / f"plans_{g}gb.json").read_text())
        configurations = document["configurations"]
        full = configurations["3d_fullres"]
        arch = full["architecture"]["arch_kwargs"]
        lowres = configurations.get("3d_lowres")
        plans[g] = {"patch": full["patch_size"], "batch": full["batch_size"],
                    "stages": arch["n_stages"], "widths": arch["features_per_stage"],
                    "strides": arch["strides"], "kernels": arch["kernel_sizes"],
                    "spacing_zyx": full["spacing"],
                    "lowres": None if lowres is None else {"spacing_zyx": lowres["spacing"],
                                                           "patch": lowres["patch_size"]}}
    return plans, cpu


def markdown(results: dict) -> str:
    lines = ["| GPU budget | planner | patch z,y,x | batch | stages | first strides | "
             "first kernels | widths | low-res spacing z,y,x / patch |",
             "|---|---|---|---:|---:|---|---|---|---|"]
    for g in BUDGETS_GB:
        for name in ("medhpc", "nnU-Net v2"):
            plan = results[name]["plans"].get(str(g)) or results[name]["plans"].get(g)
            if plan is None:
                continue
            lowres = plan["lowres"]
            low = "none" if lowres is None else (
                "x".join(f"{v:.2f}" for v in lowres["spacing_zyx"]) + " / "
                + "x".join(map(str, lowres["patch"])))
            lines.append(
                f"| {g} GB | {name} | {'x'.join(map(str, plan['patch']))} | {plan['batch']} "
                f"| {plan['stages']} | {plan['strides'][1]}, {plan['strides'][2]} "
                f"| {plan['kernels'][0]}, {plan['kernels'][1]} "
                f"| {plan['widths'][0]}..{max(plan['widths'])} | {low} |")
    return "\n".join(lines)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="medhpc-plans-") as tmp:
        work = Path(tmp)
        images, labels = write_cases(work / "data")
        results = {"machine": machine(("medhpc", "torch", "numpy", "nnunetv2")),
                   "data": {"cases": CASES, "shape_zyx": SHAPE_ZYX, "spacing_xyz": SPACING_XYZ}}
        plans, cpu = medhpc_plans(images, labels, work)
        results["medhpc"] = {"plans": plans, "cpu_s": cpu}
        try:
            plans, cpu = nnunet_plans(images, labels, work)
            results["nnU-Net v2"] = {"plans": plans, "cpu_s": cpu}
        except (FileNotFoundError, RuntimeError) as error:
            print(f"nnU-Net v2 not run: {error}", file=sys.stderr)
            results["nnU-Net v2"] = {"plans": {}, "error": str(error)[:500]}
    table = markdown(results)
    print(table)
    for name in ("medhpc", "nnU-Net v2"):
        if "cpu_s" in results[name]:
            print(f"{name}: {results[name]['cpu_s']:.1f} CPU-s (fingerprint/prepare + 3 plans)")
    out = ROOT / "bench" / "results" / f"ct-plans-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=list))
    print(f"written {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
