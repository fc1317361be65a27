"""Single-scatter simulation (Watson's SSS) from an activity and a mu-map, tail-fitted.

For a LOR between detectors A and B and scatter points S (voxels of a coarse grid where
the tissue attenuates)::

    S_AB = sum_S V_S mu_S / sigma(511) dsigma/dOmega(theta)
           sigma_AS sigma_BS / (4 pi R_AS^2 R_BS^2) / eps(511)^2
           [eps(511) eps(E') exp(-I_SA - f' I_SB) L_SA + eps(E') eps(511) exp(-f' I_SA - I_SB) L_SB]

``theta`` is the angle between the photon leaving S away from A and the direction S->B
(``cos theta = -u_SA . u_SB``), ``E' = 511 / (2 - cos theta)`` keV the scattered energy,
``dsigma/dOmega`` Klein-Nishina, ``f' = sigma(E') / sigma(511)`` scales mu to E' (Compton),
``I`` the mu line integrals and ``L`` the activity line integrals from S to a detector,
``sigma_XS`` the crystal's face area seen from S, ``eps`` the chance that a photon of that
energy lands in the energy window (Gaussian resolution, FWHM proportional to sqrt(E)). The
result is divided by the trues' own geometric factor ``sigma_A sigma_B / (4 pi R_AB^2)``, so
that it is in the units of the line-integral model ``A x``: with ``x`` a reconstruction of the
data (counts per mm), ``norm x S_AB`` are the expected scatter counts of the LOR.

SSS runs on a sub-grid of sinogram bins (every few radial bins and views, a few rings for
each end) and is interpolated to every bin; a tail fit then scales it to the prompts minus
the randoms in the LORs that miss the body (least squares).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numba
import numpy as np

from medhpc.pet.projector import JosephProjector
from medhpc.pet.scanner import (ScannerGeometry, crystal_xy, plane_members, sinogram_crystals,
                                sum_over_members)
from medhpc.pet.settings import ScatterSettings

ELECTRON_REST_KEV = 511.0
#: LORs with an attenuation factor above this miss the body (under 0.1 mm of water): the
#: tails, where prompts - randoms is scatter alone. Grazing LORs carry trues.
TAIL_ATTENUATION = 0.999


def klein_nishina(cos_theta, energy_kev=ELECTRON_REST_KEV):
    """dsigma/dOmega of Compton scattering, in units of r_e^2 (per steradian)."""
    k = energy_kev / ELECTRON_REST_KEV
    ratio = 1.0 / (1.0 + k * (1.0 - cos_theta))
    return 0.5 * ratio * ratio * (ratio + 1.0 / ratio - (1.0 - cos_theta * cos_theta))


def total_compton(energy_kev):
    """Total Klein-Nishina cross-section, in units of r_e^2."""
    k = np.asarray(energy_kev, np.float64) / ELECTRON_REST_KEV
    log = np.log1p(2.0 * k)
    return 2.0 * np.pi * ((1.0 + k) / k ** 2 * (2.0 * (1.0 + k) / (1.0 + 2.0 * k) - log / k)
                          + log / (2.0 * k) - (1.0 + 3.0 * k) / (1.0 + 2.0 * k) ** 2)


def window_efficiency(energy_kev, window_kev, resolution):
    """Chance that a photon of ``energy_kev`` is measured inside the window."""
    energy = np.asarray(energy_kev, np.float64)
    sigma = resolution * ELECTRON_REST_KEV / 2.3548 * np.sqrt(energy / ELECTRON_REST_KEV)
    low, high = window_kev
    erf = np.vectorize(math.erf)
    return 0.5 * (erf((high - energy) / (math.sqrt(2.0) * sigma))
                  - erf((low - energy) / (math.sqrt(2.0) * sigma)))


def scatter_points(mu, origin_mm, voxel_mm, settings: ScatterSettings):
    """Centres (n, 3) mm, volumes (mm^3) and mu of the coarse cells where mu is high enough:
    the mu-map averaged over blocks of about ``scatter_point_mm``."""
    steps = [max(1, int(round(settings.scatter_point_mm / v))) for v in voxel_mm[::-1]]  # z, y, x
    nz, ny, nx = (int(math.ceil(n / s)) for n, s in zip(mu.shape, steps))
    padded = np.zeros((nz * steps[0], ny * steps[1], nx * steps[2]), np.float64)
    padded[:mu.shape[0], :mu.shape[1], :mu.shape[2]] = mu
    blocks = padded.reshape(nz, steps[0], ny, steps[1], nx, steps[2]).mean(axis=(1, 3, 5))
    keep = np.argwhere(blocks > settings.mu_threshold_per_mm)
    centre_index = (keep + 0.5) * np.asarray(steps) - 0.5  # z, y, x voxel index
    centres = np.asarray(origin_mm, np.float64) + centre_index[:, ::-1] * np.asarray(voxel_mm)
    volume = float(np.prod(np.asarray(steps) * np.asarray(voxel_mm[::-1])))
    return centres, np.full(len(keep), volume), blocks[tuple(keep.T)]


def detector_normals(scanner: ScannerGeometry) -> np.ndarray:
    """Unit transaxial normal (towards the axis' outside) of every crystal's face."""
    n = scanner.crystals_per_ring
    if not scanner.modules_per_ring:
        xy = crystal_xy(scanner)
        return xy / np.linalg.norm(xy, axis=1, keepdims=True)
    module = np.arange(n) // scanner.crystals_per_module
    angle = 2.0 * np.pi * module / scanner.modules_per_ring + np.pi * (
        scanner.crystals_per_module - 1) / n
    return np.stack([np.cos(angle), np.sin(angle)], axis=1)


@dataclass
class SampledBins:
    """The sinogram sub-grid SSS runs on: radial and view indices, ring indices per end."""

    radial: np.ndarray
    views: np.ndarray
    rings: np.ndarray


def sampled_bins(scanner: ScannerGeometry, settings: ScatterSettings) -> SampledBins:
    """Every ``radial_step``-th radial bin and ``view_step``-th view (with the last ones) and
    ``rings_sampled`` evenly spread rings (first and last included)."""
    def every(n, step):
        return np.unique(np.concatenate([np.arange(0, n, step), [n - 1]]))

    rings = np.unique(np.rint(np.linspace(0, scanner.rings - 1,
                                          min(settings.rings_sampled, scanner.rings))).astype(int))
    return SampledBins(every(scanner.n_radial, settings.radial_step),
                       every(scanner.n_views, settings.view_step), rings)


def single_scatter(scanner: ScannerGeometry, activity, activity_origin, activity_voxel, mu,
                   mu_origin, mu_voxel, settings: ScatterSettings = ScatterSettings(),
                   device: str = "cpu"):
    """SSS on the sampled bins: ``(bins, values)`` with values (radial, view, ring1, ring2)."""
    bins = sampled_bins(scanner, settings)
    points, volumes, point_mu = scatter_points(mu, mu_origin, mu_voxel, settings)
    start, end = sinogram_crystals(scanner, bins.views)
    start, end = start[bins.radial], end[bins.radial]
    crystals = np.unique(np.concatenate([start.ravel(), end.ravel()]))
    crystal_index = np.searchsorted(crystals, np.arange(scanner.crystals_per_ring))
    xy = crystal_xy(scanner)[crystals]
    z = scanner.ring_z_mm[bins.rings]
    detectors = np.zeros((len(crystals), len(z), 3))
    detectors[:, :, :2] = xy[:, None, :]
    detectors[:, :, 2] = z[None, :]
    normals = np.zeros_like(detectors)
    normals[:, :, :2] = detector_normals(scanner)[crystals][:, None, :]
    detectors = detectors.reshape(-1, 3)
    normals = normals.reshape(-1, 3)
    n_points, n_detectors = len(points), len(detectors)
    if n_points == 0:
        shape = (len(bins.radial), len(bins.views), len(bins.rings), len(bins.rings))
        return bins, np.zeros(shape)
    segment_start = np.repeat(points, n_detectors, axis=0).astype(np.float32)
    segment_end = np.tile(detectors, (n_points, 1)).astype(np.float32)
    mu_integrals = JosephProjector(segment_start, segment_end, mu.shape, mu_origin, mu_voxel,
                                   device=device).forward(mu).reshape(n_points, n_detectors)
    activity_integrals = JosephProjector(segment_start, segment_end, activity.shape,
                                         activity_origin, activity_voxel,
                                         device=device).forward(activity).reshape(
                                             n_points, n_detectors)
    cos_grid = np.linspace(-1.0, 1.0, 2001)
    energies = ELECTRON_REST_KEV / (2.0 - cos_grid)
    reference = total_compton(ELECTRON_REST_KEV)
    tables = np.stack([klein_nishina(cos_grid) / reference,
                       total_compton(energies) / reference,
                       window_efficiency(energies, settings.window_kev,
                                         settings.energy_resolution)
                       / window_efficiency(ELECTRON_REST_KEV, settings.window_kev,
                                           settings.energy_resolution)])
    pairs = np.stack(np.meshgrid(np.arange(len(bins.rings)), np.arange(len(bins.rings)),
                                 indexing="ij"), axis=-1).reshape(-1, 2)
    a_index = (crystal_index[start][:, :, None] * len(z) + pairs[None, None, :, 0])
    b_index = (crystal_index[end][:, :, None] * len(z) + pairs[None, None, :, 1])
    area = scanner.crystal_size_mm * scanner.ring_spacing_mm
    values = _sss_sum(points, volumes * point_mu, detectors, normals, mu_integrals,
                      activity_integrals, a_index.reshape(-1), b_index.reshape(-1), tables,
                      area)
    return bins, values.reshape(len(bins.radial), len(bins.views), len(bins.rings),
                                len(bins.rings))


@numba.njit(parallel=True, cache=True)
def _sss_sum(points, weights, detectors, normals, mu_integrals, activity_integrals, a_index,
             b_index, tables, area):
    """S_AB / (trues' geometric factor) for LOR l = (a_index[l], b_index[l])."""
    n_lors = a_index.shape[0]
    out = np.zeros(n_lors)
    last = tables.shape[1] - 1
    for lor in numba.prange(n_lors):
        a, b = a_index[lor], b_index[lor]
        ax, ay, az = detectors[a, 0], detectors[a, 1], detectors[a, 2]
        bx, by, bz = detectors[b, 0], detectors[b, 1], detectors[b, 2]
        nax, nay, nbx, nby = normals[a, 0], normals[a, 1], normals[b, 0], normals[b, 1]
        dx, dy, dz = bx - ax, by - ay, bz - az
        r_ab2 = dx * dx + dy * dy + dz * dz
        r_ab = math.sqrt(r_ab2)
        trues = (area * abs(dx * nax + dy * nay) / r_ab * area * abs(dx * nbx + dy * nby) / r_ab
                 / (4.0 * math.pi * r_ab2))
        if trues <= 0.0:
            continue
        total = 0.0
        for s in range(points.shape[0]):
            sax, say, saz = ax - points[s, 0], ay - points[s, 1], az - points[s, 2]
            sbx, sby, sbz = bx - points[s, 0], by - points[s, 1], bz - points[s, 2]
            r_sa2 = sax * sax + say * say + saz * saz
            r_sb2 = sbx * sbx + sby * sby + sbz * sbz
            r_sa, r_sb = math.sqrt(r_sa2), math.sqrt(r_sb2)
            cos_theta = -(sax * sbx + say * sby + saz * sbz) / (r_sa * r_sb)
            position = (cos_theta + 1.0) * 0.5 * last
            index = min(int(position), last - 1)
            fraction = position - index
            cross = tables[0, index] + fraction * (tables[0, index + 1] - tables[0, index])
            scaled_mu = tables[1, index] + fraction * (tables[1, index + 1] - tables[1, index])
            efficiency = tables[2, index] + fraction * (tables[2, index + 1] - tables[2, index])
            geometry = (area * abs(sax * nax + say * nay) / r_sa * area
                        * abs(sbx * nbx + sby * nby) / r_sb / (4.0 * math.pi * r_sa2 * r_sb2))
            i_sa, i_sb = mu_integrals[s, a], mu_integrals[s, b]
            emission = (math.exp(-i_sa - scaled_mu * i_sb) * activity_integrals[s, a]
                        + math.exp(-scaled_mu * i_sa - i_sb) * activity_integrals[s, b])
            total += weights[s] * cross * geometry * efficiency * emission
        out[lor] = total / trues
    return out


def interpolate_to_sinogram(scanner: ScannerGeometry, bins: SampledBins, values,
                            views=None) -> np.ndarray:
    """The sampled SSS on every (radial, view, plane) bin of the given views (all: None):
    linear in radial bin, view and the two rings (clamped at the sampled ends)."""
    views = np.arange(scanner.n_views) if views is None else np.asarray(views)
    radial = _linear_lookup(bins.radial, np.arange(scanner.n_radial))
    view = _linear_lookup(bins.views, views)
    rings = _linear_lookup(bins.rings, np.arange(scanner.rings))
    pairs, first = plane_members(scanner)
    out = np.empty((scanner.n_radial, len(views), len(pairs)), np.float32)
    _interpolate(np.ascontiguousarray(values, np.float64), *radial, *view, *rings, pairs, out)
    return sum_over_members(out, first)


def _linear_lookup(samples, targets):
    """For each target index: the lower sample's position and the weight of the upper one."""
    samples = np.asarray(samples, np.float64)
    targets = np.asarray(targets, np.float64)
    if len(samples) == 1:
        return np.zeros(len(targets), np.int64), np.zeros(len(targets))
    lower = np.clip(np.searchsorted(samples, targets, side="right") - 1, 0, len(samples) - 2)
    weight = (targets - samples[lower]) / (samples[lower + 1] - samples[lower])
    return lower.astype(np.int64), np.clip(weight, 0.0, 1.0)


@numba.njit(parallel=True, cache=True)
def _interpolate(values, radial_index, radial_weight, view_index, view_weight, ring_index,
                 ring_weight, pairs, out):
    """out[r, v, p] = multilinear interpolation of values[radial, view, ring1, ring2]."""
    n_radial, n_views, n_planes = out.shape
    single_radial = values.shape[0] == 1
    single_view = values.shape[1] == 1
    single_ring = values.shape[2] == 1
    for r in numba.prange(n_radial):
        i0, wi = radial_index[r], radial_weight[r]
        for v in range(n_views):
            j0, wj = view_index[v], view_weight[v]
            for plane in range(n_planes):
                k0, wk = ring_index[pairs[plane, 0]], ring_weight[pairs[plane, 0]]
                l0, wl = ring_index[pairs[plane, 1]], ring_weight[pairs[plane, 1]]
                total = 0.0
                for di in range(2):
                    a = (1.0 - wi) if di == 0 else wi
                    if a == 0.0 or (di == 1 and single_radial):
                        continue
                    for dj in range(2):
                        b = (1.0 - wj) if dj == 0 else wj
                        if b == 0.0 or (dj == 1 and single_view):
                            continue
                        for dk in range(2):
                            c = (1.0 - wk) if dk == 0 else wk
                            if c == 0.0 or (dk == 1 and single_ring):
                                continue
                            for dl in range(2):
                                d = (1.0 - wl) if dl == 0 else wl
                                if d == 0.0 or (dl == 1 and single_ring):
                                    continue
                                total += a * b * c * d * values[i0 + di, j0 + dj, k0 + dk,
                                                                l0 + dl]
                out[r, v, plane] = total if total > 0.0 else 0.0


def tail_sums(scatter, prompts, randoms, attenuation, threshold: float = TAIL_ATTENUATION):
    """Least-squares sums of the tails (LORs whose attenuation factor is above ``threshold``:
    they miss the body, :data:`TAIL_ATTENUATION`): ``(sum s (y - r), sum s^2, tail bins)``; sums of several blocks of
    bins add up. Unweighted on purpose: weights ``1 / y`` bias the fit low at the few counts
    per tail bin."""
    tails = attenuation > threshold
    if prompts.ndim > scatter.ndim:  # TOF: the tails of the summed bins
        prompts, randoms = prompts.sum(axis=-1), randoms.sum(axis=-1)
    s = scatter[tails].astype(np.float64)
    excess = (prompts[tails] - randoms[tails]).astype(np.float64)
    return float(np.sum(s * excess)), float(np.sum(s * s)), int(tails.sum())


def tail_scale(numerator: float, denominator: float) -> float:
    """The fitted scale (>= 0) from :func:`tail_sums`; 1 without tails."""
    return max(numerator / denominator, 0.0) if denominator > 0 else 1.0


def tail_fit(scatter, prompts, randoms, attenuation,
             threshold: float = TAIL_ATTENUATION) -> tuple[float, int]:
    """The scale of ``scatter`` that best fits ``prompts - randoms`` in the tails, and the
    number of tail bins (see :func:`tail_sums`)."""
    numerator, denominator, count = tail_sums(scatter, prompts, randoms, attenuation, threshold)
    return tail_scale(numerator, denominator), count
