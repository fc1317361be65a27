"""LDDMM on a real brain: medhpc lddmm against ANTs, dipy and SimpleITK on MNI152 pairs with a
known map (``bench/lddmm/anatomy.py``).

One command::

    python bench/lddmm/realbrain.py [--quick] [--pairs composed:0,local:0] [--resolution 2]
        [--medhpc-root PATH] [--medhpc-args "..."]... [--ranks 1,2] [--rotate-header 10]
        [--contrast t2]

Multimodal pairs (the moving image with a T2-like contrast, ``anatomy.make_pair(contrast=
"t2")``) against ANTs SyNOnly with Mattes mutual information, one command::

    python bench/lddmm/realbrain.py --contrast t2 --tools identity,truth,medhpc,ants-synonly \\
        --medhpc-args "mi=--metric mi" --medhpc-args "mi-identity-start=--metric mi \\
        --initial-transform none" --medhpc-args "lncc=--metric lncc"

Every registration runs in its own process with one thread (``OMP_NUM_THREADS=1`` and the
like, ``--threads 1`` for medhpc, ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1`` for ANTs and
SimpleITK). The process reads the pair, registers and writes the tool's own transform; its
CPU seconds (``getrusage(RUSAGE_CHILDREN)`` before and after, every rank of an ``mpiexec``
included) and wall seconds are the cost. The peers also report the CPU seconds of the
registration call alone (``registration_cpu_s`` in the JSON).

Tools (``--tools``; rows ``identity`` and ``truth`` cost nothing):

- ``medhpc``: ``mpiexec -n K python -m medhpc lddmm --fixed F --moving M --out OUT --device
  cpu --threads 1 <args>`` for every ``--medhpc-args`` (repeatable, ``LABEL=ARGS`` names a
  configuration) and every ``--ranks``; one run per configuration on a small pair first, not
  counted, fills numba's cache (numba compiles per type, not per size);
- ``ants-synonly``, ``ants-syn``: ``ants.registration`` SyNOnly (identity start) and SyN
  (affine then SyN, ANTsPy's centre-of-mass start), ``reg_iterations=(40, 20, 10)`` so that
  the full resolution iterates (ANTsPy's default ``(40, 20, 0)`` does not);
- ``dipy-syn``: ``SymmetricDiffeomorphicRegistration(CCMetric(3))``, level_iters [50, 25, 10],
  identity start (world to world); ``dipy-affine-syn``: the same after ``AffineRegistration``
  with mutual information, rigid then affine (run for the rotated-header pair);
- ``demons``: SimpleITK ``FastSymmetricForcesDemonsRegistrationFilter``, 100 iterations per
  level, standard deviations 1.5, a 3-level pyramid (shrink 4, 2, 1), identity start.

Scores, the same for every tool, from its **recovered map** (moving world mm, RAS, of every
fixed voxel): the three world coordinates of the moving space (as images on the moving grid
padded by 16 voxels) are warped into the fixed space by the tool's own apply function with
linear interpolation, which is exact for a linear function; medhpc's map is read from
``transform.h5``. Displacement error mean / p95 (mm) against the true map over the fixed grey
and white matter; Dice of grey / white matter between the fixed labels and the moving labels
pulled through the map (nearest neighbour); folded %: fixed voxels with ``det <= 0`` of the
map's Jacobian. The ``truth`` row pulls the labels through the true map: the Dice a perfect
registration gets after nearest-neighbour resampling.

Writes ``bench/results/lddmm-realbrain-<date>.json`` (machine, versions, every parameter,
every row) and prints Markdown tables: medians over the pairs, then per pair, then the
rotated-header pair. ``--quick``: one pair (composed:0 at downsample 2) for a smoke test.
``--work DIR`` keeps the pairs and every tool's output; ``--rescore RESULTS.json --work DIR``
scores those outputs again without registering (a new results file, costs kept).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from bench.lddmm import anatomy  # noqa: E402
from bench.machine import machine as bench_machine  # noqa: E402

ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS",
                                     "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                     "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")}
ANTS_SEED = "1"
PAD_VOXELS = 16
PEERS = ("ants-synonly", "ants-synonly-default", "ants-syn", "dipy-syn", "dipy-affine-syn",
         "demons")
DEFAULT_TOOLS = ("identity", "truth", "medhpc", "ants-synonly", "ants-synonly-default",
                 "ants-syn", "dipy-syn", "demons")
DEFAULT_ROTATED_TOOLS = ("identity", "truth", "ants-syn", "dipy-affine-syn")

#: Every parameter the peers run with (ANTsPy's keywords, then what its SyN / SyNOnly
#: command line holds for them in antspyx 0.6.3).
ANTS_COMMON = {"reg_iterations": (40, 20, 10), "syn_metric": "mattes", "syn_sampling": 32,
               "grad_step": 0.2, "flow_sigma": 3, "total_sigma": 0,
               "use_legacy_histogram_matching": False}
PARAMETERS = {
    "ants-synonly": dict(ANTS_COMMON, type_of_transform="SyNOnly", command_line={
        "initial": "Identity (ANTsPy's default for SyNOnly)",
        "syn": "SyN[0.2,3,0], MattesMI 32 bins, convergence [40x20x10,1e-7,8], "
               "shrink 4x2x1, smoothing 2x1x0 vox", "histogram_matching": 0,
        "winsorize": "none", "random_seed": f"ANTS_RANDOM_SEED={ANTS_SEED}"}),
    "ants-synonly-default": dict(ANTS_COMMON, reg_iterations=(40, 20, 0),
                                 type_of_transform="SyNOnly", command_line={
        "initial": "Identity", "syn": "as ants-synonly but ANTsPy's default "
                                      "reg_iterations (40,20,0): no full-resolution iteration"}),
    "ants-syn": dict(ANTS_COMMON, type_of_transform="SyN", aff_metric="mattes",
                     aff_sampling=32, aff_random_sampling_rate=0.2, command_line={
        "initial": "[fixed,moving,1] (centre of mass; ANTsPy's default for SyN)",
        "affine": "Affine[0.25], MattesMI 32 bins regular 0.2, convergence "
                  "2100x1200x1200x0, shrink 4x2x2x1, smoothing 3x2x1x0 vox (fixed in ANTsPy's "
                  "SyN; aff_iterations / aff_shrink_factors are not used by this type)",
        "syn": "SyN[0.2,3,0], MattesMI 32 bins, convergence [40x20x10,1e-7,8], "
               "shrink 4x2x1, smoothing 2x1x0 vox", "histogram_matching": 0,
        "random_seed": f"ANTS_RANDOM_SEED={ANTS_SEED}"}),
    "dipy-syn": {"metric": "CCMetric(3, sigma_diff=2.0, radius=4)",
                 "level_iters": [50, 25, 10], "step_length": 0.25, "ss_sigma_factor": 0.2,
                 "opt_tol": 1e-5, "inv_iter": 20, "inv_tol": 1e-3,
                 "prealign": "identity (world to world, both grid-to-world affines given)"},
    "dipy-affine-syn": {"affine": {"metric": "MutualInformationMetric(nbins=32, "
                                             "sampling_proportion=None)",
                                   "level_iters": [10000, 1000, 100], "sigmas": [3.0, 1.0, 0.0],
                                   "factors": [4, 2, 1], "method": "L-BFGS-B",
                                   "stages": "RigidTransform3D from identity, then "
                                             "AffineTransform3D from the rigid result"},
                        "syn": "as dipy-syn with prealign = the affine"},
    "demons": {"filter": "FastSymmetricForcesDemonsRegistrationFilter",
               "iterations_per_level": 100, "standard_deviations": 1.5,
               "shrink_factors": [4, 2, 1], "smoothing_sigmas_vox": [2.0, 1.0, 0.0],
               "other": "SimpleITK defaults (MaximumRMSError 0.02, MaximumUpdateStepLength "
                        "0.5, UseImageSpacing on, no update-field smoothing), "
                        "no intensity matching, identity start"},
}
LABELS = {"identity": "identity (no registration)",
          "truth": "true map (labels through it: the Dice ceiling)",
          "ants-synonly": "ANTs SyNOnly (identity init)",
          "ants-synonly-default": "ANTs SyNOnly, ANTsPy default iterations (40,20,0)",
          "ants-syn": "ANTs SyN (affine + SyN)",
          "dipy-syn": "dipy SyN CCMetric, level_iters [50,25,10]",
          "dipy-affine-syn": "dipy affine (MI, rigid then affine) + SyN CC",
          "demons": "SimpleITK fast symmetric demons (100 it/level, sd 1.5, 3 levels)"}


def machine() -> dict:
    return bench_machine(("medhpc", "numpy", "scipy", "numba", "mpi4py", "mpich", "h5py",
                          "nibabel", "nilearn", "antspyx", "dipy", "SimpleITK"))


# -- pairs and coordinate images ------------------------------------------------------------
def parse_pairs(text: str) -> list[tuple[str, int]]:
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        family, _, seed = item.partition(":")
        if family not in anatomy.FAMILIES:
            raise SystemExit(f"--pairs {item}: family {family!r} is not one of "
                             f"{', '.join(anatomy.FAMILIES)}")
        pairs.append((family, int(seed or 0)))
    return pairs


def write_coordinates(folder: Path, moving_affine: np.ndarray, shape) -> None:
    """``coordinate_{x,y,z}.nii.gz``: the moving world coordinates on the moving grid padded
    by ``PAD_VOXELS`` each side (a linear function, so linear interpolation is exact)."""
    import nibabel as nib

    shift = np.eye(4)
    shift[:3, 3] = -PAD_VOXELS
    affine = moving_affine @ shift
    padded = tuple(n + 2 * PAD_VOXELS for n in shape)
    world = anatomy.voxel_world(affine, padded).astype(np.float32)
    for axis, name in enumerate("xyz"):
        image = nib.Nifti1Image(world[axis], affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        nib.save(image, str(folder / f"coordinate_{name}.nii.gz"))


def build_pair(folder: Path, family: str, seed: int, resolution: int, downsample: int,
               rotate: float, contrast: str = "t1") -> Path:
    """Write the pair (and its coordinate images) once; reuse it when it is there."""
    if (folder / "pair.json").exists() and (folder / "coordinate_z.nii.gz").exists():
        return folder
    started = time.perf_counter()
    pair = anatomy.make_pair(resolution_mm=resolution, seed=seed, family=family,
                             rotate_header_deg=rotate, downsample=downsample,
                             contrast=contrast)
    anatomy.write_pair(pair, folder)
    write_coordinates(folder, pair["moving_affine"], pair["moving"].shape)
    stats = pair["info"]["displacement_mm"]
    print(f"pair {folder.name}: {'x'.join(map(str, pair['fixed'].shape))}, displacement mean "
          f"{stats['mean_grey_white']:.2f} / max {stats['max_grey_white']:.2f} mm "
          f"({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return folder


# -- workers: one registration each, in its own process ------------------------------------
def _timed(call):
    wall, cpu = time.perf_counter(), time.process_time()
    result = call()
    return result, {"registration_wall_s": time.perf_counter() - wall,
                    "registration_cpu_s": time.process_time() - cpu}


def worker_ants(pair: Path, out: Path, tool: str) -> dict:
    import shutil

    import ants

    fixed = ants.image_read(str(pair / "fixed.nii.gz"))
    moving = ants.image_read(str(pair / "moving.nii.gz"))
    keywords = {k: v for k, v in PARAMETERS[tool].items() if k != "command_line"}
    registration, report = _timed(lambda: ants.registration(
        fixed, moving, outprefix=str(out / "ants_"), verbose=False, **keywords))
    transforms = []
    for index, path in enumerate(registration["fwdtransforms"]):
        target = out / f"forward_{index}{''.join(Path(path).suffixes)}"
        if Path(path).resolve() != target.resolve():
            shutil.copy(path, target)
        transforms.append(str(target))
    (out / "transforms.json").write_text(json.dumps(transforms))
    return report


def _dipy_inputs(pair: Path):
    import nibabel as nib

    images = {name: nib.load(str(pair / f"{name}.nii.gz")) for name in ("fixed", "moving")}
    return ({name: np.asarray(image.get_fdata(), np.float64) for name, image in images.items()},
            {name: np.asarray(image.affine, np.float64) for name, image in images.items()})


def worker_dipy(pair: Path, out: Path, tool: str) -> dict:
    from dipy.align.imwarp import SymmetricDiffeomorphicRegistration
    from dipy.align.metrics import CCMetric

    data, affines = _dipy_inputs(pair)
    static, moving = data["fixed"], data["moving"]

    def register():
        prealign = None
        if tool == "dipy-affine-syn":
            from dipy.align.imaffine import AffineRegistration, MutualInformationMetric
            from dipy.align.transforms import AffineTransform3D, RigidTransform3D

            settings = PARAMETERS[tool]["affine"]
            affine_registration = AffineRegistration(
                metric=MutualInformationMetric(nbins=32, sampling_proportion=None),
                level_iters=settings["level_iters"], sigmas=settings["sigmas"],
                factors=settings["factors"], verbosity=0)
            rigid = affine_registration.optimize(
                static, moving, RigidTransform3D(), None, static_grid2world=affines["fixed"],
                moving_grid2world=affines["moving"], starting_affine=None)
            affine = affine_registration.optimize(
                static, moving, AffineTransform3D(), None, static_grid2world=affines["fixed"],
                moving_grid2world=affines["moving"], starting_affine=rigid.affine)
            prealign = affine.affine
        settings = PARAMETERS["dipy-syn"]
        registration = SymmetricDiffeomorphicRegistration(
            CCMetric(3, sigma_diff=2.0, radius=4), level_iters=settings["level_iters"],
            step_length=settings["step_length"], ss_sigma_factor=settings["ss_sigma_factor"],
            opt_tol=settings["opt_tol"], inv_iter=settings["inv_iter"],
            inv_tol=settings["inv_tol"])
        return registration.optimize(static, moving, static_grid2world=affines["fixed"],
                                     moving_grid2world=affines["moving"], prealign=prealign)

    mapping, report = _timed(register)
    import nibabel as nib

    # the mapping is used here, after the timing, and stored as plain arrays (no pickle)
    coordinates = [nib.load(str(pair / f"coordinate_{axis}.nii.gz")) for axis in "xyz"]
    np.save(out / "recovered_map.npy", _stack_xyz(
        mapping.transform(np.asarray(image.get_fdata(), np.float64), interpolation="linear",
                          image_world2grid=np.linalg.inv(image.affine))
        for image in coordinates))
    np.save(out / "warped.npy", mapping.transform(moving, interpolation="linear"))
    return report


def worker_demons(pair: Path, out: Path, tool: str) -> dict:
    import SimpleITK as sitk

    settings = PARAMETERS["demons"]
    fixed = sitk.ReadImage(str(pair / "fixed.nii.gz"), sitk.sitkFloat32)
    moving = sitk.ReadImage(str(pair / "moving.nii.gz"), sitk.sitkFloat32)
    if not (np.allclose(fixed.GetDirection(), moving.GetDirection())
            and np.allclose(fixed.GetOrigin(), moving.GetOrigin())
            and fixed.GetSize() == moving.GetSize()):
        # demons needs both on one grid: the moving image on the fixed grid (world identity)
        moving = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0)

    def level(image, shrink, sigma_vox):
        if sigma_vox > 0:
            image = sitk.SmoothingRecursiveGaussian(
                image, [sigma_vox * s for s in image.GetSpacing()])
        return sitk.Shrink(image, [shrink] * 3) if shrink > 1 else image

    def register():
        field = None
        for shrink, sigma in zip(settings["shrink_factors"], settings["smoothing_sigmas_vox"]):
            fixed_level, moving_level = level(fixed, shrink, sigma), level(moving, shrink, sigma)
            demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
            demons.SetNumberOfIterations(settings["iterations_per_level"])
            demons.SetStandardDeviations(settings["standard_deviations"])
            demons.SetNumberOfThreads(1)
            if field is None:
                field = demons.Execute(fixed_level, moving_level)
            else:
                start = sitk.Resample(field, fixed_level, sitk.Transform(), sitk.sitkLinear,
                                      0.0, sitk.sitkVectorFloat64)
                field = demons.Execute(fixed_level, moving_level, start)
        return field

    field, report = _timed(register)
    sitk.WriteImage(field, str(out / "displacement.mha"))
    return report


WORKERS = {"ants-synonly": worker_ants, "ants-synonly-default": worker_ants,
           "ants-syn": worker_ants, "dipy-syn": worker_dipy,
           "dipy-affine-syn": worker_dipy, "demons": worker_demons}


# -- recovered maps -------------------------------------------------------------------------
def _stack_xyz(images) -> np.ndarray:
    return np.stack([np.asarray(image, np.float32) for image in images])


def recovered_map(tool: str, pair: Path, out: Path, fixed_affine: np.ndarray) -> np.ndarray:
    """The tool's map ``(3, nx, ny, nz)``: moving world mm (RAS) of every fixed voxel."""
    coordinates = [pair / f"coordinate_{axis}.nii.gz" for axis in "xyz"]
    if tool.startswith("medhpc"):
        return read_medhpc_map(out / "transform.h5", fixed_affine)
    if tool.startswith("ants"):
        import ants

        fixed = ants.image_read(str(pair / "fixed.nii.gz"))
        transforms = json.loads((out / "transforms.json").read_text())
        return _stack_xyz(ants.apply_transforms(fixed, ants.image_read(str(path)), transforms,
                                                interpolator="linear").numpy()
                          for path in coordinates)
    if tool.startswith("dipy"):
        return np.load(out / "recovered_map.npy")
    if tool == "demons":
        import SimpleITK as sitk

        fixed = sitk.ReadImage(str(pair / "fixed.nii.gz"), sitk.sitkFloat32)
        field = sitk.ReadImage(str(out / "displacement.mha"), sitk.sitkVectorFloat64)
        transform = sitk.DisplacementFieldTransform(field)
        return _stack_xyz(sitk.GetArrayFromImage(sitk.Resample(
            sitk.ReadImage(str(path), sitk.sitkFloat32), fixed, transform, sitk.sitkLinear,
            0.0)).transpose(2, 1, 0) for path in coordinates)
    raise ValueError(tool)


