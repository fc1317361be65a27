"""pet-simulate: measured data from an activity image, with the physics a scanner sees.

For every sinogram bin::

    attenuation   = exp(-A mu)                       (line integral of the mu-map)
    normalisation = e_a e_b                          (crystal efficiencies, seeded)
    m             = attenuation * normalisation
    y_bar         = s * m * A x + a                  (s scales to the requested counts)
    a             = randoms: flat per LOR (a span > 1 plane: times its ring pairs), a
                    share of the counts (randoms fraction)
    prompts       ~ Poisson(y_bar)                   (or y_bar with --no-noise)

With ``--scatter`` single scatter (:mod:`medhpc.pet.scatter`, default settings) of the
activity in the mu-map is added to the expected counts, normalised like the trues; it is
stored as ``true_scatter``, not in the additive term.

With ``--rays K`` the trues ``A x`` average K x K rays between points spread over the two
crystals' faces (transaxially over ``crystal_size_mm``, axially over the ring spacing): a
detector response that pet-recon's one ray per LOR does not model, so tests of contrast and
bias meet model error as real data do.

Views are split over the ranks; each view's noise comes from its own seeded
stream, so the data do not depend on the number of ranks. Rank 0 writes.
"""

from __future__ import annotations

import numpy as np

from medhpc.errors import InputError
from medhpc.io.geometry import ImageGeometry
from medhpc.io.images import check_nonnegative, check_same_grid, read_image
from medhpc.parallel.geometry import block_range
from medhpc.pet.projector import axis_aligned_grid, sinogram_projector, tof_spec
from medhpc.pet.corrections import attenuation_factors, mu_map_corrections, read_mu_map
from medhpc.pet.listmode import write_listmode
from medhpc.pet.scanner import (ScannerGeometry, crystal_ids, mean_over_members, plane_members,
                                plane_ring_pairs, sinogram_crystals)
from medhpc.pet.settings import ScatterSettings
from medhpc.pet.sinogram import write_sinogram

EFFICIENCY_SPREAD = 0.08


def read_inputs(activity_path, mu_map_path):
    """Read and check the activity (3-D or 4-D: frames) and the mu-map (1/mm)."""
    activity, grid = read_image(activity_path, ndim=(3, 4))
    check_nonnegative(activity_path, activity, "activity")
    frames = activity if activity.ndim == 4 else activity[None]
    mu_map = None
    if mu_map_path is not None:
        mu_map, mu_grid = read_mu_map(mu_map_path)
        check_same_grid(mu_map_path, mu_grid, activity_path, grid, "mu-map")
    return np.ascontiguousarray(frames, np.float32), mu_map, grid


def crystal_efficiencies(scanner: ScannerGeometry, seed: int) -> np.ndarray:
    """Seeded efficiencies per (ring, crystal), mean 1, clipped to [0.7, 1.3]."""
    rng = np.random.default_rng([seed, 7919])
    values = 1.0 + EFFICIENCY_SPREAD * rng.standard_normal((scanner.rings, scanner.crystals_per_ring))
    return np.clip(values, 0.7, 1.3).astype(np.float32)


def normalisation_factors(scanner: ScannerGeometry, views, seed: int) -> np.ndarray:
    """e_a e_b per (radial, view, plane) for the given views (at span > 1 the mean over
    the plane's ring pairs)."""
    efficiency = crystal_efficiencies(scanner, seed)
    crystal_a, crystal_b = sinogram_crystals(scanner, views)
    rings, first = plane_members(scanner)
    pairs = (efficiency[rings[None, None, :, 0], crystal_a[:, :, None]]
             * efficiency[rings[None, None, :, 1], crystal_b[:, :, None]])
    return mean_over_members(pairs, first).astype(np.float32)


