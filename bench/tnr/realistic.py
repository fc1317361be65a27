"""Realistic serial-section stacks from real anatomy, with ground truth and peer baselines.

The anatomy is nilearn's MNI152 template (1 mm T1 with its grey- and white-matter
probability maps), shipped inside the nilearn package and loaded offline. A run of
consecutive 1 mm slices along one volume axis becomes a stack of H&E-like RGB sections:

- every slice is upsampled to ``size`` x ``size`` pixels (the brain centred with a margin,
  the same pixel size in millimetres for every section);
- hematoxylin and eosin densities follow the anatomy (grey matter: more hematoxylin; white
  matter and T1 intensity: more eosin) and a fine texture that is correlated in 3-D, sampled
  at the true 3-D position, so consecutive sections stay similar without being equal;
  cerebrospinal fluid (ventricles, sulci) is empty glass;
- colour by Beer-Lambert, ``RGB = 255 exp(-(h H + e E))``, with stain vectors that differ
  from the Ruifrok-Johnston vectors used by colour deconvolution in medhpc, plus a little
  per-section staining strength, colour balance and noise, on white glass;
- each section is seen through its own distortion ``M_i`` (observed pixel -> true pixel):
  rotation, shift, cutting compression along a random direction, a smooth random warp
  (cubic B-spline on a coarse grid), optionally a tear (a thin blank crack with the two
  sides pulled apart), a missing piece of tissue, another stain and a mirror image.

The ground truth is the one of ``medhpc.phantoms.tnr``: held-out tissue points per section
in the true frame (``heldout_true``) and where they appear in the observed section
(``heldout_observed``, ``M_i`` inverted by fixed-point iteration), so
``medhpc.phantoms.tnr.heldout_error`` scores a ``tnr-register --fields`` displacement.

Peer baselines on the same PNG sections (each returns a ``--fields``-style displacement):
pystackreg rigid body to the previous section, OpenCV ECC (Euclidean, 3-level pyramid)
to the previous section chained, and no registration.

Usage::

    python bench/tnr/realistic.py --out DIR [--sections 36 --size 1024 --seed 0 --axis 2]
    python bench/tnr/realistic.py --out DIR --peers --downsample 4 [--check-truth]
        [--montage montage.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _unit_rows(vectors) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


#: Optical density per RGB channel of hematoxylin and eosin used to colour the sections
#: (deliberately not the Ruifrok-Johnston vectors that colour deconvolution assumes).
DEFAULT_STAINS = _unit_rows([[0.55, 0.75, 0.36], [0.10, 0.95, 0.30]])
#: Restained (IHC-like) sections: a hematoxylin counterstain and a DAB-like brown.
RESTAIN_STAINS = _unit_rows([[0.62, 0.66, 0.42], [0.27, 0.57, 0.78]])
RESTAIN_GAMMA = 0.7
#: Ruifrok & Johnston (2001) H, E, DAB vectors: what a peer's colour deconvolution assumes.
RUIFROK_HED = _unit_rows([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])

#: Warp and tear sizes are given in pixels of a section this wide and scale with ``size``.
REFERENCE_SIZE = 1024
#: Fraction of the section width left free on each side of the whole brain's bounding box.
MARGIN_FRACTION = 0.12
#: Tissue where the grey- plus white-matter probability is above this (CSF is glass).
TISSUE_LEVEL = 0.35
WARP_CONTROL_POINTS = 7


# ----------------------------------------------------------------------------- anatomy

def load_anatomy(axis: int = 2) -> dict:
    """The 1 mm MNI152 T1, GM and WM volumes, resliced so that axis 0 is the cut direction.

    Parameters
    ----------
    axis : int
        The volume axis (0: x, sagittal; 1: y, coronal; 2: z, axial) along which the
        sections are cut.

    Returns
    -------
    dict
        ``t1``, ``gm``, ``wm``: float32 ``(slice, row, column)`` volumes in [0, 1], rows
        flipped so that anterior (axial) or superior (coronal, sagittal) is at the top.
    """
    import warnings

    from nilearn import datasets

    if axis not in (0, 1, 2):
        raise ValueError(f"axis {axis}: expected 0, 1 or 2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = {"t1": datasets.load_mni152_template(resolution=1),
                  "gm": datasets.load_mni152_gm_template(resolution=1),
                  "wm": datasets.load_mni152_wm_template(resolution=1)}
    volumes = {}
    for name, image in images.items():
        data = np.asarray(image.get_fdata(dtype=np.float32))
        data = np.moveaxis(data, axis, 0)          # (slice, a, b), a < b in volume order
        data = np.swapaxes(data, 1, 2)[:, ::-1, :]  # rows: the later axis, flipped
        volumes[name] = np.ascontiguousarray(data)
    return volumes


def _keys_cubic_matrix(coordinates: np.ndarray, length: int) -> np.ndarray:
    """Dense (len(coordinates), length) Keys cubic (a = -0.5) interpolation weights.

    Indices beyond the grid are clamped to its edge.
    """
    base = np.floor(coordinates).astype(np.int64)
    t = coordinates - base
    weights = np.stack([((-0.5 * t + 1.0) * t - 0.5) * t,
                        (1.5 * t - 2.5) * t * t + 1.0,
                        ((-1.5 * t + 2.0) * t + 0.5) * t,
                        (0.5 * t - 0.5) * t * t], axis=1)
    matrix = np.zeros((len(coordinates), length), np.float64)
    rows = np.arange(len(coordinates))
    for k in range(4):
        np.add.at(matrix, (rows, np.clip(base + k - 1, 0, length - 1)), weights[:, k])
    return matrix


def _linear_matrix(coordinates: np.ndarray, length: int) -> np.ndarray:
    """Dense (len(coordinates), length) linear interpolation weights, clamped at the edges."""
    base = np.floor(coordinates).astype(np.int64)
    t = coordinates - base
    matrix = np.zeros((len(coordinates), length), np.float64)
    rows = np.arange(len(coordinates))
    np.add.at(matrix, (rows, np.clip(base, 0, length - 1)), 1.0 - t)
    np.add.at(matrix, (rows, np.clip(base + 1, 0, length - 1)), t)
    return matrix


def _upsample(plane: np.ndarray, row_matrix: np.ndarray, column_matrix: np.ndarray):
    """Separable resampling ``R @ plane @ C.T`` in float32."""
    return (row_matrix.astype(np.float32, copy=False) @ plane.astype(np.float32, copy=False)
            @ column_matrix.T.astype(np.float32, copy=False))


def _cubic_bspline_matrix(grid_coordinates: np.ndarray, count: int) -> np.ndarray:
    """Cubic B-spline weights (N, count) of control points 0..count-1 at grid coordinates."""
    distance = np.abs(grid_coordinates[:, None] - np.arange(count)[None, :])
    weights = np.where(distance < 1.0, 2.0 / 3.0 - distance ** 2 + 0.5 * distance ** 3,
                       np.where(distance < 2.0, (2.0 - np.minimum(distance, 2.0)) ** 3 / 6.0,
                                0.0))
    return weights


# --------------------------------------------------------------------------- distortion

@dataclass
class Tear:
    """A crack along a wobbly line (observed frame); the sides are pulled apart by ``half_gap``.

    An observed point at signed distance ``d`` from the crack line came from ``d - sign(d)
    g exp(-(|d| - g) / reach)`` (``g`` the local half gap): the gap ``|d| < g`` is glass and
    the pull fades with distance from the crack.
    """

    origin: tuple
    angle: float           # direction of the crack line, radians
    half_gap: float        # px, largest half width of the crack
    reach: float           # px, decay length of the pull
    wobble: float          # px, amplitude of the crack line's meander
    wavelength: float      # px
    phase: float
    taper_phase: float

    def frame(self, points):
        """(along, across) coordinates of points relative to the crack line."""
        direction = np.array([np.sin(self.angle), np.cos(self.angle)])   # (y, x)
        normal = np.array([np.cos(self.angle), -np.sin(self.angle)])
        relative = points - np.asarray(self.origin)
        along = relative @ direction
        across = relative @ normal - self.wobble * np.sin(2 * np.pi * along / self.wavelength
                                                           + self.phase)
        return along, across, normal

    def gap(self, along):
        """Local half gap (px) along the crack."""
        return self.half_gap * (0.55 + 0.45 * np.sin(2 * np.pi * along / (4 * self.wavelength)
                                                     + self.taper_phase))

    def to_untorn(self, points):
        """Observed -> untorn positions and the mask of observed points inside the gap."""
        along, across, normal = self.frame(points)
        gap = self.gap(along)
        inside = np.abs(across) < gap
        pull = np.sign(across) * gap * np.exp(-np.maximum(np.abs(across) - gap, 0.0) / self.reach)
        return points - pull[:, None] * normal, inside

    def to_torn(self, points, iterations: int = 30):
        """Untorn -> observed positions (Newton on the distance to the crack)."""
        along, across, normal = self.frame(points)
        gap = self.gap(along)
        target = np.abs(across)
        distance = target + gap
        for _ in range(iterations):
            decay = np.exp(-(distance - gap) / self.reach)
            residual = distance - gap * decay - target
            distance = np.maximum(distance - residual / (1.0 + gap / self.reach * decay), gap)
        return points + ((np.sign(across) * distance - across))[:, None] * normal


@dataclass
class MissingPiece:
    """A blob of the observed section where the tissue is missing (glass)."""

    centre: tuple
    radius: float
    harmonics: tuple      # (amplitude, frequency, phase) triples of the outline

    def inside(self, points, margin: float = 0.0):
        relative = points - np.asarray(self.centre)
        angle = np.arctan2(relative[:, 0], relative[:, 1])
        outline = np.ones_like(angle)
        for amplitude, frequency, phase in self.harmonics:
            outline += amplitude * np.sin(frequency * angle + phase)
        return np.hypot(relative[:, 0], relative[:, 1]) < self.radius * outline + margin


@dataclass
class SectionDistortion:
    """The observed-pixel -> true-pixel map ``M_i`` of one section.

    ``M_i(p) = G(T(F(p)))``: ``F`` the mirror (flipped sections), ``T`` the tear (torn
    sections) and ``G(p) = c + R S (p - c) + shift + w(p)`` with ``R`` the rotation, ``S``
    the stretch undoing the cutting compression, ``c`` the image centre and ``w`` a cubic
    B-spline warp. Points are ``(y, x)`` pixels, arrays of shape ``(N, 2)``.
    """

    size: int
    angle_deg: float
    shift: tuple
    compression: float
    compression_angle_deg: float
    warp_amplitude: float
    warp_coefficients: np.ndarray = field(repr=False)     # (2, G, G)
    flipped: bool = False
    tear: Tear | None = None
    missing: MissingPiece | None = None

    @property
    def centre(self) -> float:
        return (self.size - 1) / 2.0

    def linear(self) -> np.ndarray:
        """The 2 x 2 linear part ``R S`` on (y, x)."""
        angle = np.deg2rad(self.angle_deg)
        rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        direction = np.deg2rad(self.compression_angle_deg)
        unit = np.array([np.sin(direction), np.cos(direction)])
        stretch = np.eye(2) + (1.0 / (1.0 - self.compression) - 1.0) * np.outer(unit, unit)
        return rotation @ stretch

    def warp(self, points) -> np.ndarray:
        """The smooth displacement ``w`` (px) at points (N, 2).

        ``w`` is a cubic B-spline whose ``G x G`` control points are spaced
        ``size / (G - 3)`` px apart, the first one ``size / (G - 3)`` px before pixel 0
        (scipy's order-3 spline evaluation on the coefficients, without prefiltering).
        """
        count = self.warp_coefficients.shape[1]
        grid = np.asarray(points, dtype=np.float64).T / (self.size / (count - 3)) + 1.0
        return np.stack([ndimage.map_coordinates(self.warp_coefficients[c], grid, order=3,
                                                 prefilter=False, mode="nearest")
                         for c in range(2)], axis=1)

    def _affine(self, points):
        (a, b), (c, d) = self.linear()
        y, x = points[:, 0] - self.centre, points[:, 1] - self.centre
        return np.stack([a * y + b * x + (self.centre + self.shift[0]),
                         c * y + d * x + (self.centre + self.shift[1])], axis=1)

    def _global(self, points):
        return self._affine(points) + self.warp(points)

    def true_grid(self):
        """``M_i`` at every observed pixel (size, size, 2), and the mask of the tear's gap.

        Without a tear the warp is evaluated separably (the B-spline's row and column
        weights), which is the same function as :meth:`warp` and much faster.
        """
        size = self.size
        yy, xx = np.mgrid[0:size, 0:size]
        points = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)
        if self.tear is not None:
            true_points, in_gap = self.to_true(points)
            return true_points.reshape(size, size, 2), in_gap.reshape(size, size)
        if self.flipped:
            points = self._mirror(points)
        count = self.warp_coefficients.shape[1]
        weights = _cubic_bspline_matrix(np.arange(size) / (size / (count - 3)) + 1.0, count)
        warp = np.stack([weights @ self.warp_coefficients[c] @ weights.T for c in range(2)],
                        axis=-1)
        if self.flipped:
            warp = warp[:, ::-1]
        out = self._affine(points).reshape(size, size, 2) + warp
        return out, np.zeros((size, size), bool)

    def _mirror(self, points):
        return np.stack([points[:, 0], self.size - 1.0 - points[:, 1]], axis=1)

    def to_true(self, points):
        """True positions of observed points, and the mask of points in a tear's gap."""
        points = np.asarray(points, dtype=np.float64)
        if self.flipped:
            points = self._mirror(points)
        in_gap = np.zeros(len(points), bool)
        if self.tear is not None:
            points, in_gap = self.tear.to_untorn(points)
        return self._global(points), in_gap

    def to_observed(self, true_points, iterations: int = 100, tolerance: float = 1e-4):
        """Observed positions of true points: ``M_i`` inverted by fixed-point iteration.

        The global part is inverted by ``p <- p + (R S)^-1 (q - G(p))`` (convergent because
        the warp's gradient is small), the tear by Newton steps on the distance to the
        crack, the mirror exactly.

        Returns
        -------
        points : (N, 2)
        converged : (N,) bool
            ``|M_i(p) - q| < tolerance`` px (and ``p`` not inside a gap).
        """
        true_points = np.asarray(true_points, dtype=np.float64)
        inverse = np.linalg.inv(self.linear())
        estimate = self.centre + (true_points - self.centre - np.asarray(self.shift)) @ inverse.T
        for _ in range(iterations):
            residual = true_points - self._global(estimate)
            estimate = estimate + residual @ inverse.T
            if np.abs(residual).max(initial=0.0) < tolerance * 1e-3:
                break
        if self.tear is not None:
            estimate = self.tear.to_torn(estimate)
        if self.flipped:
            estimate = self._mirror(estimate)
        check, in_gap = self.to_true(estimate)
        converged = (np.hypot(*(check - true_points).T) < tolerance) & ~in_gap
        return estimate, converged

    def blank(self, points, margin: float = 0.0) -> np.ndarray:
        """Observed points in the tear's gap or the missing piece (widened by ``margin``)."""
        points = np.asarray(points, dtype=np.float64)
        out = np.zeros(len(points), bool)
        if self.tear is not None:
            along, across, _ = self.tear.frame(points)
            out |= np.abs(across) < self.tear.gap(along) + margin
        if self.missing is not None:
            out |= self.missing.inside(points, margin)
        return out

    def summary(self) -> dict:
        """JSON-ready parameters (the warp as its amplitude)."""
        out = {"angle_deg": self.angle_deg, "shift_yx_px": list(self.shift),
               "compression": self.compression,
               "compression_angle_deg": self.compression_angle_deg,
               "warp_amplitude_px": self.warp_amplitude, "flipped": self.flipped}
        if self.tear is not None:
            out["tear"] = {k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in asdict(self.tear).items()}
        if self.missing is not None:
            out["missing"] = {"centre": list(self.missing.centre), "radius": self.missing.radius}
        return out


def _random_warp(rng, size: int, amplitude: float) -> np.ndarray:
    """B-spline coefficients (2, G, G) of a zero-mean warp whose largest magnitude is amplitude."""
    count = WARP_CONTROL_POINTS
    coefficients = rng.standard_normal((2, count, count))
    coefficients -= coefficients.mean(axis=(1, 2), keepdims=True)
    probe = SectionDistortion(size, 0.0, (0.0, 0.0), 0.0, 0.0, 0.0, coefficients)
    grid = np.stack(np.meshgrid(np.linspace(0, size - 1, 33), np.linspace(0, size - 1, 33),
                                indexing="ij"), axis=-1).reshape(-1, 2)
    mean = probe.warp(grid).mean(axis=0)
    coefficients -= mean[:, None, None]   # B-splines sum to one: this removes the mean shift
    largest = np.hypot(*probe.warp(grid).T).max()
    return coefficients * (amplitude / max(largest, 1e-12))


def _random_tear(rng, size: int, tissue_centre, tissue_radius: float, scale: float) -> Tear:
    offset = rng.uniform(-0.4, 0.4, 2) * tissue_radius
    return Tear(origin=tuple(float(v) for v in np.asarray(tissue_centre) + offset),
                angle=float(rng.uniform(0, np.pi)),
                half_gap=float(rng.uniform(2.5, 5.0) * scale),
                reach=float(rng.uniform(0.06, 0.12) * size),
                wobble=float(rng.uniform(0.004, 0.012) * size),
                wavelength=float(rng.uniform(0.15, 0.3) * size),
                phase=float(rng.uniform(0, 2 * np.pi)),
                taper_phase=float(rng.uniform(0, 2 * np.pi)))


def _random_missing_piece(rng, tissue: np.ndarray) -> MissingPiece:
    """A blob at the edge of the observed tissue (a piece that fell off)."""
    points = np.argwhere(tissue)
    centre = points.mean(axis=0)
    radius = np.sqrt(len(points) / np.pi)
    direction = rng.uniform(0, 2 * np.pi)
    unit = np.array([np.sin(direction), np.cos(direction)])
    # walk out to the tissue edge along the direction
    steps = np.arange(0, 2.0 * radius, 1.0)
    path = np.round(centre + steps[:, None] * unit).astype(int)
    inside_image = np.all((path >= 0) & (path < tissue.shape[0]), axis=1)
    path = path[inside_image]
    edge = path[np.nonzero(tissue[path[:, 0], path[:, 1]])[0].max()] if len(path) else centre
    blob_radius = rng.uniform(0.3, 0.45) * radius
    blob_centre = np.asarray(edge, dtype=np.float64) - 0.35 * blob_radius * unit
    harmonics = tuple((float(rng.uniform(0.05, 0.15)), float(f), float(rng.uniform(0, 2 * np.pi)))
                      for f in (2, 3, 5))
    return MissingPiece(tuple(float(v) for v in blob_centre), float(blob_radius), harmonics)


# ------------------------------------------------------------------------------- stack

def _choose_start(tissue_area: np.ndarray, sections: int, rng, start) -> int:
    count = len(tissue_area)
    if start is not None:
        if not 0 <= start <= count - sections:
            raise ValueError(f"start {start}: expected 0..{count - sections} for {sections} "
                             f"sections of a {count}-slice volume")
        return int(start)
    if sections > count:
        raise ValueError(f"sections {sections}: the volume has only {count} slices")
    runs = np.lib.stride_tricks.sliding_window_view(tissue_area, sections).min(axis=1)
    for fraction in (0.5, 0.3, 0.1, 1e-9):
        valid = np.nonzero(runs >= fraction * tissue_area.max())[0]
        if len(valid):
            return int(rng.choice(valid))
    raise ValueError(f"sections {sections}: no run of that many slices lies inside the brain")


def _choose_damage(rng, sections: int, counts: dict) -> dict:
    """Distinct interior sections for tears, missing pieces, restaining and mirroring."""
    interior = list(range(1, sections - 1)) if sections > 2 else list(range(sections))
    wanted = sum(counts.values())
    if wanted > len(interior):
        raise ValueError(f"{wanted} damaged/restained/flipped sections: only {len(interior)} "
                         "interior sections")
    chosen = [int(i) for i in rng.permutation(interior)[:wanted]]
    out, position = {}, 0
    for name, count in counts.items():
        out[name] = sorted(chosen[position:position + count])
        position += count
    return out


def _texture(rng, planes: int, cells: int):
    """Fine and medium 3-D-correlated textures (planes, cells, cells), about unit spread."""
    noise = rng.standard_normal((planes, cells, cells), dtype=np.float32)
    fine = ndimage.gaussian_filter(noise, (0.9, 1.0, 1.0), mode="reflect")
    fine /= fine.std()
    medium = ndimage.gaussian_filter(noise, (1.3, 4.0, 4.0), mode="reflect")
    medium /= medium.std()
    return fine, medium


def _densities(t1, gm, wm, fine, medium):
    """Hematoxylin and eosin densities and the tissue weight from the (upsampled) anatomy."""
    tissue = np.clip((gm + wm - TISSUE_LEVEL) / 0.12, 0.0, 1.0)
    gm = np.clip(gm, 0.0, 1.0)
    wm = np.clip(wm, 0.0, 1.0)
    nuclei = 1.0 / (1.0 + np.exp(-2.0 * (fine - 0.8)))          # sparse dark speckles
    hematoxylin = (0.18 + 0.55 * gm + 0.08 * wm) * (0.75 + 0.2 * medium + 0.9 * nuclei * (0.4 + gm))
    eosin = (0.22 + 0.45 * wm + 0.15 * gm + 0.2 * np.clip(t1, 0, 1)) * (0.9 + 0.15 * medium)
    hematoxylin = np.maximum(hematoxylin, 0.0) * tissue
    eosin = np.maximum(eosin, 0.0) * tissue
    return hematoxylin.astype(np.float32), eosin.astype(np.float32), tissue.astype(np.float32)


def _colour(hematoxylin, eosin, stains, gamma, rng, noise_level=2.0 / 255.0) -> np.ndarray:
    """Beer-Lambert RGB on white glass, with per-section colour balance and noise."""
    channel_gain = 1.0 + rng.normal(0.0, 0.01, 3)
    glass = np.array([0.015, 0.012, 0.02]) * rng.uniform(0.7, 1.3)
    density = (hematoxylin[..., None] * stains[0].astype(np.float32)
               + eosin[..., None] * stains[1].astype(np.float32)
               + glass.astype(np.float32))
    intensity = np.exp(-density * np.float32(gamma)) * channel_gain.astype(np.float32)
    intensity += rng.standard_normal(intensity.shape, dtype=np.float32) * np.float32(noise_level)
    return np.clip(np.rint(255.0 * intensity), 0, 255).astype(np.uint8)


def make_stack(sections: int = 36, size: int = 1024, seed: int = 0, axis: int = 2,
               start: int | None = None, rotation_deg: float = 8.0, shift_frac: float = 0.05,
               compression=(0.0, 0.04), warp_px=(6.0, 12.0), tears: int = 3, missing: int = 2,
               restained: int = 1, flipped: int = 0, heldout: int = 106, stain=None) -> dict:
    """Render a realistic serial-section stack of the MNI152 brain and its ground truth.

    Parameters
    ----------
    sections : int
        Consecutive 1 mm slices (one section each).
    size : int
        Section width and height in pixels.
    seed : int
        Seeds everything random (the run's offset, distortions, damage, texture, noise).
    axis : int
        Volume axis along which the brain is cut (0 sagittal, 1 coronal, 2 axial).
    start : int, optional
        First slice of the run; by default drawn among runs whose every slice holds at least
        half of the largest slice's tissue.
    rotation_deg : float
        Largest rotation of a section (uniform in +/-).
    shift_frac : float
        Largest shift per axis, as a fraction of ``size``.
    compression : (float, float)
        Range of the cutting compression (fraction), along a random direction.
    warp_px : (float, float)
        Range of the smooth warp's largest displacement, in pixels of a 1024-pixel section
        (scaled by ``size / 1024``; the tears' gaps scale the same way).
    tears, missing, restained, flipped : int
        How many (distinct, interior) sections get a tear, lose a piece of tissue, are
        coloured with other stains and a gamma, or are mirrored.
    heldout : int
        Held-out points per section.
    stain : array-like (2, 3), optional
        Optical density per RGB channel of hematoxylin and eosin; default
        :data:`DEFAULT_STAINS` (rows are normalised).

    Returns
    -------
    dict
        ``sections`` (z, size, size, 3) uint8; ``heldout_true`` and ``heldout_observed``
        (z, heldout, 2) float32 (y, x) pixels; ``distortions`` (one
        :class:`SectionDistortion` per section); ``torn``, ``missing``, ``damaged`` (torn or
        missing), ``restained``, ``flipped`` (sorted section lists); ``settings`` (JSON-ready,
        with the slice run, pixel size and per-section parameters); ``seconds`` (wall) and
        ``cpu_seconds`` of the generation.
    """
    began, began_cpu = time.perf_counter(), time.process_time()
    stains = DEFAULT_STAINS if stain is None else _unit_rows(stain)
    if sections < 1 or size < 32:
        raise ValueError("expected at least 1 section of at least 32 pixels")
    rng = np.random.default_rng(seed)
    anatomy = load_anatomy(axis)
    soft_tissue = anatomy["gm"] + anatomy["wm"]
    tissue_voxels = soft_tissue > TISSUE_LEVEL
    first = _choose_start(tissue_voxels.sum(axis=(1, 2)), sections, rng, start)
    # one pixel size for the whole brain: the union of all slices' tissue, centred
    rows = np.nonzero(tissue_voxels.any(axis=(0, 2)))[0]
    columns = np.nonzero(tissue_voxels.any(axis=(0, 1)))[0]
    extent_mm = max(rows[-1] - rows[0], columns[-1] - columns[0]) + 1.0
    px_per_mm = size * (1.0 - 2 * MARGIN_FRACTION) / extent_mm
    centre_px = (size - 1) / 2.0
    pixel = np.arange(size, dtype=np.float64)
    row_coordinates = (rows[0] + rows[-1]) / 2.0 + (pixel - centre_px) / px_per_mm
    column_coordinates = (columns[0] + columns[-1]) / 2.0 + (pixel - centre_px) / px_per_mm
    row_cubic = _keys_cubic_matrix(row_coordinates, soft_tissue.shape[1]).astype(np.float32)
    column_cubic = _keys_cubic_matrix(column_coordinates,
                                      soft_tissue.shape[2]).astype(np.float32)
    # 3-D texture on a grid of `pitch` true pixels, one plane per section (+ padding)
    pitch = max(1, int(round(size / 512)))
    cells = size // pitch + 2
    padding = 3
    fine_volume, medium_volume = _texture(rng, sections + 2 * padding, cells)
    texture_coordinates = pixel / pitch
    texture_matrix = _linear_matrix(texture_coordinates, cells).astype(np.float32)

    damage = _choose_damage(rng, sections, {"torn": tears, "missing": missing,
                                            "restained": restained, "flipped": flipped})
    scale = size / REFERENCE_SIZE
    yy, xx = np.mgrid[0:size, 0:size]
    observed_grid = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)
    out_sections = np.empty((sections, size, size, 3), np.uint8)
    heldout_true = np.empty((sections, heldout, 2), np.float32)
    heldout_observed = np.empty((sections, heldout, 2), np.float32)
    distortions, summaries = [], []
    margin_px = max(3.0, size / 64.0)
    for i in range(sections):
        k = first + i
        planes = {name: _upsample(anatomy[name][k], row_cubic, column_cubic)
                  for name in ("t1", "gm", "wm")}
        fine = _upsample(fine_volume[i + padding], texture_matrix, texture_matrix)
        medium = _upsample(medium_volume[i + padding], texture_matrix, texture_matrix)
        hematoxylin_true, eosin_true, tissue_true = _densities(
            planes["t1"], planes["gm"], planes["wm"], fine, medium)
        solid = tissue_true > 0.999
        tissue_points = np.argwhere(solid)
        tissue_centre = tissue_points.mean(axis=0) if len(tissue_points) else (centre_px,) * 2
        tissue_radius = np.sqrt(max(len(tissue_points), 1) / np.pi)

        distortion = SectionDistortion(
            size=size,
            angle_deg=float(rng.uniform(-rotation_deg, rotation_deg)),
            shift=tuple(float(v) for v in rng.uniform(-shift_frac, shift_frac, 2) * size),
            compression=float(rng.uniform(*compression)),
            compression_angle_deg=float(rng.uniform(0, 180)),
            warp_amplitude=float(rng.uniform(*warp_px) * scale),
            warp_coefficients=np.zeros((2, WARP_CONTROL_POINTS, WARP_CONTROL_POINTS)),
            flipped=i in damage["flipped"])
        distortion.warp_coefficients = _random_warp(rng, size, distortion.warp_amplitude)
        if i in damage["torn"]:
            # the tear lies in the observed frame: place it through the observed tissue
            observed_centre, _ = distortion.to_observed(np.asarray(tissue_centre)[None, :])
            distortion.tear = _random_tear(rng, size, observed_centre[0], tissue_radius, scale)
        true_positions, blank = distortion.true_grid()
        coordinates = [true_positions[..., 0], true_positions[..., 1]]
        hematoxylin = ndimage.map_coordinates(hematoxylin_true, coordinates, order=1,
                                              mode="constant", cval=0.0)
        eosin = ndimage.map_coordinates(eosin_true, coordinates, order=1, mode="constant",
                                        cval=0.0)
        if i in damage["missing"]:
            distortion.missing = _random_missing_piece(rng, (hematoxylin > 0.05) & ~blank)
            blank |= distortion.missing.inside(observed_grid).reshape(size, size)
        hematoxylin[blank] = 0.0
        eosin[blank] = 0.0
        strength_h, strength_e = 1.0 + rng.normal(0.0, 0.07, 2)
        if i in damage["restained"]:
            out_sections[i] = _colour(0.6 * strength_h * hematoxylin, 1.1 * strength_e * eosin,
                                      RESTAIN_STAINS, RESTAIN_GAMMA, rng)
        else:
            out_sections[i] = _colour(strength_h * hematoxylin, strength_e * eosin, stains, 1.0,
                                      rng)

        # held-out points: solid tissue away from its edges, the tear and the missing piece
        inner = ndimage.uniform_filter(solid.astype(np.float32), 2 * int(margin_px) + 1) > 0.999
        candidates = np.argwhere(inner)
        if len(candidates) < heldout:
            raise RuntimeError(f"section {i}: only {len(candidates)} inner tissue pixels")
        picked = candidates[rng.choice(len(candidates), min(len(candidates), 8 * heldout),
                                       replace=False)]
        true_points = picked + rng.uniform(-0.5, 0.5, picked.shape)
        observed_points, converged = distortion.to_observed(true_points)
        usable = (converged & np.all((observed_points >= margin_px)
                                     & (observed_points <= size - 1 - margin_px), axis=1)
                  & ~distortion.blank(observed_points, margin=margin_px))
        keep = np.nonzero(usable)[0][:heldout]
        if len(keep) < heldout:
            raise RuntimeError(f"section {i}: only {len(keep)} usable held-out points")
        heldout_true[i] = true_points[keep]
        heldout_observed[i] = observed_points[keep]
        distortions.append(distortion)
        summaries.append(distortion.summary())

    damaged = sorted(set(damage["torn"]) | set(damage["missing"]))
    settings = {"sections": sections, "size": size, "seed": seed, "axis": axis,
                "start": first, "slices": [first, first + sections],
                "rotation_deg": rotation_deg, "shift_frac": shift_frac,
                "compression": list(compression), "warp_px": list(warp_px),
                "warp_px_reference_size": REFERENCE_SIZE, "tears": tears, "missing": missing,
                "restained": restained, "flipped": flipped, "heldout": heldout,
                "stain": stains.tolist(), "restain_stain": RESTAIN_STAINS.tolist(),
                "restain_gamma": RESTAIN_GAMMA, "px_per_mm": px_per_mm,
                "section_thickness_mm": 1.0, "anatomy": "nilearn MNI152 1 mm T1/GM/WM",
                "damage": {**damage, "damaged": damaged}, "distortions": summaries}
    return {"sections": out_sections, "heldout_true": heldout_true,
            "heldout_observed": heldout_observed, "distortions": distortions,
            "torn": damage["torn"], "missing": damage["missing"], "damaged": damaged,
            "restained": damage["restained"], "flipped": damage["flipped"],
            "settings": settings, "seconds": time.perf_counter() - began,
            "cpu_seconds": time.process_time() - began_cpu}


