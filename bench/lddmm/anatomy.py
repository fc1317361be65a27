"""Registration pairs from real anatomy with a known answer, and the scores that use it.

The fixed image is nilearn's MNI152 T1 template (shipped inside the nilearn package, loaded
offline) at ``resolution_mm``; the moving image is the same anatomy seen through a smooth
random diffeomorphism, times a smooth multiplicative bias field and plus Gaussian noise.
Tissue labels (0 background, 1 CSF, 2 grey matter, 3 white matter) come from nilearn's
grey- and white-matter probability maps; where nilearn ships no CSF map, CSF is the part of
the template's brain support that is neither grey nor white matter.

Spaces and the true map
-----------------------
Arrays are in NIfTI voxel order ``(i, j, k)`` = ``(x, y, z)``; world coordinates are the
template's RAS millimetres. The deformation ``T`` takes a fixed world point to the moving
world point holding the same anatomy. The moving image is built on the fixed grid:
``moving(q) = bias(q) * fixed(T^-1(A_F q)) + noise`` (``T^-1`` by fixed-point iteration,
checked to 1e-3 mm). With ``rotate_header_deg`` the moving header becomes
``A_M = R_c A_F`` (a rotation about the image centre, data unchanged), so the anatomy is
rotated in world space and the true map is ``R_c T``.

The **true map** is ``true_map[:, i, j, k]`` = the moving world position (mm, RAS) of fixed
voxel ``(i, j, k)``: shape ``(3, nx, ny, nz)``. A registration's recovered map has the same
layout, and :func:`displacement_error`, :func:`dice` and :func:`folded_share` score it.

Families (each a diffeomorphism: ``det DT > 0`` is checked on the fixed grid and asserted):

- ``composed``: ``T = T3 o T2 o T1``, each ``Ti(x) = x + d_i(x)`` with ``d_i`` Gaussian-
  smoothed white noise (sigma 30, 20 and 14 mm), scaled together so that the mean
  ``|T(x) - x|`` over the fixed grey and white matter is ``amplitude_mm`` (default 3.9);
- ``small`` / ``large``: the same with a mean of 1.5 / 6.0 mm;
- ``modes``: one field, a sum of low-frequency sines and cosines (up to 2 periods over
  240 mm per axis, amplitudes falling as 1/(1+|k|^2)), mean ``amplitude_mm`` (default 3.0);
- ``local``: four localised radial bumps (three contractions, atrophy-like, and one
  expansion), ``d(x) = a (x - c) exp(-|x - c|^2 / 2 r^2)``, r 15-25 mm, centres inside the
  brain; ``amplitude_mm`` (default 4.0) is the largest displacement over the fixed grey
  and white matter, not the mean.

With ``contrast="t2"`` the moving anatomy is seen with a T2-like contrast before the bias
and noise: every T1 value is remapped by :func:`t2_like`, piecewise linear through the
template's median T1 of each tissue, so that background stays dark, CSF becomes the
brightest tissue, grey matter mid-grey and white matter dark (``T2_LIKE_LEVELS``). The map
rises, then falls: no monotone function of one image gives the other, so correlation-based
metrics are not made for such a pair and mutual information is.

The fields are functions of world position (the noise fields sampled by cubic B-spline from
a fixed 4 mm world grid, the others analytic), so a seed gives the same ``T`` at every
resolution and ``downsample`` (block means of the template; the map stays exact) up to one
overall scale, fitted on the pair's own grey and white matter (to the mean displacement, or
the largest for ``local``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from scipy import ndimage

FAMILIES = ("composed", "small", "large", "modes", "local")
CONTRASTS = ("t1", "t2")
#: The T2-like level of background, CSF, grey and white matter (``contrast="t2"``).
T2_LIKE_LEVELS = {"background": 0.0, "csf": 1.0, "grey": 0.6, "white": 0.3}
DEFAULT_AMPLITUDE_MM = {"composed": 3.9, "small": 1.5, "large": 6.0, "modes": 3.0, "local": 4.0}
LABELS = {"background": 0, "csf": 1, "grey": 2, "white": 3}
TISSUES = {"grey": 2, "white": 3}

#: World box (RAS mm) and spacing of the grid the random fields are drawn on: it holds the
#: MNI152 template's field of view (x -98..98, y -134..98, z -72..116) with a wide margin.
FIELD_BOX_MM = ((-150.0, 150.0), (-190.0, 150.0), (-130.0, 170.0))
FIELD_SPACING_MM = 4.0
COMPOSED_SIGMAS_MM = (30.0, 20.0, 14.0)
BIAS_SIGMA_MM = 40.0
INVERSE_TOLERANCE_MM = 1e-3


# -- anatomy --------------------------------------------------------------------------------
def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    if factor == 1:
        return volume
    shape = [n // factor for n in volume.shape]
    trimmed = volume[:shape[0] * factor, :shape[1] * factor, :shape[2] * factor]
    return trimmed.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(
        axis=(1, 3, 5))


def _downsampled_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of the grid of ``factor``^3 block means (world position of each block centre)."""
    scale = np.diag([factor, factor, factor, 1.0])
    scale[:3, 3] = (factor - 1) / 2.0
    return affine @ scale


