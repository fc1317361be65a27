"""Training patches: which case and where, deterministic per global batch slot.

The global batch of ``G`` patches per step has ``G`` slots; rank ``r`` with
``B`` patches per step fills slots ``r*B .. r*B+B-1``. Slot ``s`` draws only
from its own block of the training cases, and patch ``(step, s)`` is a pure
function of ``(seed, step, s)``. So the patches of a step do not depend on how
many ranks share the global batch, every rank holds only the cases of its
slots, and resuming needs nothing but the step number.

A patch is centred on a foreground voxel (a class present in the case, chosen
uniformly, then a voxel of it) with probability ``foreground_fraction``
(nnU-Net's 33%), else on a uniformly drawn voxel.
"""

from __future__ import annotations

import numpy as np

from medhpc.ct.augment import AugmentSettings, draw_transform, extract_patch
from medhpc.parallel.geometry import block_range

FOREGROUND_VOXELS_KEPT = 20_000


def slot_cases(n_cases: int, slots: int, slot: int) -> range:
    """The training cases (indices) slot ``slot`` draws from."""
    if n_cases >= slots:
        return range(*block_range(n_cases, slots, slot))
    return range(slot % n_cases, slot % n_cases + 1)


def uniform_centre(rng, patch_shape, shape) -> np.ndarray:
    """A patch centre drawn uniformly where the patch fits (the middle on shorter axes)."""
    half = (np.array(patch_shape) - 1) / 2
    shape = np.array(shape)
    low = np.minimum(half, (shape - 1) / 2)
    high = np.maximum(shape - 1 - half, (shape - 1) / 2)
    return rng.uniform(low, high)


def rank_slots(rank: int, batch_per_rank: int) -> range:
    """The global batch slots rank ``rank`` fills."""
    return range(rank * batch_per_rank, (rank + 1) * batch_per_rank)


class TrainingCase:
    """One case held in memory for sampling: normalised image, labels (or None), foreground
    voxels."""

    def __init__(self, name: str, image: np.ndarray, labels: np.ndarray, n_classes: int,
                 fill: float):
        self.name = name
        self.image = image
        self.labels = labels
        self.fill = fill
        rng = np.random.default_rng(list(name.encode()))
        self.foreground = {}
        for c in range(1, n_classes + 1 if labels is not None else 1):
            voxels = np.argwhere(labels == c)
            if len(voxels) > FOREGROUND_VOXELS_KEPT:
                voxels = voxels[rng.choice(len(voxels), FOREGROUND_VOXELS_KEPT, replace=False)]
            if len(voxels):
                self.foreground[c] = voxels


class PatchSampler:
    """Draws the patches of the slots this rank fills."""

    def __init__(self, cases: dict, n_training_cases: int, global_batch: int, slots, patch_shape,
                 seed: int, kernels, augment: AugmentSettings, foreground_fraction: float = 1 / 3):
        self.cases = cases  # global case index -> TrainingCase (those of this rank's slots)
        self.n_training_cases = n_training_cases
        self.global_batch = global_batch
        self.slots = list(slots)
        self.patch_shape = tuple(patch_shape)
        self.seed = seed
        self.kernels = kernels
        self.augment = augment
        self.foreground_fraction = foreground_fraction

    def needed_cases(self) -> list[int]:
        """Indices of the training cases this rank's slots draw from."""
        return sorted({c for s in self.slots
                       for c in slot_cases(self.n_training_cases, self.global_batch, s)})

    def centre(self, rng, case: TrainingCase) -> np.ndarray:
        if case.foreground and rng.random() < self.foreground_fraction:
            classes = sorted(case.foreground)
            voxels = case.foreground[classes[rng.integers(len(classes))]]
            return voxels[rng.integers(len(voxels))].astype(np.float64)
        return uniform_centre(rng, self.patch_shape, case.image.shape)

    def patch(self, step: int, slot: int):
        """The (image, labels) patch of global batch slot ``slot`` at ``step``."""
        rng = np.random.default_rng([self.seed, step, slot])
        choices = slot_cases(self.n_training_cases, self.global_batch, slot)
        case = self.cases[choices[rng.integers(len(choices))]]
        transform = draw_transform(rng, self.centre(rng, case), self.patch_shape, self.augment)
        return extract_patch(self.kernels, case.image, case.labels, transform, self.patch_shape,
                             case.fill, rng)

    def batch(self, step: int):
        """This rank's patches at ``step``: images (B, 1, z, y, x) float32, labels (B, z, y, x)."""
        pairs = [self.patch(step, slot) for slot in self.slots]
        images = np.stack([p[0] for p in pairs])[:, None]
        labels = np.stack([p[1] for p in pairs]).astype(np.int64)
        return images, labels
