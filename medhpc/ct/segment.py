"""ct-segment: sliding-window segmentation of CT volumes with a trained model, cases over ranks.

Each rank segments its block of cases: read (NIfTI or DICOM series), resample
to the model's voxel size when it was trained on resampled data, normalise as in
training, blend windows (:mod:`medhpc.ct.inference`; with ``--tta`` averaged over
mirrored copies, with several ``--model`` over the fold models), bring the label map back
to the input's own grid and write it as NIfTI. Classes for which ct-train's validation
showed that keeping only the largest connected component helps (for an ensemble: every
model's validation) get that postprocessing (:mod:`medhpc.ct.postprocess`;
``--no-postprocess`` turns it off). ``--dicom-seg`` also writes each DICOM series' labels as
a DICOM Segmentation referencing its slices, ``--png`` an overlay picture per case. With
reference labels, TP/FP/FN counts per case and
organ are gathered and rank 0 prints a Dice table (also written as ``dice.csv`` and
``dice.json``).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from medhpc.ct.dataset import (find_cases, intensity_fill, normalised_hu, read_ct, read_labels,
                               resample, resampled_geometry)
from medhpc.ct.inference import segment_volume
from medhpc.ct.loss import confusion_counts, dice_from_counts
from medhpc.ct.postprocess import largest_component
from medhpc.ct.unet import UNet3D, UNetConfig
from medhpc.errors import InputError, one_line
from medhpc.io.atomic import atomic_path, check_output_free, publish_together
from medhpc.io.nifti import write_nifti
from medhpc.parallel.work import static_items
from medhpc.runtime.checkpoint import read_torch_document
from medhpc.runtime.runlog import write_run_log


def load_model(path, device) -> tuple[torch.nn.Module, dict]:
    """Rebuild the network saved by ct-train and return it with its settings."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: model not found; expected RUN/model.pt written by ct-train")
    document = read_torch_document(path, "RUN/model.pt written by ct-train")
    try:
        config = UNetConfig.from_dict(document["network"])
        model = UNet3D(config)
        model.load_state_dict(document["model"])
    except Exception as error:
        raise InputError(f"{path}: not a ct-train model ({type(error).__name__}: "
                         f"{one_line(error)}); expected RUN/model.pt") from None
    return model.to(device).eval(), document


def inference_device(run) -> torch.device:
    """The torch device of this rank for inference (its GPU with --device cuda), threads set."""
    torch.set_num_threads(run.threads)
    if run.device != "cuda":
        return torch.device("cpu")
    device = torch.device("cuda", run.gpu if run.gpu is not None else 0)
    torch.cuda.set_device(device)
    return device