def on_crystal_face(scanner: ScannerGeometry, points: np.ndarray, across: float,
                    along: float) -> np.ndarray:
    """Crystal centres moved over the crystal's face: ``across`` x ``crystal_size_mm`` along
    the ring's tangent and ``along`` x ``ring_spacing_mm`` along z (fractions in [-0.5, 0.5])."""
    moved = np.array(points, dtype=np.float64)
    radius = np.hypot(moved[..., 0], moved[..., 1])
    tangent_x, tangent_y = -moved[..., 1] / radius, moved[..., 0] / radius
    moved[..., 0] += across * scanner.crystal_size_mm * tangent_x
    moved[..., 1] += across * scanner.crystal_size_mm * tangent_y
    moved[..., 2] += along * scanner.ring_spacing_mm
    return moved.astype(np.float32)


def check_settings(scanner: ScannerGeometry, counts: float, randoms_fraction: float,
                   tof: bool) -> None:
    """Raise :class:`InputError` for counts, randoms fraction or TOF the scanner cannot take."""
    if not 0 <= randoms_fraction < 1:
        raise InputError(f"--randoms-fraction {randoms_fraction}: expected 0 <= F < 1")
    if counts <= 0:
        raise InputError(f"--counts {counts:g}: expected a positive number of counts")
    if tof and scanner.tof_bins < 1:
        raise InputError(f"--tof: scanner '{scanner.name}' has no TOF bins; use a TOF scanner "
                         f"(for example ge-dmi-4ring-tof)")


def check_listmode_scanner(scanner: ScannerGeometry) -> None:
    """Raise :class:`InputError` unless list-mode events can be simulated on ``scanner``."""
    if scanner.span != 1:
        raise InputError(f"--listmode: scanner '{scanner.name}' has span {scanner.span}; "
                         f"events are crystal pairs, simulate them with a span-1 scanner")


