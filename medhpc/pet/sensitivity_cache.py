"""Sensitivity images kept between runs.

The subsets' sensitivity images ``G^T A_s^T m`` depend only on the scanner, the
multiplicative factors, the subsets, the image grid and the resolution model,
not on the counts or the iterations; at one rank they are about a third of a
one-iteration run. With ``--sensitivity-cache FILE`` the first run writes them
and later runs with the same inputs read them.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from medhpc.io.atomic import atomic_path

FORMAT = "medhpc-sensitivity-cache"


def fingerprint(sinogram, settings, grid, tof: bool) -> dict:
    """What the sensitivities depend on: the sinogram file (path, size, time), subsets,
    resolution model, grid and TOF."""
    path = Path(sinogram).resolve()
    status = path.stat()
    return {"sinogram": str(path), "bytes": status.st_size, "modified_ns": status.st_mtime_ns,
            "subsets": settings.n_subsets, "psf_fwhm_mm": settings.psf_fwhm_mm,
            "image_shape": list(grid.shape), "affine": np.asarray(grid.affine).round(6).tolist(),
            "tof": bool(tof)}


def load(path, expected: dict) -> list[np.ndarray] | None:
    """The cached images, or None when the file is missing or made for other inputs."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as h5:
            if h5.attrs.get("format") != FORMAT or json.loads(h5.attrs["fingerprint"]) != expected:
                return None
            return [h5[f"subset_{index}"][...] for index in range(expected["subsets"])]
    except (OSError, KeyError, ValueError):
        return None


def save(path, expected: dict, sensitivities) -> None:
    """Write the images atomically (replacing an outdated cache)."""
    with atomic_path(path, overwrite=True) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs["format"] = FORMAT
            h5.attrs["fingerprint"] = json.dumps(expected)
            for index, image in enumerate(sensitivities):
                h5.create_dataset(f"subset_{index}", data=np.asarray(image, np.float32),
                                  compression="gzip", compression_opts=1)