def write_stack(out_folder, stack: dict) -> dict:
    """Write ``sections/section_NNN.png``, ``truth.h5`` and ``stack.json`` into a folder.

    ``truth.h5`` holds ``heldout_true`` and ``heldout_observed`` (z, K, 2) and the
    attributes ``settings`` (JSON), ``damaged``, ``torn``, ``missing``, ``restained`` and
    ``flipped`` (section indices), so ``medhpc.phantoms.tnr.read_truth`` reads it.

    Returns
    -------
    dict
        The summary written to ``stack.json``.
    """
    import h5py
    from PIL import Image

    out = Path(out_folder)
    folder = out / "sections"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("section_*.png"):
        old.unlink()
    for i, section in enumerate(stack["sections"]):
        Image.fromarray(section).save(folder / f"section_{i:03d}.png", compress_level=1)
    with h5py.File(out / "truth.h5", "w") as h5:
        for name in ("heldout_true", "heldout_observed"):
            h5.create_dataset(name, data=stack[name].astype(np.float32))
        h5.attrs["settings"] = json.dumps(stack["settings"])
        for name in ("damaged", "torn", "missing", "restained", "flipped"):
            h5.attrs[name] = np.asarray(stack[name], dtype=np.int64)
    summary = {"sections": len(stack["sections"]), "size": int(stack["sections"].shape[1]),
               "folder": str(folder), "truth": str(out / "truth.h5"),
               "damaged": stack["damaged"], "torn": stack["torn"], "missing": stack["missing"],
               "restained": stack["restained"], "flipped": stack["flipped"],
               "generation_seconds": stack.get("seconds"),
               "generation_cpu_seconds": stack.get("cpu_seconds"), "settings": stack["settings"]}
    (out / "stack.json").write_text(json.dumps(summary, indent=2))
    return summary


