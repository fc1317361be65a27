"""tnr-register: rebuild a volume from serial sections by trajectory-based registration.

1. Check the input once (count, readable images, sizes; mixed sizes are padded).
2. Match every neighbouring pair (i, i+1), pairs spread over the ranks by a
   dynamic queue: working-level stain channel and tissue mask of both sections,
   rigid pre-alignment, grid patches matched by zero-mean NCC, outlier rejection.
3. Flag sections: blank (little tissue or texture), off-stain (mean colour far
   from the stack's), unmatched (too few accepted matches on both sides). Unmatched
   sections are bridged by matching their matched neighbours directly.
4. On the gathered pair results: rigid transforms chained from the centre
   section, trajectories chained from seeds in the centre section, smoothed along
   z (``tnr``), made straight (``pairwise``), or only the rigid chain (``none``);
   a thin-plate-spline warp per section from (target, observed) positions.
5. Sections warped across the ranks (block split) and written without gathering
   (HDF5 parts behind one virtual dataset); ``--fields``, JSON log and QC picture.
"""

from __future__ import annotations

import json
import signal
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from medhpc import backend
from medhpc.errors import InputError
from medhpc.io.atomic import atomic_path, check_output_free, pending_path, publish_together
from medhpc.io.geometry import ImageGeometry
from medhpc.parallel.geometry import block_range, slab
from medhpc.parallel.work import map_items
from medhpc.tnr import rigid, trajectories
from medhpc.tnr.flags import (SectionFlags, flag_sections, flag_strain, local_strain,
                              uncovered_tissue)
from medhpc.tnr.intensity import IntensityMaps
from medhpc.tnr.matching import STATUS_NAMES, Matches, grid_axes, match_sections
from medhpc.tnr.preprocess import WorkingSection, downsample, prepare_section
from medhpc.tnr.sources import SectionStack, open_stack
from medhpc.tnr.warpfield import SectionWarp, fitted_warp, rigid_warp
from medhpc.runtime.checkpoint import (CheckpointStop, StopSignals, StoppedBeforeFirstIteration,
                                      plain_data)
from medhpc.runtime.runlog import write_run_log
from medhpc.runtime.timing import peak_memory_mb
from medhpc.tnr.settings import INTERPOLATION_ORDER, OutputSettings, TnrSettings
from medhpc.tnr.wholeslide import memory_plan, output_tiles, region_cap_pixels, warp_tile

TILE_ROWS = 512
NCC_BINS = np.linspace(-1.0, 1.0, 41)


@dataclass
class PairResult:
    """What matching one pair (a, b) gives (small; gathered on every rank)."""

    a: int
    b: int
    transform: np.ndarray
    matches: Matches
    sections: dict                 # {index: statistics of the section}
    tissue_nodes: dict             # {index: bool (gy, gx) tissue at the grid nodes}
    uncovered: dict = None         # {index: bool map, glass where the other has tissue}

    @property
    def accepted_fraction(self) -> float:
        total = len(self.matches.status)
        return float(np.count_nonzero(self.matches.accepted)) / total if total else 0.0


def write_pair(path, result: PairResult, fingerprint: str) -> None:
    """One matched pair as HDF5 arrays and JSON text (the ``--resume`` store)."""
    import h5py

    with h5py.File(path, "w") as h5:
        h5.attrs["fingerprint"] = fingerprint
        h5.attrs["pair"] = [result.a, result.b]
        h5.attrs["sections"] = json.dumps({str(k): v for k, v in result.sections.items()})
        h5["transform"] = result.transform
        for name in ("points", "offsets", "ncc", "status"):
            h5[f"matches/{name}"] = getattr(result.matches, name)
        for index, nodes in result.tissue_nodes.items():
            h5[f"tissue_nodes/{index}"] = np.asarray(nodes, bool)
        for index, uncovered in (result.uncovered or {}).items():
            h5[f"uncovered/{index}"] = np.asarray(uncovered, bool)


def read_pair(path, a: int, b: int, fingerprint: str) -> PairResult | None:
    """The pair saved by :func:`write_pair` if it is pair (a, b) of the same fingerprint."""
    import h5py

    with h5py.File(path, "r") as h5:
        if h5.attrs["fingerprint"] != fingerprint or list(h5.attrs["pair"]) != [a, b]:
            return None
        matches = Matches(*(np.asarray(h5[f"matches/{name}"][()])
                            for name in ("points", "offsets", "ncc", "status")))
        transform = np.asarray(h5["transform"][()], np.float64)
        if transform.shape != (3, 3) or len({len(matches.points), len(matches.status)}) != 1:
            return None
        sections = {int(k): v for k, v in json.loads(h5.attrs["sections"]).items()}
        nodes = {int(k): np.asarray(v[()], bool) for k, v in h5["tissue_nodes"].items()}
        uncovered = {int(k): np.asarray(v[()], bool) for k, v in h5["uncovered"].items()}
    return PairResult(a, b, transform, matches, sections, nodes, uncovered)


def section_statistics(section: WorkingSection) -> dict:
    return {"tissue_fraction": section.tissue_fraction, "texture": section.texture,
            "mean_colour": list(section.mean_colour),
            "od_direction": list(section.od_direction),
            "quantiles": [list(row) for row in section.quantiles]}


def solve_trajectories(settings: TnrSettings, count: int, shape, pairs: dict,
                       matched: list[int], flags: SectionFlags | None = None) -> dict:
    """The rigid chain, the trajectories and their targets (cheap; the same on every rank).

    ``matched`` is the chain; ``flags`` gives the leaves (warped from a neighbour)
    and the weights of doubtful sections in the placement estimate and the smoothing.
    Returns the record: ``reference``, ``rigid`` (the chain), ``fallback`` (each
    section's output -> input rigid map where too few trajectories reach it) and,
    unless the mode is ``none``, ``observed``, ``target`` and ``valid``.
    """
    flags = flags or SectionFlags()
    reference = min(matched, key=lambda i: (abs(i - (count - 1) / 2), i))
    chained = rigid.chain_from_centre({(a, b): pairs[(a, b)].transform
                                       for a, b in zip(matched, matched[1:])}, matched, reference)
    for leaf in sorted(flags.leaves, key=lambda s: (abs(s - reference), s)):
        if leaf > reference and leaf - 1 in chained and (leaf - 1, leaf) in pairs:
            chained[leaf] = pairs[(leaf - 1, leaf)].transform @ chained[leaf - 1]
        elif leaf < reference and leaf + 1 in chained and (leaf, leaf + 1) in pairs:
            chained[leaf] = np.linalg.inv(pairs[(leaf, leaf + 1)].transform) @ chained[leaf + 1]
    for i in range(count):
        if i not in chained:
            nearest = min(matched, key=lambda m: (abs(m - i), m))
            chained[i] = chained[nearest]
    transforms = np.stack([chained[i] for i in range(count)])
    weights = flags.weights(count)
    record = {"reference": reference, "rigid": transforms, "fallback": transforms,
              "weights": weights}
    if settings.mode == "none":
        return record
    leaves = sorted(flags.leaves)
    grid = settings.match.grid
    keys = set(zip(matched, matched[1:]))
    keys |= {key for leaf in leaves for key in ((leaf - 1, leaf), (leaf, leaf + 1))
             if key in pairs}
    fields = {(a, b): trajectories.pair_field(a, b, shape, grid, pairs[(a, b)].matches,
                                              pairs[(a, b)].transform) for a, b in sorted(keys)}
    seeds = trajectories.seed_points(shape, grid, pairs_tissue(pairs, reference))
    observed, valid = trajectories.chain_trajectories(fields, matched, count, reference, seeds,
                                                      shape, leaves)
    if settings.mode == "tnr":
        placed = trajectories.placement_free_frame(observed, valid, transforms, weights, shape,
                                                   settings.placement)
        target = trajectories.smooth_along_z(placed["frame"], valid, settings.sigma,
                                             flags.point_weights(observed, valid))
        strain = local_strain(placed["frame"], target, valid, seeds, grid)
        record["strain"] = strain
        if flag_strain(flags, strain):
            # the torn or folded sections count less; solve again
            weights = flags.weights(count)
            record["weights"] = weights
            placed = trajectories.placement_free_frame(observed, valid, transforms, weights,
                                                       shape, settings.placement)
            target = trajectories.smooth_along_z(placed["frame"], valid, settings.sigma,
                                                 flags.point_weights(observed, valid))
        record["fallback"] = np.stack([p @ np.linalg.inv(d)
                                       for p, d in zip(placed["placement"], placed["drift"])])
        record.update(placement=placed["placement"], drift=placed["drift"],
                      drift_ratio=placed["drift_ratio"])
    else:
        target = trajectories.straight(observed, valid, reference)
    record.update(observed=observed, target=target, valid=valid)
    return record


