"""A NEMA NU 2 image-quality-like PET phantom and its contrast/variability analysis.

Geometry (nominal, scale 1), in the transaxial plane with the lung insert on
the scanner axis:

- body: a "D" made of the half-disc of radius 147 mm on the +y side of the
  line y = -35 mm and, below it, a 140 mm wide rectangle 77 mm deep with
  corners rounded to 77 mm (flat side at y = -112 mm, towards -y); 180 mm long;
  warm background, activity 1, water;
- lung insert: a cylinder of 50 mm diameter on the axis through the whole body,
  no activity, lung attenuation;
- six hot spheres of 10, 13, 17, 22, 28 and 37 mm diameter, contrast 4, water,
  centred on a ring of radius 57.2 mm at the angles 0, 60, ..., 300 degrees
  (from +x towards +y) in the sphere plane.

The sphere plane is the centre of the middle image slice (z = 0 for an odd
number of slices, half a slice above it for an even one), and the body is
centred on it axially.

When the image is too small for the body, the whole phantom (body, lung
insert, sphere ring, sphere diameters and axial length) is scaled by
``scale = 0.95 * (smaller transaxial half-width of the image) / 155.26 mm``
(155.26 mm is the body's largest distance from the axis), so that the body fits
the circle inscribed in the image. The returned ``spheres`` hold the scaled
diameters.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from medhpc.errors import InputError

NEMA_SPHERE_DIAMETERS_MM = (10.0, 13.0, 17.0, 22.0, 28.0, 37.0)
SPHERE_CONTRAST = 4.0
MU_WATER_PER_MM = 0.0096
MU_LUNG_PER_MM = 0.0029

_ARC_RADIUS_MM = 147.0
_CORNER_RADIUS_MM = 77.0
_FLAT_HALF_WIDTH_MM = 70.0
_ARC_CENTRE_Y_MM = -35.0
_BODY_LENGTH_MM = 180.0
_BODY_MAX_RADIUS_MM = math.hypot(_FLAT_HALF_WIDTH_MM, _ARC_CENTRE_Y_MM) + _CORNER_RADIUS_MM
_SPHERE_RING_RADIUS_MM = 57.2
_LUNG_DIAMETER_MM = 50.0
_LUNG_ROI_DIAMETER_MM = 30.0
_BACKGROUND_PLANE_OFFSETS_MM = (0.0, -10.0, 10.0, -20.0, 20.0)
_BACKGROUND_ROI_COUNT = 12
_FIT_MARGIN = 0.95


def nema_iq_phantom(shape, voxel_mm, seed=0, supersample=3) -> dict:
    """Render the NEMA-like image-quality phantom on a voxel grid.

    Parameters
    ----------
    shape : tuple of 3 int
        Image shape ``(z, y, x)``.
    voxel_mm : tuple of 3 float
        Voxel size ``(x, y, z)`` in mm.
    seed : int or None
        Seeds a random shift of the sub-voxel sample grid (one shift for all
        voxels); None samples the sub-voxel centres.
    supersample : int
        Samples per voxel along each axis for partial-volume fractions.

    Returns
    -------
    dict
        ``activity`` (float32 ``[z, y, x]``, background 1, spheres 4, lung 0),
        ``mu_map`` (float32, 1/mm), ``origin_mm`` (x, y, z of voxel [0, 0, 0]'s
        centre; the image is centred on the scanner centre), ``voxel_mm``,
        ``shape``, ``scale``, ``spheres`` (dicts with ``centre_mm``,
        ``diameter_mm``, ``contrast``), ``lung`` (``centre_mm``,
        ``diameter_mm``), ``background_mask`` (bool, voxels wholly in the warm
        background), ``background_roi_centres_mm`` ((x, y) of the background
        ROIs), ``background_roi_slices`` (slice indices for the background
        ROIs), ``sphere_slice`` and ``sphere_fractions`` (per sphere: the box of
        slices and its volume fractions; see :func:`sphere_masks`).
    """
    shape, voxel_mm, supersample = _check_grid(shape, voxel_mm, supersample)
    nz, ny, nx = shape
    origin_mm = tuple(-(n - 1) / 2.0 * v for n, v in zip((nx, ny, nz), voxel_mm))
    half_width_mm = min(nx * voxel_mm[0], ny * voxel_mm[1]) / 2.0
    scale = min(1.0, _FIT_MARGIN * half_width_mm / _BODY_MAX_RADIUS_MM)
    sphere_slice = nz // 2
    sphere_z_mm = origin_mm[2] + sphere_slice * voxel_mm[2]
    offsets = _subsample_offsets(supersample, seed)

    x_mm = _axis_mm(nx, origin_mm[0], voxel_mm[0])
    y_mm = _axis_mm(ny, origin_mm[1], voxel_mm[1])
    x_fine = (x_mm[:, None] + offsets[0] * voxel_mm[0]).ravel()
    y_fine = (y_mm[:, None] + offsets[1] * voxel_mm[1]).ravel()
    xx, yy = np.meshgrid(x_fine / scale, y_fine / scale)
    body_2d = _block_mean(_inside_body(xx, yy, 0.0), (ny, nx))
    lung_radius = _LUNG_DIAMETER_MM / 2.0
    lung_2d = _block_mean(xx ** 2 + yy ** 2 <= lung_radius ** 2, (ny, nx))

    z_mm = _axis_mm(nz, origin_mm[2], voxel_mm[2])
    half_length_mm = _BODY_LENGTH_MM * scale / 2.0
    low = np.maximum(z_mm - voxel_mm[2] / 2.0, sphere_z_mm - half_length_mm)
    high = np.minimum(z_mm + voxel_mm[2] / 2.0, sphere_z_mm + half_length_mm)
    axial = np.clip(high - low, 0.0, None) / voxel_mm[2]

    body = (axial[:, None, None] * body_2d[None]).astype(np.float32)
    lung = (axial[:, None, None] * lung_2d[None]).astype(np.float32)
    activity = body - lung
    mu_map = MU_WATER_PER_MM * body + (MU_LUNG_PER_MM - MU_WATER_PER_MM) * lung

    spheres, sphere_fractions = [], []
    in_any_sphere = np.zeros(shape, dtype=bool)
    for index, diameter in enumerate(NEMA_SPHERE_DIAMETERS_MM):
        angle = math.radians(60.0 * index)
        centre = (scale * _SPHERE_RING_RADIUS_MM * math.cos(angle),
                  scale * _SPHERE_RING_RADIUS_MM * math.sin(angle), sphere_z_mm)
        sphere = {"centre_mm": centre, "diameter_mm": scale * diameter,
                  "contrast": SPHERE_CONTRAST}
        box, fraction = _sphere_fraction(sphere, shape, origin_mm, voxel_mm, offsets)
        activity[box] += (SPHERE_CONTRAST - 1.0) * fraction
        in_any_sphere[box] |= fraction > 0
        spheres.append(sphere)
        sphere_fractions.append((box, fraction))

    background_mask = (body >= 1.0 - 1e-6) & (lung == 0) & ~in_any_sphere
    roi_centres = _background_roi_centres(spheres, scale)
    roi_slices = sorted({sphere_slice + round(offset * scale / voxel_mm[2])
                         for offset in _BACKGROUND_PLANE_OFFSETS_MM})
    roi_slices = [k for k in roi_slices if 0 <= k < nz and axial[k] >= 1.0 - 1e-6]
    return {
        "activity": activity,
        "mu_map": mu_map.astype(np.float32),
        "origin_mm": origin_mm,
        "voxel_mm": voxel_mm,
        "shape": shape,
        "scale": scale,
        "spheres": spheres,
        "lung": {"centre_mm": (0.0, 0.0, sphere_z_mm), "diameter_mm": scale * _LUNG_DIAMETER_MM},
        "background_mask": background_mask,
        "background_roi_centres_mm": roi_centres,
        "background_roi_slices": roi_slices,
        "sphere_slice": sphere_slice,
        "sphere_fractions": sphere_fractions,
    }


def sphere_masks(phantom: dict, min_fraction: float = 0.5) -> list[np.ndarray]:
    """Return one bool mask per sphere: voxels at least ``min_fraction`` inside it."""
    masks = []
    for box, fraction in phantom["sphere_fractions"]:
        mask = np.zeros(phantom["shape"], dtype=bool)
        mask[box] = fraction >= min_fraction
        masks.append(mask)
    return masks


def nema_analysis(image, phantom: dict) -> dict:
    """Contrast recovery and background variability, NEMA NU 2 style.

    Circular ROIs of each sphere's diameter: one on the sphere's central slice
    over the sphere, and the same size at every background ROI centre on every
    background slice (12 centres x up to 5 slices, at 0, +-10 and +-20 mm, scaled).
    An ROI holds the voxels whose centres fall inside the circle (at least the
    nearest voxel).

    Parameters
    ----------
    image : ndarray, shape (z, y, x)
        A reconstruction on the phantom's grid.
    phantom : dict
        As returned by :func:`nema_iq_phantom`.

    Returns
    -------
    dict
        Per sphere (lists in the phantom's sphere order): ``diameters_mm``,
        ``sphere_means``, ``background_means`` (C_B of that ROI size),
        ``contrast_recovery`` ((mean_sphere / C_B - 1) / (contrast - 1)) and
        ``background_variability`` (std / mean of the background ROI means);
        and ``background_mean`` (over all background ROIs) and
        ``lung_residual`` (lung ROI mean / C_B of the largest sphere size).
    """
    image = np.asarray(image)
    if image.shape != tuple(phantom["shape"]):
        raise InputError(f"image shape {image.shape} does not match the phantom grid "
                         f"{tuple(phantom['shape'])}")
    grid = (phantom["origin_mm"], phantom["voxel_mm"])
    slices = phantom["background_roi_slices"]
    centres = phantom["background_roi_centres_mm"]
    result = {key: [] for key in ("diameters_mm", "sphere_means", "background_means",
                                  "contrast_recovery", "background_variability")}
    all_background = []
    for sphere in phantom["spheres"]:
        diameter = sphere["diameter_mm"]
        x, y, z = sphere["centre_mm"]
        k = int(round((z - grid[0][2]) / grid[1][2]))
        sphere_mean = _roi_mean(image[k], (x, y), diameter, *grid)
        background = np.array([_roi_mean(image[s], c, diameter, *grid)
                               for s in slices for c in centres])
        background_mean = float(background.mean())
        spread = float(background.std(ddof=1)) if background.size > 1 else 0.0
        result["diameters_mm"].append(float(diameter))
        result["sphere_means"].append(sphere_mean)
        result["background_means"].append(background_mean)
        result["contrast_recovery"].append(
            (sphere_mean / background_mean - 1.0) / (sphere["contrast"] - 1.0))
        result["background_variability"].append(spread / background_mean)
        all_background.append(background)
    result["background_mean"] = float(np.concatenate(all_background).mean())
    lung_roi_mm = _LUNG_ROI_DIAMETER_MM * phantom["scale"]
    lung_xy = phantom["lung"]["centre_mm"][:2]
    lung_mean = float(np.mean([_roi_mean(image[s], lung_xy, lung_roi_mm, *grid) for s in slices]))
    result["lung_residual"] = lung_mean / result["background_means"][-1]
    return result


def _check_grid(shape, voxel_mm, supersample):
    try:
        shape = tuple(shape)
        voxel_mm = tuple(float(v) for v in voxel_mm)
    except (TypeError, ValueError):
        raise InputError(f"phantom grid: expected shape (z, y, x) and voxel_mm (x, y, z), "
                         f"got {shape!r} and {voxel_mm!r}") from None
    if len(shape) != 3 or not all(isinstance(n, numbers.Integral) and n >= 1 for n in shape):
        raise InputError(f"phantom shape {shape!r}: expected 3 positive integers (z, y, x)")
    if len(voxel_mm) != 3 or not all(math.isfinite(v) and v > 0 for v in voxel_mm):
        raise InputError(f"phantom voxel_mm {voxel_mm!r}: expected 3 positive sizes (x, y, z)")
    if not isinstance(supersample, numbers.Integral) or supersample < 1:
        raise InputError(f"phantom supersample {supersample!r}: expected an integer >= 1")
    return tuple(int(n) for n in shape), voxel_mm, int(supersample)


def _axis_mm(n, origin_mm, voxel_mm):
    return origin_mm + voxel_mm * np.arange(n)


def _subsample_offsets(supersample, seed):
    """Per-axis (x, y, z) sub-voxel sample offsets, in voxels, centred on 0."""
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    shifts = (np.zeros(3) if seed is None
              else np.random.default_rng(seed).uniform(-0.5, 0.5, 3) / supersample)
    return [offsets + shift for shift in shifts]


def _block_mean(samples, shape):
    """Average a fine grid of samples over each voxel's block of sub-samples."""
    blocks = samples.reshape(shape[0], -1, shape[1], samples.shape[1] // shape[1])
    return blocks.mean(axis=(1, 3))


def _inside_body(x, y, inset):
    """Points of the nominal body at least ``inset`` mm inside its outline."""
    q = y - _ARC_CENTRE_Y_MM
    arc_radius = max(_ARC_RADIUS_MM - inset, 0.0)
    corner_radius = max(_CORNER_RADIUS_MM - inset, 0.0)
    upper = (q >= 0) & (x ** 2 + q ** 2 <= arc_radius ** 2)
    outside_flat = np.maximum(np.abs(x) - _FLAT_HALF_WIDTH_MM, 0.0)
    lower = (q < 0) & (outside_flat ** 2 + q ** 2 <= corner_radius ** 2)
    return upper | lower


def _sphere_fraction(sphere, shape, origin_mm, voxel_mm, offsets):
    """Volume fractions of a sphere over the voxel box that bounds it."""
    radius = sphere["diameter_mm"] / 2.0
    box, fine = [], []
    # image axes are (z, y, x); centre, origin and voxel are (x, y, z)
    for axis, n in zip((2, 1, 0), shape):
        centre, first, step = sphere["centre_mm"][axis], origin_mm[axis], voxel_mm[axis]
        start = max(0, math.floor((centre - radius - first) / step))
        stop = min(n, math.ceil((centre + radius - first) / step) + 1)
        box.append(slice(start, stop))
        coords = first + step * np.arange(start, stop)
        fine.append(((coords[:, None] + offsets[axis] * step) - centre).ravel())
    dz, dy, dx = np.ix_(*fine)
    inside = dz ** 2 + dy ** 2 + dx ** 2 <= radius ** 2
    k = len(offsets[0])
    counts = [s.stop - s.start for s in box]
    fraction = inside.reshape(counts[0], k, counts[1], k, counts[2], k).mean(axis=(1, 3, 5))
    return tuple(box), fraction.astype(np.float32)


def _background_roi_centres(spheres, scale):
    """Up to 12 ROI centres (x, y) in the background, spread around the body.

    On rays from the axis every 7.5 degrees, the middle of the outermost run of
    points where a circle of the largest sphere's size keeps 10 mm from the body
    outline and 5 mm from the spheres and the lung insert (nominal mm); then 12
    of those rays, evenly spaced.
    """
    roi_radius = NEMA_SPHERE_DIAMETERS_MM[-1] / 2.0
    radii = np.arange(0.0, _BODY_MAX_RADIUS_MM, 0.5)
    candidates = []
    for angle in np.radians(np.arange(0.0, 360.0, 7.5)):
        x, y = radii * math.cos(angle), radii * math.sin(angle)
        valid = _inside_body(x, y, roi_radius + 10.0)
        valid &= np.hypot(x, y) >= _LUNG_DIAMETER_MM / 2.0 + roi_radius + 5.0
        for sphere in spheres:
            cx, cy = (c / scale for c in sphere["centre_mm"][:2])
            clearance = sphere["diameter_mm"] / scale / 2.0 + roi_radius + 5.0
            valid &= np.hypot(x - cx, y - cy) >= clearance
        if not valid.any():
            continue
        last = np.flatnonzero(valid)[-1]
        first = last
        while first > 0 and valid[first - 1]:
            first -= 1
        middle = (first + last) // 2
        candidates.append((scale * x[middle], scale * y[middle]))
    if len(candidates) > _BACKGROUND_ROI_COUNT:
        keep = np.linspace(0, len(candidates), _BACKGROUND_ROI_COUNT, endpoint=False)
        candidates = [candidates[int(i)] for i in keep]
    return [(float(x), float(y)) for x, y in candidates]


def _roi_mean(slice_2d, centre_xy, diameter_mm, origin_mm, voxel_mm):
    """Mean of a 2-D slice over the voxels whose centres fall in a circle."""
    ny, nx = slice_2d.shape
    radius = diameter_mm / 2.0
    columns = (centre_xy[0] - origin_mm[0]) / voxel_mm[0]
    rows = (centre_xy[1] - origin_mm[1]) / voxel_mm[1]
    x0 = max(0, math.floor(columns - radius / voxel_mm[0]))
    x1 = min(nx, math.ceil(columns + radius / voxel_mm[0]) + 1)
    y0 = max(0, math.floor(rows - radius / voxel_mm[1]))
    y1 = min(ny, math.ceil(rows + radius / voxel_mm[1]) + 1)
    dx = (np.arange(x0, x1) - columns) * voxel_mm[0]
    dy = (np.arange(y0, y1) - rows) * voxel_mm[1]
    inside = dy[:, None] ** 2 + dx[None, :] ** 2 <= radius ** 2
    window = slice_2d[y0:y1, x0:x1]
    if not inside.any():
        row = min(max(int(round(rows)), 0), ny - 1)
        column = min(max(int(round(columns)), 0), nx - 1)
        return float(slice_2d[row, column])
    return float(window[inside].mean(dtype=np.float64))


def dynamic_phantom(phantom: dict, frames: int) -> tuple[np.ndarray, dict]:
    """Frames of the NEMA-like phantom with a time-activity curve per region.

    The spheres take up tracer, ``4 (1 - exp(-t / 2))``, the warm background washes out,
    ``0.5 + 1.5 exp(-t / 4)``, the lung stays cold (t = frame index): two kinetic
    components. Returns ``(activity [t, z, y, x] float32, {"spheres": curve,
    "background": curve})``.
    """
    time = np.arange(frames, dtype=np.float64)
    curves = {"spheres": 4.0 * (1.0 - np.exp(-(time + 0.5) / 2.0)),
              "background": 0.5 + 1.5 * np.exp(-time / 4.0)}
    activity = np.asarray(phantom["activity"], np.float64)
    spheres = np.clip(activity - 1.0, 0.0, None) / 3.0  # sphere fraction (contrast 4 on 1)
    background = np.where(activity > 0, np.minimum(activity, 1.0), 0.0) * (1.0 - spheres)
    frames_out = (spheres[None] * curves["spheres"][:, None, None, None]
                  + background[None] * curves["background"][:, None, None, None])
    return frames_out.astype(np.float32), curves