@functools.lru_cache(maxsize=4)
def _anatomy(resolution_mm: int, downsample: int) -> dict:
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=resolution_mm)
    t1 = np.asarray(template.get_fdata(), np.float64)
    grey = np.asarray(datasets.load_mni152_gm_template(resolution=resolution_mm).get_fdata())
    white = np.asarray(datasets.load_mni152_wm_template(resolution=resolution_mm).get_fdata())
    if hasattr(datasets, "load_mni152_csf_template"):
        csf = np.asarray(datasets.load_mni152_csf_template(
            resolution=resolution_mm).get_fdata())
        csf_source = "nilearn load_mni152_csf_template"
    else:  # the brain support (T1 above a tenth of full scale, soft) minus grey and white
        csf = np.clip(np.clip(t1 / 0.1, 0.0, 1.0) - grey - white, 0.0, 1.0)
        csf_source = "clip(min(T1 / 0.1, 1) - GM - WM, 0, 1) (nilearn ships no CSF map)"
    affine = np.asarray(template.affine, np.float64)
    volumes = {name: _block_mean(volume, downsample).astype(np.float32)
               for name, volume in (("t1", t1), ("csf", csf), ("grey", grey),
                                    ("white", white))}
    return dict(volumes, affine=_downsampled_affine(affine, downsample), csf_source=csf_source)


def load_anatomy(resolution_mm: int = 2, downsample: int = 1) -> dict:
    """The template T1, its tissue probabilities (CSF, grey, white) and affine (copies of a
    cached load: nilearn resamples the 1 mm maps for every other resolution)."""
    return {key: value.copy() if isinstance(value, np.ndarray) else value
            for key, value in _anatomy(int(resolution_mm), int(downsample)).items()}


def tissue_labels(csf: np.ndarray, grey: np.ndarray, white: np.ndarray) -> np.ndarray:
    """0 where the three probabilities sum below 0.5, else 1 + argmax (CSF, grey, white)."""
    stack = np.stack([csf, grey, white])
    labels = (1 + np.argmax(stack, axis=0)).astype(np.uint8)
    labels[stack.sum(axis=0) < 0.5] = 0
    return labels