class Segmentation:
    """The ct-segment run on this rank (collective)."""

    def __init__(self, run, model_path, images, out, labels=None, batch: int = 2,
                 tta: bool = False, postprocess: bool = True, dicom_seg: bool = False,
                 png: bool = False):
        self.run = run
        self.world = run.world
        self.model_paths = [model_path] if isinstance(model_path, (str, Path)) else \
            list(model_path)
        self.mirror_axes = (0, 1, 2) if tta else ()
        self.postprocess = postprocess
        self.images = images
        self.out = Path(out)
        self.labels = labels
        self.batch = batch
        self.dicom_seg = dicom_seg
        self.png = png

    def check(self):
        documents = [load_model(path, torch.device("cpu"))[1] for path in self.model_paths]
        for path, document in zip(self.model_paths, documents):
            if document.get("task", "segmentation") != "segmentation":
                raise InputError(f"{path}: a {document['task']} model; expected RUN/model.pt "
                                 f"of ct-train --task segmentation (ct-register applies "
                                 f"registration models)")
        for path, document in zip(self.model_paths[1:], documents[1:]):
            for key in ("classes", "spacing_mm", "intensity"):
                if document.get(key) != documents[0].get(key):
                    raise InputError(f"{path}: its {key} differ from {self.model_paths[0]}'s; "
                                     f"expected fold models of one ct-train dataset")
        if self.mirror_axes:
            for path, document in zip(self.model_paths, documents):
                if document.get("mirrored") is False:
                    raise InputError(f"{path}: trained without mirroring (--no-augment); "
                                     f"--tta would average views it never saw (drop --tta)")
        document = documents[0]
        cases = find_cases(self.images, self.labels)
        if self.dicom_seg:
            try:
                import highdicom  # noqa: F401
            except ImportError:
                raise InputError("--dicom-seg needs highdicom; install medhpc[dicom]") from None
            for case in cases:
                if not Path(case.image).is_dir():
                    raise InputError(f"{case.image}: not a DICOM series folder; --dicom-seg "
                                     f"writes Segmentations of DICOM series only")
        for case in cases:
            for path in self.outputs(case):
                check_output_free(path, self.run.overwrite)
        return cases, len(document["classes"])

    def outputs(self, case) -> list[Path]:
        """The files written for ``case``."""
        paths = [self.out / f"{case.name}.nii.gz"]
        if self.dicom_seg:
            paths.append(self.out / f"{case.name}.seg.dcm")
        if self.png:
            paths.append(self.out / f"{case.name}.png")
        return paths

    def execute(self) -> dict | None:
        run = self.run
        with run.stage("validate inputs", "io"):
            cases, n_classes = self.world.agree(self.check)
        if run.dry_run:
            run.print_plan({"cases": len(cases), "cases_per_rank":
                            [len(static_items(_RankView(r, self.world.size), len(cases)))
                             for r in range(self.world.size)]})
            return None
        device = inference_device(run)
        with run.stage("load model", "io"):
            loaded = [load_model(path, device) for path in self.model_paths]
        document = dict(loaded[0][1], largest_component=[  # what every model's validation chose
            name for name in loaded[0][1].get("largest_component", [])
            if all(name in doc.get("largest_component", []) for _, doc in loaded)])
        model = [(network, tuple(doc["patch"]), bool(doc.get("amp"))) for network, doc in loaded]
        mine = static_items(self.world, len(cases))
        with publish_together():  # every rank's label maps, the tables and --timings
            results = self.world.agree_all(
                lambda: [self.segment_case(cases[i], model, document, device) for i in mine])
            with run.stage("gather Dice counts", "comm"):
                gathered = self.world.gather(results)
            table = None
            if self.world.is_root and self.labels is not None:
                rows = [row for part in gathered for row in part]
                table = self.write_table(rows, document["classes"])
                self.run.summary.update(cases=len(rows), dice=dict(zip(table["classes"],
                                                                       table["all"])))
            run.finish()
        return {"cases": len(cases), "dice": table}

    def segment_case(self, case, model, document, device) -> dict:
        run = self.run
        with run.stage("read", "io"):
            image, geometry = read_ct(case.image)
            reference = None
            if case.labels is not None:
                reference = read_labels(case.labels, case.image, geometry,
                                        len(document["classes"]))
        stats = document["intensity"]
        source_hu = image
        with run.stage("resample and normalise", "kernel"):
            model_grid = geometry
            if document.get("spacing_mm"):
                model_grid = resampled_geometry(geometry, document["spacing_mm"])
                image = resample(image, geometry, model_grid, labels=False,
                                 fill=float(image.min()))
            normalised = normalised_hu(image, stats)
        fill = intensity_fill(stats)
        with run.stage("inference", "kernel"):
            prediction = segment_volume(model, normalised, tuple(document["patch"]),
                                        len(document["classes"]) + 1, device, fill,
                                        batch=self.batch, mirror_axes=self.mirror_axes)
        if self.postprocess and document.get("largest_component"):
            with run.stage("postprocess", "kernel"):
                prediction = largest_component(prediction, [
                    document["classes"].index(name) + 1
                    for name in document["largest_component"]])
        if model_grid is not geometry:
            prediction = resample(prediction, model_grid, geometry, labels=True)
        with run.stage("write", "io"):
            write_nifti(self.out / f"{case.name}.nii.gz", prediction, geometry,
                        overwrite=run.overwrite)
            if self.dicom_seg:
                from medhpc.ct.dicom import write_dicom_seg

                if write_dicom_seg(self.out / f"{case.name}.seg.dcm", case.image, prediction,
                                   document["classes"], overwrite=run.overwrite) is None:
                    run.log.notice(f"{case.name}: no organ found; no DICOM Segmentation "
                                   f"written (it needs at least one segment)")
        if self.png:
            from medhpc.ct.figures import plot_segmentation_overlay

            with run.stage("picture", "io"):
                plot_segmentation_overlay(self.out / f"{case.name}.png", source_hu, prediction,
                                          document["classes"], geometry.spacing_mm[::-1],
                                          reference)
        row = {"case": case.name}
        if reference is not None:
            row["counts"] = confusion_counts(prediction, reference,
                                             len(document["classes"])).tolist()
        run.log.info(f"segmented {case.name} ({geometry.describe()})")
        return row

    def write_table(self, rows: list[dict], classes) -> dict:
        total = np.zeros((len(classes), 3))
        table = {"cases": {}, "classes": list(classes)}
        lines = ["case".ljust(16) + "".join(c[:10].rjust(11) for c in classes)]
        for row in rows:
            counts = np.array(row["counts"])
            total += counts
            dice = dice_from_counts(counts)
            table["cases"][row["case"]] = [None if np.isnan(d) else float(d) for d in dice]
            lines.append(row["case"][:16].ljust(16) + "".join(_cell(d) for d in dice))
        overall = dice_from_counts(total)
        table["all"] = [None if np.isnan(d) else float(d) for d in overall]
        lines.append("all (pooled)".ljust(16) + "".join(_cell(d) for d in overall))
        self.run.log.info("Dice per organ:\n" + "\n".join(lines))
        write_run_log(self.out / "dice.json", "ct-segment", table, overwrite=True)
        with atomic_path(self.out / "dice.csv", overwrite=True) as tmp:
            with open(tmp, "w", newline="") as stream:
                writer = csv.writer(stream)
                writer.writerow(["case", *classes])
                for name, values in table["cases"].items():
                    writer.writerow([name, *("" if v is None else f"{v:.4f}" for v in values)])
                writer.writerow(["all", *("" if v is None else f"{v:.4f}" for v in table["all"])])
        return table


def _cell(value) -> str:
    return ("-" if np.isnan(value) else f"{value:.3f}").rjust(11)


class _RankView:
    """A stand-in world of (rank, size) for computing another rank's share."""

    def __init__(self, rank, size):
        self.rank, self.size = rank, size
