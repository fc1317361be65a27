"""The ``lddmm`` command's work: one registration, or many from a pairs table.

1. Read and check both images once (rank 0); resample the moving image onto the
   fixed grid through world space; scale both to [0, 1].
2. Register on the ranks of the decomposition (``slabs``: all ranks share one
   registration; ``none``: one rank does it), checkpointing when due.
3. Gather the maps on rank 0 and write the warped image, ``transform.h5``, its ITK
   twins (``forward_warp.nii.gz``, ``inverse_warp.nii.gz``, ``affine.txt``), the
   Jacobian determinant and ``log.json`` into the output folder.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medhpc import backend
from medhpc.errors import InputError
from medhpc.io.atomic import atomic_path, check_output_free
from medhpc.io.geometry import ImageGeometry
from medhpc.io.images import read_image, write_image
from medhpc.lddmm import transform as transforms
from medhpc.lddmm.grid import check_split, halo_for, memory_per_rank
from medhpc.lddmm.itk import ITK_OUTPUT_NAMES, write_itk_outputs
from medhpc.lddmm.optimise import Settings
from medhpc.lddmm.register import Registration, pyramid_shapes, settings_record
from medhpc.parallel.comm import World
from medhpc.parallel.geometry import slab
from medhpc.parallel.slabs import gather_volume
from medhpc.runtime.checkpoint import Checkpointer

OUTPUT_NAMES = ("warped.nii.gz", "transform.h5", *ITK_OUTPUT_NAMES, "jacobian.nii.gz",
                "log.json")
DECOMPOSITIONS = ("slabs", "none", "auto")


@dataclass
class Inputs:
    """Both images on the fixed grid, scaled to [0, 1], with their geometries."""

    fixed: np.ndarray
    moving: np.ndarray
    fixed_geometry: ImageGeometry
    moving_geometry: ImageGeometry
    moving_original: np.ndarray


def _scaled(path, image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, np.float32)
    low, high = float(np.min(image)), float(np.max(image))
    if not high > low:
        raise InputError(f"{path}: the image is constant ({low:g} everywhere), nothing to "
                         f"register; expected an image with structure")
    return ((image - low) / (high - low)).astype(np.float32)


def read_inputs(fixed_path, moving_path) -> Inputs:
    """Read, check and prepare both images (rank 0; raises :class:`InputError`)."""
    fixed, fixed_geometry = read_image(fixed_path, ndim=3)
    moving, moving_geometry = read_image(moving_path, ndim=3)
    fixed = _scaled(fixed_path, fixed)
    moving_scaled = _scaled(moving_path, moving)
    if fixed_geometry.same_grid(moving_geometry):
        on_fixed = moving_scaled
    else:
        on_fixed = transforms.resample(moving_scaled, moving_geometry, fixed_geometry)
        if not np.any(on_fixed > 0):
            raise InputError(f"{moving_path}: does not overlap the fixed image "
                             f"{fixed_path} in world space; expected images of the same anatomy")
    return Inputs(fixed, np.ascontiguousarray(on_fixed, np.float32), fixed_geometry,
                  moving_geometry, np.asarray(moving, np.float32))


def check_settings(settings: Settings, shape) -> None:
    """Reject settings that cannot work, naming the option."""
    if settings.metric not in ("ssd", "ncc", "lncc"):
        raise InputError(f"--metric {settings.metric}: expected ssd, ncc or lncc")
    if len(settings.iterations) > settings.levels:
        raise InputError(f"--iterations has {len(settings.iterations)} entries for "
                         f"{settings.levels} level(s); expected at most one per level")
    coarsest = pyramid_shapes(shape, settings.levels)[0]
    if min(coarsest) < 4:
        raise InputError(f"--levels {settings.levels}: the coarsest level would be "
                         f"{'x'.join(map(str, coarsest[::-1]))} voxels; expected at least 4 "
                         f"per axis (use fewer levels)")


def choose_decomposition(decomp: str, settings: Settings, shape, size: int) -> str:
    """``slabs`` or ``none`` for ``size`` ranks (``auto``: slabs when every level splits)."""
    if decomp not in DECOMPOSITIONS:
        raise InputError(f"--decomp {decomp}: expected one of {', '.join(DECOMPOSITIONS)}")
    if size == 1:
        return "slabs"
    shapes = pyramid_shapes(shape, settings.levels)
    if decomp == "auto":
        try:
            check_split(shapes, size, halo_for(settings.max_step_voxels, settings))
        except InputError:
            return "none"
        return "slabs"
    if decomp == "slabs":
        check_split(shapes, size, halo_for(settings.max_step_voxels, settings))
    return decomp


def plan(settings: Settings, shape, size: int, mode: str) -> dict:
    """The decomposition and every rank's memory at the finest level."""
    ranks = size if mode == "slabs" else 1
    halo = halo_for(settings.max_step_voxels, settings)
    shares = []
    for rank in range(ranks):
        share = slab(shape[0], ranks, rank, halo)
        shares.append({"rank": rank, "planes": [share.start, share.stop], "halo": halo,
                       "memory_bytes": memory_per_rank(shape, settings.timesteps, ranks, rank,
                                                       halo)})
    return {"decomposition": mode, "registration_ranks": ranks,
            "levels": [list(s) for s in pyramid_shapes(shape, settings.levels)],
            "settings": settings_record(settings), "ranks_detail": shares}