# ------------------------------------------------------------------------------ scoring

def score(displacement: np.ndarray, truth: dict, factor: float = 1.0, ends: int = 3) -> dict:
    """Held-out error of a displacement, split into the stack's ends and its middle.

    Parameters
    ----------
    displacement : (2, z, y, x)
        Output -> input (y, x) displacement in working pixels (``tnr-register --fields``).
    truth : dict
        ``heldout_true`` and ``heldout_observed`` (from :func:`make_stack` or
        ``medhpc.phantoms.tnr.read_truth``).
    factor : float
        The working pixel size in section pixels.
    ends : int
        Sections at each end counted as "stack ends".

    Returns
    -------
    dict
        ``medhpc.phantoms.tnr.heldout_error``'s ``mean_px``, ``per_section_px`` and
        ``max_px``, plus ``ends_px`` (mean over the first and last ``ends`` sections) and
        ``middle_px`` (the others; NaN when there are none).
    """
    from medhpc.phantoms.tnr import heldout_error

    result = heldout_error(displacement, truth, factor)
    per_section = np.asarray(result["per_section_px"])
    count = len(per_section)
    end_indices = sorted(set(range(min(ends, count))) | set(range(max(count - ends, 0), count)))
    middle = np.setdiff1d(np.arange(count), end_indices)
    result["ends_px"] = float(per_section[end_indices].mean())
    result["middle_px"] = float(per_section[middle].mean()) if len(middle) else float("nan")
    return result