def read_medhpc_map(path: Path, fixed_affine: np.ndarray) -> np.ndarray:
    """medhpc's ``transform.h5`` as a map: ``forward_displacement_vox`` is ``(3, nz, ny, nx)``
    (z, y, x) in fixed voxels and the moving world point is
    ``fixed_affine @ (x + u_x, y + u_y, z + u_z, 1)``; where the file holds
    ``affine_world_ras`` (fixed world -> moving world, 4x4), that is applied after."""
    import h5py

    with h5py.File(path, "r") as f:
        forward = np.asarray(f["forward_displacement_vox"][()], np.float64)
        world_affine = (np.asarray(f["affine_world_ras"][()], np.float64)
                        if "affine_world_ras" in f else None)
        stored = (np.asarray(f["fixed"].attrs["affine"], np.float64)
                  if "fixed" in f and "affine" in f["fixed"].attrs else None)
    if stored is not None and not np.allclose(stored, fixed_affine, atol=1e-4):
        print(f"{path}: fixed affine differs from the pair's; using the pair's",
              file=sys.stderr)
    displacement_xyz = np.stack([forward[2 - axis].transpose(2, 1, 0) for axis in range(3)])
    voxels = np.indices(displacement_xyz.shape[1:], dtype=np.float64) + displacement_xyz
    flat = voxels.reshape(3, -1)
    world = fixed_affine[:3, :3] @ flat + fixed_affine[:3, 3:4]
    if world_affine is not None:
        world = world_affine[:3, :3] @ world + world_affine[:3, 3:4]
    return world.reshape(voxels.shape).astype(np.float32)