def t2_like(t1: np.ndarray, reference_t1: np.ndarray, reference_labels: np.ndarray) -> np.ndarray:
    """A T2-like contrast of ``t1``: piecewise linear through ``(median T1 of a tissue,
    its T2_LIKE_LEVELS level)`` for background (at 0), CSF, grey and white matter, the
    medians taken over ``reference_labels`` of ``reference_t1``, and flat beyond white
    matter. Non-monotone: it rises from background to CSF and falls from CSF to white
    matter."""
    knots = [0.0] + [float(np.median(reference_t1[reference_labels == LABELS[name]]))
                     for name in ("csf", "grey", "white")]
    levels = [T2_LIKE_LEVELS[name] for name in ("background", "csf", "grey", "white")]
    if not all(a < b for a, b in zip(knots, knots[1:])):
        raise ValueError(f"tissue medians {knots} are not increasing; expected a T1 image")
    return np.interp(t1, knots, levels).astype(np.float32)


# -- smooth random fields -------------------------------------------------------------------
def _field_grid_shape() -> tuple:
    return tuple(int(round((hi - lo) / FIELD_SPACING_MM)) + 1 for lo, hi in FIELD_BOX_MM)


class GridField:
    """A smooth displacement ``d(x)`` (mm) on the 4 mm world grid, sampled by cubic B-spline."""

    def __init__(self, components: np.ndarray):
        self.coefficients = [ndimage.spline_filter(c, order=3) for c in components]

    @classmethod
    def random(cls, rng: np.random.Generator, sigma_mm: float) -> "GridField":
        """Gaussian-smoothed white noise, scaled to an RMS length of 1 mm."""
        shape = _field_grid_shape()
        sigma = sigma_mm / FIELD_SPACING_MM
        components = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), sigma,
                                                       mode="wrap") for _ in range(3)])
        components /= np.sqrt(np.mean(np.sum(components ** 2, axis=0)))
        return cls(components)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        """``d`` at world points ``(3, N)`` (mm)."""
        index = np.stack([(points[a] - FIELD_BOX_MM[a][0]) / FIELD_SPACING_MM
                          for a in range(3)])
        return np.stack([ndimage.map_coordinates(c, index, order=3, prefilter=False,
                                                 mode="nearest") for c in self.coefficients])


class ModesField:
    """``d(x) = sum_k a_k sin(2 pi k.x / L) + b_k cos(2 pi k.x / L)``, low wavenumbers."""

    PERIOD_MM = 240.0

    def __init__(self, rng: np.random.Generator, max_wavenumber: int = 2):
        ks = [k for k in np.ndindex(*(2 * max_wavenumber + 1,) * 3)]
        ks = np.array(ks, np.float64) - max_wavenumber
        ks = ks[(np.abs(ks).sum(axis=1) > 0) & (np.linalg.norm(ks, axis=1) <= max_wavenumber)]
        weight = 1.0 / (1.0 + np.sum(ks ** 2, axis=1))
        self.wavenumbers = ks
        self.sine = rng.standard_normal((3, len(ks))) * weight
        self.cosine = rng.standard_normal((3, len(ks))) * weight

    def __call__(self, points: np.ndarray) -> np.ndarray:
        phase = (2 * np.pi / self.PERIOD_MM) * (self.wavenumbers @ points)  # (K, N)
        return self.sine @ np.sin(phase) + self.cosine @ np.cos(phase)


class RadialBump:
    """``d(x) = a (x - c) exp(-|x - c|^2 / 2 r^2)``: a contraction (a < 0) or expansion.

    A diffeomorphism for -1 < a < 2.2 (radial stretch ``1 + a g (1 - rho^2/r^2)``,
    tangential ``1 + a g``); the largest displacement is ``|a| r exp(-1/2)`` at rho = r.
    """

    def __init__(self, centre_mm, radius_mm: float, strength: float):
        self.centre = np.asarray(centre_mm, np.float64).reshape(3, 1)
        self.radius = float(radius_mm)
        self.strength = float(strength)

    def __call__(self, points: np.ndarray) -> np.ndarray:
        offset = points - self.centre
        g = np.exp(-np.sum(offset ** 2, axis=0) / (2 * self.radius ** 2))
        return self.strength * offset * g