def exact_displacement(stack: dict, factor: int = 1) -> np.ndarray:
    """The perfect registration's ``--fields`` displacement, from the true maps.

    The output frame is the true frame: at working pixel ``u`` the displacement is
    ``(M_i^-1(f u) - f u) / f``. Scoring it checks the ground truth and the scorer.
    """
    size = stack["sections"].shape[1]
    working = size // factor
    uu, vv = np.mgrid[0:working, 0:working].astype(np.float64)
    true_points = np.stack([uu.ravel(), vv.ravel()], axis=1) * factor
    out = np.empty((2, len(stack["distortions"]), working, working), np.float32)
    for i, distortion in enumerate(stack["distortions"]):
        observed, _ = distortion.to_observed(true_points)
        for c in range(2):
            out[c, i] = ((observed[:, c] - true_points[:, c]) / factor).reshape(working, working)
    return out


# ------------------------------------------------------------------------------- peers

def read_sections(folder) -> np.ndarray:
    """The ``section_*.png`` images of a folder, (z, y, x, 3) uint8, in name order."""
    from PIL import Image

    paths = sorted(Path(folder).glob("section_*.png"))
    if not paths:
        raise FileNotFoundError(f"{folder}: no section_*.png")
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor`` x ``factor`` blocks (trailing partial blocks dropped)."""
    if factor == 1:
        return image.astype(np.float32)
    rows, columns = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    trimmed = image[:rows, :columns]
    shape = (rows // factor, factor, columns // factor, factor) + trimmed.shape[2:]
    return trimmed.reshape(shape).mean(axis=(1, 3), dtype=np.float32)


def hematoxylin_channel(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin density by Ruifrok-Johnston colour deconvolution (tissue bright)."""
    values = np.clip(np.asarray(rgb, np.float32) / 255.0, 1.0 / 255.0, 1.0)
    density = -np.log10(values)
    return (density @ np.linalg.inv(RUIFROK_HED).astype(np.float32))[..., 0]


