"""The affine start of ``medhpc lddmm`` against SimpleITK and ANTs on real anatomy.

One command (``python bench/lddmm/affine.py``); prints a Markdown table and writes
``bench/results/lddmm-affine-<date>.json``.

Inputs, for each resolution (2 mm and 1 mm): nilearn's MNI152 T1 (the 2009a template it
ships, loaded offline) copied voxel for voxel onto the FSL MNI152 grids (91x109x91 at 2 mm,
182x218x182 at 1 mm, LAS); the moving image is the same data times a smooth multiplicative
bias field (+/-20 %) with its header rotated by 10 degrees about an oblique axis through
the image centre. The truth is that world rotation; the score is the largest distance, over
the 8 corners of the fixed grid, between where a method and the truth put them (mm).

Every registration runs in a fresh process (``--worker``) with one thread
(``NUMBA_NUM_THREADS``, ``OMP_NUM_THREADS``, ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` = 1),
which reports the CPU seconds (``time.process_time``, all threads) and wall seconds of the
registration call alone, inputs in memory. medhpc first registers a tiny pair to load its
JIT cache (reported as ``jit_load_cpu_s``, not counted). Medians of ``--repeats`` runs.

Rows: medhpc ``register_affine`` (ncc affine, ncc rigid, mi affine, defaults); SimpleITK
``ImageRegistrationMethod`` (Euler3D then Affine, correlation, regular-step gradient
descent, physical-shift scales, 3 levels at the same 8/4/2 mm spacings, random 10 %
sampling, geometry-centred start); ANTs ``ants.registration(type_of_transform="Affine")``
(its defaults: Mattes MI, 4 levels, centre-of-mass start). A peer that does not import is
reported as missing.
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
from medhpc.io.geometry import ImageGeometry  # noqa: E402

FSL_GRIDS = {2: ((91, 109, 91), [[-2, 0, 0, 90], [0, 2, 0, -126], [0, 0, 2, -72]]),
             1: ((182, 218, 182), [[-1, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72]])}
ROTATION_DEGREES = 10.0
ROTATION_AXIS = (1.0, 0.6, 0.3)
BIAS = 0.2
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


# -- inputs (shared with tests/lddmm/test_affine.py) -----------------------------------------
def mni_template(resolution: int = 2, fsl_grid: bool = True):
    """nilearn's MNI152 T1 ``(z, y, x)`` float32 and its geometry.

    ``fsl_grid``: copied onto the FSL MNI152 grid of that resolution (a subgrid of
    nilearn's, so the copy is exact); otherwise nilearn's own grid.
    """
    import warnings

    from nilearn import datasets

    from medhpc.lddmm.transform import resample

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        image = datasets.load_mni152_template(resolution=resolution)
    data = np.ascontiguousarray(np.asarray(image.get_fdata(dtype=np.float32)).transpose(2, 1, 0))
    geometry = ImageGeometry(data.shape, image.affine)
    if not fsl_grid:
        return data, geometry
    shape_xyz, rows = FSL_GRIDS[resolution]
    target = ImageGeometry(shape_xyz[::-1], np.vstack([rows, [0, 0, 0, 1]]))
    return np.ascontiguousarray(resample(data, geometry, target)), target


def rotation_about(axis, degrees: float, centre_mm) -> np.ndarray:
    """4x4 world rotation by ``degrees`` about ``axis`` through ``centre_mm``."""
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    out = np.eye(4)
    out[:3, :3] = rotation
    out[:3, 3] = np.asarray(centre_mm) - rotation @ np.asarray(centre_mm)
    return out


def grid_centre_mm(geometry: ImageGeometry) -> np.ndarray:
    return geometry.voxel_to_world((np.array(geometry.shape[::-1]) - 1) / 2)


def bias_field(geometry: ImageGeometry, amplitude: float = BIAS) -> np.ndarray:
    """A smooth multiplicative field spanning ``1 +/- amplitude`` over the grid."""
    z, y, x = np.indices(geometry.shape, dtype=np.float64)
    world = geometry.voxel_to_world(np.stack([x, y, z], -1)) - grid_centre_mm(geometry)
    size = np.max(np.abs(world))
    u, v, w = (world[..., k] / size for k in range(3))
    shape = u + 0.7 * v * v - 0.5 * u * w + 0.4 * np.sin(2.0 * w)
    shape = 2 * (shape - shape.min()) / (shape.max() - shape.min()) - 1
    return (1.0 + amplitude * shape).astype(np.float32)


def rotated_header_pair(image: np.ndarray, geometry: ImageGeometry,
                        degrees: float = ROTATION_DEGREES, axis=ROTATION_AXIS,
                        bias: float = BIAS):
    """The moving image (``image`` times a bias field), its rotated geometry, the truth.

    The moving header is the fixed one rotated about the image centre; the data are the
    same, so the truth (fixed world to moving world) is that rotation.
    """
    truth = rotation_about(axis, degrees, grid_centre_mm(geometry))
    moving = (image * bias_field(geometry, bias)).astype(np.float32)
    return moving, ImageGeometry(geometry.shape, truth @ geometry.affine), truth


# -- peers: images and transforms in ITK's LPS world ------------------------------------------
def _lps_parts(geometry: ImageGeometry):
    affine = LPS @ geometry.affine
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return affine[:3, 3].tolist(), spacing.tolist(), (affine[:3, :3] / spacing).ravel().tolist()


def _lps_matrix(transform_point) -> np.ndarray:
    """The 4x4 LPS matrix of an ITK-style point map (fixed to moving), probed at 4 points."""
    probes = np.array([[0, 0, 0], [100, 0, 0], [0, 100, 0], [0, 0, 100]], np.float64)
    moved = np.array([transform_point(tuple(map(float, p))) for p in probes])
    lps = np.eye(4)
    lps[:3, :3] = ((moved[1:] - moved[0]) / 100.0).T
    lps[:3, 3] = moved[0]
    return lps


def _matrix_from_points(transform_point) -> np.ndarray:
    """The 4x4 RAS matrix (fixed world to moving world) of an ITK-style point map."""
    return LPS @ _lps_matrix(transform_point) @ LPS


def run_simpleitk(data) -> dict:
    import SimpleITK as sitk

    def image(values, geometry):
        out = sitk.GetImageFromArray(values.astype(np.float32))
        origin, spacing, direction = _lps_parts(geometry)
        out.SetOrigin(origin)
        out.SetSpacing(spacing)
        out.SetDirection(direction)
        return out

    fixed = image(data["fixed"], data["fixed_geometry"])
    moving = image(data["moving"], data["moving_geometry"])
    spacing = min(data["fixed_geometry"].spacing_mm)
    shrink = [max(1, round(level / spacing)) for level in (8.0, 4.0, 2.0)]
    sigmas = [0.0 if s == 1 else level / 2 for s, level in zip(shrink, (8.0, 4.0, 2.0))]

    def method():
        r = sitk.ImageRegistrationMethod()
        r.SetMetricAsCorrelation()
        r.SetMetricSamplingStrategy(r.RANDOM)
        r.SetMetricSamplingPercentage(0.1, 1)
        r.SetInterpolator(sitk.sitkLinear)
        r.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3,
                                                   numberOfIterations=200,
                                                   gradientMagnitudeTolerance=1e-6)
        r.SetOptimizerScalesFromPhysicalShift()
        r.SetShrinkFactorsPerLevel(shrink)
        r.SetSmoothingSigmasPerLevel(sigmas)
        r.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
        return r

    start = time.process_time(), time.perf_counter()
    initial = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(),
        sitk.CenteredTransformInitializerFilter.GEOMETRY)
    rigid = method()
    rigid.SetInitialTransform(initial, inPlace=False)
    euler = rigid.Execute(fixed, moving)
    lps = _lps_matrix(euler.TransformPoint)
    centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint(
        [(n - 1) / 2 for n in fixed.GetSize()]))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre.tolist())
    affine.SetMatrix(lps[:3, :3].ravel().tolist())
    affine.SetTranslation((lps[:3, :3] @ centre + lps[:3, 3] - centre).tolist())
    stage = method()
    stage.SetInitialTransform(affine, inPlace=False)
    result = stage.Execute(fixed, moving)
    cpu, wall = time.process_time() - start[0], time.perf_counter() - start[1]
    return {"tool": "SimpleITK", "variant": "Euler3D + Affine, correlation",
            "cpu_s": cpu, "wall_s": wall,
            "matrix": _matrix_from_points(result.TransformPoint).tolist(),
            "iterations": [rigid.GetOptimizerIteration(), stage.GetOptimizerIteration()],
            "settings": {"shrink": shrink, "sigmas_mm": sigmas, "sampling": "random 10 %",
                         "optimizer": "regular step gradient descent, 200 per level"}}


def run_ants(data) -> dict:
    import ants

    def image(values, geometry):
        origin, spacing, direction = _lps_parts(geometry)
        return ants.from_numpy(np.ascontiguousarray(values.transpose(2, 1, 0), np.float32),
                               origin=origin, spacing=spacing,
                               direction=np.array(direction).reshape(3, 3))

    fixed = image(data["fixed"], data["fixed_geometry"])
    moving = image(data["moving"], data["moving_geometry"])
    start = time.process_time(), time.perf_counter()
    result = ants.registration(fixed, moving, type_of_transform="Affine",
                               random_seed=1)
    cpu, wall = time.process_time() - start[0], time.perf_counter() - start[1]
    transform = ants.read_transform(result["fwdtransforms"][0])
    return {"tool": "ANTs", "variant": "Affine (Mattes MI, defaults)", "cpu_s": cpu,
            "wall_s": wall,
            "matrix": _matrix_from_points(lambda p: transform.apply_to_point(p)).tolist()}


def run_medhpc(data, mode: str, metric: str) -> dict:
    from medhpc.lddmm.affine import register_affine

    tiny, tiny_geometry = data["fixed"][::8, ::8, ::8].copy(), None
    tiny_geometry = ImageGeometry(tiny.shape, data["fixed_geometry"].affine @ np.diag([8, 8, 8, 1]))
    start = time.process_time()
    register_affine(tiny, tiny_geometry, tiny, tiny_geometry, mode=mode, metric=metric,
                    levels=(8,))
    jit = time.process_time() - start
    start = time.process_time(), time.perf_counter()
    result = register_affine(data["fixed"], data["fixed_geometry"], data["moving"],
                             data["moving_geometry"], mode=mode, metric=metric)
    cpu, wall = time.process_time() - start[0], time.perf_counter() - start[1]
    return {"tool": "medhpc", "variant": f"{metric} {mode}", "cpu_s": cpu, "wall_s": wall,
            "jit_load_cpu_s": jit, "matrix": result.matrix.tolist(),
            "iterations": {k: list(v) for k, v in result.iterations.items()},
            "start": result.start, "metric_before": result.metric_before,
            "metric_after": result.metric_after, "samples": list(result.samples)}


TOOLS = {"medhpc-ncc-affine": lambda d: run_medhpc(d, "affine", "ncc"),
         "medhpc-ncc-rigid": lambda d: run_medhpc(d, "rigid", "ncc"),
         "medhpc-mi-affine": lambda d: run_medhpc(d, "affine", "mi"),
         "simpleitk": run_simpleitk, "ants": run_ants}
PEERS = ("simpleitk", "ants")


# -- driver ----------------------------------------------------------------------------------
def _save(path: Path, fixed, fixed_geometry, moving, moving_geometry, truth) -> None:
    np.savez(path, fixed=fixed, fixed_affine=fixed_geometry.affine, moving=moving,
             moving_affine=moving_geometry.affine, truth=truth)


def _load(path: Path) -> dict:
    stored = np.load(path)
    return {"fixed": stored["fixed"], "moving": stored["moving"], "truth": stored["truth"],
            "fixed_geometry": ImageGeometry(stored["fixed"].shape, stored["fixed_affine"]),
            "moving_geometry": ImageGeometry(stored["moving"].shape, stored["moving_affine"])}


def worker(tool: str, path: Path) -> None:
    report = TOOLS[tool](_load(path))
    print(json.dumps(report))


def run_worker(tool: str, path: Path, timeout: float = 3600) -> dict | None:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, str(path)]
    env = dict(os.environ, **{name: "1" for name in THREAD_VARIABLES})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if result.returncode != 0:
        print(f"{tool} failed:\n{result.stderr[-2000:]}", file=sys.stderr)
        return None
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def median_report(reports: list) -> dict | None:
    reports = [r for r in reports if r]
    if not reports:
        return None
    out = dict(reports[-1])
    for key in ("cpu_s", "wall_s"):
        out[f"{key}_runs"] = [r[key] for r in reports]
        out[key] = statistics.median(out[f"{key}_runs"])
    return out


def bench_resolution(resolution: int, tools, repeats: int, scratch: Path) -> dict:
    from medhpc.lddmm.affine import corner_error_mm

    fixed, geometry = mni_template(resolution)
    moving, moving_geometry, truth = rotated_header_pair(fixed, geometry)
    path = scratch / f"mni{resolution}.npz"
    _save(path, fixed, geometry, moving, moving_geometry, truth)
    rows = []
    for tool in tools:
        report = median_report([run_worker(tool, path) for _ in range(repeats)])
        if report is None:
            rows.append({"tool": tool, "missing": True})
            continue
        report["corner_error_mm"] = corner_error_mm(report["matrix"], truth, geometry)
        report["corner_error_voxels"] = report["corner_error_mm"] / min(geometry.spacing_mm)
        rows.append(report)
    return {"resolution_mm": resolution, "grid": geometry.describe(),
            "start_corner_error_mm": corner_error_mm(np.eye(4), truth, geometry),
            "truth": truth.tolist(), "rows": rows}


def table(results: list[dict]) -> str:
    lines = ["| input | method | CPU s | wall s | corner error mm (voxels) |",
             "| --- | --- | ---: | ---: | ---: |"]
    for part in results:
        for row in part["rows"]:
            name = f"{row['tool']} {row.get('variant', '')}".strip()
            if row.get("missing"):
                lines.append(f"| {part['grid']} | {name} | missing | | |")
                continue
            lines.append(f"| {part['grid']} | {name} | {row['cpu_s']:.2f} | {row['wall_s']:.2f} | "
                         f"{row['corner_error_mm']:.2f} ({row['corner_error_voxels']:.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("TOOL", "DATA"), help=argparse.SUPPRESS)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[2, 1], choices=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]))
        return
    tools = [t for t in TOOLS if not (args.no_peers and t in PEERS)]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for resolution in args.resolutions:
            results.append(bench_resolution(resolution, tools, args.repeats, Path(scratch)))
            print(table(results[-1:]) + "\n", flush=True)
    record = {"machine": bench_machine(("medhpc", "numpy", "numba", "scipy", "nilearn",
                                        "SimpleITK", "antspyx")),
              "threads": {name: 1 for name in THREAD_VARIABLES}, "repeats": args.repeats,
              "rotation_degrees": ROTATION_DEGREES, "rotation_axis": ROTATION_AXIS,
              "bias_amplitude": BIAS, "results": results}
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"lddmm-affine-{time.strftime('%Y%m%d-%H%M')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(table(results))
    print(f"results in {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