class Deformation:
    """``T = T_n o ... o T_1`` with ``T_i(x) = x + scale * d_i(x)``, world mm to world mm."""

    def __init__(self, fields, scale: float = 1.0):
        self.fields = list(fields)
        self.scale = float(scale)

    def forward(self, points: np.ndarray) -> np.ndarray:
        x = np.array(points, np.float64)
        for field in self.fields:
            x = x + self.scale * field(x)
        return x

    def inverse(self, points: np.ndarray, iterations: int = 60) -> np.ndarray:
        """``T^-1`` by fixed-point iteration per step, ``x = p - d(x)`` (a contraction
        where ``|Dd| < 1``), iterating each point until it moves by less than 1e-4 mm;
        raises when the residual stays above 1e-3 mm."""
        p = np.array(points, np.float64)
        for field in reversed(self.fields):
            x = p - self.scale * field(p)
            active = np.arange(p.shape[1])
            for _ in range(iterations):
                new = p[:, active] - self.scale * field(x[:, active])
                moving = np.max(np.abs(new - x[:, active]), axis=0) >= INVERSE_TOLERANCE_MM / 10
                x[:, active] = new
                active = active[moving]
                if active.size == 0:
                    break
            residual = np.max(np.abs(x + self.scale * field(x) - p))
            if residual > INVERSE_TOLERANCE_MM:
                raise RuntimeError(f"inverting the deformation: residual {residual:.2e} mm "
                                   f"after {iterations} iterations")
            p = x
        return p


def _brain_point(rng: np.random.Generator) -> np.ndarray:
    """A random point inside an ellipsoid in the MNI152 brain (semi-axes 50, 65, 45 mm)."""
    centre, axes = np.array([0.0, -18.0, 15.0]), np.array([50.0, 65.0, 45.0])
    while True:
        u = rng.uniform(-1, 1, 3)
        if np.sum(u ** 2) <= 1:
            return centre + axes * u


def _fields(family: str, seed: int, amplitude_mm: float):
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    if family in ("composed", "small", "large"):
        return [GridField.random(rng, s) for s in COMPOSED_SIGMAS_MM]
    if family == "modes":
        return [ModesField(rng)]
    bumps = []
    signs = (-1.0, -1.0, -1.0, 1.0)
    factors = [1.0] + list(rng.uniform(0.6, 1.0, len(signs) - 1))
    for sign, factor in zip(signs, factors):
        radius = rng.uniform(15.0, 25.0)
        strength = sign * factor * amplitude_mm / (radius * np.exp(-0.5))
        bumps.append(RadialBump(_brain_point(rng), radius, strength))
    return bumps


def _fit_scale(fields, points: np.ndarray, target_mm: float, statistic=np.mean) -> float:
    """The scale giving ``statistic(|T(x) - x|)`` = ``target_mm`` over ``points`` (secant)."""
    def mean_length(scale):
        moved = Deformation(fields, scale).forward(points)
        return float(statistic(np.linalg.norm(moved - points, axis=0)))

    s0 = target_mm / mean_length(1.0)
    s1 = s0 * target_mm / mean_length(s0)
    f0, f1 = mean_length(s0) - target_mm, mean_length(s1) - target_mm
    for _ in range(20):
        if abs(f1) < 1e-4 * target_mm or f1 == f0:
            break
        s0, s1 = s1, s1 - f1 * (s1 - s0) / (f1 - f0)
        f0, f1 = f1, mean_length(s1) - target_mm
    return s1


# -- geometry helpers -----------------------------------------------------------------------
def voxel_world(affine: np.ndarray, shape) -> np.ndarray:
    """World position (mm) of every voxel: ``(3, nx, ny, nz)``."""
    index = np.indices(shape, dtype=np.float64).reshape(3, -1)
    return (affine[:3, :3] @ index + affine[:3, 3:4]).reshape((3,) + tuple(shape))


def world_to_voxel(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Voxel coordinates in the grid of ``affine`` of world points ``(3, ...)``."""
    inverse = np.linalg.inv(affine)
    flat = points.reshape(3, -1)
    return (inverse[:3, :3] @ flat + inverse[:3, 3:4]).reshape(points.shape)


def rotation_about_centre(affine: np.ndarray, shape, degrees: float,
                          axis=(1.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 world rotation by ``degrees`` about ``axis`` through the image centre."""
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    angle = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)
    centre = affine[:3, :3] @ ((np.asarray(shape, np.float64) - 1) / 2) + affine[:3, 3]
    matrix = np.eye(4)
    matrix[:3, :3] = rotation
    matrix[:3, 3] = centre - rotation @ centre
    return matrix


def sample(volume: np.ndarray, voxels: np.ndarray, order: int = 1,
           fill: float = 0.0) -> np.ndarray:
    """``volume`` at voxel coordinates ``(3, ...)`` (spline ``order``; ``fill`` outside)."""
    flat = voxels.reshape(3, -1)
    out = ndimage.map_coordinates(volume, flat, order=order, mode="constant", cval=fill)
    return out.reshape(voxels.shape[1:])


def jacobian_determinant(world_map: np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
    """``det`` of the Jacobian of a map ``(3, nx, ny, nz)`` (world mm per fixed voxel, central
    differences), divided by ``det`` of the fixed affine when given (world per world)."""
    gradient = np.stack([np.stack(np.gradient(np.asarray(world_map[c], np.float64)), axis=0)
                         for c in range(3)])  # (component, axis, ...)
    determinant = np.linalg.det(np.moveaxis(gradient, (0, 1), (-2, -1)))
    if affine is not None:
        determinant = determinant / np.linalg.det(np.asarray(affine)[:3, :3])
    return determinant


# -- the pair -------------------------------------------------------------------------------
def make_pair(resolution_mm: int = 2, seed: int = 0, family: str = "composed",
              amplitude_mm: float | None = None, bias: float = 0.2, noise: float = 0.03,
              rotate_header_deg: float = 0.0, downsample: int = 1,
              contrast: str = "t1") -> dict:
    """A fixed / moving pair with labels and the true map (see the module docstring);
    ``contrast`` ``t2`` gives the moving image a T2-like contrast (:func:`t2_like`).

    Returns a dict: ``fixed``, ``moving`` (float32 arrays), ``fixed_labels``,
    ``moving_labels`` (uint8), ``fixed_affine``, ``moving_affine`` (4x4), ``true_map``
    (float32 ``(3, nx, ny, nz)``, moving world mm per fixed voxel) and ``info`` (the
    parameters and the displacement statistics, JSON-ready).
    """
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: expected one of {FAMILIES}")
    if contrast not in CONTRASTS:
        raise ValueError(f"contrast {contrast!r}: expected one of {CONTRASTS}")
    amplitude = DEFAULT_AMPLITUDE_MM[family] if amplitude_mm is None else float(amplitude_mm)
    anatomy = load_anatomy(resolution_mm, downsample)
    affine = anatomy["affine"]
    shape = anatomy["t1"].shape
    fixed = anatomy["t1"]
    fixed_labels = tissue_labels(anatomy["csf"], anatomy["grey"], anatomy["white"])
    brain = np.isin(fixed_labels, list(TISSUES.values()))

    fields = _fields(family, seed, amplitude)
    grid = voxel_world(affine, shape)
    scale = _fit_scale(fields, grid[:, brain], amplitude,
                       np.max if family == "local" else np.mean)
    deformation = Deformation(fields, scale)

    # True map: fixed world -> moving world, then the header rotation.
    mapped = deformation.forward(grid.reshape(3, -1)).reshape(grid.shape)
    length = np.linalg.norm(mapped - grid, axis=0)
    determinant = jacobian_determinant(mapped, affine)
    if not determinant.min() > 0:
        raise AssertionError(f"{family}:{seed}: det(DT) {determinant.min():.3g} <= 0; "
                             f"not a diffeomorphism (lower amplitude_mm)")
    moving_affine = affine.copy()
    rotation = np.eye(4)
    if rotate_header_deg:
        rotation = rotation_about_centre(affine, shape, rotate_header_deg)
        moving_affine = rotation @ affine
    true_map = rotation[:3, :3] @ mapped.reshape(3, -1) + rotation[:3, 3:4]

    # Moving image: the fixed anatomy at T^-1 of every moving voxel (on the fixed grid).
    source = world_to_voxel(affine, deformation.inverse(grid.reshape(3, -1))).reshape(grid.shape)
    coefficients = ndimage.spline_filter(fixed.astype(np.float64), order=3)
    warped = np.clip(ndimage.map_coordinates(coefficients, source.reshape(3, -1), order=3,
                                             prefilter=False, mode="constant", cval=0.0), 0,
                     None).reshape(shape)
    probabilities = [sample(anatomy[name], source) for name in ("csf", "grey", "white")]
    moving_labels = tissue_labels(*probabilities)
    if contrast == "t2":
        warped = t2_like(warped, fixed, fixed_labels)

    rng = np.random.default_rng([seed, FAMILIES.index(family), 1])
    smooth = GridField.random(rng, BIAS_SIGMA_MM)
    bias_noise = smooth(grid.reshape(3, -1))[0].reshape(shape)
    bias_noise /= np.max(np.abs(bias_noise[fixed > 0.01]))
    bias_field = 1.0 + bias * bias_noise
    p99 = float(np.percentile(fixed, 99))
    moving = warped * bias_field + rng.standard_normal(shape) * (noise * p99)

    info = {"family": family, "seed": seed, "resolution_mm": resolution_mm,
            "downsample": downsample, "shape": list(shape),
            "voxel_mm": [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)],
            "amplitude_mm_target": amplitude, "field_scale": scale,
            "displacement_mm": {"mean_grey_white": float(length[brain].mean()),
                                "max_grey_white": float(length[brain].max()),
                                "p95_grey_white": float(np.percentile(length[brain], 95)),
                                "max_grid": float(length.max())},
            "det_jacobian": {"min": float(determinant.min()),
                             "max": float(determinant.max())},
            "bias": bias, "noise": noise, "noise_sd": noise * p99,
            "rotate_header_deg": rotate_header_deg, "contrast": contrast,
            "t2_like_levels": T2_LIKE_LEVELS if contrast == "t2" else None,
            "rotation_axis": [1.0, 0.0, 0.0] if rotate_header_deg else None,
            "csf_source": anatomy["csf_source"],
            "labels": LABELS, "true_map_layout": "(3, nx, ny, nz): moving world RAS mm of "
                                                 "each fixed voxel (i, j, k)"}
    return {"fixed": fixed.astype(np.float32), "moving": moving.astype(np.float32),
            "fixed_labels": fixed_labels, "moving_labels": moving_labels,
            "fixed_affine": affine, "moving_affine": moving_affine,
            "true_map": true_map.reshape(grid.shape).astype(np.float32), "info": info}


def write_pair(pair: dict, folder) -> Path:
    """fixed, moving, fixed_labels, moving_labels and true_map (.nii.gz; the map as
    ``(nx, ny, nz, 3)`` on the fixed grid) and ``pair.json``."""
    import nibabel as nib

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, affine_key in (("fixed", "fixed_affine"), ("moving", "moving_affine"),
                             ("fixed_labels", "fixed_affine"),
                             ("moving_labels", "moving_affine")):
        image = nib.Nifti1Image(pair[name], pair[affine_key])
        image.set_qform(pair[affine_key], code=1)
        image.set_sform(pair[affine_key], code=1)
        nib.save(image, str(folder / f"{name}.nii.gz"))
    true_map = nib.Nifti1Image(np.moveaxis(pair["true_map"], 0, -1), pair["fixed_affine"])
    true_map.header.set_intent("vector")
    nib.save(true_map, str(folder / "true_map.nii.gz"))
    (folder / "pair.json").write_text(json.dumps(pair["info"], indent=2))
    return folder


def read_pair(folder) -> dict:
    """What :func:`write_pair` wrote, in the layout of :func:`make_pair`."""
    import nibabel as nib

    folder = Path(folder)
    pair = {}
    for name in ("fixed", "moving", "fixed_labels", "moving_labels"):
        image = nib.load(str(folder / f"{name}.nii.gz"))
        pair[name] = np.asarray(image.dataobj)
        pair[f"{name.split('_')[0]}_affine"] = np.asarray(image.affine, np.float64)
    pair["true_map"] = np.moveaxis(
        np.asarray(nib.load(str(folder / "true_map.nii.gz")).dataobj, np.float32), -1, 0)
    pair["info"] = json.loads((folder / "pair.json").read_text())
    return pair