def working_stack(sections: np.ndarray, factor: int) -> np.ndarray:
    """The peers' input: the hematoxylin channel of each section at the working level."""
    return np.stack([hematoxylin_channel(block_mean(s, factor)) for s in sections])


def _rigid_displacement(matrices_xy: np.ndarray, shape, factor: int) -> np.ndarray:
    """``--fields`` displacement from per-section 3x3 matrices on (x, y, 1), output -> input.

    The matrices act on working-level pixel coordinates of block means, whose centres lie
    at ``f u + (f - 1) / 2`` section pixels; the scorer reads the displacement at ``q / f``,
    so the half-block offset is accounted for here.
    """
    rows, columns = shape
    offset = (factor - 1) / (2.0 * factor)
    yy, xx = np.mgrid[0:rows, 0:columns].astype(np.float64)
    y, x = yy - offset, xx - offset
    out = np.empty((2, len(matrices_xy), rows, columns), np.float32)
    for i, m in enumerate(matrices_xy):
        x_in = m[0, 0] * x + m[0, 1] * y + m[0, 2]
        y_in = m[1, 0] * x + m[1, 1] * y + m[1, 2]
        out[0, i] = y_in + offset - yy
        out[1, i] = x_in + offset - xx
    return out


def peer_none(stack: np.ndarray, factor: int) -> dict:
    """No registration: zero displacement."""
    return {"displacement": np.zeros((2,) + stack.shape, np.float32)}


