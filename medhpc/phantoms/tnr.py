"""Serial-section phantom for tnr-register, with the ground truth of every distortion.

The true anatomy is a 3-D textured block of tissue: band-limited random texture
(correlated over about a section along z), a few tubes (vessels: pale lumen,
dense wall) whose centre lines curve smoothly along z, and an elliptical tissue
outline; the whole anatomy drifts along a smooth curve as z goes on, so
straightening it (what pairwise registration does) is an error.

Each section ``i`` is the true plane ``z = i`` seen through its own distortion
``M_i`` (observed pixel -> true pixel): a rotation by up to ``rotation_deg``
about the image centre, a shift of up to ``shift_px`` and a smooth random
displacement of amplitude ``warp_px`` (three random plane waves per
component). Sections are written as H&E-like RGB PNGs (hematoxylin and eosin
optical densities); ``restain`` sections use other stain vectors and a gamma
(an IHC-like look), ``blank`` sections are empty glass.

Ground truth (``truth.h5``): ``maps`` (z, y, x, 2) = M_i at every observed
pixel, ``heldout_true`` (z, K, 2) random tissue points in the true frame and
``heldout_observed`` (z, K, 2) where they appear in the observed sections
(M_i inverted), and ``anatomy`` (z, y, x) the undistorted planes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from medhpc.errors import InputError

# Optical density per RGB channel (rows: hematoxylin, eosin) for H&E, and for the restained look.
_HE = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
_IHC = np.array([[0.65, 0.70, 0.29], [0.27, 0.57, 0.78]])


@dataclass
class TnrPhantomSettings:
    """Size and distortions of the phantom (pixels, degrees)."""

    sections: int = 24
    size: int = 256
    rotation_deg: float = 2.0
    shift_px: float | None = None       # default size / 50
    warp_px: float | None = None        # default size / 85
    curvature_px: float | None = None   # default size / 20
    heldout: int = 64
    blank: tuple = ()
    restain: tuple = ()
    seed: int = 0
    tubes: int = 5

    def resolved(self) -> "TnrPhantomSettings":
        values = asdict(self)
        for name, divisor in (("shift_px", 50.0), ("warp_px", 85.0), ("curvature_px", 20.0)):
            if values[name] is None:
                values[name] = self.size / divisor
        values["blank"] = tuple(int(i) for i in self.blank)
        values["restain"] = tuple(int(i) for i in self.restain)
        return TnrPhantomSettings(**values)


def check_settings(settings: TnrPhantomSettings) -> None:
    """Raise InputError for settings that cannot make a phantom."""
    if settings.sections < 3:
        raise InputError(f"--sections {settings.sections}: expected at least 3 sections")
    if settings.size < 48:
        raise InputError(f"--size {settings.size}: expected at least 48 pixels")
    for name in ("blank", "restain"):
        for index in getattr(settings, name):
            if not 0 <= index < settings.sections:
                raise InputError(f"--{name} {index}: expected a section index in "
                                 f"[0, {settings.sections})")


@dataclass
class _Anatomy:
    texture: np.ndarray          # (z, y, x) on a padded grid
    pad: int
    drift: np.ndarray            # (z, 2) anatomy centre offset per section
    tube_paths: np.ndarray       # (tubes, z, 2) centre lines (anatomy frame)
    tube_radii: np.ndarray       # (tubes,)
    outline: tuple = field(default=())


def _anatomy(settings: TnrPhantomSettings, rng) -> _Anatomy:
    n, size = settings.sections, settings.size
    pad = int(size * 0.25)
    noise = rng.standard_normal((n, size + 2 * pad, size + 2 * pad)).astype(np.float32)
    fine = ndimage.gaussian_filter(noise, (1.2, 1.6, 1.6), mode="reflect")
    coarse = ndimage.gaussian_filter(noise, (1.5, 5.0, 5.0), mode="reflect")
    texture = fine / fine.std() + 0.8 * coarse / coarse.std()
    texture = 1.0 / (1.0 + np.exp(-1.2 * texture))
    z = np.arange(n) / max(n - 1, 1)
    phase = rng.uniform(0, 2 * np.pi, 2)
    drift = settings.curvature_px * np.stack(
        [np.sin(np.pi * 1.1 * z + phase[0]), np.sin(np.pi * 0.8 * z + phase[1])], axis=1)
    drift -= drift.mean(axis=0)
    centre = (size - 1) / 2.0
    tubes = settings.tubes
    base = centre + rng.uniform(-0.22, 0.22, (tubes, 1, 2)) * size
    wobble = rng.uniform(0.3, 0.8, (tubes, 1, 2)) * settings.curvature_px
    tube_phase = rng.uniform(0, 2 * np.pi, (tubes, 1, 2))
    tube_paths = base + wobble * np.sin(np.pi * z[None, :, None] + tube_phase)
    radii = rng.uniform(0.02, 0.045, tubes) * size
    outline = (centre, 0.40 * size, 0.34 * size, rng.uniform(0, 2 * np.pi, 3))
    return _Anatomy(texture, pad, drift, tube_paths, radii, outline)


def _smooth_field(rng, shape, amplitude: float) -> callable:
    """A random smooth displacement (3 plane waves per component), as a function of (y, x)."""
    size = max(shape)
    waves = []
    for _ in range(2):
        wavelength = rng.uniform(0.5, 1.2, 3) * size
        angle = rng.uniform(0, 2 * np.pi, 3)
        phase = rng.uniform(0, 2 * np.pi, 3)
        weight = rng.uniform(0.5, 1.0, 3)
        waves.append((wavelength, angle, phase, weight / weight.sum()))

    def displacement(y, x):
        out = []
        for wavelength, angle, phase, weight in waves:
            total = 0.0
            for k in range(3):
                along = np.cos(angle[k]) * x + np.sin(angle[k]) * y
                total = total + weight[k] * np.sin(2 * np.pi * along / wavelength[k] + phase[k])
            out.append(amplitude * total)
        return np.stack(out, axis=-1)
    return displacement


def _distortion(settings: TnrPhantomSettings, rng):
    """M_i as a function of observed (y, x) arrays -> true (y, x) (..., 2)."""
    centre = (settings.size - 1) / 2.0
    angle = np.deg2rad(rng.uniform(-settings.rotation_deg, settings.rotation_deg))
    shift = rng.uniform(-settings.shift_px, settings.shift_px, 2)
    warp = _smooth_field(rng, (settings.size, settings.size), settings.warp_px)
    cos, sin = np.cos(angle), np.sin(angle)

    def to_true(y, x):
        dy, dx = y - centre, x - centre
        rotated = np.stack([cos * dy - sin * dx + centre, sin * dy + cos * dx + centre], axis=-1)
        return rotated + shift + warp(y, x)
    return to_true


def _invert(to_true, true_points: np.ndarray, iterations: int = 60) -> np.ndarray:
    """Observed positions of true points (fixed-point iteration on the distortion)."""
    estimate = true_points.copy()
    for _ in range(iterations):
        estimate = estimate + 0.8 * (true_points - to_true(estimate[:, 0], estimate[:, 1]))
    return estimate


def _densities(anatomy: _Anatomy, section: int, true_yx: np.ndarray, size: int):
    """Hematoxylin and eosin densities and the tissue mask at true positions (..., 2)."""
    frame = true_yx - anatomy.drift[section]
    coords = [np.full(frame.shape[:-1], float(section)), frame[..., 0] + anatomy.pad,
              frame[..., 1] + anatomy.pad]
    texture = ndimage.map_coordinates(anatomy.texture, coords, order=1, mode="nearest")
    centre, half_y, half_x, phases = anatomy.outline
    dy, dx = frame[..., 0] - centre, frame[..., 1] - centre
    theta = np.arctan2(dy, dx)
    wobble = 1.0 + 0.06 * np.sin(3 * theta + phases[0]) + 0.04 * np.sin(5 * theta + phases[1])
    tissue = (dy / half_y) ** 2 + (dx / half_x) ** 2 <= wobble ** 2
    hematoxylin = 0.1 + 0.9 * texture
    eosin = 0.35 + 0.4 * (1.0 - texture)
    for path, radius in zip(anatomy.tube_paths, anatomy.tube_radii):
        distance = np.hypot(frame[..., 0] - path[section, 0], frame[..., 1] - path[section, 1])
        lumen = distance < radius
        wall = (distance >= radius) & (distance < radius * 1.5)
        hematoxylin = np.where(lumen, 0.05, np.where(wall, 0.25, hematoxylin))
        eosin = np.where(lumen, 0.05, np.where(wall, 1.0, eosin))
    return np.where(tissue, hematoxylin, 0.0), np.where(tissue, eosin, 0.0), tissue


def _rgb(hematoxylin, eosin, stains, gamma: float, rng) -> np.ndarray:
    density = hematoxylin[..., None] * stains[0] + eosin[..., None] * stains[1]
    intensity = np.power(10.0, -density) ** gamma
    intensity = intensity + rng.normal(0, 0.01, intensity.shape)
    return np.clip(np.round(255 * intensity), 0, 255).astype(np.uint8)


def make_tnr_phantom(settings: TnrPhantomSettings) -> dict:
    """Render the sections and their ground truth in memory.

    Returns
    -------
    dict
        ``sections`` (z, y, x, 3) uint8, ``maps`` (z, y, x, 2) float32,
        ``heldout_true`` / ``heldout_observed`` (z, K, 2) float32, ``anatomy``
        (z, y, x) float32 (hematoxylin density of the undistorted planes),
        ``settings``.
    """
    settings = settings.resolved()
    check_settings(settings)
    rng = np.random.default_rng(settings.seed)
    anatomy = _anatomy(settings, rng)
    n, size = settings.sections, settings.size
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    identity = np.stack([yy, xx], axis=-1)
    sections = np.empty((n, size, size, 3), np.uint8)
    maps = np.empty((n, size, size, 2), np.float32)
    anatomy_planes = np.empty((n, size, size), np.float32)
    heldout_true = np.empty((n, settings.heldout, 2), np.float32)
    heldout_observed = np.empty((n, settings.heldout, 2), np.float32)
    for i in range(n):
        to_true = _distortion(settings, rng)
        true_yx = to_true(yy, xx)
        maps[i] = true_yx
        hematoxylin, eosin, _ = _densities(anatomy, i, true_yx, size)
        plain_h, _, tissue = _densities(anatomy, i, identity, size)
        anatomy_planes[i] = plain_h
        if i in settings.blank:
            sections[i] = _rgb(np.zeros_like(hematoxylin), np.zeros_like(eosin), _HE, 1.0, rng)
        elif i in settings.restain:
            sections[i] = _rgb(0.7 * hematoxylin, 1.3 * eosin, _IHC, 0.7, rng)
        else:
            sections[i] = _rgb(hematoxylin, eosin, _HE, 1.0, rng)
        inner = ndimage.binary_erosion(tissue, iterations=max(2, size // 16))
        candidates = np.argwhere(inner)
        chosen = candidates[rng.choice(len(candidates), settings.heldout, replace=False)]
        points = chosen + rng.uniform(-0.5, 0.5, chosen.shape)
        heldout_true[i] = points
        heldout_observed[i] = _invert(to_true, points)
    return {"sections": sections, "maps": maps, "heldout_true": heldout_true,
            "heldout_observed": heldout_observed, "anatomy": anatomy_planes,
            "settings": settings}


def write_tnr_phantom(out, settings: TnrPhantomSettings, overwrite: bool = False) -> dict:
    """Write ``sections/section_NNN.png``, ``truth.h5`` and ``phantom.json`` into ``out``."""
    import h5py
    from PIL import Image

    from medhpc.io.atomic import atomic_path

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out}: folder exists and is not empty; expected a new folder "
                         "or --overwrite")
    phantom = make_tnr_phantom(settings)
    resolved = phantom["settings"]
    folder = out / "sections"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("section_*.png"):
        old.unlink()
    for i, section in enumerate(phantom["sections"]):
        Image.fromarray(section).save(folder / f"section_{i:03d}.png")
    with atomic_path(out / "truth.h5", overwrite=True) as tmp:
        with h5py.File(tmp, "w") as h5:
            for name in ("maps", "heldout_true", "heldout_observed", "anatomy"):
                h5.create_dataset(name, data=phantom[name], compression="gzip")
            h5.attrs["settings"] = json.dumps(asdict(resolved))
    summary = {"sections": resolved.sections, "size": resolved.size,
               "settings": asdict(resolved), "folder": str(folder),
               "truth": str(out / "truth.h5")}
    (out / "phantom.json").write_text(json.dumps(summary, indent=2))
    return summary


def read_truth(path) -> dict:
    """The ground truth written by :func:`write_tnr_phantom`."""
    import h5py

    with h5py.File(path, "r") as h5:
        truth = {name: h5[name][()] for name in ("heldout_true", "heldout_observed")}
        truth["settings"] = json.loads(h5.attrs["settings"])
    return truth


def _output_position(displacement: np.ndarray, start: np.ndarray, observed: np.ndarray,
                     factor: float, iterations: int = 8) -> np.ndarray:
    """Output positions ``o`` (phantom px) with ``F(o) = observed``, from ``start``.

    ``F(o) = o + factor * d(o / factor)`` with ``d`` the (2, y, x) output -> input
    displacement in output pixels (bilinear); its Jacobian by central differences.
    """
    def shown(points):
        at = points / factor
        return np.stack([ndimage.map_coordinates(displacement[c], [at[:, 0], at[:, 1]],
                                                 order=1, mode="nearest") for c in range(2)],
                        axis=1) * factor + points

    position = start.copy()
    step = 0.5 * factor
    for _ in range(iterations):
        residual = shown(position) - observed
        jacobian = np.empty((len(position), 2, 2))
        for axis in range(2):
            offset = np.zeros(2)
            offset[axis] = step
            jacobian[:, :, axis] = (shown(position + offset) - shown(position - offset)) / (2 * step)
        singular = np.abs(np.linalg.det(jacobian)) < 1e-6
        jacobian[singular] = np.eye(2)
        position = position - np.linalg.solve(jacobian, residual[..., None])[..., 0]
    return position


def heldout_error(displacement: np.ndarray, truth: dict, factor: float = 1.0) -> dict:
    """Registration error at the held-out points, in phantom pixels.

    Parameters
    ----------
    displacement : (2, z, y, x)
        The registration's output -> input displacement (output pixels, as in
        ``--fields``); ``factor`` is the output's pixel size in phantom pixels.
    truth : dict
        From :func:`read_truth`.

    The reconstructed position of a true point of section ``i`` seen at ``p`` is the
    output pixel ``o`` that shows it, ``F_i(o) = p`` with ``F_i(o)`` the input pixel
    shown at output ``o`` (Newton's method from the true position; exact also for
    sections turned over, where ``F`` is far from a shift). The output's frame is arbitrary, so one
    rigid transform common to the whole stack (least squares) is removed first.
    Returns mean and per-section mean errors.
    """
    true = truth["heldout_true"].astype(np.float64)
    observed = truth["heldout_observed"].astype(np.float64)
    n, count, _ = true.shape
    reconstructed = np.empty_like(true)
    for i in range(n):
        reconstructed[i] = _output_position(displacement[:, i], true[i], observed[i], factor)
    a = true.reshape(-1, 2)
    b = reconstructed.reshape(-1, 2)
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    u, _, vt = np.linalg.svd((a - mean_a).T @ (b - mean_b))
    rotation = (u @ vt).T
    if np.linalg.det(rotation) < 0:
        vt[-1] *= -1
        rotation = (u @ vt).T
    aligned = (a - mean_a) @ rotation.T + mean_b
    error = np.hypot(*(b - aligned).T).reshape(n, count)
    return {"mean_px": float(error.mean()), "per_section_px": error.mean(axis=1).tolist(),
            "max_px": float(error.max())}