class Simulation:
    """One pet-simulate run (see the module notes)."""

    def __init__(self, run, scanner: ScannerGeometry, activity: np.ndarray, mu_map, grid: ImageGeometry,
                 counts: float, noise: bool, randoms_fraction: float, tof: bool, source="activity",
                 rays: int = 1, scatter: bool = False, timing=None):
        check_settings(scanner, counts, randoms_fraction, tof)
        if scatter and mu_map is None:
            raise InputError("--scatter needs --mu-map: scatter happens in the attenuating body")
        self.scatter = bool(scatter)
        if rays < 1:
            raise InputError(f"--rays {rays}: expected 1 (the LOR's centre) or more per side")
        self.rays = int(rays)
        self.timing = timing  # each crystal's TOF time offset (medhpc.pet.timing)
        self.run = run
        self.scanner = scanner
        self.activity = activity
        self.mu_map = mu_map
        self.grid = grid
        self.counts = counts
        self.noise = noise
        self.randoms_fraction = randoms_fraction
        self.tof = tof
        self.origin_mm, self.voxel_mm = axis_aligned_grid(grid, source)

    def _projector(self, views, tof: bool, offsets=None):
        def on_faces(xstart, xend):
            return (on_crystal_face(self.scanner, xstart, *offsets[0]),
                    on_crystal_face(self.scanner, xend, *offsets[1]))

        return sinogram_projector(self.scanner, self.grid.shape, self.origin_mm, self.voxel_mm,
                                  views=views, device=self.run.device,
                                  tof=tof_spec(self.scanner) if tof else None,
                                  move_endpoints=None if offsets is None else on_faces,
                                  timing=self.timing)

    def _trues_projectors(self, views):
        """One projector per ray of a LOR: its centre, or ``rays x rays`` rays between points
        spread over the two crystals' faces (the detector response the reconstruction does not
        model)."""
        if self.rays == 1:
            return [self._projector(views, self.tof)]
        steps = (np.arange(self.rays) + 0.5) / self.rays - 0.5
        return [self._projector(views, self.tof, ((steps[i], steps[j]), (steps[j], steps[i])))
                for i in range(self.rays) for j in range(self.rays)]

    def execute(self, seed: int) -> dict | None:
        """Simulate this rank's views; return the whole data on rank 0 (None elsewhere)."""
        scanner, world = self.scanner, self.run.world
        views = np.arange(*block_range(scanner.n_views, world.size, world.rank))
        n_radial, n_planes = scanner.n_radial, scanner.n_planes
        shape = (n_radial, len(views), n_planes)
        tof_bins = scanner.tof_bins if self.tof else 1
        with self.run.stage("factors", "kernel"):
            normalisation = normalisation_factors(scanner, views, seed)
            if self.mu_map is not None:
                attenuation = attenuation_factors(
                    mu_map_corrections(self.mu_map, self.origin_mm, self.voxel_mm), scanner,
                    views, slice(None), self.run.device)
            else:
                attenuation = np.ones(shape, np.float32)
            multiplicative = attenuation * normalisation
        projectors = self._trues_projectors(views)
        trues = []
        for frame in self.run.log.progress(range(len(self.activity)), desc="frames"):
            with self.run.stage("forward project", "kernel"):
                projection = sum(projector.forward(self.activity[frame])
                                 for projector in projectors) / len(projectors)
            values = projection.reshape(shape + ((tof_bins,) if self.tof else ()))
            factors = multiplicative[..., None] if self.tof else multiplicative
            trues.append((values * factors).astype(np.float32))
        with self.run.stage("allreduce", "comm"):
            total_trues = world.sum(float(sum(np.sum(t, dtype=np.float64) for t in trues)))
        if total_trues <= 0:
            raise InputError("the activity projects to zero counts in the scanner's field of "
                             "view; expected activity inside the scanner")
        # one scale for all frames keeps their relative activity; the mean frame gets `counts`
        scale = (1 - self.randoms_fraction) * self.counts * len(trues) / total_trues
        # flat per LOR: a plane holds its ring pairs' share (all alike at span 1)
        pairs = np.diff(plane_members(scanner)[1]).astype(np.float64)
        randoms_per_bin = (self.randoms_fraction * self.counts * pairs / (pairs.sum()
                           * scanner.n_radial * scanner.n_views * tof_bins))
        randoms_per_bin = randoms_per_bin.reshape((1, 1, -1) + ((1,) if self.tof else ()))
        prompts, additive = [], []
        scatter = []
        for frame, frame_trues in enumerate(trues):
            expected = frame_trues * scale + randoms_per_bin
            if self.scatter:
                with self.run.stage("single scatter", "kernel"):
                    frame_scatter = scale * normalisation * self._scatter(self.activity[frame],
                                                                         views)
                if self.tof:
                    frame_scatter = np.repeat(frame_scatter[..., None] / tof_bins, tof_bins, -1)
                expected = expected + frame_scatter
                scatter.append(frame_scatter.astype(np.float32))
            additive.append(np.broadcast_to(randoms_per_bin, expected.shape).astype(np.float32))
            with self.run.stage("noise", "other"):
                prompts.append(self._noisy(expected, views, frame, seed))
        with self.run.stage("gather", "comm"):
            blocks = world.gather({"prompts": prompts, "additive": additive, "scatter": scatter,
                                   "multiplicative": multiplicative, "attenuation": attenuation,
                                   "normalisation": normalisation})
        if blocks is None:
            return None
        return self._assemble(blocks)

    def _scatter(self, activity, views) -> np.ndarray:
        """Single-scatter estimate of the activity on this rank's views, in the units of ``A x``
        (no normalisation), with the default :class:`ScatterSettings`."""
        from medhpc.pet.scatter import interpolate_to_sinogram, single_scatter

        bins, values = single_scatter(self.scanner, activity, self.origin_mm, self.voxel_mm,
                                      self.mu_map, self.origin_mm, self.voxel_mm,
                                      ScatterSettings(), self.run.device)
        return interpolate_to_sinogram(self.scanner, bins, values, views).astype(np.float32)

    def _noisy(self, expected: np.ndarray, views, frame: int, seed: int) -> np.ndarray:
        if not self.noise:
            return expected.astype(np.float32)
        out = np.empty_like(expected, dtype=np.float32)
        for index, view in enumerate(views):
            rng = np.random.default_rng([seed, frame, int(view)])
            out[:, index] = rng.poisson(expected[:, index])
        return out

    def _assemble(self, blocks: list[dict]) -> dict:
        frames = len(self.activity)

        def joined(name, frame=None):
            parts = [b[name][frame] if frame is not None else b[name] for b in blocks]
            return np.concatenate(parts, axis=1)

        data = {name: joined(name) for name in ("multiplicative", "attenuation", "normalisation")}
        for name in ("prompts", "additive") + (("scatter",) if self.scatter else ()):
            per_frame = [joined(name, frame) for frame in range(frames)]
            data[name] = per_frame[0] if frames == 1 else np.stack(per_frame, axis=-1)
        data["frames"] = frames
        return data


