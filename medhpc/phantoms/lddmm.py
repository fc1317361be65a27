"""A brain-like pair of volumes and the smooth diffeomorphism between them (``phantom lddmm``).

The fixed volume has four tissue labels (0 background, 1 CSF with ventricles, 2 grey
matter with folds, 3 white matter) and T1-like intensities blurred over about one voxel.
The moving volume is the same anatomy seen through a smooth random deformation
``psi(x) = x + d(x)``: ``moving = fixed o psi`` (labels and intensities are drawn from
the same continuous description at the deformed positions, so there is no resampling
blur). A registration ``phi`` with ``moving o phi = fixed`` recovers ``psi^-1``; both
``d`` and the displacement of ``psi^-1`` are stored, in voxels, ``(z, y, x)`` components.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medhpc.io.geometry import ImageGeometry

INTENSITY = {0: 0.0, 1: 0.25, 2: 0.6, 3: 0.95}
TISSUES = {0: "background", 1: "csf", 2: "grey matter", 3: "white matter"}


def phantom_geometry(shape, spacing_xyz_mm=(1.1, 1.0, 1.2),
                     angle_deg: float = 12.0) -> ImageGeometry:
    """A non-trivial affine: x flipped, rotated about z, anisotropic voxels, off-centre."""
    angle = np.deg2rad(angle_deg)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0],
                         [np.sin(angle), np.cos(angle), 0.0],
                         [0.0, 0.0, 1.0]])
    linear = rotation @ np.diag([-1.0, 1.0, 1.0]) @ np.diag(spacing_xyz_mm)
    centre = (np.array(shape[::-1], np.float64) - 1) / 2
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = np.array([5.0, -8.0, 12.0]) - linear @ centre
    return ImageGeometry(tuple(shape), affine)


def tissue_labels(points_zyx: np.ndarray, shape) -> np.ndarray:
    """Labels of the continuous anatomy at voxel positions ``(3, ...)`` of a grid ``shape``."""
    centre = (np.asarray(shape, np.float64) - 1) / 2
    half = np.asarray(shape, np.float64) / 2
    z, y, x = ((points_zyx[i] - centre[i]) / half[i] for i in range(3))
    radius = np.sqrt((x / 0.80) ** 2 + (y / 0.88) ** 2 + (z / 0.72) ** 2) + 1e-9
    ux, uy, uz = x / radius, y / radius, z / radius
    folds = 0.045 * (np.sin(9 * ux + 1.0) * np.cos(7 * uy) + np.sin(8 * uz + 2 * uy))
    labels = np.zeros(points_zyx.shape[1:], np.uint8)
    labels[radius < 0.92] = 1
    labels[radius < 0.84 + 0.5 * folds] = 2
    labels[radius < 0.58 + folds] = 3
    for side in (-1.0, 1.0):
        ventricle = (((x - 0.13 * side) / 0.09) ** 2 + (y / 0.30) ** 2 + ((z - 0.05) / 0.14) ** 2)
        labels[ventricle < 1.0] = 1
    return labels


def gaussian_blur(volume: np.ndarray, sigma_voxels: float) -> np.ndarray:
    """Periodic Gaussian blur by FFT (``sigma_voxels`` on every axis)."""
    spectrum = np.fft.rfftn(volume)
    shape = volume.shape
    axes = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    grids = np.meshgrid(*axes, indexing="ij")
    squared = sum(g * g for g in grids)
    spectrum *= np.exp(-2.0 * (np.pi * sigma_voxels) ** 2 * squared)
    return np.fft.irfftn(spectrum, s=shape, axes=tuple(range(len(shape)))).astype(np.float32)


def intensities(labels: np.ndarray) -> np.ndarray:
    table = np.array([INTENSITY[k] for k in sorted(INTENSITY)], np.float32)
    return gaussian_blur(table[labels], 0.7)


def random_displacement(shape, amplitude_voxels: float, seed: int) -> np.ndarray:
    """A smooth random displacement ``(3, nz, ny, nx)`` in voxels, largest norm ``amplitude``."""
    rng = np.random.default_rng(seed)
    width = max(shape) / 7.0
    field = np.stack([gaussian_blur(rng.standard_normal(shape).astype(np.float32), width)
                      for _ in range(3)])
    field *= amplitude_voxels / float(np.max(np.sqrt(np.sum(field ** 2, axis=0))))
    return field.astype(np.float32)


def invert_displacement(displacement: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Displacement of ``psi^-1`` by the fixed point ``w(y) = -d(y + w(y))``."""
    from medhpc.lddmm.transform import sample_field

    shape = displacement.shape[1:]
    identity = np.indices(shape, dtype=np.float32)
    inverse = -displacement.copy()
    for _ in range(iterations):
        inverse = -sample_field(displacement, identity + inverse)
    return inverse


def make_phantom(shape=(64, 64, 64), amplitude_voxels: float | None = None, seed: int = 0) -> dict:
    """Fixed and moving volumes, their labels and the true displacements (see module notes)."""
    shape = tuple(int(n) for n in shape)
    amplitude = 0.06 * min(shape) if amplitude_voxels is None else amplitude_voxels
    identity = np.indices(shape, dtype=np.float64)
    displacement = random_displacement(shape, amplitude, seed)
    fixed_labels = tissue_labels(identity, shape)
    moving_labels = tissue_labels(identity + displacement, shape)
    return {
        "fixed": intensities(fixed_labels), "moving": intensities(moving_labels),
        "fixed_labels": fixed_labels, "moving_labels": moving_labels,
        "displacement": displacement, "inverse_displacement": invert_displacement(displacement),
        "geometry": phantom_geometry(shape), "amplitude_voxels": amplitude, "seed": seed,
    }


def write_lddmm_phantom(out, shape=(64, 64, 64), seed: int = 0, overwrite: bool = False) -> dict:
    """Write the phantom's NIfTI images, ``true_transform.h5`` and ``phantom.json`` to ``out``."""
    import h5py

    from medhpc.io.atomic import atomic_path, check_output_free
    from medhpc.io.images import write_image

    out = Path(out)
    names = ["fixed.nii.gz", "moving.nii.gz", "fixed_labels.nii.gz", "moving_labels.nii.gz",
             "true_transform.h5", "phantom.json"]
    for name in names:
        check_output_free(out / name, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    phantom = make_phantom(shape, seed=seed)
    geometry = phantom["geometry"]
    for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
        write_image(out / f"{key}.nii.gz", phantom[key], geometry, overwrite=overwrite)
    with atomic_path(out / "true_transform.h5", overwrite=overwrite) as tmp:
        with h5py.File(tmp, "w") as f:
            f["displacement_vox"] = phantom["displacement"]
            f["inverse_displacement_vox"] = phantom["inverse_displacement"]
            for key, value in geometry.to_attrs().items():
                f.attrs[key] = value
            f.attrs["description"] = ("moving(x) = fixed(x + displacement(x)); components "
                                      "(z, y, x) in voxels of the fixed grid")
    summary = {"shape_zyx": list(shape), "seed": seed,
               "amplitude_voxels": phantom["amplitude_voxels"],
               "voxel_mm": list(geometry.spacing_mm), "tissues": TISSUES,
               "intensity": {TISSUES[k]: v for k, v in INTENSITY.items()},
               "files": names[:-1]}
    with atomic_path(out / "phantom.json", overwrite=overwrite) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary
