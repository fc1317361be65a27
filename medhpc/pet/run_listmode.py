"""pet-recon --listmode: OSEM / MLEM over coincidence events spread across the ranks.

1. Read and check the list-mode description (medhpc HDF5 or CASToR), the factors
   (in the file or ``--factors``) and the time windows, once.
2. Sensitivity: the scanner's LORs, views split over the ranks, back-projected with
   their multiplicative factors (``G^T A^T m``, every TOF bin), summed over the ranks.
3. Per window (frame): each rank reads a block of the window's events; subset ``s``
   holds the events whose index in the window is ``s`` modulo the subsets. Each event
   is one measurement: its LOR (with TOF, centred on its TOF position), its factor
   and its additive term (:class:`medhpc.pet.osem.ListModeReconstructor`).
4. Write as pet-recon does (one frame: 3-D; several windows: 4-D).
"""

from __future__ import annotations

from dataclasses import asdict

import h5py
import numpy as np

from medhpc import backend
from medhpc.errors import InputError
from medhpc.parallel.geometry import block_range
from medhpc.pet.corrections import (CorrectionFiles, attenuation_factors, check_corrections,
                                    line_attenuation)
from medhpc.pet.listmode import (ListModeLayout, check_factor_shapes, parse_time_windows,
                                 read_events, read_listmode_layout, window_events)
from medhpc.pet.osem import ListModeReconstructor, SubsetShare
from medhpc.pet.projector import (JosephProjector, LorTofKernels, TofSpec, axis_aligned_grid,
                                  sinogram_projector, tof_spec)
from medhpc.pet.run import PetRecon, output_grid
from medhpc.pet.scanner import (SPEED_OF_LIGHT_MM_PER_PS, crystal_pair_lors, crystal_positions,
                                load_scanner, plane_members)
from medhpc.pet.sinogram import read_layout

#: Views back-projected per call while computing the sensitivity (bounds the LOR memory).
SENSITIVITY_VIEWS = 16
#: Events read per call (bounds the reading memory; the events stay on the rank).
READ_EVENTS = 1 << 22


class ListModeRecon(PetRecon):
    """One list-mode pet-recon run on every rank (see the module notes)."""

    def __init__(self, run, listmode, out, settings, scanner=None, factors=None,
                 time_windows=None, image_shape=None, voxel_size_mm=None, mu_map=None,
                 **options):
        self._scanner_request = scanner
        self._factors_request = factors
        self._windows_request = time_windows
        self._mu_map_request = mu_map
        super().__init__(run, listmode, out, settings, decomp="auto", image_shape=image_shape,
                         voxel_size_mm=voxel_size_mm, **options)
        self.windows, self.factor_path, self.attenuation = self.world.agree(
            self._validated_listmode)

    def _validated_inputs(self, listmode, decomp, image_shape, voxel_size_mm):
        if self.settings.algorithm == "nmf":
            raise InputError("--algorithm nmf models dynamic sinograms; list-mode data "
                             "reconstruct frame by frame with --time-windows")
        scanner = load_scanner(self._scanner_request) if self._scanner_request else None
        layout = read_listmode_layout(listmode, scanner)
        grid = output_grid(layout, image_shape, voxel_size_mm)
        origin_mm, voxel_mm = axis_aligned_grid(grid, listmode)
        return layout, grid, origin_mm, voxel_mm, "events"

    def _validated_listmode(self):
        layout: ListModeLayout = self.layout
        windows = parse_time_windows(self._windows_request, layout.duration_s)
        if len(windows) > 1 and (self.resume or self.checkpoint_every):
            raise InputError("--resume and --checkpoint-every need one time window; "
                             "reconstruct the windows in separate runs to checkpoint them")
        for window in windows:
            first, last = window_events(layout, *window)
            if last - first < self.settings.n_subsets:
                raise InputError(f"{layout.path}: {last - first} events in the window "
                                 f"{window[0]:g}-{window[1]:g} s; expected at least one per "
                                 f"subset ({self.settings.n_subsets})")
        factor_path = None
        if self._factors_request:
            factors = read_layout(self._factors_request)
            if factors.kind != "medhpc":
                raise InputError(f"{factors.path}: --factors needs a medhpc sinogram file "
                                 f"(multiplicative and additive); convert with 'medhpc "
                                 f"pet-convert'")
            if factors.scanner != layout.scanner:
                raise InputError(f"{factors.path}: factors for scanner '{factors.scanner.name}', "
                                 f"but the events are of scanner '{layout.scanner.name}'")
            if factors.frames > 1:
                raise InputError(f"{factors.path}: {factors.frames} frames; --factors needs a "
                                 f"static sinogram (one frame)")
            with h5py.File(factors.path, "r") as h5:
                check_factor_shapes(layout, {name: tuple(h5[name].shape)
                                             for name in ("multiplicative", "additive")},
                                    factors.path)
            factor_path = factors.path
        elif layout.has_factors:
            factor_path = layout.path
        elif layout.event_fields:
            raise InputError(f"{layout.path}: the events carry corrections ("
                             f"{', '.join(layout.event_fields)}), but the sensitivity image needs "
                             f"them for every LOR; pass --factors SINOGRAM.h5 with its "
                             f"multiplicative and additive sinograms")
        attenuation = None
        if self._mu_map_request is not None:
            if layout.event_fields:
                raise InputError(f"{layout.path}: the events carry their own corrections; "
                                 f"--mu-map gives the attenuation of data without them")
            if factor_path is not None:
                with h5py.File(factor_path, "r") as h5:
                    if "normalisation" not in h5:
                        raise InputError(
                            f"{factor_path}: holds 'multiplicative' (attenuation x "
                            f"normalisation) but no 'normalisation'; with --mu-map the "
                            f"normalisation is needed on its own")
            attenuation = check_corrections(CorrectionFiles(mu_map=self._mu_map_request), layout)
        return windows, factor_path, attenuation

    # -- plan ----------------------------------------------------------------------------
    def plan(self) -> dict:
        """The windows' events and every rank's share of them."""
        ranges = [window_events(self.layout, *window) for window in self.windows]
        ranks = []
        for rank in range(self.world.size):
            events = [int(np.subtract(*block_range(stop - start, self.world.size, rank)[::-1]))
                      for start, stop in ranges]
            ranks.append({"rank": rank, "events_per_window": events,
                          "event_bytes": int(max(events, default=0) * EVENT_BYTES)})
        return {"decomposition": "events", "scanner": self.layout.scanner.name,
                "listmode": str(self.layout.path), "format": self.layout.kind,
                "events": self.layout.n_events, "tof": self.layout.tof,
                "tof_calibration": self._timing_path(), "windows_s": self.windows, "events_per_window": [b - a for a, b in ranges],
                "factors": str(self.factor_path) if self.factor_path else None,
                "image_shape": list(self.grid.shape), "settings": asdict(self.settings),
                "ranks_detail": ranks}

    # -- compute -------------------------------------------------------------------------
    def compute(self):
        """Reconstruct every window; ``(image, history)`` on every rank."""
        sensitivity = self.sensitivity()
        images, histories = [], []
        for index, window in enumerate(self.windows):
            first, last = window_events(self.layout, *window)
            self.run.log.info(f"window {window[0]:g}-{window[1]:g} s: {last - first:,} events")
            shares = self.event_shares(first, last, window[1] - window[0])
            reconstructor = ListModeReconstructor(
                self.run, shares, self.grid.shape, self.voxel_mm, self.settings, self.world,
                sensitivity, additive_total=self._additive_total(window[1] - window[0]),
                support=self.support)
            if len(self.windows) == 1:
                with self._checkpointer(self.world, self.checkpoint_path,
                                        {"windows": self.windows}) as checkpointer:
                    state = self._iterate(reconstructor, checkpointer)
                if self.world.is_root:
                    self.checkpoint_path.unlink(missing_ok=True)
            else:
                state = self._iterate(reconstructor, None)
            images.append(reconstructor.postfilter(state.image, self.voxel_mm))
            histories.append(state.log_likelihood)
        if len(images) == 1:
            return images[0], histories[0]
        return np.stack(images), histories

    @property
    def _multiplicative_name(self) -> str:
        """The factor dataset multiplying the projections: all of it, or only the
        normalisation when --mu-map gives the attenuation."""
        return "normalisation" if self.attenuation is not None else "multiplicative"

    def _factors(self, name: str, views):
        """The factor sinogram ``name`` at some views (None without factors)."""
        if self.factor_path is None:
            return None
        with h5py.File(self.factor_path, "r") as h5:
            dataset = h5[name]
            block = dataset[:, int(views[0]):int(views[-1]) + 1]
            return np.asarray(block, np.float32)

    def _additive_total(self, window_s: float) -> float:
        if self.factor_path is None:
            return 0.0
        total = 0.0
        with h5py.File(self.factor_path, "r") as h5:
            dataset = h5["additive"]
            for view in range(0, dataset.shape[1], 8):
                total += float(np.sum(dataset[:, view:view + 8], dtype=np.float64))
        return total * self._window_fraction(window_s)

    def _window_fraction(self, window_s: float) -> float:
        """The share of the acquisition's additive counts (the factors') in a window."""
        return window_s / self.layout.duration_s

    def sensitivity(self):
        """``G^T A^T m / n_subsets`` over every LOR of the scanner (views over the ranks)."""
        scanner = self.layout.scanner
        start, stop = block_range(scanner.n_views, self.world.size, self.world.rank)
        tof = tof_spec(scanner) if self.layout.tof else None
        image = np.zeros(self.grid.shape, np.float32)
        for first in range(start, stop, SENSITIVITY_VIEWS):
            views = np.arange(first, min(first + SENSITIVITY_VIEWS, stop))
            with self.run.stage("LOR geometry", "other"):
                projector = sinogram_projector(scanner, self.grid.shape, self.origin_mm,
                                               self.voxel_mm, views=views,
                                               device=self.run.device, tof=tof,
                                               timing=self.timing)
            with self.run.stage("read factors", "io"):
                factors = self._factors(self._multiplicative_name, views)
            weights = (np.ones((scanner.n_radial, len(views), scanner.n_planes), np.float32)
                       if factors is None else factors)
            if self.attenuation is not None:
                with self.run.stage("attenuation", "kernel"):
                    weights = weights * attenuation_factors(self.attenuation, scanner, views,
                                                            slice(None), self.run.device)
            weights = (weights / self.settings.n_subsets).reshape(-1)
            with self.run.stage("sensitivity", "kernel"):
                image += backend.to_host(projector.back_every_bin(weights))
        from medhpc.filters.gaussian import GaussianFilter

        psf = GaussianFilter(self.settings.psf_fwhm_mm, self.voxel_mm, self.run.device, False)
        with self.run.stage("resolution model", "kernel"):
            image = backend.to_host(psf.apply(backend.to_device(image, self.run.device)))
        with self.run.stage("allreduce", "comm"):
            self.world.allreduce_(image)
        return image

    def event_shares(self, first: int, last: int, window_s: float) -> list[SubsetShare]:
        """This rank's block of events ``[first, last)``, one share per subset."""
        layout, scanner = self.layout, self.layout.scanner
        start, stop = block_range(last - first, self.world.size, self.world.rank)
        parts = []
        # every rank takes part in the same number of checked reads (agree_all is collective)
        reads = max(1, max(-(-(b - a) // READ_EVENTS) for a, b in
                           (block_range(last - first, self.world.size, rank)
                            for rank in range(self.world.size))))
        with self.run.stage("read events", "io"):
            for read in range(reads):
                begin = first + start + read * READ_EVENTS
                end = min(begin + READ_EVENTS, first + stop)
                block = self.world.agree_all(lambda b=begin, e=end: read_events(layout, b, e)
                                             if e > b else None)
                if block is not None:
                    parts.append((begin, block))
        skipped = 0
        pieces = {name: [] for name in ("index", "crystal1", "crystal2", "lor", "reversed",
                                        "tof_mm", "tof_bin", "multiplicative", "additive")}
        with self.run.stage("event geometry", "other"):
            for begin, block in parts:
                lor, reversed_pair = crystal_pair_lors(scanner, block.crystal1, block.crystal2)
                keep = lor >= 0
                skipped += int(np.count_nonzero(~keep))
                pieces["index"].append(begin - first + np.flatnonzero(keep))
                for name, values in (("crystal1", block.crystal1), ("crystal2", block.crystal2),
                                     ("lor", lor), ("reversed", reversed_pair),
                                     ("tof_mm", block.tof_mm), ("tof_bin", block.tof_bin),
                                     ("multiplicative", block.multiplicative),
                                     ("additive", block.additive_rate)):
                    if values is not None:
                        pieces[name].append(values[keep])
        events = {name: np.concatenate(values) if values else None
                  for name, values in pieces.items()}
        if events["index"] is None:
            events = {name: np.zeros(0, np.int64) for name in ("index", "crystal1", "crystal2",
                                                               "lor")}
            empty_tof = layout.tof or None
            events.update(reversed=np.zeros(0, bool),
                          tof_mm=np.zeros(0, np.float32) if empty_tof else None,
                          tof_bin=np.zeros(0, np.int64) if empty_tof else None,
                          multiplicative=None, additive=None)
        skipped = self.world.sum(skipped)
        if skipped:
            self.run.log.notice(f"{skipped:,} events join crystals outside the sinogram's LORs "
                                f"(radial trim or ring difference); they are skipped")
        multiplicative, additive = self._event_factors(events, window_s)
        positions = crystal_positions(scanner).transpose(1, 0, 2).reshape(-1, 3)
        if self.attenuation is not None and len(multiplicative):
            with self.run.stage("attenuation", "kernel"):
                multiplicative = multiplicative * line_attenuation(
                    self.attenuation, positions[events["crystal1"]],
                    positions[events["crystal2"]], self.run.device)
        tof = self._event_tof()
        shares = []
        for subset in range(self.settings.n_subsets):
            chosen = np.flatnonzero(events["index"] % self.settings.n_subsets == subset)
            # in LOR order the rays walk the image as a sinogram's do (the sum is the same)
            chosen = chosen[np.argsort(events["lor"][chosen], kind="stable")]
            with self.run.stage("event geometry", "other"):
                xstart = positions[events["crystal1"][chosen]]
                xend = positions[events["crystal2"][chosen]]
                kernels = None
                if tof is not None:
                    tof_mm = events["tof_mm"][chosen]
                    if self.timing is not None:  # the true position and the pair's own width
                        kernels = self.timing.pair_kernels(events["crystal1"][chosen],
                                                           events["crystal2"][chosen])
                        tof_mm = tof_mm - kernels.offset_mm
                        kernels = LorTofKernels(kernels.sigma_mm, np.zeros(1, np.float32))
                    xstart, xend = centred_on_tof(xstart, xend, tof_mm)
                projector = JosephProjector(xstart, xend, self.grid.shape, self.origin_mm,
                                            self.voxel_mm, device=self.run.device, tof=tof,
                                            tof_kernels=kernels)
            with self.run.stage("host to device", "transfer"):
                arrays = [backend.to_device(np.ascontiguousarray(a, np.float32), self.run.device)
                          for a in (np.ones(chosen.size, np.float32), multiplicative[chosen],
                                    additive[chosen])]
            shares.append(SubsetShare(projector, *arrays, tof_bins=1))
        return shares

    def _event_tof(self) -> TofSpec | None:
        """One TOF bin per event, centred on it: the scanner's bin, or the CASToR step."""
        layout, scanner = self.layout, self.layout.scanner
        if not layout.tof:
            return None
        return TofSpec(bins=1, bin_mm=self._event_tof_bin_mm(), sigma_mm=scanner.tof_sigma_mm)

    def _event_tof_bin_mm(self) -> float:
        layout = self.layout
        if layout.kind == "castor" and layout.tof_quantisation_ps > 0:
            return 0.5 * SPEED_OF_LIGHT_MM_PER_PS * layout.tof_quantisation_ps
        return layout.scanner.tof_bin_mm

    def _event_factors(self, events: dict, window_s: float):
        """Each event's multiplicative factor and additive term (expected counts in its bin)."""
        n = events["lor"].shape[0]
        layout, scanner = self.layout, self.layout.scanner
        multiplicative = events["multiplicative"]
        additive = None
        if events["additive"] is not None:  # CASToR rates, per LOR
            additive = events["additive"] * window_s
        if self.factor_path is not None:
            with self.run.stage("read factors", "io"):
                looked_up_m, looked_up_a = self._lookup_factors(events)
            multiplicative = looked_up_m if multiplicative is None else multiplicative
            if additive is None:
                additive = looked_up_a * self._window_fraction(window_s)
        if multiplicative is None:
            multiplicative = np.ones(n, np.float32)
        if additive is None:
            additive = np.zeros(n, np.float32)
        elif layout.tof and (layout.kind == "castor"):
            # a LOR's additive term spread evenly over the scanner's TOF range
            additive = additive * (self._event_tof_bin_mm() / (scanner.tof_bins
                                                               * scanner.tof_bin_mm))
        return multiplicative.astype(np.float32), additive.astype(np.float32)

    def _lookup_factors(self, events: dict):
        """The factor sinograms at the events' LORs (and TOF bins), one view window at a time."""
        scanner = self.layout.scanner
        shape = scanner.sinogram_shape[:3]
        radial, view, plane = np.unravel_index(events["lor"], shape)
        tof_bin = None
        if self.layout.tof and self.layout.kind == "medhpc":
            bins = scanner.tof_bins
            tof_bin = np.where(events["reversed"], bins - 1 - events["tof_bin"],
                               events["tof_bin"])
        multiplicative = np.zeros(view.shape, np.float32)
        additive = np.zeros(view.shape, np.float32)
        order = np.argsort(view, kind="stable")
        bounds = np.searchsorted(view[order], np.arange(0, scanner.n_views + 8, 8))
        with h5py.File(self.factor_path, "r") as h5:
            for window, (low, high) in enumerate(zip(bounds[:-1], bounds[1:])):
                if low == high:
                    continue
                picked = order[low:high]
                views = slice(8 * window, 8 * window + 8)
                index = (radial[picked], view[picked] - 8 * window, plane[picked])
                multiplicative[picked] = h5[self._multiplicative_name][:, views][index]
                block = h5["additive"][:, views]
                additive[picked] = block[index + ((tof_bin[picked],) if tof_bin is not None
                                                  else ())]
        if scanner.span > 1:  # a plane's additive counts spread over its ring pairs' LORs
            additive /= np.diff(plane_members(scanner)[1]).astype(np.float32)[plane]
        return multiplicative, additive


#: Bytes an event takes on its rank (LOR end points, factor, additive, count, ratio, projection).
EVENT_BYTES = 24 + 5 * 4


def centred_on_tof(xstart, xend, tof_mm):
    """LORs moved along themselves so that their midpoint is the event's TOF position,
    lengthened by twice the shift so that they still span the image (float32)."""
    xstart = np.asarray(xstart, np.float64)
    xend = np.asarray(xend, np.float64)
    middle = 0.5 * (xstart + xend)
    direction = xend - xstart
    length = np.linalg.norm(direction, axis=1, keepdims=True)
    unit = direction / np.where(length > 0, length, 1.0)
    shift = np.asarray(tof_mm, np.float64)[:, None]
    half = 0.5 * length + np.abs(shift)
    centre = middle + shift * unit
    return (centre - half * unit).astype(np.float32), (centre + half * unit).astype(np.float32)


