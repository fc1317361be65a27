"""The ``lddmm`` command's work: one registration, or many from a pairs table.

1. Read and check both images once (rank 0); find the initial affine, resample the
   moving image onto the fixed grid through it; scale both to [0, 1]. Only rank 0
   holds whole images, and only until they are handed out.
2. Hand every rank its owned planes of both pyramids (and of the moving image as read);
   register on the ranks of the decomposition (``slabs``: all ranks share one
   registration; ``none``: one rank does it), checkpointing when due.
3. Every rank derives its planes of each output; rank 0 writes the warped image,
   ``transform.h5``, its ITK twins (``forward_warp.nii.gz``, ``inverse_warp.nii.gz``,
   ``affine.txt``), the Jacobian determinant (:mod:`medhpc.lddmm.outputs`, block by
   block as they arrive) and ``log.json`` into the output folder.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medhpc import backend
from medhpc.errors import InputError
from medhpc.io.atomic import atomic_path, check_free_space, check_output_path
from medhpc.io.geometry import ImageGeometry
from medhpc.io.images import read_image
from medhpc.io.lists import is_stdin, list_stream, read_list_text
from medhpc.lddmm import outputs
from medhpc.lddmm import transform as transforms
from medhpc.lddmm.grid import memory_per_rank
from medhpc.lddmm.optimise import resolved
from medhpc.lddmm.settings import Settings
from medhpc.lddmm.register import (Registration, check_level_split, level_halos, pyramid_shapes,
                                   scatter_pyramids, settings_record)
from medhpc.parallel.comm import World
from medhpc.parallel.geometry import slab
from medhpc.parallel.slabs import scatter_planes
from medhpc.runtime.checkpoint import Checkpointer
from medhpc.runtime.runlog import write_run_log

OUTPUT_NAMES = (*outputs.OUTPUT_NAMES, "log.json")
DECOMPOSITIONS = ("slabs", "none", "auto")


@dataclass
class Inputs:
    """Both images on the fixed grid, scaled to about [0, 1], with their geometries.

    ``affine_world`` (4x4, world RAS mm, fixed to moving) is the initial transform the
    moving image was resampled through; the masks are on the fixed grid (or None). The
    arrays are held on rank 0 only (None elsewhere) and dropped once handed out.
    """

    fixed: np.ndarray | None
    moving: np.ndarray | None
    fixed_geometry: ImageGeometry
    moving_geometry: ImageGeometry
    moving_original: np.ndarray | None
    affine_world: np.ndarray
    initial: dict
    fixed_mask: np.ndarray | None = None
    moving_mask: np.ndarray | None = None


INITIAL_TRANSFORMS = ("affine", "rigid", "none")


def _read_mask(path, grid: ImageGeometry, world=None) -> np.ndarray:
    """A mask resampled (nearest) onto ``grid`` as float32 0/1."""
    mask, geometry = read_image(path, ndim=3)
    if not np.any(mask):
        raise InputError(f"{path}: the mask is empty; expected a mask with voxels inside")
    inside = (np.asarray(mask) > 0).astype(np.float32)
    if geometry.same_grid(grid) and world is None:
        return inside
    return transforms.resample(inside, geometry, grid, "nearest", world=world)


def initial_affine(initial: str, fixed, fixed_geometry, moving, moving_geometry,
                   fixed_mask=None, moving_mask=None, metric="ncc") -> tuple[np.ndarray, dict]:
    """The start transform (4x4 world RAS, fixed to moving) and a record of how it came
    (``metric`` of the affine registration: ``ncc``, or ``mi`` for multimodal pairs)."""
    from medhpc.lddmm import itk

    if initial == "none":
        return np.eye(4), {"initial_transform": "none"}
    if initial not in INITIAL_TRANSFORMS:
        matrix = itk.read_affine(initial)
        return matrix, {"initial_transform": str(initial)}
    from medhpc.lddmm.affine import register_affine

    result = register_affine(fixed, fixed_geometry, moving, moving_geometry, mode=initial,
                             metric=metric, fixed_mask=fixed_mask, moving_mask=moving_mask)
    record = {"initial_transform": initial, f"{metric}_before": float(result.metric_before),
              f"{metric}_after": float(result.metric_after), "stages": list(result.stages)}
    if not result.metric_after > result.metric_before:
        record["kept"] = "identity (the headers align the images best)"
        return np.eye(4), record
    return np.asarray(result.matrix, np.float64), record


def read_inputs(fixed_path, moving_path, initial="none", normalise="minmax", fixed_mask=None,
                moving_mask=None, affine_metric="ncc") -> Inputs:
    """Read, check and prepare both images (rank 0; raises :class:`InputError`).

    Scales intensities (``normalise``), finds the initial transform (by ``affine_metric``),
    resamples the moving image (and its mask) onto the fixed grid through it.
    """
    from medhpc.lddmm.intensity import normalised_pair

    fixed, fixed_geometry = read_image(fixed_path, ndim=3)
    moving, moving_geometry = read_image(moving_path, ndim=3)
    for path, image in ((fixed_path, fixed), (moving_path, moving)):
        if np.iscomplexobj(image) or image.dtype == bool:
            raise InputError(f"{path}: {image.dtype} voxels; expected a real-valued image")
    fixed, moving_scaled = normalised_pair(fixed, moving, normalise, fixed_path, moving_path)
    fixed_weights = _read_mask(fixed_mask, fixed_geometry) if fixed_mask else None
    moving_own_mask = _read_mask(moving_mask, moving_geometry) if moving_mask else None
    affine, record = initial_affine(initial, fixed, fixed_geometry, moving_scaled,
                                    moving_geometry, fixed_weights, moving_own_mask,
                                    affine_metric)
    identity = np.allclose(affine, np.eye(4), atol=0, rtol=0)
    if fixed_geometry.same_grid(moving_geometry) and identity:
        on_fixed = moving_scaled
    else:
        on_fixed = transforms.resample(moving_scaled, moving_geometry, fixed_geometry, "cubic",
                                       world=None if identity else affine)
        on_fixed = np.clip(on_fixed, 0.0, None)
        if not np.any(on_fixed > 0):
            raise InputError(f"{moving_path}: does not overlap the fixed image "
                             f"{fixed_path} in world space; expected images of the same anatomy")
    moving_weights = None
    if moving_own_mask is not None:
        moving_weights = transforms.resample(moving_own_mask, moving_geometry, fixed_geometry,
                                             "nearest", world=None if identity else affine)
    return Inputs(fixed, np.ascontiguousarray(on_fixed, np.float32), fixed_geometry,
                  moving_geometry, np.asarray(moving, np.float32), affine, record,
                  fixed_weights, moving_weights)


def affine_metric(settings: Settings) -> str:
    """The affine start's metric: mutual information when the deformable stage takes it
    (multimodal pairs), global correlation otherwise."""
    return "mi" if settings.metric == "mi" else "ncc"


def check_settings(settings: Settings, shape) -> None:
    """Reject settings that cannot work, naming the option."""
    from medhpc.lddmm.settings import MAX_BINS, METHODS, METRICS, MIN_BINS

    if settings.method not in METHODS:
        raise InputError(f"--method {settings.method}: expected one of {', '.join(METHODS)}")
    if settings.metric not in METRICS:
        raise InputError(f"--metric {settings.metric}: expected one of {', '.join(METRICS)}")
    if settings.method == "symmetric" and settings.metric not in ("lncc", "mi"):
        raise InputError(f"--metric {settings.metric} with --method symmetric: expected lncc "
                         f"or mi (ssd and ncc go with --method beg)")
    if settings.method == "beg" and settings.metric == "mi":
        raise InputError("--metric mi with --method beg: expected --method symmetric (beg "
                         "takes ssd, ncc or lncc)")
    if settings.metric == "mi" and not MIN_BINS <= settings.bins <= MAX_BINS:
        raise InputError(f"--bins {settings.bins}: expected {MIN_BINS} to {MAX_BINS} "
                         f"histogram bins")
    if len(settings.iterations) > settings.levels:
        raise InputError(f"--iterations has {len(settings.iterations)} entries for "
                         f"{settings.levels} level(s); expected at most one per level")
    coarsest = pyramid_shapes(shape, settings.levels)[0]
    if min(coarsest) < 4:
        raise InputError(f"--levels {settings.levels}: the coarsest level would be "
                         f"{'x'.join(map(str, coarsest[::-1]))} voxels; expected at least 4 "
                         f"per axis (use fewer levels)")


def choose_decomposition(decomp: str, settings: Settings, shape, size: int,
                         spacing_zyx_mm=(1.0, 1.0, 1.0)) -> str:
    """``slabs`` or ``none`` for ``size`` ranks (``auto``: slabs when every level splits)."""
    if decomp not in DECOMPOSITIONS:
        raise InputError(f"--decomp {decomp}: expected one of {', '.join(DECOMPOSITIONS)}")
    if size == 1:
        return "slabs"
    if decomp == "auto":
        try:
            check_level_split(settings, shape, spacing_zyx_mm, size)
        except InputError:
            return "none"
        return "slabs"
    if decomp == "slabs":
        check_level_split(settings, shape, spacing_zyx_mm, size)
    return decomp


def plan(settings: Settings, shape, size: int, mode: str, spacing_zyx_mm=(1.0, 1.0, 1.0),
         moving_shape=None, masked: bool = False) -> dict:
    """The decomposition and every rank's memory at its peak (arrays only: the runtime's
    own memory, Python, numba and MPI, comes on top; see docs/performance.md)."""
    from medhpc.lddmm.grid import PLANNED_REACH_MM, preparation_bytes

    ranks = size if mode == "slabs" else 1
    halo = level_halos(settings, shape, spacing_zyx_mm)[-1]
    levels = pyramid_shapes(shape, settings.levels)
    shares = []
    for rank in range(ranks):
        share = slab(shape[0], ranks, rank, halo)
        memory = memory_per_rank(shape, settings, ranks, rank, halo, spacing_zyx_mm[0],
                                 masked, levels)
        detail = {"rank": rank, "planes": [share.start, share.stop], "halo": halo,
                  "memory_bytes": memory, "peak_bytes": memory["total"]}
        if rank == 0:
            detail["preparation_bytes"] = preparation_bytes(shape, moving_shape or shape)
            detail["peak_bytes"] = max(memory["total"], detail["preparation_bytes"])
        shares.append(detail)
    return {"decomposition": mode, "registration_ranks": ranks,
            "levels": [list(s) for s in levels],
            "settings": settings_record(settings), "ranks_detail": shares,
            "assumes": f"maps reach up to {PLANNED_REACH_MM:g} mm beyond a slab in z; the "
                       f"runtime (Python, numba, MPI) adds a fixed amount per process"}


class PairRegistration:
    """One registration of ``moving`` to ``fixed`` written to ``out`` (see module notes)."""

    def __init__(self, run, world: World, settings: Settings, fixed, moving, out,
                 decomp="auto", resume=False, checkpoint_every=0, save_velocity=False,
                 overwrite=False, initial_transform="affine", normalise="percentile",
                 fixed_mask=None, moving_mask=None):
        self.run = run
        self.initial_transform = initial_transform
        self.normalise = normalise
        self.fixed_mask, self.moving_mask = fixed_mask, moving_mask
        self.world = world
        self.settings = settings
        self.fixed_path, self.moving_path = Path(fixed), Path(moving)
        self.out = Path(out)
        self.resume = resume
        self.checkpoint_every = checkpoint_every
        self.save_velocity = save_velocity
        self.overwrite = overwrite
        self.decomp = decomp

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.h5"

    def prepare(self) -> tuple[Inputs, str]:
        """Checked inputs and the decomposition (read on rank 0 of ``world``, which keeps
        the images; the other ranks get the geometries and the verdict)."""
        held = {}

        def validated():
            for name in OUTPUT_NAMES:
                check_output_path(self.out / name, self.overwrite)
            if self.settings.method == "beg" and (self.fixed_mask or self.moving_mask):
                raise InputError("--fixed-mask/--moving-mask: expected --method symmetric "
                                 "(beg takes no masks)")
            if self.initial_transform not in INITIAL_TRANSFORMS and not Path(
                    self.initial_transform).is_file():
                raise InputError(f"--initial-transform {self.initial_transform}: neither "
                                 f"affine, rigid, none nor an existing transform file")
            inputs = read_inputs(self.fixed_path, self.moving_path, self.initial_transform,
                                 self.normalise, self.fixed_mask, self.moving_mask,
                                 affine_metric(self.settings))
            spacing = tuple(inputs.fixed_geometry.spacing_mm[::-1])
            settings = resolved(self.settings, inputs.fixed.shape, spacing)
            check_settings(settings, inputs.fixed.shape)
            check_free_space(self.out, outputs.output_bytes(
                inputs.fixed.shape, 0 if not self.save_velocity else
                1 if settings.method == "symmetric" else settings.timesteps),
                "the registration's outputs")
            mode = choose_decomposition(self.decomp, settings, inputs.fixed.shape,
                                        self.world.size, spacing)
            held["inputs"] = inputs
            return (replace(inputs, fixed=None, moving=None, moving_original=None,
                            fixed_mask=None, moving_mask=None), mode, settings)

        with self.run.stage("read inputs", "io"):
            inputs, mode, self.settings = self.world.agree(validated)
        return held.get("inputs", inputs), mode

    def execute(self) -> dict | None:
        """Register and write every output; return the summary (rank 0) or None."""
        inputs, mode = self.prepare()
        workers = self.world if mode == "slabs" else self.world.split(
            0 if self.world.rank == 0 else 1)
        summary = None
        if mode == "slabs" or self.world.rank == 0:
            summary = self._register(workers, inputs, mode)
        if mode == "none" and self.world.size > 1:
            summary = self.world.bcast(summary)
        return summary

    def _checkpointer(self, world: World) -> Checkpointer:
        fingerprint = {"fixed": str(self.fixed_path.resolve()),
                       "moving": str(self.moving_path.resolve()),
                       **settings_record(self.settings)}
        resume = self.resume and world.agree(self.checkpoint_path.exists)
        if self.resume and not resume:
            self.run.log.notice(f"--resume: no checkpoint at {self.checkpoint_path}; "
                                f"starting from the beginning")
        if world.is_root:
            self.out.mkdir(parents=True, exist_ok=True)
        return Checkpointer(world, self.checkpoint_path, every=self.checkpoint_every,
                            resume=resume, fingerprint=fingerprint)

    def _register(self, world: World, inputs: Inputs, mode: str) -> dict | None:
        kernels = backend.host_kernels("medhpc.lddmm", self.run.device)
        spacing_zyx = tuple(inputs.fixed_geometry.spacing_mm[::-1])
        with self.run.stage("hand out images", "comm"):
            images = scatter_pyramids(world, self.settings.levels, inputs.fixed, inputs.moving,
                                      inputs.fixed_mask, inputs.moving_mask)
            moving_owned = scatter_planes(world, inputs.moving_original)
            inputs.fixed = inputs.moving = inputs.moving_original = None  # rank 0's copies
            inputs.fixed_mask = inputs.moving_mask = None
        registration = Registration(world, kernels, self.settings, images, None, spacing_zyx,
                                    self.run.stage, self.run.log)
        with self._checkpointer(world) as checkpointer:
            result = registration.run(checkpointer)
        del registration  # its pyramids: the outputs need only the maps from here on
        result.warped = None
        from medhpc.lddmm.flows import Flows

        grid = result.grid
        flows = Flows(world, grid, kernels, self.settings.timesteps,
                      self.settings.max_step_voxels, self.run.stage)
        interior = grid.slab.interior
        maps = {"forward": np.ascontiguousarray(result.forward[:, interior]),
                "inverse": np.ascontiguousarray(result.inverse[:, interior]),
                "determinant": flows.determinant(result.forward)}
        result.forward = result.inverse = None
        with self.run.stage("warp moving image", "other"):
            maps["warped"] = outputs.warped_planes(world, maps["forward"], grid.z_first,
                                                   inputs.fixed_geometry,
                                                   inputs.moving_geometry, moving_owned,
                                                   inputs.affine_world)
        with self.run.stage("inverse consistency", "other"):
            consistency = outputs.consistency_planes(world, maps["forward"], maps["inverse"],
                                                     grid.z_first, grid.shape[0])
        with self.run.stage("reductions", "comm"):
            voxels = float(np.prod(grid.shape))
            determinant = maps["determinant"]
            stats = {
                "folded_share": world.sum(float(np.sum(determinant <= 0))) / voxels,
                "jacobian_min": world.min(float(determinant.min()) if determinant.size
                                          else np.inf),
                "jacobian_max": world.max(float(determinant.max()) if determinant.size
                                          else -np.inf),
                "inverse_consistency_mean_voxels": world.sum(float(np.sum(
                    consistency, dtype=np.float64))) / voxels,
                "inverse_consistency_max_voxels": world.max(float(consistency.max())
                                                            if consistency.size else 0.0)}
        if world.is_root:
            self.out.mkdir(parents=True, exist_ok=True)
        with self.run.stage("write outputs", "io"):
            outputs.write_outputs(
                world, self.out, maps,
                {"fixed": inputs.fixed_geometry, "moving": inputs.moving_geometry,
                 "affine_world": inputs.affine_world},
                settings_record(self.settings),
                result.velocity if self.save_velocity else None, self.overwrite)
        if not world.is_root:
            return None
        self.checkpoint_path.unlink(missing_ok=True)
        return self._summary(inputs, stats, result, mode, world.size)

    def _summary(self, inputs: Inputs, stats: dict, result, mode, ranks) -> dict:
        final = result.history[-1]
        summary = {
            "fixed": str(self.fixed_path), "moving": str(self.moving_path), "out": str(self.out),
            "energy": final["energy"], "similarity": final["similarity"],
            "regularity": final["regularity"], "iterations": len(result.history) - len(
                result.stopped), **stats,
        }
        self._log = {**summary, "settings": settings_record(self.settings),
                     "decomposition": mode, "ranks": ranks, "device": self.run.device,
                     "initial": inputs.initial,
                     "levels_stopped": result.stopped, "history": result.history}
        return summary

    def write_log(self, timings: dict | None) -> None:
        """Write ``log.json`` with the iteration history and the stage timings (rank 0)."""
        if not hasattr(self, "_log"):
            return
        write_run_log(self.out / "log.json", "lddmm", self._log, timings,
                      overwrite=self.overwrite)


# -- many pairs ---------------------------------------------------------------------------------
def read_pairs(path) -> list[dict]:
    """Rows ``fixed,moving[,name]`` of a pairs table (relative paths from its folder), or of
    stdin when ``path`` is ``-`` (relative paths from the working folder)."""
    if not is_stdin(path) and not Path(path).exists():
        raise InputError(f"{path}: pairs table not found; expected a CSV of fixed,moving[,name]")
    text, folder, path = read_list_text(path)
    pairs = []
    with list_stream(text) as stream:
        for number, row in enumerate(csv.reader(stream), start=1):
            row = [cell.strip() for cell in row]
            if not row or not row[0] or row[0].startswith("#"):
                continue
            if number == 1 and row[0].lower() == "fixed":
                continue
            if len(row) not in (2, 3):
                raise InputError(f"{path}:{number}: {len(row)} columns; expected "
                                 f"fixed,moving[,name]")
            fixed, moving = (Path(p) if Path(p).is_absolute() else folder / p
                             for p in row[:2])
            name = row[2] if len(row) == 3 and row[2] else f"pair{len(pairs):04d}"
            pairs.append({"fixed": fixed, "moving": moving, "name": name})
    if not pairs:
        raise InputError(f"{path}: no pairs; expected lines of fixed,moving[,name]")
    names = [p["name"] for p in pairs]
    if len(set(names)) != len(names):
        raise InputError(f"{path}: pair names repeat; expected one output folder per pair")
    return pairs


def write_summary(out: Path, rows: list[dict], overwrite: bool) -> None:
    """``summary.csv``: one line per pair (name, status, similarity, folding, ...)."""
    columns = ["name", "status", "fixed", "moving", "energy", "similarity", "regularity",
               "folded_share", "jacobian_min", "inverse_consistency_mean_voxels", "error"]
    with atomic_path(out / "summary.csv", overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as stream:
            writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
