"""ct-train's tasks: what a training run learns, as plug-ins of one loop (:mod:`medhpc.ct.run`).

The loop owns launch, planning, sampling schedule, gradient sync, checkpoints and outputs; a
task says which dataset it accepts, the network's channels, how a batch is drawn and scored,
what validation measures and what the model file keeps.

- :class:`SegmentationTask`: organ labels by Dice + cross-entropy (ct-segment applies it);
- :class:`RegistrationTask`: a stationary velocity field between two CT volumes, by local NCC
  and a diffusion regulariser (and soft Dice of warped labels when the dataset has labels);
  ct-register applies it (:mod:`medhpc.ct.registration`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from medhpc.ct import distributed
from medhpc.ct.inference import segment_volume
from medhpc.ct.loss import confusion_counts, deep_supervision_loss, dice_from_counts
from medhpc.ct.postprocess import helpful_classes, largest_component
from medhpc.ct.settings import TASKS
from medhpc.errors import InputError
from medhpc.parallel.geometry import block_range


def task_for(settings):
    """The task object of a run's settings."""
    if settings.task == "registration":
        return RegistrationTask(settings)
    if settings.task == "segmentation":
        return SegmentationTask(settings)
    raise InputError(f"--task {settings.task}: expected {' or '.join(TASKS)}")


def _finite(value) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def largest_component_classes(history: list[dict]) -> list[str]:
    """The classes whose validation Dice of the last epoch rose with only their largest
    connected component kept (none without validation)."""
    if not history or "dice_largest_component" not in history[-1]:
        return []
    last = history[-1]
    names = list(last["dice"])
    as_array = lambda values: np.array([np.nan if v is None else v for v in values])  # noqa: E731
    return helpful_classes(as_array(last["dice"].values()),
                           as_array(last["dice_largest_component"][n] for n in names), names)


class SegmentationTask:
    """Organ segmentation: 1 input channel, background + one channel per class."""

    name = "segmentation"

    def __init__(self, settings):
        self.settings = settings

    def check(self, dataset, path) -> None:
        unlabelled = [n for n in dataset.names if not dataset.labelled[n]]
        if unlabelled:
            raise InputError(f"{path}: case(s) {', '.join(unlabelled[:3])} have no labels; "
                             f"expected a labelled dataset (ct-prepare --labels)")

    def bind(self, dataset) -> None:
        pass

    def channels(self, dataset) -> tuple[int, int]:
        return 1, dataset.n_classes + 1

    def prepare_model(self, model) -> None:
        pass

    def sampler(self, n_training_cases, global_batch, slots, patch, kernels, augment):
        from medhpc.ct.sampler import PatchSampler

        s = self.settings
        return PatchSampler({}, n_training_cases, global_batch, slots, patch, s.seed, kernels,
                            augment, s.foreground_fraction)

    def loss(self, network, batch, device):
        images, labels = batch
        return deep_supervision_loss(network(torch.from_numpy(images).to(device)),
                                     torch.from_numpy(labels).to(device))

    def validation_items(self, names: list[str], ranks) -> tuple[list, list[str]]:
        """This rank's validation items and the case names they read."""
        mine = [names[i] for i in range(*block_range(len(names), ranks.size, ranks.rank))]
        return mine, mine

    def validate(self, world, ranks, model, items, cases: dict, dataset, patch, device, amp):
        """Pooled Dice per class of the held-out cases, as predicted and with only the
        largest connected component of each class kept."""
        classes = range(1, dataset.n_classes + 1)
        counts = np.zeros((2, dataset.n_classes, 3))
        for name in items:
            case = cases[name]
            prediction = segment_volume(model, case.image, patch, dataset.n_classes + 1, device,
                                        case.fill, amp=amp)
            counts[0] += confusion_counts(prediction, case.labels, dataset.n_classes)
            counts[1] += confusion_counts(largest_component(prediction, classes), case.labels,
                                          dataset.n_classes)
        counts = distributed.reduce_sum(world, ranks, counts)
        dice, largest = dice_from_counts(counts[0]), dice_from_counts(counts[1])
        return {"dice": {name: _finite(d) for name, d in zip(dataset.classes, dice)},
                "dice_largest_component": {name: _finite(d) for name, d in
                                           zip(dataset.classes, largest)}}

    def describe(self, record: dict) -> str:
        return "Dice " + ", ".join(f"{k} {v:.3f}" if v is not None else f"{k} -"
                                   for k, v in record["dice"].items())

    def csv_columns(self, classes) -> list[str]:
        return [f"dice_{c}" for c in classes]

    def csv_values(self, record: dict, classes) -> list[str]:
        return ["" if record["dice"][c] is None else f"{record['dice'][c]:.4f}" for c in classes]

    def summary(self, record: dict) -> dict:
        return {"dice": record["dice"]}

    def document(self, history: list[dict]) -> dict:
        return {"largest_component": largest_component_classes(history),
                "mirrored": bool(self.settings.augment)}