# -- scores ---------------------------------------------------------------------------------
def displacement_error(true_map: np.ndarray, recovered_map: np.ndarray, mask) -> dict:
    """Mean and 95th percentile of ``|true - recovered|`` (mm) over ``mask`` voxels."""
    difference = np.linalg.norm(np.asarray(true_map, np.float64)
                                - np.asarray(recovered_map, np.float64), axis=0)[mask]
    return {"mean_mm": float(difference.mean()), "p95_mm": float(np.percentile(difference, 95))}


def dice(labels_a: np.ndarray, labels_b: np.ndarray) -> dict:
    """Dice of grey and white matter between two label maps."""
    return {name: float(2 * np.sum((labels_a == k) & (labels_b == k))
                        / max(1, np.sum(labels_a == k) + np.sum(labels_b == k)))
            for name, k in TISSUES.items()}


def folded_share(recovered_map: np.ndarray, fixed_affine: np.ndarray | None = None) -> float:
    """Share of fixed voxels where ``det`` of the recovered map's Jacobian (moving world mm
    per fixed voxel) is ``<= 0``; with ``fixed_affine`` the sign of its ``det`` is taken out
    (a map of a left-handed fixed grid has negative ``det`` where it is not folded)."""
    determinant = jacobian_determinant(recovered_map)
    if fixed_affine is not None and np.linalg.det(np.asarray(fixed_affine)[:3, :3]) < 0:
        determinant = -determinant
    return float(np.mean(determinant <= 0))


def warp_labels(moving_labels: np.ndarray, moving_affine: np.ndarray,
                recovered_map: np.ndarray, interpolation: str = "nearest") -> np.ndarray:
    """Moving labels on the fixed grid through a map, 0 outside: ``nearest`` neighbour, or
    ``label`` (each label's indicator interpolated linearly, the largest wins)."""
    voxels = world_to_voxel(moving_affine, np.asarray(recovered_map, np.float64))
    if interpolation == "nearest":
        return sample(moving_labels, voxels, order=0).astype(moving_labels.dtype)
    if interpolation != "label":
        raise ValueError(f"interpolation {interpolation!r}: expected nearest or label")
    values = np.unique(moving_labels)
    scores = np.stack([sample((moving_labels == v).astype(np.float32), voxels, order=1,
                              fill=1.0 if v == 0 else 0.0) for v in values])
    return values[np.argmax(scores, axis=0)].astype(moving_labels.dtype)


def identity_map(fixed_affine: np.ndarray, shape) -> np.ndarray:
    """The map of no registration: every fixed voxel at its own world position."""
    return voxel_world(fixed_affine, shape).astype(np.float32)


def brain_mask(fixed_labels: np.ndarray) -> np.ndarray:
    """Fixed grey and white matter: where the displacement error is measured."""
    return np.isin(fixed_labels, list(TISSUES.values()))