def fit_warps(settings: TnrSettings, shape, record: dict, sections) -> dict:
    """``{section: SectionWarp}`` (output -> input, working pixels) for ``sections``."""
    step = max(2, settings.match.grid // 4)
    if settings.mode == "none":
        return {i: rigid_warp(record["rigid"][i], shape, step) for i in sections}
    return {i: fitted_warp(record["target"][:, i], record["observed"][:, i], shape, step,
                           settings.tps_smoothing, record["fallback"][i]) for i in sections}


def write_section_volume(world, out: Path, volume: np.ndarray, own, geometry,
                         overwrite: bool) -> None:
    """Write a stack whose sections are split over the ranks, ``(z, y, x)`` or ``(c, z, y, x)``
    with this rank's block ``own``: HDF5 in parts behind one virtual dataset, other formats
    (TIFF, NIfTI: the channel mean) gathered and written on rank 0."""
    suffix = "".join(out.suffixes).lower()
    if suffix.endswith((".h5", ".hdf5")):
        from medhpc.parallel.slabs import write_slabs_hdf5

        write_slabs_hdf5(world, out, "volume", volume, own,
                         attrs={**geometry.to_attrs(), "units": "input intensity"},
                         overwrite=overwrite)
        return
    from medhpc.io.images import write_image

    parts = world.gather(volume)

    def write_whole():
        whole = np.concatenate(parts, axis=volume.ndim - 3)
        if volume.ndim == 4 and suffix.endswith((".nii", ".nii.gz")):
            whole = whole.mean(axis=0).astype(whole.dtype)
        write_image(out, whole, geometry, overwrite=overwrite)

    world.agree(write_whole)


def section_rows(pairs: dict, count: int, record: dict) -> list:
    """The measured evidence per section for the log (tissue fraction, texture, colour,
    local strain) and its weight in the solve."""
    statistics = {}
    for result in pairs.values():
        statistics.update(result.sections)
    rows = []
    for i in range(count):
        row = {"section": i, **{key: value for key, value in statistics.get(i, {}).items()
                                if key != "quantiles"}}
        if "strain" in record:
            row["strain_px"] = float(record["strain"][i])
        row["weight"] = float(record["weights"][i])
        rows.append(row)
    return rows


def section_work(stack: SectionStack, index: int) -> float:
    """Estimated matching work of one section: its size on disk (compressed pixels grow
    with tissue area and texture), or 1 where sections are not files of their own."""
    if stack.kind == "folder":
        try:
            return float(max(1, (Path(stack.source) / stack.names[index]).stat().st_size))
        except OSError:
            return 1.0
    return 1.0


def work_runs(items: list, work: list, count: int, longest: int = 8) -> list[list[int]]:
    """Indices of ``items`` cut into runs of consecutive items of about ``sum(work) / count``
    each (at most ``longest`` items per run)."""
    target = sum(work) / max(1, count)
    runs, current, load = [], [], 0.0
    for index, cost in enumerate(work):
        if current and (load + 0.5 * cost > target or len(current) == longest):
            runs.append(current)
            current, load = [], 0.0
        current.append(index)
        load += cost
    if current:
        runs.append(current)
    return runs


def snake_order(count: int, ranks: int) -> list[int]:
    """Positions of ``count`` items sorted largest first such that a cyclic split over
    ``ranks`` deals them in turns 0..r-1, r-1..0, 0..r-1, ... (greedy balance)."""
    dealt = [[] for _ in range(ranks)]
    for k in range(count):
        lap, place = divmod(k, ranks)
        dealt[place if lap % 2 == 0 else ranks - 1 - place].append(k)
    order = []
    for turn in range(max(len(d) for d in dealt)):
        order += [d[turn] for d in dealt if turn < len(d)]
    return order


def pairs_tissue(pairs: dict, section: int):
    for result in pairs.values():
        if section in result.tissue_nodes:
            return result.tissue_nodes[section]
    return None


class StackRegistration:
    """One tnr-register run on every rank (see the module notes for the steps)."""

    def __init__(self, run, source, out, settings: TnrSettings, fields=None, log_path=None,
                 png=False, resume=False, output: OutputSettings | None = None):
        self.run = run
        self.output_settings = output or OutputSettings()
        self.world = run.world
        self.settings = settings
        self.out = Path(out)
        stem = _stem(self.out)
        self.fields = Path(fields) if fields else None
        self.log_path = Path(log_path) if log_path else self.out.with_name(stem + ".json")
        self.png = self.out.with_name(stem + ".png") if png else None
        self.pairs_dir = self.out.with_name(stem + ".tnr-pairs")
        self.resume = resume
        self.kernels = backend.host_kernels("medhpc.tnr", run.device)
        self.stack: SectionStack = self.world.agree(lambda: self._validated(source))
        self.work_shape = tuple(n // settings.downsample for n in self.stack.shape)
        self._cache: dict[int, WorkingSection] = {}
        self.intensity = IntensityMaps.identity()
        self._levels_read: dict[int, dict] = {}
        self._signals: StopSignals | None = None

    def _validated(self, source) -> SectionStack:
        self.settings.check()
        self.output_settings.check()
        stack = open_stack(source)
        if min(stack.shape) // self.settings.downsample < self.settings.match.patch + 2:
            raise InputError(f"{source}: sections of {stack.shape[1]}x{stack.shape[0]} px at "
                             f"--downsample {self.settings.downsample} are smaller than a patch "
                             f"({self.settings.match.patch} px); expected larger sections or "
                             "a smaller --patch")
        suffix = "".join(self.out.suffixes).lower()
        if not suffix.endswith((".h5", ".hdf5", ".tif", ".tiff", ".nii", ".nii.gz", ".zarr")):
            raise InputError(f"{self.out}: unknown output format; expected .ome.zarr, "
                             ".ome.tif (pyramidal), .h5, .tif or .nii/.nii.gz")
        if (self.output_settings.compression == "jpeg"
                and np.dtype(stack.dtype) != np.uint8):
            raise InputError(f"{self.out}: --compression jpeg needs 8-bit input, got "
                             f"{stack.dtype}; expected zlib or none")
        if self.fields is not None and self.fields.suffix.lower() not in (".h5", ".hdf5"):
            raise InputError(f"{self.fields}: --fields is written as HDF5; expected .h5")
        return stack

    # -- plan ----------------------------------------------------------------------------
    def plan(self) -> dict:
        n = self.stack.count
        stack = self.stack
        tile = self.output_settings.tile
        input_tile_bytes = 0
        if stack.slides:
            from medhpc.io.wholeslide import choose_level

            ty, tx = stack.slides[0].tile_shape
            input_tile_bytes = ty * tx * stack.channels * np.dtype(stack.dtype).itemsize
            levels = [dict(zip(("level", "block"), choose_level(s, self.settings.downsample)))
                      for s in stack.slides]
        else:
            levels = [{"level": 0, "block": self.settings.downsample}] * n
        ranks = []
        for r in range(self.world.size):
            first, last = block_range(n, self.world.size, r)
            memory = memory_plan(self.work_shape, self.output_shape(), stack.channels,
                                 stack.dtype, tile, last - first, self.settings.full_res,
                                 self._pyramid(), self.fields is not None, input_tile_bytes)
            ranks.append({"rank": r, "sections_warped": [first, last],
                          "memory": memory, "memory_mb": round(memory["total_bytes"] / 2**20)})
        return {"sections": n, "section_shape": list(stack.shape),
                "working_shape": list(self.work_shape), "output_shape": list(self.output_shape()),
                "pixel_size_um": stack.pixel_size_um, "pairs": n - 1,
                "levels_read": {stack.names[i]: levels[i] for i in range(n)},
                "output": {"path": str(self.out), "pyramid": self._pyramid(), "tile": tile,
                           "tiles_per_section": len(list(output_tiles(self.output_shape(), tile))),
                           "region_cap_pixels": region_cap_pixels(tile),
                           "compression": self.output_settings.resolved_compression(stack)},
                "settings": plain_data(asdict(self.settings)), "ranks_detail": ranks}

    def _pyramid(self) -> bool:
        """Pyramidal OME-Zarr or OME-TIFF output, written tile by tile."""
        from medhpc.io.pyramid import is_zarr_path
        from medhpc.io.tiff import is_ome_path

        return is_zarr_path(self.out) or is_ome_path(self.out)

    def output_pixel_size_um(self):
        size = self.stack.pixel_size_um
        if size is None:
            return None
        scale = 1 if self.settings.full_res else self.settings.downsample
        return (size[0] * scale, size[1] * scale)

    # -- running ---------------------------------------------------------------------------
    def execute(self) -> None:
        if self.run.dry_run:
            self.run.print_plan(self.plan())
            return
        self.world.agree(self._check_outputs)
        stack = self.stack
        if stack.padded and self.world.is_root:
            self.run.log.notice(f"{len(stack.padded)} section(s) smaller than "
                                f"{stack.shape[1]}x{stack.shape[0]} px padded (centred): "
                                f"{', '.join(stack.names[i] for i in stack.padded)}")
        self.run.log.info(f"tnr-register: {stack.count} sections of {stack.shape[1]}x"
                          f"{stack.shape[0]} px, working level {self.work_shape[1]}x"
                          f"{self.work_shape[0]}, mode {self.settings.mode}, "
                          f"{self.world.size} rank(s), device {self.run.device}")
        with StopSignals(raise_while_idle=False) as self._signals:
            try:
                return self._reconstruct()
            finally:
                self._signals = None

    def _reconstruct(self) -> None:
        stack = self.stack
        pairs, flags, matched = self.match_stack()
        self._stop_if_signalled("matching")
        with self.run.stage("trajectories", "other"):
            # every rank solves the (small) trajectory problem itself: nobody waits
            record = solve_trajectories(self.settings, stack.count, self.work_shape, pairs,
                                        matched, flags)
        for index, reasons in sorted(flags.reasons.items()):
            self.run.log.notice(f"section {index} ({self.stack.names[index]}): "
                                f"{'; '.join(reasons)}")
        with self.run.stage("fit warps", "kernel"):
            start, stop = block_range(stack.count, self.world.size, self.world.rank)
            warps = fit_warps(self.settings, self.work_shape, record, range(start, stop))
        self.intensity = self.intensity_maps(pairs, flags)
        local, views, displacement = self.warp_sections(warps)
        self._stop_if_signalled("warping")
        # the volume, fields, picture, log and --timings appear together or not at all
        with publish_together():
            self.write_outputs(local, displacement)
            views = self.world.gather(views)
            if self.world.is_root:
                self._document = self._log_document(pairs, flags, matched, record)
            if self.fields is not None:
                with self.run.stage("write fields", "io"):
                    gathered = self.world.gather(warps)
                    every = ({i: w for part in gathered for i, w in part.items()}
                             if self.world.is_root else {})
                    self.world.agree(lambda: self._append_trajectories(
                        record, [every[i] for i in range(stack.count)]))
            if self.png is not None:
                with self.run.stage("picture", "io"):
                    self.world.agree(lambda: self._picture(views, record))
            timings = self.run.finish({"mode": self.settings.mode})
            flagged = np.flatnonzero(record["weights"] < 1) if "weights" in record else []
            self.run.summary.update(sections=stack.count, mode=self.settings.mode,
                                    flagged=[int(i) for i in flagged])
            levels_read = self.world.gather(self._levels_read)
            peaks = self.world.gather(peak_memory_mb())
            if self.world.is_root:
                read = {}
                for part in levels_read:
                    read.update(part)
                plan_mb = [round(r["memory"]["total_bytes"] / 2**20, 1)
                           for r in self.plan()["ranks_detail"]]
                document = dict(self._document, timings=timings,
                                pixel_size_um=self.stack.pixel_size_um,
                                output_pixel_size_um=self.output_pixel_size_um(),
                                levels_read={self.stack.names[i]: read[i] for i in sorted(read)},
                                memory={"peak_rss_mb_per_rank": [round(p, 1) for p in peaks],
                                        "plan_mb_per_rank": plan_mb,
                                        "tile": self.output_settings.tile})
                write_run_log(self.log_path, "tnr-register", document,
                              overwrite=self.run.overwrite)
                self.run.log.info(f"log written to {self.log_path}")
        if self.world.is_root:
            _remove_tree(self.pairs_dir)  # the pairs matter only until the outputs exist
        self.world.barrier()  # every rank returns once rank 0 has published

    def _stop_if_signalled(self, stage: str) -> None:
        """Stop (exit 143) when a rank received a stop signal, before anything is written;
        the matched pairs stay for ``--resume``."""
        signum = self.world.max(self._signals.received or 0)
        if signum:
            raise CheckpointStop(signum, 0, self.pairs_dir, message=(
                f"{signal.Signals(signum).name} received: stopped after {stage}, before "
                f"writing; the matched pairs are kept in {self.pairs_dir}; rerun with "
                f"--resume to continue without matching again"))

    def _check_outputs(self) -> None:
        for path in (self.out, self.log_path, self.png, self.fields):
            if path is not None:
                check_output_free(path, self.run.overwrite)
        if not self.resume:
            _remove_tree(self.pairs_dir)

    # -- matching --------------------------------------------------------------------------
    def working_section(self, index: int) -> WorkingSection:
        if index not in self._cache:
            from medhpc.tnr.preprocess import intensity_scale

            with self.run.stage("read sections", "io"):
                working, self._levels_read[index] = self.stack.read_working(
                    index, self.settings.downsample)
                working /= np.float32(intensity_scale(self.stack.dtype))
            with self.run.stage("preprocess", "kernel"):
                self._cache[index] = prepare_section(working, self.settings.stain, 1)
            while len(self._cache) > 3:
                self._cache.pop(next(iter(self._cache)))
        return self._cache[index]

    def match_pair(self, pair) -> PairResult:
        a, b = pair
        saved = self._load_pair(a, b)
        if saved is not None:
            return saved
        signals = self._signals
        if signals is not None and signals.received:  # stopping: match no other pair
            raise CheckpointStop(signals.received, 0, self.pairs_dir)
        if signals is None:
            return self._matched_pair(a, b)
        with signals.at_once_until_busy():  # until a pair is kept, a signal stops at once
            result = self._matched_pair(a, b)
            signals.busy()
        return result

    def _matched_pair(self, a: int, b: int) -> PairResult:
        fixed, moving = self.working_section(a), self.working_section(b)
        grid = self.settings.match.grid
        ys, xs = grid_axes(self.work_shape, grid)
        nodes = np.ix_(np.round(ys).astype(int), np.round(xs).astype(int))
        with self.run.stage("rigid pre-alignment", "kernel"):
            transform = rigid.estimate_rigid(fixed.image, moving.image,
                                             self.settings.max_angle_deg, self.settings.mirror)
            aligned = rigid.resample(moving.image, transform)
        with self.run.stage("match patches", "kernel"):
            matches = match_sections(fixed.image, fixed.mask, aligned, self.settings.match,
                                     self.kernels.zncc_scores)
        with self.run.stage("rigid pre-alignment", "kernel"):
            uncovered = {a: uncovered_tissue(fixed.mask, moving.mask, transform),
                         b: uncovered_tissue(moving.mask, fixed.mask, np.linalg.inv(transform))}
        result = PairResult(a, b, transform, matches,
                            {a: section_statistics(fixed), b: section_statistics(moving)},
                            {a: fixed.mask[nodes], b: moving.mask[nodes]}, uncovered)
        self._save_pair(result)
        return result

    def _fingerprint(self) -> str:
        return json.dumps({"input": self.stack.source, "names": self.stack.names,
                           "settings": plain_data(asdict(replace(self.settings, mode="tnr",
                                                                sigma=1.0)))}, sort_keys=True)

    def _pair_path(self, a: int, b: int) -> Path:
        return self.pairs_dir / f"pair-{a:05d}-{b:05d}.h5"

    def _load_pair(self, a, b):
        """A saved pair of an interrupted run with the same input and settings, or None.

        Only arrays and JSON text are read (nothing is unpickled); a file that does not
        hold a complete pair is ignored and the pair matched again.
        """
        path = self._pair_path(a, b)
        if not (self.resume and path.exists()):
            return None
        try:
            return read_pair(path, a, b, self._fingerprint())
        except (OSError, KeyError, ValueError, TypeError):
            return None

    def _save_pair(self, result: PairResult) -> None:
        self.pairs_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._pair_path(result.a, result.b), overwrite=True, now=True) as tmp:
            write_pair(tmp, result, self._fingerprint())

    def _match(self, pair_list) -> dict:
        """Match pairs through the dynamic queue, in runs of consecutive pairs (a rank prepares
        the section they share once) of about equal estimated work, largest runs first."""
        work = [section_work(self.stack, a) + section_work(self.stack, b) for a, b in pair_list]
        runs = work_runs(pair_list, work, 4 * self.world.size)
        order = sorted(range(len(runs)), key=lambda r: -sum(work[i] for i in runs[r]))
        schedule = "dynamic"
        if self.world.size == 2:
            # the dynamic queue's root also works and answers only between its own runs, so
            # the other rank waits; two ranks take the runs largest first, in turns
            # (0, 1, 1, 0, 0, 1, ...), without a queue
            order = [order[k] for k in snake_order(len(order), 2)]
            schedule = "cyclic"
        show = self.run.log.counter(f"runs of pairs matched ({len(pair_list)} pairs)")
        try:
            results = map_items(self.world, [runs[r] for r in order],
                                lambda run: [self.match_pair(pair_list[i]) for i in run],
                                schedule=schedule, progress=show)
        finally:
            show.end()
        return {(r.a, r.b): r for chunk in results for r in chunk}

    def _stoppable_match(self, pair_list) -> dict:
        """:meth:`_match`, ending in one agreed :class:`CheckpointStop` on a stop signal."""
        try:
            return self._match(pair_list)
        except (CheckpointStop, StoppedBeforeFirstIteration) as stop:
            kept = self.world.agree(lambda: len(list(self.pairs_dir.glob("pair-*.h5")))
                                    if self.pairs_dir.exists() else 0)
            raise CheckpointStop(stop.signum, 0, self.pairs_dir, message=(
                f"{signal.Signals(stop.signum).name} received: stopped while matching, "
                f"{kept} of {self.stack.count - 1} pair(s) kept in {self.pairs_dir}; rerun "
                f"with --resume to continue")) from None

    def match_stack(self):
        """Match every neighbouring pair, flag sections, bridge the unmatched ones."""
        n = self.stack.count
        if self.resume and self.world.is_root and self.pairs_dir.exists():
            self.run.log.info(f"--resume: reusing matched pairs in {self.pairs_dir}")
        pairs = self._stoppable_match([(i, i + 1) for i in range(n - 1)])
        statistics = {}
        for result in pairs.values():
            statistics.update(result.sections)
        flags = flag_sections(n, statistics, pairs, self.settings.min_accepted_fraction)
        matched = flags.chain(n)
        if len(matched) < 2:
            raise InputError(f"{self.stack.source}: fewer than 2 sections could be matched "
                             f"(flags: {flags.reasons}); expected sections with tissue and "
                             "texture")
        bridges = [(a, b) for a, b in zip(matched, matched[1:]) if (a, b) not in pairs]
        if bridges:
            self.run.log.info(f"bridging {len(bridges)} pair(s) over doubtful sections: "
                              f"{bridges}")
            pairs.update(self._stoppable_match(bridges))
        return pairs, flags, matched

    # -- warping and writing ---------------------------------------------------------------
    def intensity_maps(self, pairs: dict, flags: SectionFlags) -> IntensityMaps:
        """The output's per-section intensity maps (the same on every rank)."""
        if self.settings.normalise == "none":
            return IntensityMaps.identity()
        from medhpc.tnr.preprocess import intensity_scale

        statistics = {}
        for result in pairs.values():
            statistics.update(result.sections)
        return IntensityMaps.from_statistics(statistics, self.stack.count,
                                             flags.weights(self.stack.count),
                                             intensity_scale(self.stack.dtype))

    def output_shape(self) -> tuple:
        return tuple(self.stack.shape) if self.settings.full_res else self.work_shape

    def warp_sections(self, warps: list[SectionWarp]):
        """Warp this rank's block of sections tile by tile; also the QC views and displacements.

        Each output tile (``--tile`` square) is warped channel by channel from only the
        input region its coordinates need (level 0 of a slide read by region with
        ``--full-res``, else the working-level image). Pyramidal outputs receive the
        tiles as they are made; other outputs are held for this rank's sections.
        """
        start, stop = block_range(self.stack.count, self.world.size, self.world.rank)
        ny, nx = self.output_shape()
        channels = self.stack.channels
        dtype = np.dtype(self.stack.dtype)
        pyramid = self._open_pyramid() if self._pyramid() else None
        local = None if pyramid else np.zeros((channels, stop - start, ny, nx), dtype)
        factor = self.settings.downsample if self.settings.full_res else 1
        order = INTERPOLATION_ORDER[self.settings.interpolation]
        fill = self.stack.background
        cap = region_cap_pixels(self.output_settings.tile)
        views = {}
        displacement = (np.zeros((2, stop - start) + self.work_shape, np.float32)
                        if self.fields is not None else None)

        def warp_tiles(index, regions, source_shape, tile_factor, shape, deliver):
            for rows, columns in output_tiles(shape, self.output_settings.tile):
                with self.run.stage("warp", "kernel"):
                    coord_y, coord_x = warps[index].coordinates(rows, shape[1], tile_factor,
                                                                columns)
                tile = warp_tile(coord_y, coord_x, regions, source_shape, cap,
                                 self.kernels.remap, order, fill, channels, self.run.stage)
                for c in range(channels):
                    tile[c] = self.intensity(index, c, tile[c])
                deliver(rows, columns, tile)

        def warp_block():
            for row, index in enumerate(range(start, stop)):
                with self.run.stage("read sections", "io"):
                    working, self._levels_read[index] = self.stack.read_working(
                        index, self.settings.downsample)
                after = np.zeros(self.work_shape, np.float32)

                def keep_view(rows, columns, tile):
                    after[rows, columns] = tile.mean(axis=0)

                def deliver(rows, columns, tile):
                    values = _cast(tile, dtype)
                    with self.run.stage("write volume", "io"):
                        if pyramid is not None:
                            pyramid.write_tile(index, rows, columns, values)
                        else:
                            local[:, row, rows, columns] = values
                    if not self.settings.full_res:
                        keep_view(rows, columns, tile)

                working_regions = lambda rows, columns: working[rows, columns]  # noqa: E731
                if self.settings.full_res:
                    with self.stack.regions(index) as regions:
                        warp_tiles(index, regions, self.stack.shape, factor, (ny, nx), deliver)
                    with self.run.stage("QC views", "kernel"):
                        warp_tiles(index, working_regions, self.work_shape, 1,
                                   self.work_shape, keep_view)
                else:
                    warp_tiles(index, working_regions, self.work_shape, 1, (ny, nx), deliver)
                if displacement is not None:
                    displacement[:, row] = warps[index].dense()
                before = working.mean(axis=2) if working.ndim == 3 else working
                views[index] = _qc_views(before, after)

        try:
            self.world.agree_all(warp_block)
        except BaseException:
            if pyramid is not None:
                pyramid.abort()
            raise
        self._pyramid_output = pyramid
        return local, views, displacement

    def _open_pyramid(self):
        from medhpc.io.pyramid import PyramidOutput, pyramid_layout

        layout = pyramid_layout((self.stack.count,) + tuple(self.output_shape()),
                                self.stack.channels, self.stack.dtype,
                                self.output_settings.tile, self.output_pixel_size_um(),
                                self.stack.background)
        return PyramidOutput(self.world, self.out, layout,
                             self.output_settings.resolved_compression(self.stack),
                             overwrite=self.run.overwrite)

    def write_outputs(self, local: np.ndarray, displacement) -> None:
        ny, nx = self.output_shape()
        n = self.stack.count
        scale = self.settings.downsample if not self.settings.full_res else 1
        geometry = ImageGeometry.from_spacing((n, ny, nx), (float(scale), float(scale), 1.0))
        size_um = self.output_pixel_size_um()
        if size_um is not None:  # the input's physical pixel size (mm in the geometry)
            geometry = ImageGeometry.from_spacing((n, ny, nx), (size_um[1] * 1e-3,
                                                                size_um[0] * 1e-3, 1.0))
        volume = (local if self.stack.channels == 3 else local[0]) if local is not None else None
        own = slab(n, self.world.size, self.world.rank)
        with self.run.stage("write volume", "io"):
            if local is None:
                start, stop = block_range(n, self.world.size, self.world.rank)
                self._pyramid_output.finish(range(start, stop))
            else:
                write_section_volume(self.world, self.out, volume, own, geometry,
                                     self.run.overwrite)
        if self.world.is_root:
            self.run.log.info(f"volume written to {self.out}")
        if displacement is not None:
            from medhpc.parallel.slabs import write_slabs_hdf5

            with self.run.stage("write fields", "io"):
                write_slabs_hdf5(self.world, self.fields, "displacement", displacement, own,
                                 attrs={"description": "output -> input displacement (y, x) in "
                                                       "working-level pixels"},
                                 overwrite=self.run.overwrite)

    def _picture(self, views, record) -> None:
        from medhpc.tnr.figures import qc_figure

        qc_figure(self.png, views, record, self.settings, self.run.overwrite)
        self.run.log.info(f"picture written to {self.png}")

    def _append_trajectories(self, record: dict, warps: list[SectionWarp]) -> None:
        import h5py

        from medhpc.tnr.registration_file import append_registration

        with h5py.File(pending_path(self.fields), "a") as h5:
            append_registration(h5, warps, self.stack, self.settings, self.output_shape(),
                                record.get("weights"))
            h5.create_dataset("rigid", data=record["rigid"])
            h5.attrs["reference_section"] = record["reference"]
            for name in ("observed", "target", "valid"):
                if name in record:
                    h5.create_dataset(f"trajectories/{name}", data=record[name],
                                      compression="gzip")
        self.run.log.info(f"fields written to {self.fields}")

    def _log_document(self, pairs, flags, matched, record) -> dict:
        peaks = np.concatenate([p.matches.ncc for p in pairs.values()] or [np.zeros(0)])
        counts = {name: 0 for name in STATUS_NAMES}
        pair_rows = []
        for (a, b), result in sorted(pairs.items()):
            row = result.matches.counts()
            for name, value in row.items():
                counts[name] += value
            accepted = result.matches.accepted
            median_ncc = float(np.median(result.matches.ncc[accepted])) if np.any(accepted) \
                else None
            pair_rows.append({"pair": [a, b], "patches": len(result.matches.status), **row,
                              "median_ncc": median_ncc,
                              "accepted_fraction": result.accepted_fraction,
                              "rotation_deg": float(np.rad2deg(rigid.rotation_angle(result.transform))),
                              "mirrored": rigid.is_mirrored(result.transform),
                              "translation_px": result.transform[:2, 2].tolist(),
                              "bridge": b - a > 1})
        total = max(1, sum(counts.values()))
        histogram, _ = np.histogram(peaks, bins=NCC_BINS)
        return {
            "command": "tnr-register", "input": self.stack.source, "output": str(self.out),
            "fields": str(self.fields) if self.fields else None, "ranks": self.world.size,
            "device": self.run.device, "settings": plain_data(asdict(self.settings)),
            "sections": self.stack.count, "section_shape": list(self.stack.shape),
            "working_shape": list(self.work_shape), "output_shape": list(self.output_shape()),
            "padded_sections": [self.stack.names[i] for i in self.stack.padded],
            "flagged_sections": {str(i): {"name": self.stack.names[i], "reasons": r,
                                          "role": ("excluded" if i in flags.excluded else
                                                   "leaf" if i in flags.leaves else
                                                   "down-weighted where the piece is missing"
                                                   if flags.weights(self.stack.count)[i] == 1
                                                   else "down-weighted")}
                                 for i, r in sorted(flags.reasons.items())},
            "matched_sections": matched, "reference_section": record["reference"],
            "pairs": pair_rows,
            "section_statistics": section_rows(pairs, self.stack.count, record),
            "placement_drift_ratio": record.get("drift_ratio"),
            "rejection_rates": {name: value / total for name, value in counts.items()},
            "ncc_histogram": {"edges": NCC_BINS.tolist(), "counts": histogram.tolist()},
        }


def _cast(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(values), info.min, info.max).astype(dtype)
    return values.astype(dtype)


def _qc_views(before: np.ndarray, after: np.ndarray) -> dict:
    ny, nx = after.shape
    before = before[: ny, : nx] if before.shape == after.shape else _fit(before, after.shape)
    return {"before_row": before[ny // 2].copy(), "after_row": after[ny // 2].copy(),
            "before_column": before[:, nx // 2].copy(), "after_column": after[:, nx // 2].copy(),
            "after_plane": after[:: max(1, ny // 256), :: max(1, nx // 256)].copy()}


def _fit(image: np.ndarray, shape) -> np.ndarray:
    factor = max(1, image.shape[0] // shape[0])
    small = downsample(image, factor)
    out = np.zeros(shape, np.float32)
    out[: min(shape[0], small.shape[0]), : min(shape[1], small.shape[1])] = \
        small[: shape[0], : shape[1]]
    return out


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", ".ome.zarr", ".zarr", ".nii.gz", ".nii", ".h5", ".hdf5",
                   ".tiff", ".tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
