"""The dataset fingerprint: what the planner knows about the source cases.

Written by ct-prepare into the dataset (root attribute ``fingerprint``, JSON): the
source voxel spacing and shape of every case (before any resampling), the
foreground intensity statistics, how often each class occurs, and the target
spacing the planner recommends for the data (:func:`target_spacing`).
"""

from __future__ import annotations

import numpy as np

#: An axis counts as coarse when its voxels are longer than this many times the others'.
ANISOTROPIC_RATIO = 3.0
#: ... and it also has this many times fewer voxels than the others.
ANISOTROPIC_SIZE_RATIO = 3.0
#: The percentile of the coarse axis' spacings the target takes on anisotropic data.
COARSE_AXIS_PERCENTILE = 10


def case_entry(name: str, geometry, labels, n_classes: int) -> dict:
    """One case's part of the fingerprint: source spacing and shape (z, y, x), class voxels."""
    entry = {"name": name, "spacing_zyx": [float(v) for v in geometry.spacing_mm[::-1]],
             "shape_zyx": [int(n) for n in geometry.shape]}
    if labels is not None:
        entry["class_voxels"] = np.bincount(labels.ravel(), minlength=n_classes + 1)[
            : n_classes + 1].astype(int).tolist()
    return entry


def target_spacing(spacings_zyx, shapes_zyx) -> tuple:
    """The voxel size to train at (z, y, x, mm): the median spacing per axis.

    When one axis is both much coarser (more than 3x the others' voxel length) and much
    shorter in voxels (3x fewer), the median would thin out the many cases acquired
    finer on it; that axis takes the 10th percentile of its spacings instead, never finer
    than the other axes (nnU-Net's rule for anisotropic data).
    """
    spacings = np.asarray(spacings_zyx, dtype=np.float64).reshape(-1, 3)
    shapes = np.asarray(shapes_zyx, dtype=np.float64).reshape(-1, 3)
    target = np.median(spacings, axis=0)
    median_shape = np.median(shapes, axis=0)
    coarse = int(np.argmax(target))
    others = [a for a in range(3) if a != coarse]
    if (target[coarse] > ANISOTROPIC_RATIO * target[others].max()
            and median_shape[coarse] * ANISOTROPIC_SIZE_RATIO < median_shape[others].min()):
        finer = np.percentile(spacings[:, coarse], COARSE_AXIS_PERCENTILE)
        target[coarse] = max(finer, target[others].max())
    return tuple(float(v) for v in target)


def dataset_fingerprint(entries: list[dict], classes: list[str], intensity: dict) -> dict:
    """The fingerprint of a dataset from its cases' entries (:func:`case_entry`)."""
    spacings = np.array([e["spacing_zyx"] for e in entries], dtype=np.float64)
    shapes = np.array([e["shape_zyx"] for e in entries], dtype=np.float64)
    labelled = [e for e in entries if "class_voxels" in e]
    frequencies, present = {}, {}
    if labelled:
        counts = np.array([e["class_voxels"] for e in labelled], dtype=np.float64)
        total = counts.sum()
        for index, name in enumerate(classes, start=1):
            frequencies[name] = float(counts[:, index].sum() / total)
            present[name] = int(np.count_nonzero(counts[:, index]))
    target = target_spacing(spacings, shapes)
    return {
        "cases": len(entries), "labelled": len(labelled),
        "spacing_zyx": {"median": np.median(spacings, 0).tolist(),
                        "min": spacings.min(0).tolist(), "max": spacings.max(0).tolist()},
        "shape_zyx": {"median": np.median(shapes, 0).tolist(),
                      "min": shapes.min(0).astype(int).tolist(),
                      "max": shapes.max(0).astype(int).tolist()},
        "class_fraction": frequencies, "cases_with_class": present,
        "intensity": intensity,
        "target_spacing_zyx": list(target),
        "anisotropic": bool(max(target) > ANISOTROPIC_RATIO * min(target)),
        "per_case": {e["name"]: {"spacing_zyx": e["spacing_zyx"], "shape_zyx": e["shape_zyx"]}
                     for e in entries},
    }
