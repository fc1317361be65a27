"""Write the PET phantom as files: activity, mu-map and a JSON description."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medhpc.io.atomic import atomic_path
from medhpc.io.geometry import ImageGeometry
from medhpc.io.nifti import write_nifti
from medhpc.pet.scanner import default_image_grid, load_scanner
from medhpc.phantoms.pet import nema_iq_phantom


def write_pet_phantom(out, scanner_name="small-test", shape=None, voxel_mm=None, seed=0,
                      overwrite=False) -> dict:
    """Write ``activity.nii.gz``, ``mu_map.nii.gz`` and ``phantom.json`` into folder ``out``.

    The grid is the scanner's default (:func:`default_image_grid`) unless
    ``shape`` (z, y, x) or ``voxel_mm`` (x, y, z) are given; it is centred on
    the scanner. Returns the description written to ``phantom.json``.
    """
    scanner = load_scanner(scanner_name)
    default_shape, default_voxel = default_image_grid(scanner)
    shape = tuple(shape or default_shape)
    voxel_mm = tuple(voxel_mm or default_voxel)
    phantom = nema_iq_phantom(shape, voxel_mm, seed=seed)
    geometry = ImageGeometry.from_spacing(shape, voxel_mm, origin_mm=phantom["origin_mm"])
    description = {
        "scanner": scanner.name, "shape_zyx": list(shape), "voxel_mm": list(voxel_mm),
        "origin_mm": [float(v) for v in phantom["origin_mm"]], "scale": float(phantom["scale"]),
        "seed": seed,
        "spheres": [{"centre_mm": [float(c) for c in s["centre_mm"]],
                     "diameter_mm": float(s["diameter_mm"]), "contrast": float(s["contrast"])}
                    for s in phantom["spheres"]],
        "units": {"activity": "a.u. (background 1)", "mu_map": "1/mm"},
    }
    with atomic_path(out, overwrite=overwrite) as folder:
        folder.mkdir()
        write_nifti(folder / "activity.nii.gz", np.asarray(phantom["activity"], np.float32), geometry)
        write_nifti(folder / "mu_map.nii.gz", np.asarray(phantom["mu_map"], np.float32), geometry)
        (folder / "phantom.json").write_text(json.dumps(description, indent=2))
    return description


def phantom_of(activity_path, activity: np.ndarray) -> dict | None:
    """The NEMA-like phantom behind ``activity_path`` (its ``phantom.json`` beside it), or
    None when there is none or it does not render to this activity."""
    description_path = Path(activity_path).parent / "phantom.json"
    if not description_path.is_file():
        return None
    try:
        description = json.loads(description_path.read_text())
        phantom = nema_iq_phantom(tuple(description["shape_zyx"]), tuple(description["voxel_mm"]),
                                  seed=description.get("seed", 0))
    except (ValueError, KeyError, TypeError):
        return None
    if phantom["activity"].shape != activity.shape or not np.allclose(phantom["activity"],
                                                                     activity, atol=1e-5):
        return None
    return phantom