def own_warp(tool: str, pair: Path, out: Path) -> np.ndarray | None:
    """The moving image warped to the fixed grid by the tool itself (linear): the check that
    the recovered map is the tool's transform."""
    if tool.startswith("medhpc"):
        import nibabel as nib

        path = out / "warped.nii.gz"
        return np.asarray(nib.load(str(path)).dataobj, np.float64) if path.exists() else None
    if tool.startswith("ants"):
        import ants

        return ants.apply_transforms(ants.image_read(str(pair / "fixed.nii.gz")),
                                     ants.image_read(str(pair / "moving.nii.gz")),
                                     json.loads((out / "transforms.json").read_text()),
                                     interpolator="linear").numpy()
    if tool.startswith("dipy"):
        return np.load(out / "warped.npy")
    if tool == "demons":
        import SimpleITK as sitk

        fixed = sitk.ReadImage(str(pair / "fixed.nii.gz"), sitk.sitkFloat32)
        field = sitk.ReadImage(str(out / "displacement.mha"), sitk.sitkVectorFloat64)
        moving = sitk.ReadImage(str(pair / "moving.nii.gz"), sitk.sitkFloat32)
        return sitk.GetArrayFromImage(sitk.Resample(
            moving, fixed, sitk.DisplacementFieldTransform(field), sitk.sitkLinear,
            0.0)).transpose(2, 1, 0)
    return None


def map_check(tool: str, pair: Path, out: Path, pair_data: dict, world_map) -> float | None:
    """Largest ``|moving at the map - the tool's own warp|`` inside the fixed head, as a share
    of the moving image's 99th percentile (~1e-6 when the map is the tool's transform).

    Only where the map lands inside the moving grid: beyond it the tools extrapolate in their
    own ways (the template's brain reaches the grid's lowest plane)."""
    own = own_warp(tool, pair, out)
    if own is None:
        return None
    moving = np.asarray(pair_data["moving"], np.float64)
    voxels = anatomy.world_to_voxel(pair_data["moving_affine"], np.asarray(world_map, np.float64))
    ours = anatomy.sample(moving, voxels)
    inside = pair_data["fixed_labels"] > 0
    for axis, n in enumerate(moving.shape):
        inside &= (voxels[axis] >= 0) & (voxels[axis] <= n - 1)
    return float(np.max(np.abs(ours - own)[inside]) / np.percentile(moving, 99))


def score(pair_data: dict, world_map: np.ndarray) -> dict:
    mask = anatomy.brain_mask(pair_data["fixed_labels"])
    warped = anatomy.warp_labels(pair_data["moving_labels"], pair_data["moving_affine"],
                                 world_map)
    return {"dice": anatomy.dice(warped, pair_data["fixed_labels"]),
            "error": anatomy.displacement_error(pair_data["true_map"], world_map, mask),
            "folded_percent": 100 * anatomy.folded_share(world_map, pair_data["fixed_affine"])}


