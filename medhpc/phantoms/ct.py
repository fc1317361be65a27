"""CT-like abdominal phantoms with organ labels (``medhpc phantom ct``).

Each case is an axial stack through the upper abdomen: an elliptic body with a
subcutaneous fat rim around soft tissue, the liver on the patient's right, the
spleen on the left and behind, two kidneys beside a vertebral column, and air
outside. Values are Hounsfield units of a late portal-venous (nephrographic)
contrast phase with Gaussian noise; every case has its own organ sizes, positions and tilts, drawn
from ``seed`` and the case number.

Labels: 0 background, 1 liver, 2 spleen, 3 kidneys (:data:`CLASS_NAMES`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medhpc.errors import InputError
from medhpc.io.geometry import ImageGeometry

CLASS_NAMES = ("liver", "spleen", "kidneys")
DEFAULT_SHAPE = (64, 96, 96)  # z, y, x
FIELD_OF_VIEW_MM = (360.0, 360.0, 200.0)  # x, y, z

HU = {"air": -1000.0, "fat": -100.0, "soft_tissue": 45.0, "liver": 105.0, "spleen": 125.0,
      "kidney": 200.0, "bone": 450.0}
NOISE_HU = 15.0


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid in normalised body coordinates (-1..1 across the field of view)."""

    centre: tuple
    radii: tuple
    tilt_rad: float = 0.0

    def mask(self, x, y, z) -> np.ndarray:
        cos, sin = np.cos(self.tilt_rad), np.sin(self.tilt_rad)
        dx, dy, dz = x - self.centre[0], y - self.centre[1], z - self.centre[2]
        u = cos * dx + sin * dy
        v = -sin * dx + cos * dy
        return (u / self.radii[0]) ** 2 + (v / self.radii[1]) ** 2 + (dz / self.radii[2]) ** 2 <= 1.0


def case_anatomy(rng: np.random.Generator) -> dict:
    """Draw one case's organs: a dict of name -> list of :class:`Ellipsoid`.

    Coordinates are normalised: x from the patient's right (-1) to left (+1),
    y from anterior (-1) to posterior (+1), z from feet (-1) to head (+1).
    """
    def jitter(scale):
        return float(rng.uniform(-scale, scale))

    body_rx, body_ry = 0.80 + jitter(0.06), 0.58 + jitter(0.05)
    body = Ellipsoid((jitter(0.03), jitter(0.03), 0.0), (body_rx, body_ry, 10.0))
    inner = Ellipsoid(body.centre, (body_rx - 0.07 - jitter(0.02), body_ry - 0.06, 10.0))
    liver = Ellipsoid((-0.30 + jitter(0.05), -0.06 + jitter(0.05), 0.25 + jitter(0.1)),
                      (0.40 + jitter(0.05), 0.34 + jitter(0.04), 0.70 + jitter(0.1)),
                      jitter(0.35))
    spleen = Ellipsoid((0.45 + jitter(0.04), 0.18 + jitter(0.04), 0.35 + jitter(0.1)),
                       (0.14 + jitter(0.03), 0.22 + jitter(0.03), 0.40 + jitter(0.08)),
                       0.5 + jitter(0.3))
    kidney_z = -0.20 + jitter(0.1)
    kidneys = [Ellipsoid((side * (0.25 + jitter(0.03)), 0.28 + jitter(0.03),
                          kidney_z + jitter(0.08)),
                         (0.10 + jitter(0.015), 0.14 + jitter(0.02), 0.45 + jitter(0.06)),
                         side * (0.35 + jitter(0.2)))
               for side in (-1.0, 1.0)]
    spine = Ellipsoid((jitter(0.02), 0.36 + jitter(0.02), 0.0), (0.08, 0.08, 10.0))
    return {"body": [body], "inner": [inner], "liver": [liver], "spleen": [spleen],
            "kidneys": kidneys, "spine": [spine]}


def make_case(shape, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(ct_hu, labels)`` of one case on a ``(z, y, x)`` grid (float32, uint8)."""
    nz, ny, nx = shape
    z, y, x = np.meshgrid(np.linspace(-1, 1, nz, dtype=np.float32),
                          np.linspace(-1, 1, ny, dtype=np.float32),
                          np.linspace(-1, 1, nx, dtype=np.float32), indexing="ij")
    anatomy = case_anatomy(rng)

    def union(name):
        mask = np.zeros(shape, dtype=bool)
        for ellipsoid in anatomy[name]:
            mask |= ellipsoid.mask(x, y, z)
        return mask

    body, inner = union("body"), union("inner")
    hu = np.full(shape, HU["air"], dtype=np.float32)
    hu[body] = HU["fat"]
    hu[inner] = HU["soft_tissue"]
    labels = np.zeros(shape, dtype=np.uint8)
    for label, (name, value) in enumerate((("liver", "liver"), ("spleen", "spleen"),
                                           ("kidneys", "kidney")), start=1):
        mask = union(name) & inner
        hu[mask] = HU[value] + rng.uniform(-10, 10)
        labels[mask] = label
    spine = union("spine") & inner
    hu[spine] = HU["bone"] + rng.uniform(-50, 50)
    labels[spine] = 0
    hu += rng.normal(0.0, NOISE_HU, size=shape).astype(np.float32)
    return hu, labels


def phantom_geometry(shape) -> ImageGeometry:
    """Axis-aligned geometry covering :data:`FIELD_OF_VIEW_MM`, centred on the origin."""
    spacing = [fov / n for fov, n in zip(FIELD_OF_VIEW_MM, shape[::-1])]
    return ImageGeometry.from_spacing(shape, spacing)


def write_ct_phantom(out, cases: int, shape=None, seed: int = 0, overwrite: bool = False,
                     world=None) -> dict:
    """Write ``cases`` phantoms as ``out/images/case_NNN.nii.gz`` and ``out/labels/...``.

    With ``world``, cases are spread over its ranks. Returns the summary also
    written to ``out/phantom.json`` (rank 0's, identical everywhere).
    """
    from medhpc.io.nifti import write_nifti
    from medhpc.parallel.geometry import block_range

    shape = tuple(int(n) for n in (shape or DEFAULT_SHAPE))
    if cases < 1:
        raise InputError(f"--cases {cases}: expected at least 1 case")
    if len(shape) != 3 or min(shape) < 8:
        raise InputError(f"--shape {shape}: expected 3 sizes z,y,x of at least 8 voxels")
    out = Path(out)
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    geometry = phantom_geometry(shape)
    start, stop = block_range(cases, size, rank)
    for case in range(start, stop):
        hu, labels = make_case(shape, np.random.default_rng([seed, case]))
        name = f"case_{case:03d}.nii.gz"
        write_nifti(out / "images" / name, hu, geometry, overwrite=overwrite)
        write_nifti(out / "labels" / name, labels, geometry, overwrite=overwrite)
    summary = {"cases": cases, "shape_zyx": list(shape), "spacing_mm": list(geometry.spacing_mm),
               "classes": list(CLASS_NAMES), "seed": seed, "hu": HU, "noise_hu": NOISE_HU}
    if rank == 0:
        (out / "phantom.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