def write_simulation(path, scanner, grid, data: dict, tof: bool, overwrite: bool, attrs: dict):
    """Write the simulated data as a sinogram file (rank 0); simulated scatter is kept as
    ``true_scatter`` (not in the additive term: a reconstruction must estimate it)."""
    factors = {"attenuation": data["attenuation"], "normalisation": data["normalisation"]}
    if "scatter" in data:
        factors["true_scatter"] = data["scatter"]
    write_sinogram(path, scanner, grid, data["prompts"], data["multiplicative"], data["additive"],
                   tof=tof, frames=data["frames"], overwrite=overwrite, factors=factors,
                   attrs=attrs)


def listmode_events(scanner: ScannerGeometry, prompts: np.ndarray, duration_s: float,
                    seed: int) -> dict:
    """The events of a sinogram of counts, in time order.

    Each count of a bin becomes one event of the bin's crystal pair, in a random
    orientation (the TOF bin mirrored with it), at a uniform random time in
    ``[0, duration_s)``.
    """
    check_listmode_scanner(scanner)
    counts = np.asarray(prompts)
    if not np.array_equal(counts, np.rint(counts)):
        raise InputError("list-mode events need whole counts: drop --no-noise")
    tof = counts.ndim == 4
    flat = counts.reshape(scanner.n_lors, -1).astype(np.int64)
    lor, tof_bin = np.nonzero(flat)
    repeats = flat[lor, tof_bin]
    lor, tof_bin = np.repeat(lor, repeats), np.repeat(tof_bin, repeats)
    radial, view, plane = np.unravel_index(lor, scanner.sinogram_shape[:3])
    start_crystal, end_crystal = sinogram_crystals(scanner)
    rings = plane_ring_pairs(scanner)
    crystal1 = crystal_ids(scanner, start_crystal[radial, view], rings[plane, 0])
    crystal2 = crystal_ids(scanner, end_crystal[radial, view], rings[plane, 1])
    rng = np.random.default_rng([seed, 104729])
    swap = rng.random(lor.size) < 0.5
    crystal1, crystal2 = np.where(swap, crystal2, crystal1), np.where(swap, crystal1, crystal2)
    time_ms = np.floor(rng.random(lor.size) * duration_s * 1000.0).astype(np.int64)
    order = np.argsort(time_ms, kind="stable")
    events = {"crystal1": crystal1[order], "crystal2": crystal2[order], "time_ms": time_ms[order]}
    if tof:
        tof_bin = np.where(swap, scanner.tof_bins - 1 - tof_bin, tof_bin)
        events["tof_bin"] = tof_bin[order]
    return events


def write_simulated_listmode(path, scanner, grid, data: dict, duration_s: float, seed: int,
                             overwrite: bool, attrs: dict) -> int:
    """Write the simulated counts as a medhpc list-mode file (rank 0); return the events."""
    if data["frames"] != 1:
        raise InputError("--listmode writes one acquisition; drop --frames (time windows of "
                         "pet-recon --time-windows select frames)")
    events = listmode_events(scanner, data["prompts"], duration_s, seed)
    write_listmode(path, scanner, grid, events, duration_s, multiplicative=data["multiplicative"],
                   additive=data["additive"], overwrite=overwrite, attrs=attrs,
                   factors={"attenuation": data["attenuation"],
                            "normalisation": data["normalisation"]})
    return len(events["crystal1"])