# -- running --------------------------------------------------------------------------------
def child_env(pythonpath: Path) -> dict:
    env = dict(os.environ, **ONE_THREAD, ANTS_RANDOM_SEED=ANTS_SEED)
    env["PYTHONPATH"] = os.pathsep.join([str(pythonpath)] + [
        p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def measured(command, env, timeout, cwd=None) -> tuple[subprocess.CompletedProcess, float,
                                                       float]:
    """Run ``command``; its CPU seconds (every descendant it waited for) and wall seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    result = subprocess.run(list(map(str, command)), capture_output=True, text=True, env=env,
                            timeout=timeout, cwd=cwd)
    wall = time.perf_counter() - wall
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result, cpu, wall


def medhpc_command(args, pair: Path, out: Path, ranks: int, extra: str) -> list:
    mpiexec = Path(sys.executable).parent / "mpiexec"
    return [mpiexec, "-n", ranks, sys.executable, "-m", "medhpc", "lddmm", "--fixed",
            pair / "fixed.nii.gz", "--moving", pair / "moving.nii.gz", "--out", out,
            "--overwrite", "--quiet", "--device", "cpu", "--threads", "1", "--timings",
            out / "timings.json", *shlex.split(extra)]


def run_medhpc(args, pair: Path, out: Path, ranks: int, extra: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    # run from the output folder: ``python -m`` puts the working folder first on the path,
    # which would shadow --medhpc-root
    result, cpu, wall = measured(medhpc_command(args, pair, out, ranks, extra),
                                 child_env(args.medhpc_root), args.timeout, cwd=out)
    if result.returncode != 0:
        return {"failed": (result.stderr or result.stdout)[-2000:]}
    report = {"cpu_s": cpu, "wall_s": wall}
    timings = out / "timings.json"
    if timings.exists():
        document = json.loads(timings.read_text())
        report["medhpc_wall_s"] = document.get("wall_seconds")
        report["peak_memory_mb_per_rank"] = document.get("peak_memory_mb_per_rank")
    log = out / "log.json"
    if log.exists():
        history = json.loads(log.read_text()).get("history")
        if isinstance(history, list):
            report["iterations"] = len(history)
    return report


def run_peer(args, tool: str, pair: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, Path(__file__).resolve(), "--worker", tool, pair, out]
    result, cpu, wall = measured(command, child_env(ROOT), args.timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"failed": (result.stderr or result.stdout)[-2000:]}
    return dict(json.loads(lines[-1]), cpu_s=cpu, wall_s=wall)


def medhpc_configurations(values) -> list[tuple[str, str]]:
    """``--medhpc-args`` values as (label, arguments); ``LABEL=ARGS`` names one."""
    configurations = []
    for value in values or [""]:
        head, sep, tail = value.partition("=")
        if sep and head and not head.startswith("-") and " " not in head:
            configurations.append((head, tail))
        else:
            configurations.append((value.strip() or "defaults", value))
    return configurations


def output_folder(work: Path, pair: Path, row: dict) -> Path | None:
    """Where a row's registration wrote its transform (``None`` for identity and truth)."""
    if row["tool"] == "medhpc":
        return work / pair.name / f"medhpc-{row['configuration'].replace(' ', '_')}-{row['ranks']}"
    return work / pair.name / row["tool"] if row["tool"] in PEERS else None


def score_row(row: dict, pair: Path, pair_data: dict, out: Path | None) -> dict:
    """Add the scores (and the map check) of a row whose registration is done."""
    if "failed" in row:
        return row
    if row["tool"] == "identity":
        world_map = anatomy.identity_map(pair_data["fixed_affine"], pair_data["fixed"].shape)
    elif row["tool"] == "truth":
        world_map = pair_data["true_map"]
    else:
        world_map = recovered_map(row["tool"], pair, out, pair_data["fixed_affine"])
    row.update(score(pair_data, world_map))
    if out is not None:
        row["output"] = str(out)
        row["map_check"] = map_check(row["tool"], pair, out, pair_data, world_map)
    return row


def run_pair(args, pair: Path, tools, work: Path, configurations, ranks_list) -> list[dict]:
    pair_data = anatomy.read_pair(pair)
    rows = []

    def add(row):
        rows.append(score_row(row, pair, pair_data, output_folder(work, pair, row)))
        print(f"  {row['label']}: {brief(row)}", file=sys.stderr)

    for tool in ("identity", "truth"):
        if tool in tools:
            add({"tool": tool, "label": LABELS[tool]})
    if "medhpc" in tools:
        for label, extra in configurations:
            for ranks in ranks_list:
                row = {"tool": "medhpc", "label": f"medhpc lddmm {label}, {ranks} rank(s)",
                       "configuration": label, "medhpc_args": extra, "ranks": ranks}
                row.update(run_medhpc(args, pair, output_folder(work, pair, row), ranks, extra))
                add(row)
    for tool in PEERS:
        if tool in tools:
            row = {"tool": tool, "label": LABELS[tool], "parameters": PARAMETERS[tool]}
            row.update(run_peer(args, tool, pair, output_folder(work, pair, row)))
            add(row)
    return rows


def rescore(path: Path, work: Path) -> dict:
    """Score the registrations of an earlier run again from their outputs under ``work``
    (nothing is registered again); costs and parameters are kept."""
    results = json.loads(path.read_text())
    for entry in results["pairs"]:
        pair = work / entry.get("folder", f"{entry['name']}-r{results['resolution_mm']}"
                                          f"-d{results['downsample']}")
        pair_data = anatomy.read_pair(pair)
        print(f"{entry['name']}:", file=sys.stderr)
        for row in entry["rows"]:
            score_row(row, pair, pair_data, output_folder(work, pair, row))
            print(f"  {row['label']}: {brief(row)}", file=sys.stderr)
    results["medians"] = median_rows([p for p in results["pairs"]
                                      if not p["rotate_header_deg"]])
    results["rescored"] = {"from": str(path), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                           "machine": machine()}
    return results


def warm_up(args, work: Path, configurations, ranks_list) -> None:
    """One uncounted medhpc run per configuration and rank count on a small pair."""
    family, seed = args.pair_list[0]
    pair = build_pair(work / f"warmup-{family}-{seed}-{args.contrast}", family, seed,
                      args.resolution, 4, 0.0, args.contrast)
    for label, extra in configurations:
        for ranks in ranks_list:
            report = run_medhpc(args, pair, work / "warmup" / f"{label}-{ranks}".replace(" ", "_"),
                                ranks, extra)
            if "failed" in report:
                print(f"medhpc warm-up {label!r} on {ranks} rank(s) failed:\n"
                      f"{report['failed']}", file=sys.stderr)


# -- tables ---------------------------------------------------------------------------------
def brief(row: dict) -> str:
    if "failed" in row:
        lines = row["failed"].strip().splitlines()
        return "failed: " + lines[-1][:200] if lines else "failed"
    parts = []
    if "cpu_s" in row:
        parts.append(f"{row['cpu_s']:.1f} CPU-s, {row['wall_s']:.1f} s")
    if "dice" in row:
        parts.append(f"Dice {row['dice']['grey']:.3f}/{row['dice']['white']:.3f}, error "
                     f"{row['error']['mean_mm']:.2f}/{row['error']['p95_mm']:.2f} mm, folded "
                     f"{row['folded_percent']:.3f}%")
    if row.get("map_check") is not None:
        parts.append(f"map check {row['map_check']:.1e}")
    return "; ".join(parts)


def _cells(row: dict) -> list[str]:
    if "failed" in row:
        return ["failed", "", "", "", "", ""]
    cost = row.get("cpu_s")
    registration = row.get("registration_cpu_s")
    return [f"{cost:.1f}" if cost is not None else "-",
            f"{registration:.1f}" if registration is not None else "-",
            f"{row['wall_s']:.1f}" if "wall_s" in row else "-",
            f"{row['dice']['grey']:.3f} / {row['dice']['white']:.3f}",
            f"{row['error']['mean_mm']:.2f} / {row['error']['p95_mm']:.2f}",
            f"{row['folded_percent']:.3f}"]


HEADER = ("| CPU-s | registration CPU-s | wall-s | Dice GM / WM | error mean / p95 mm | "
          "folded % |")


def median_rows(pairs: list[dict]) -> list[dict]:
    """Per tool label, the median of every number over the pairs where it ran."""
    by_label = {}
    for pair in pairs:
        for row in pair["rows"]:
            if "failed" not in row:
                by_label.setdefault(row["label"], []).append(row)
    rows = []
    for label, group in by_label.items():
        row = {"label": label, "pairs": len(group)}
        for key in ("cpu_s", "registration_cpu_s", "wall_s", "folded_percent"):
            values = [r[key] for r in group if r.get(key) is not None]
            if values:
                row[key] = statistics.median(values)
        row["dice"] = {k: statistics.median(r["dice"][k] for r in group)
                       for k in group[0]["dice"]}
        row["error"] = {k: statistics.median(r["error"][k] for r in group)
                        for k in group[0]["error"]}
        rows.append(row)
    return rows


def markdown(results: dict) -> str:
    lines = []
    plain = [p for p in results["pairs"] if not p["rotate_header_deg"]]
    rotated = [p for p in results["pairs"] if p["rotate_header_deg"]]
    if plain:
        names = ", ".join(p["name"] for p in plain)
        contrast = (", moving image T2-like" if results.get("contrast", "t1") == "t2"
                    else "")
        lines += [f"Medians over {len(plain)} pair(s) ({names}), "
                  f"{results['resolution_mm']} mm MNI152{contrast}, one thread per process:", "",
                  "| tool " + HEADER, "| --- | ---: | ---: | ---: | --- | --- | ---: |"]
        lines += [f"| {row['label']} | " + " | ".join(_cells(row)) + " |"
                  for row in median_rows(plain)]
    for title, group in (("Per pair", plain), ("Rotated moving header", rotated)):
        if not group:
            continue
        lines += ["", f"{title}:", "", "| pair | tool " + HEADER,
                  "| --- | --- | ---: | ---: | ---: | --- | --- | ---: |"]
        for pair in group:
            stats = pair["info"]["displacement_mm"]
            name = (f"{pair['name']} (mean {stats['mean_grey_white']:.2f}, max "
                    f"{stats['max_grey_white']:.2f} mm)")
            for row in pair["rows"]:
                lines.append(f"| {name} | {row['label']} | " + " | ".join(_cells(row)) + " |")
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--quick", action="store_true",
                        help="one small pair (composed:0, downsample 2): a smoke test")
    parser.add_argument("--pairs", default="composed:0,local:0",
                        help="family:seed,... (families: " + ", ".join(anatomy.FAMILIES) + ")")
    parser.add_argument("--resolution", type=int, default=2, help="template resolution (mm)")
    parser.add_argument("--downsample", type=int, default=1, help="block-mean factor")
    parser.add_argument("--medhpc-root", type=Path, default=ROOT,
                        help="PYTHONPATH of the medhpc under test [default: this repository]")
    parser.add_argument("--medhpc-args", action="append",
                        help="arguments of one medhpc configuration (repeatable; "
                             "'LABEL=ARGS' names it) [default: medhpc's defaults]")
    parser.add_argument("--ranks", default="1", help="rank counts for medhpc, e.g. 1,2")
    parser.add_argument("--contrast", choices=anatomy.CONTRASTS, default="t1",
                        help="the moving image's contrast: t1 (the template's), or t2 "
                             "(T2-like, a non-monotone remap: the multimodal case)")
    parser.add_argument("--rotate-header", type=float, default=0.0,
                        help="also the first pair with its moving header rotated by this "
                             "many degrees (about the left-right axis through the centre)")
    parser.add_argument("--tools", default=",".join(DEFAULT_TOOLS))
    parser.add_argument("--rotated-tools", default=",".join(DEFAULT_ROTATED_TOOLS),
                        help="tools for the rotated-header pair (medhpc may be added)")
    parser.add_argument("--work", type=Path, help="where pairs and outputs go (kept) "
                        "[default: a temporary folder]")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--rescore", type=Path, metavar="RESULTS_JSON",
                        help="score an earlier run again from its --work outputs (no "
                             "registration runs); writes a new results file")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        tool, pair, out = args.worker
        report = WORKERS[tool](Path(pair), Path(out), tool)
        print(json.dumps(report))
        return 0

    if args.rescore:
        if args.work is None:
            raise SystemExit("--rescore needs --work: the folder of the earlier run's outputs")
        results = rescore(args.rescore, args.work.resolve())
        return write_results(args.out, results)
    if args.quick:
        args.pairs, args.downsample = "composed:0", 2
    args.pair_list = parse_pairs(args.pairs)
    tools = [t for t in args.tools.split(",") if t]
    rotated_tools = [t for t in args.rotated_tools.split(",") if t]
    known = set(DEFAULT_TOOLS) | set(PEERS)
    for tool in tools + rotated_tools:
        if tool not in known:
            raise SystemExit(f"--tools {tool}: expected one of {', '.join(sorted(known))}")
    configurations = medhpc_configurations(args.medhpc_args)
    ranks_list = [int(r) for r in args.ranks.split(",") if r]
    args.medhpc_root = args.medhpc_root.resolve()

    results = {"machine": machine(), "resolution_mm": args.resolution,
               "contrast": args.contrast,
               "downsample": args.downsample, "medhpc_root": str(args.medhpc_root),
               "medhpc_configurations": [{"label": l, "args": a} for l, a in configurations],
               "ranks": ranks_list, "parameters": PARAMETERS, "threads_env": ONE_THREAD,
               "scoring": {"mask": "fixed grey + white matter (labels 2, 3)",
                           "labels": "moving labels through the map, nearest neighbour",
                           "map": "moving world coordinates (padded by "
                                  f"{PAD_VOXELS} voxels) warped by each tool's own apply, "
                                  "linear; medhpc from transform.h5",
                           "cpu_s": "getrusage(RUSAGE_CHILDREN) of the registration "
                                    "process (read, register, write)"},
               "pairs": []}
    with tempfile.TemporaryDirectory() as scratch:
        work = (args.work or Path(scratch)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        jobs = [(family, seed, 0.0, tools) for family, seed in args.pair_list]
        if args.rotate_header:
            family, seed = args.pair_list[0]
            jobs.append((family, seed, args.rotate_header, rotated_tools))
        if any("medhpc" in job[3] for job in jobs):
            warm_up(args, work, configurations, ranks_list)
        for family, seed, rotate, job_tools in jobs:
            name = (f"{family}-{seed}" + (f"-rot{rotate:g}" if rotate else "")
                    + (f"-{args.contrast}" if args.contrast != "t1" else ""))
            folder = work / f"{name}-r{args.resolution}-d{args.downsample}"
            pair = build_pair(folder, family, seed, args.resolution, args.downsample, rotate,
                              args.contrast)
            print(f"{name}:", file=sys.stderr)
            rows = run_pair(args, pair, job_tools, work, configurations, ranks_list)
            results["pairs"].append({"name": name, "folder": folder.name,
                                     "family": family, "seed": seed,
                                     "rotate_header_deg": rotate,
                                     "info": json.loads((pair / "pair.json").read_text()),
                                     "rows": rows})
        results["medians"] = median_rows([p for p in results["pairs"]
                                          if not p["rotate_header_deg"]])
    results["machine"]["load_average_end"] = list(os.getloadavg())
    return write_results(args.out, results)


def write_results(folder: Path, results: dict) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"lddmm-realbrain-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2, default=float))
    print(markdown(results))
    print(f"\nresults: {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
