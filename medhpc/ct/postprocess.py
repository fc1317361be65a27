"""Postprocessing of label maps: keep only the largest connected component of a class.

Organs are single connected objects; a false positive far from the organ is a second
component. ct-train measures on the validation cases, per class, whether keeping only the
largest 26-connected component raises the pooled Dice, and stores the classes where it does
in the model; ct-segment applies it to those classes (as nnU-Net decides its
postprocessing from cross-validation).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def largest_component(labels: np.ndarray, classes) -> np.ndarray:
    """``labels`` with every voxel of a listed class outside that class's largest
    26-connected component set to background (0)."""
    out = labels.copy()
    for label in classes:
        mask = labels == label
        components, count = ndimage.label(mask, structure=_CONNECTIVITY)
        if count < 2:
            continue
        sizes = np.bincount(components.ravel())[1:]
        out[mask & (components != 1 + int(np.argmax(sizes)))] = 0
    return out


def helpful_classes(dice: np.ndarray, dice_largest: np.ndarray, names) -> list[str]:
    """The class names whose pooled Dice rises with the largest component kept."""
    return [name for name, plain, kept in zip(names, dice, dice_largest)
            if np.isfinite(plain) and np.isfinite(kept) and kept > plain + 1e-6]