class PairRegistration:
    """One registration of ``moving`` to ``fixed`` written to ``out`` (see module notes)."""

    def __init__(self, run, world: World, settings: Settings, fixed, moving, out,
                 decomp="auto", resume=False, checkpoint_every=0, save_velocity=False,
                 overwrite=False):
        self.run = run
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
        """Checked inputs and the decomposition (rank 0 of ``world``; shared)."""
        def validated():
            for name in OUTPUT_NAMES:
                check_output_free(self.out / name, self.overwrite)
            inputs = read_inputs(self.fixed_path, self.moving_path)
            check_settings(self.settings, inputs.fixed.shape)
            mode = choose_decomposition(self.decomp, self.settings, inputs.fixed.shape,
                                        self.world.size)
            return inputs, mode

        with self.run.stage("read inputs", "io"):
            return self.world.agree(validated)

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
        kernels = backend.kernels("medhpc.lddmm", self.run.device, "kernels")
        if self.run.device == "cuda":
            from medhpc.lddmm.staging import HostStaged

            kernels = HostStaged(kernels)
        spacing_zyx = tuple(inputs.fixed_geometry.spacing_mm[::-1])
        registration = Registration(world, kernels, self.settings, inputs.fixed, inputs.moving,
                                    spacing_zyx, self.run.stage, self.run.log)
        with self._checkpointer(world) as checkpointer:
            result = registration.run(checkpointer)
        from medhpc.lddmm.flows import Flows

        flows = Flows(world, result.grid, kernels, self.settings.timesteps,
                      self.settings.max_step_voxels, self.run.stage)
        determinant = flows.determinant(result.forward)
        interior = result.grid.slab.interior
        owned = slab(result.grid.shape[0], world.size, world.rank, 0)
        with self.run.stage("gather maps", "comm"):
            forward = gather_volume(world, np.ascontiguousarray(result.forward[:, interior]), owned)
            inverse = gather_volume(world, np.ascontiguousarray(result.inverse[:, interior]), owned)
            determinant = gather_volume(world, determinant, owned)
            velocity = None
            if self.save_velocity:
                stacked = np.concatenate(result.velocity, axis=0)
                velocity = gather_volume(world, np.ascontiguousarray(stacked), owned)
        if not world.is_root:
            return None
        with self.run.stage("write outputs", "io"):
            summary = self._write(inputs, forward, inverse, determinant, velocity, result, mode,
                                  world.size)
        self.checkpoint_path.unlink(missing_ok=True)
        return summary

    def _write(self, inputs: Inputs, forward, inverse, determinant, velocity, result, mode,
               ranks) -> dict:
        fixed_geometry = inputs.fixed_geometry
        # affine_world: world RAS fixed -> moving (None: identity), used by every output below
        transform = {"forward": forward, "inverse": inverse, "fixed": fixed_geometry,
                     "moving": inputs.moving_geometry, "affine_world": None}
        warped, _ = transforms.apply_transform(transform, inputs.moving_original,
                                               inputs.moving_geometry)
        write_image(self.out / "warped.nii.gz", warped, fixed_geometry, overwrite=self.overwrite)
        write_image(self.out / "jacobian.nii.gz", determinant, fixed_geometry,
                    overwrite=self.overwrite)
        if velocity is not None:
            velocity = velocity.reshape((self.settings.timesteps, 3) + forward.shape[1:])
        transforms.write_transform(self.out / "transform.h5", forward, inverse, fixed_geometry,
                                   inputs.moving_geometry, settings_record(self.settings),
                                   velocity, overwrite=self.overwrite,
                                   affine_world=transform["affine_world"])
        write_itk_outputs(self.out, transform, overwrite=self.overwrite)
        folded = float(np.mean(determinant <= 0))
        consistency = transforms.compose_error_voxels(forward, inverse)
        final = result.history[-1]
        summary = {
            "fixed": str(self.fixed_path), "moving": str(self.moving_path), "out": str(self.out),
            "energy": final["energy"], "similarity": final["similarity"],
            "regularity": final["regularity"], "iterations": len(result.history) - len(
                result.stopped), "folded_share": folded,
            "jacobian_min": float(determinant.min()), "jacobian_max": float(determinant.max()),
            "inverse_consistency_mean_voxels": float(consistency.mean()),
            "inverse_consistency_max_voxels": float(consistency.max()),
        }
        self._log = {"command": "lddmm", **summary, "settings": settings_record(self.settings),
                     "decomposition": mode, "ranks": ranks, "device": self.run.device,
                     "levels_stopped": result.stopped, "history": result.history}
        return summary

    def write_log(self, timings: dict | None) -> None:
        """Write ``log.json`` with the iteration history and the stage timings (rank 0)."""
        if not hasattr(self, "_log"):
            return
        with atomic_path(self.out / "log.json", overwrite=self.overwrite) as tmp:
            tmp.write_text(json.dumps(dict(self._log, timings=timings), indent=2, default=float))


# -- many pairs ---------------------------------------------------------------------------------
def read_pairs(path) -> list[dict]:
    """Rows ``fixed,moving[,name]`` of a pairs table (relative paths from its folder)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: pairs table not found; expected a CSV of fixed,moving[,name]")
    pairs = []
    with open(path, newline="") as stream:
        for number, row in enumerate(csv.reader(stream), start=1):
            row = [cell.strip() for cell in row]
            if not row or not row[0] or row[0].startswith("#"):
                continue
            if number == 1 and row[0].lower() == "fixed":
                continue
            if len(row) not in (2, 3):
                raise InputError(f"{path}:{number}: {len(row)} columns; expected "
                                 f"fixed,moving[,name]")
            fixed, moving = (Path(p) if Path(p).is_absolute() else path.parent / p
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