class RegistrationTask:
    """Deformable registration: moving and fixed image in, a velocity field (z, y, x) out."""

    name = "registration"

    def __init__(self, settings):
        self.settings = settings
        self.labelled, self.classes = False, 0

    def check(self, dataset, path) -> None:
        if len(dataset.names) < 2:
            raise InputError(f"{path}: {len(dataset.names)} case; registration pairs need at "
                             f"least two cases")
        if self.settings.deep_supervision:
            raise InputError("--deep-supervision: only for --task segmentation")

    def bind(self, dataset) -> None:
        """Take the label classes from the dataset (every rank, after :meth:`check`)."""
        self.labelled = all(dataset.labelled[n] for n in dataset.names)
        self.classes = dataset.n_classes + 1

    def channels(self, dataset) -> tuple[int, int]:
        return 2, 3

    def prepare_model(self, model) -> None:
        from medhpc.ct.registration import initialise_velocity_head

        initialise_velocity_head(model)

    def sampler(self, n_training_cases, global_batch, slots, patch, kernels, augment):
        from medhpc.ct.registration import PairSampler

        if n_training_cases < 2:
            raise InputError(f"{n_training_cases} training case in this fold; registration "
                             f"pairs need at least two (more cases, or fewer --folds)")
        return PairSampler({}, n_training_cases, global_batch, slots, patch, self.settings.seed,
                           kernels, augment)

    def loss(self, network, batch, device):
        from medhpc.ct.registration import registration_loss

        moving, fixed, moving_labels, fixed_labels = (
            None if a is None else torch.from_numpy(a).to(device) for a in batch)
        weight = self.settings.label_weight if self.labelled else 0.0
        return registration_loss(network, moving, fixed, moving_labels, fixed_labels,
                                 self.classes, self.settings.smoothness, weight)

    def validation_items(self, names: list[str], ranks) -> tuple[list, list[str]]:
        pairs = [(m, f) for m in names for f in names if m != f]
        mine = [pairs[i] for i in range(*block_range(len(pairs), ranks.size, ranks.rank))]
        return mine, sorted({name for pair in mine for name in pair})

    def validate(self, world, ranks, model, items, cases: dict, dataset, patch, device, amp):
        """Over the ordered pairs of held-out cases: pooled Dice of the warped moving labels
        with the fixed labels, mean local NCC, and the fraction of folded voxels."""
        from medhpc.ct.registration import (folding_fraction, local_ncc, predict_displacements,
                                            warp_numpy)

        counts = np.zeros((dataset.n_classes, 3))
        sums = np.zeros(3)  # NCC, folded voxels, voxels
        for moving_name, fixed_name in items:
            moving, fixed = cases[moving_name], cases[fixed_name]
            if moving.image.shape != fixed.image.shape:
                raise InputError(f"{dataset.path}: cases {moving_name} and {fixed_name} have "
                                 f"different grids; expected a dataset prepared at one grid "
                                 f"(ct-prepare --spacing-mm and equal extents)")
            displacement, _ = predict_displacements(model, moving.image, fixed.image,
                                                    model.config.divisor, fixed.fill, device,
                                                    inverse=False)
            warped = warp_numpy(moving.image, displacement)
            ncc = local_ncc(torch.from_numpy(fixed.image)[None, None],
                            torch.from_numpy(warped)[None, None])
            sums += [float(ncc[0]), folding_fraction(displacement) * warped.size, warped.size]
            if moving.labels is not None and fixed.labels is not None:
                warped_labels = warp_numpy(moving.labels, displacement, labels=True)
                counts += confusion_counts(warped_labels, fixed.labels, dataset.n_classes)
        counts = distributed.reduce_sum(world, ranks, counts)
        sums = distributed.reduce_sum(world, ranks, sums)
        pairs = distributed.reduce_sum(world, ranks, np.array([float(len(items))]))[0]
        dice = dice_from_counts(counts)
        return {"dice": {name: _finite(d) for name, d in zip(dataset.classes, dice)},
                "ncc": _finite(sums[0] / pairs) if pairs else None,
                "folding_fraction": _finite(sums[1] / sums[2]) if sums[2] else None}

    def describe(self, record: dict) -> str:
        parts = [f"{k} {v:.3f}" for k, v in record["dice"].items() if v is not None]
        text = "warped-label Dice " + ", ".join(parts) if parts else "no labels"
        if record.get("ncc") is not None:
            text += f", NCC {record['ncc']:.3f}, folded {record['folding_fraction']:.2e}"
        return text

    def csv_columns(self, classes) -> list[str]:
        return [f"dice_{c}" for c in classes] + ["ncc", "folding_fraction"]

    def csv_values(self, record: dict, classes) -> list[str]:
        values = ["" if record["dice"][c] is None else f"{record['dice'][c]:.4f}"
                  for c in classes]
        return values + ["" if record.get(k) is None else f"{record[k]:.6g}"
                         for k in ("ncc", "folding_fraction")]

    def summary(self, record: dict) -> dict:
        return {"dice": record["dice"], "ncc": record.get("ncc"),
                "folding_fraction": record.get("folding_fraction")}

    def document(self, history: list[dict]) -> dict:
        from medhpc.ct.registration import INTEGRATION_STEPS

        return {"integration_steps": INTEGRATION_STEPS,
                "smoothness": self.settings.smoothness,
                "label_weight": self.settings.label_weight if self.labelled else 0.0}
