"""ct-register: apply a registration model trained by ``ct-train --task registration``.

For each pair the network runs on the fixed image's extent at the model's voxel size (the
fixed grid itself when the model was trained on each case's grid): the moving image is
resampled there through world coordinates, both are normalised as in training, and one
forward pass gives the velocity field; brought onto the fixed image's own grid
(:func:`displacement_on_grid`), optionally refined for this pair (``--refine N``: N Adam
iterations on ``v`` of the training loss's image terms, on the fixed grid), scaling and
squaring of ``v`` and ``-v`` there gives the forward and inverse displacements
(:mod:`medhpc.ct.registration`). The outputs are those of ``lddmm``, on the
fixed grid:
``transform.h5`` (so ``lddmm-apply`` warps images, labels and points with it), the ITK
fields ``forward_warp.nii.gz`` / ``inverse_warp.nii.gz`` with ``affine.txt``, ``warped.nii.gz``
and ``jacobian.nii.gz``; with ``--moving-labels`` also ``warped_labels.nii.gz``, and with
``--fixed-labels`` the Dice per class (``dice.json``). Pairs (``--pairs``) are spread over
the ranks, one folder per pair.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from medhpc.ct.dataset import (intensity_fill, normalised_hu, read_ct, read_labels, resample,
                               resampled_geometry, source_geometry)
from medhpc.ct.loss import confusion_counts, dice_from_counts
from medhpc.ct.registration import (exponential, jacobian_determinant, predict_velocity,
                                    refine_velocity)
from medhpc.ct.segment import inference_device, load_model
from medhpc.errors import InputError
from medhpc.io.atomic import check_output_free, publish_together
from medhpc.io.nifti import write_nifti
from medhpc.lddmm import itk
from medhpc.lddmm.transform import (IDENTITY, apply_transform, map_points, sample_field,
                                    write_transform)
from medhpc.parallel.geometry import block_range
from medhpc.parallel.work import static_items
from medhpc.runtime.runlog import write_run_log

WARPED, WARPED_LABELS, JACOBIAN, TRANSFORM = ("warped.nii.gz", "warped_labels.nii.gz",
                                              "jacobian.nii.gz", "transform.h5")
MODEL_EXPECTED = "RUN/model.pt written by ct-train --task registration"


def load_registration_model(path, device):
    """The network and document of a registration model (one line for anything else)."""
    model, document = load_model(path, device)
    task = document.get("task", "segmentation")
    if task != "registration":
        raise InputError(f"{path}: a {task} model; expected {MODEL_EXPECTED} (ct-segment "
                         f"applies segmentation models)")
    return model, document


def displacement_on_grid(displacement: np.ndarray, grid, target) -> np.ndarray:
    """A displacement or velocity (voxels of ``grid``, z, y, x) as the same field of world
    vectors on the ``target`` grid.

    With ``C`` the voxel map target -> grid and ``L`` its linear part, the map
    ``y -> y + u(y)`` of ``grid`` is ``t -> C^-1 (C t + u(C t))``: ``L^-1 u(C t)``.
    """
    points = map_points(np.indices(target.shape, dtype=np.float32), target, grid)
    sampled = sample_field(displacement, points)
    to_grid = np.linalg.inv(grid.affine) @ target.affine
    linear = to_grid[:3, :3][::-1, ::-1]  # (z, y, x) order
    back = np.linalg.inv(linear).astype(np.float32)
    return np.einsum("ij,j...->i...", back, sampled).astype(np.float32)


class Registration:
    """The ct-register run on this rank (collective)."""

    def __init__(self, run, model_path, pairs: list[dict], out, moving_labels=None,
                 fixed_labels=None, refine: int = 0):
        self.run = run
        self.world = run.world
        self.model_path = Path(model_path)
        self.pairs = pairs
        self.out = Path(out)
        self.moving_labels = moving_labels
        self.fixed_labels = fixed_labels
        self.refine = int(refine)

    def folder(self, pair: dict) -> Path:
        return self.out if len(self.pairs) == 1 and pair.get("name") is None \
            else self.out / pair["name"]

    def outputs(self, pair: dict) -> list[Path]:
        folder = self.folder(pair)
        names = [TRANSFORM, WARPED, JACOBIAN, *itk.ITK_OUTPUT_NAMES, "register.json"]
        if self.moving_labels is not None:
            names.append(WARPED_LABELS)
        if self.fixed_labels is not None:
            names.append("dice.json")
        return [folder / name for name in names]

    def check(self) -> dict:
        if not self.model_path.exists():
            raise InputError(f"{self.model_path}: model not found; expected {MODEL_EXPECTED}")
        _, document = load_registration_model(self.model_path, torch.device("cpu"))
        if self.fixed_labels is not None and self.moving_labels is None:
            raise InputError("--fixed-labels: needs --moving-labels (the labels warped onto "
                             "the fixed image are what is compared)")
        for pair in self.pairs:
            for role in ("fixed", "moving"):
                if not Path(pair[role]).exists():
                    raise InputError(f"{pair[role]}: {role} image not found; expected a NIfTI "
                                     f"file or a DICOM series folder")
                source_geometry(pair[role])
            for path in self.outputs(pair):
                check_output_free(path, self.run.overwrite)
        for labels, role in ((self.moving_labels, "moving"), (self.fixed_labels, "fixed")):
            if labels is not None:
                image = self.pairs[0][role]
                read_labels(labels, image, source_geometry(image), len(document["classes"]))
        return document

    def execute(self) -> dict | None:
        run = self.run
        with run.stage("validate inputs", "io"):
            document = self.world.agree(self.check)
        if run.dry_run:
            size = self.world.size
            run.print_plan({"pairs": len(self.pairs), "model_spacing_mm": document.get(
                "spacing_mm"), "pairs_per_rank": [len(range(*block_range(len(self.pairs), size,
                                                                         r)))
                                                  for r in range(size)]})
            return None
        device = inference_device(run)
        with run.stage("load model", "io"):
            model, document = load_registration_model(self.model_path, device)
        mine = static_items(self.world, len(self.pairs))
        with publish_together():  # every pair's outputs and --timings, or none of them
            results = self.world.agree_all(
                lambda: [self.register_pair(self.pairs[i], model, document, device)
                         for i in mine])
            rows = [row for part in self.world.gather(results) or [] for row in part]
            if self.world.is_root and rows:
                self.run.summary.update(pairs=len(rows), seconds_per_pair=float(
                    np.median([r["seconds"] for r in rows])))
            run.finish()
        return {"pairs": rows if self.world.is_root else None}

    def register_pair(self, pair: dict, model, document, device) -> dict:
        run = self.run
        stats = document["intensity"]
        started = time.perf_counter()
        with run.stage("read", "io"):
            fixed, fixed_geometry = read_ct(pair["fixed"])
            moving, moving_geometry = read_ct(pair["moving"])
        grid = fixed_geometry
        if document.get("spacing_mm"):
            grid = resampled_geometry(fixed_geometry, document["spacing_mm"])

        def normalised_on(target):
            images = []
            for image, geometry in ((moving, moving_geometry), (fixed, fixed_geometry)):
                if not geometry.same_grid(target):
                    image = resample(image, geometry, target, labels=False,
                                     fill=float(image.min()))
                images.append(normalised_hu(image, stats))
            return images

        with run.stage("resample and normalise", "kernel"):
            images = normalised_on(grid)
        fill = intensity_fill(stats)
        with run.stage("inference", "kernel"):
            velocity = predict_velocity(model, images[0], images[1], model.config.divisor,
                                        fill, device)
        if not grid.same_grid(fixed_geometry):  # exp(v) integrated on the fixed grid
            velocity = displacement_on_grid(velocity, grid, fixed_geometry)
        if self.refine:
            with run.stage("refinement", "kernel"):
                if not grid.same_grid(fixed_geometry):
                    images = normalised_on(fixed_geometry)
                velocity = refine_velocity(velocity, images[0], images[1], self.refine,
                                           float(document.get("smoothness", 1.0)), device)
        with run.stage("integration", "kernel"):
            forward, inverse = exponential(velocity, device), exponential(-velocity, device)
            determinant = jacobian_determinant(forward)
        seconds = time.perf_counter() - started
        folder = self.folder(pair)
        transform = {"forward": forward, "inverse": inverse, "fixed": fixed_geometry,
                     "moving": moving_geometry, "affine_world": IDENTITY.copy()}
        row = {"name": pair.get("name") or folder.name, "fixed": str(pair["fixed"]),
               "moving": str(pair["moving"]), "seconds": seconds,
               "folded_share": float(np.mean(determinant <= 0)),
               "jacobian_min": float(determinant.min()), "network_grid": grid.describe()}
        with run.stage("write", "io"):
            folder.mkdir(parents=True, exist_ok=True)
            settings = {"method": "ct-register", "model": str(self.model_path),
                        "integration_steps": int(document.get("integration_steps", 7)),
                        "refine_iterations": self.refine,
                        "network_grid": grid.describe()}
            write_transform(folder / TRANSFORM, forward, inverse, fixed_geometry,
                            moving_geometry, settings, overwrite=run.overwrite)
            itk.write_itk_outputs(folder, transform, overwrite=run.overwrite)
            warped, _ = apply_transform(transform, moving, moving_geometry)
            write_nifti(folder / WARPED, warped.astype(np.float32), fixed_geometry,
                        overwrite=run.overwrite)
            write_nifti(folder / JACOBIAN, determinant, fixed_geometry,
                        overwrite=run.overwrite)
            if self.moving_labels is not None:
                row.update(self.warp_labels(transform, moving_geometry, fixed_geometry,
                                            document, folder))
            write_run_log(folder / "register.json", "ct-register", row,
                          overwrite=run.overwrite)
        dice = ", Dice " + ", ".join(f"{k} {v:.3f}" for k, v in row["dice"].items()
                                     if v is not None) if "dice" in row else ""
        run.log.info(f"registered {pair['moving']} to {pair['fixed']} in {seconds:.2f} s "
                     f"(network at {row['network_grid']}): "
                     f"{100 * row['folded_share']:.3g}% voxels with det <= 0{dice}")
        return row

    def warp_labels(self, transform, moving_geometry, fixed_geometry, document, folder) -> dict:
        classes = document["classes"]
        labels = read_labels(self.moving_labels, self.pairs[0]["moving"], moving_geometry,
                             len(classes))
        warped, _ = apply_transform(transform, labels, moving_geometry, "label")
        warped = np.asarray(warped, np.uint8)
        write_nifti(folder / WARPED_LABELS, warped, fixed_geometry, overwrite=self.run.overwrite)
        if self.fixed_labels is None:
            return {}
        reference = read_labels(self.fixed_labels, self.pairs[0]["fixed"], fixed_geometry,
                                len(classes))
        dice = dice_from_counts(confusion_counts(warped, reference, len(classes)))
        table = {name: None if np.isnan(d) else float(d) for name, d in zip(classes, dice)}
        write_run_log(folder / "dice.json", "ct-register", {"dice": table},
                      overwrite=self.run.overwrite)
        return {"dice": table}