def peer_pystackreg(stack: np.ndarray, factor: int) -> dict:
    """pystackreg rigid body, each section to the previous (registered) one."""
    from pystackreg import StackReg

    registration = StackReg(StackReg.RIGID_BODY)
    matrices = registration.register_stack(stack.astype(np.float64), reference="previous")
    return {"displacement": _rigid_displacement(matrices, stack.shape[1:], factor),
            "matrices": matrices}


def _ecc_pair(template: np.ndarray, moving: np.ndarray, levels: int = 3):
    """Euclidean ECC warp (2x3, template (x, y) -> moving (x, y)), coarse to fine."""
    import cv2

    pyramid = [(template, moving)]
    for _ in range(levels - 1):
        pyramid.append((cv2.pyrDown(pyramid[-1][0]), cv2.pyrDown(pyramid[-1][1])))
    warp = np.eye(2, 3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 200, 1e-6)
    failures = 0
    for level in range(levels - 1, -1, -1):
        fixed, moved = pyramid[level]
        try:
            _, warp = cv2.findTransformECC(fixed, moved, warp, cv2.MOTION_EUCLIDEAN, criteria,
                                           None, 5)
        except cv2.error:
            failures += 1
        if level:
            warp[:, 2] *= 2.0
    return warp.astype(np.float64), failures


def peer_ecc(stack: np.ndarray, factor: int) -> dict:
    """OpenCV ECC (MOTION_EUCLIDEAN, 3-level pyramid), each section to the previous, chained."""
    chain = [np.eye(3)]
    failures = 0
    for i in range(1, len(stack)):
        warp, failed = _ecc_pair(np.ascontiguousarray(stack[i - 1], np.float32),
                                 np.ascontiguousarray(stack[i], np.float32))
        failures += failed
        step = np.vstack([warp, [0.0, 0.0, 1.0]])
        chain.append(step @ chain[-1])      # section 0 (output) -> section i-1 -> section i
    matrices = np.stack(chain)
    return {"displacement": _rigid_displacement(matrices, stack.shape[1:], factor),
            "matrices": matrices, "ecc_failures": failures}


PEERS = {"none (no registration)": peer_none,
         "pystackreg RIGID_BODY, previous": peer_pystackreg,
         "OpenCV ECC Euclidean, 3 levels, previous (chained)": peer_ecc}


def run_peers(sections_folder, truth: dict, factor: int = 4) -> list:
    """Run every peer on the PNG sections and score it.

    Returns
    -------
    list of dict
        Per peer: ``method``, the :func:`score` keys, ``cpu_s`` (``time.process_time``)
        and ``wall_s`` of the registration (the shared reading and channel preparation is
        reported as its own row).
    """
    cpu, wall = time.process_time(), time.perf_counter()
    stack = working_stack(read_sections(sections_folder), factor)
    rows = [{"method": "(shared) read PNGs + hematoxylin channel",
             "cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall}]
    for name, peer in PEERS.items():
        cpu, wall = time.process_time(), time.perf_counter()
        result = peer(stack, factor)
        row = {"method": name, "cpu_s": time.process_time() - cpu,
               "wall_s": time.perf_counter() - wall}
        row.update(score(result["displacement"], truth, factor))
        if "ecc_failures" in result:
            row["ecc_failures"] = result["ecc_failures"]
        rows.append(row)
    return rows


def markdown(rows: list, title: str = "") -> str:
    """Peer scores as a Markdown table."""
    lines = [title, ""] if title else []
    lines += ["| method | mean px | ends px | middle px | max px | CPU s | wall s |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        if "mean_px" not in row:
            lines.append(f"| {row['method']} | | | | | {row['cpu_s']:.2f} | "
                         f"{row['wall_s']:.2f} |")
            continue
        lines.append(f"| {row['method']} | {row['mean_px']:.2f} | {row['ends_px']:.2f} | "
                     f"{row['middle_px']:.2f} | {row['max_px']:.1f} | {row['cpu_s']:.2f} | "
                     f"{row['wall_s']:.2f} |")
    return "\n".join(lines)


def save_montage(sections: np.ndarray, path, count: int = 8, width: int = 256,
                 include=()) -> list:
    """Save a montage of ``count`` evenly spaced sections plus ``include``, ``width`` px each.

    Returns the section indices shown (row-major, four per row).
    """
    from PIL import Image

    evenly = np.linspace(0, len(sections) - 1, min(count, len(sections))).astype(int)
    picks = np.unique(np.concatenate([evenly, np.asarray(list(include), int)]))
    tiles = [np.asarray(Image.fromarray(sections[i]).resize((width, width), Image.BILINEAR))
             for i in picks]
    columns = min(4, len(tiles))
    rows = -(-len(tiles) // columns)
    canvas = np.full((rows * width, columns * width, 3), 255, np.uint8)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, columns)
        canvas[r * width:(r + 1) * width, c * width:(c + 1) * width] = tile
    Image.fromarray(canvas).save(path)
    return picks.tolist()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sections", type=int, default=36)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--axis", type=int, default=2, choices=(0, 1, 2))
    parser.add_argument("--start", type=int, default=None)
    parser.add_argument("--rotation-deg", type=float, default=8.0)
    parser.add_argument("--shift-frac", type=float, default=0.05)
    parser.add_argument("--tears", type=int, default=3)
    parser.add_argument("--missing", type=int, default=2)
    parser.add_argument("--restained", type=int, default=1)
    parser.add_argument("--flipped", type=int, default=0)
    parser.add_argument("--heldout", type=int, default=106)
    parser.add_argument("--peers", action="store_true", help="run and score the peers")
    parser.add_argument("--downsample", type=int, default=4, help="peers' working level")
    parser.add_argument("--check-truth", action="store_true",
                        help="score the exact inverse maps (should be ~0 px)")
    parser.add_argument("--montage", type=Path, default=None, help="save a PNG montage")
    args = parser.parse_args(argv)

    stack = make_stack(sections=args.sections, size=args.size, seed=args.seed, axis=args.axis,
                       start=args.start, rotation_deg=args.rotation_deg,
                       shift_frac=args.shift_frac, tears=args.tears, missing=args.missing,
                       restained=args.restained, flipped=args.flipped, heldout=args.heldout)
    began = time.perf_counter()
    summary = write_stack(args.out, stack)
    print(f"{args.sections} sections of {args.size}^2 (slices {stack['settings']['slices']}, "
          f"axis {args.axis}, {stack['settings']['px_per_mm']:.2f} px/mm): generated in "
          f"{stack['seconds']:.1f} s ({stack['cpu_seconds']:.1f} CPU-s), written in "
          f"{time.perf_counter() - began:.1f} s; torn "
          f"{stack['torn']}, missing {stack['missing']}, restained {stack['restained']}, "
          f"flipped {stack['flipped']}", file=sys.stderr)
    if args.montage:
        shown = save_montage(stack["sections"], args.montage, include=stack["damaged"]
                             + stack["restained"] + stack["flipped"])
        print(f"montage {args.montage}: sections {shown}", file=sys.stderr)
    results = {"stack": {k: v for k, v in summary.items() if k != "settings"}}
    if args.check_truth:
        exact = score(exact_displacement(stack, args.downsample), stack, args.downsample)
        results["exact_inverse"] = {k: exact[k] for k in ("mean_px", "max_px")}
        print(f"exact inverse maps at downsample {args.downsample}: mean "
              f"{exact['mean_px']:.4f} px, max {exact['max_px']:.4f} px", file=sys.stderr)
    if args.peers:
        from medhpc.phantoms.tnr import read_truth

        truth = read_truth(args.out / "truth.h5")
        rows = run_peers(args.out / "sections", truth, args.downsample)
        results["peers"] = {"downsample": args.downsample, "rows": rows}
        print(markdown(rows, f"Peers on {args.sections} x {args.size}^2 (seed {args.seed}, "
                             f"axis {args.axis}, downsample {args.downsample}); error at "
                             "held-out points in section px"))
    (args.out / "results.json").write_text(json.dumps(
        results, indent=2, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


if __name__ == "__main__":
    main()
