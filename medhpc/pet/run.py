"""pet-recon: read the sinogram, spread it over the ranks, iterate, write the image.

1. Read and check the sinogram's layout once; choose the decomposition.
2. Each rank reads only its share (a block of every subset's views, a block of
   rebinned planes, or whole frames from a queue) and builds the projectors.
3. Sensitivity images, then OSEM sub-iterations (:mod:`medhpc.pet.osem`),
   checkpointing when due.
4. Post-filter, collect the image on rank 0, write image, JSON log and picture.
"""

from __future__ import annotations

import signal
from dataclasses import asdict, replace
from pathlib import Path

import h5py
import numpy as np

from medhpc import backend
from medhpc.errors import InputError
from medhpc.io.atomic import atomic_path, check_output_path, publish_together
from medhpc.io.geometry import ImageGeometry
from medhpc.io.images import check_image_output, check_same_grid, read_image, write_image
from medhpc.parallel.comm import World
from medhpc.parallel.geometry import block_range
from medhpc.parallel.work import map_items
from medhpc.pet import decomposition, sensitivity_cache
from medhpc.pet.timing import read_timing_calibration
from medhpc.pet.corrections import (CorrectionFiles, check_corrections, corrected_block,
                                    corrections_fingerprint)
from medhpc.pet.projector import (JosephProjector, axis_aligned_grid, sinogram_projector,
                                  tof_spec)
from medhpc.pet.osem import (OsemReconstructor, ReconSettings, ReconState, SubsetShare,
                             postfiltered)
from medhpc.pet.scanner import (direct_planes, field_of_view_mask, lor_endpoints,
                                plane_members, plane_ring_sums)
from medhpc.pet.sinogram import SinogramLayout, read_block, read_layout
from medhpc.runtime.checkpoint import (Checkpointer, CheckpointStop, StopSignals,
                                       StoppedBeforeFirstIteration)
from medhpc.runtime.runlog import write_run_log


def output_grid(layout: SinogramLayout, image_shape=None, voxel_size_mm=None) -> ImageGeometry:
    """The stored image grid, or a grid centred on the scanner from the overrides."""
    if image_shape is None and voxel_size_mm is None:
        return layout.image
    shape = tuple(image_shape) if image_shape else layout.image.shape
    spacing = tuple(voxel_size_mm) if voxel_size_mm else layout.image.spacing_mm
    return ImageGeometry.from_spacing(shape, spacing)


def check_planes_grid(layout: SinogramLayout, grid: ImageGeometry, origin_mm, voxel_mm) -> None:
    """Raise :class:`InputError` unless the image planes sit at the rebinned plane positions."""
    scanner = layout.scanner
    if scanner.has_ring_gaps:
        raise InputError(f"{layout.path}: --decomp planes rebins onto evenly spaced planes, but "
                         f"scanner '{scanner.name}' has gaps between its ring blocks; use "
                         f"--decomp views")
    nz = decomposition.rebinned_planes(scanner.rings)
    ring_z = scanner.ring_z_mm
    expected_z = ring_z[0] + 0.5 * scanner.ring_spacing_mm * np.arange(nz)
    image_z = origin_mm[2] + voxel_mm[2] * np.arange(grid.shape[0])
    if grid.shape[0] != nz or not np.allclose(image_z, expected_z, atol=1e-3):
        raise InputError(
            f"{layout.path}: --decomp planes needs image planes at the rebinned plane "
            f"positions ({nz} planes every {scanner.ring_spacing_mm / 2:g} mm from "
            f"z = {ring_z[0]:g} mm), but the image grid is {grid.describe()}; "
            f"use --decomp views or pass --image-shape/--voxel-size-mm accordingly")


class PetRecon:
    """One pet-recon run on every rank (see the module notes for the steps)."""

    def __init__(self, run, sinogram, out, settings: ReconSettings, decomp="auto",
                 image_shape=None, voxel_size_mm=None, resume=False, checkpoint_every=0,
                 png=False, log_path=None, sensitivity_cache=None, fov_mask=True,
                 corrections: CorrectionFiles | None = None, truth=None, tof_calibration=None,
                 prior=None):
        self.run = run
        self.world: World = run.world
        self.settings = settings
        self.out = Path(out)
        self.png = self.out.with_name(_stem(self.out) + ".png") if png else None
        self.log_path = Path(log_path) if log_path else self.out.with_name(_stem(self.out) + ".json")
        self.checkpoint_path = self.out.with_name(_stem(self.out) + ".checkpoint.h5")
        self.resume = resume
        self.checkpoint_every = checkpoint_every
        self.sensitivity_cache = Path(sensitivity_cache) if sensitivity_cache else None
        (self.layout, self.grid, self.origin_mm, self.voxel_mm, self.mode) = self.world.agree(
            lambda: self._validated_inputs(sinogram, decomp, image_shape, voxel_size_mm))
        self.tof = tof_spec(self.layout.scanner) if self.layout.tof else None
        self.timing = self.world.agree(lambda: self._timing(tof_calibration))
        self.corrections = self.world.agree(
            lambda: check_corrections(corrections, self.layout)) if corrections else None
        self.truth_path = self.world.agree(lambda: self._truth_path(truth))
        self.prior = self.world.agree(lambda: self._prior(prior))
        self.log_extra = {}  # what a caller adds to the JSON log
        self.support = field_of_view_mask(self.layout.scanner, self.grid.shape, self.origin_mm,
                                          self.voxel_mm) if fov_mask else None

    def _validated_inputs(self, sinogram, decomp, image_shape, voxel_size_mm):
        """Layout, image grid, (origin, voxel) and decomposition, checked once (rank 0)."""
        layout = read_layout(sinogram)
        if self.settings.n_subsets > layout.scanner.n_views:
            raise InputError(f"--subsets {self.settings.subsets}: the scanner has only "
                             f"{layout.scanner.n_views} views; expected at most that many subsets")
        grid = output_grid(layout, image_shape, voxel_size_mm)
        origin_mm, voxel_mm = axis_aligned_grid(grid, sinogram)
        mode = decomposition.choose_mode(decomp, layout.frames, self.world.size)
        if self.settings.algorithm == "nmf":
            mode = self._check_nmf(layout, decomp)
        if self.settings.algorithm == "dip":
            self._check_dip(layout, mode)
        if mode == "planes":
            check_planes_grid(layout, grid, origin_mm, voxel_mm)
        return layout, grid, origin_mm, voxel_mm, mode

    def _timing(self, path):
        """The TOF timing calibration, checked against the data (rank 0); None without."""
        if path is None:
            return None
        if self.mode == "planes":
            raise InputError(f"{path}: --tof-calibration gives each ring pair's LORs their own "
                             f"TOF kernel, which --decomp planes rebins away; use --decomp views")
        return read_timing_calibration(path, self.layout.scanner, self.layout.tof)

    def _timing_path(self) -> str | None:
        return None if self.timing is None else str(self.timing.path)

    def _check_dip(self, layout, mode) -> None:
        """DIP fits one static image with its views over the ranks; it needs PyTorch."""
        if mode != "views" or layout.frames > 1:
            raise InputError(f"{layout.path}: --algorithm dip reconstructs one static frame "
                             f"with its views over the ranks (--decomp views); this run would "
                             f"use --decomp {mode} on {layout.frames} frame(s)")
        if self.resume or self.checkpoint_every:
            raise InputError("--algorithm dip does not checkpoint yet: leave out --resume and "
                             "--checkpoint-every")
        try:
            import torch  # noqa: F401
        except ImportError:
            raise InputError("--algorithm dip needs PyTorch: pip install 'medhpc[train]'") \
                from None

    def _prior(self, path):
        """The --prior image on the output grid (rank 0), or None."""
        if path is None:
            return None
        if self.settings.algorithm != "dip":
            raise InputError(f"{path}: --prior is the network input of --algorithm dip; "
                             f"this run is {self.settings.algorithm}")
        from medhpc.io.images import read_image

        image, geometry = read_image(path, ndim=3)
        if not geometry.same_grid(self.grid):
            raise InputError(f"{path}: prior image on {geometry.describe()}; expected the "
                             f"output grid {self.grid.describe()}")
        return np.asarray(image, np.float32)

    def _check_nmf(self, layout, decomp) -> str:
        """NMF spreads frames over the ranks; it needs dynamic data with a frame per rank."""
        if layout.frames < 2:
            raise InputError(f"{layout.path}: --algorithm nmf models dynamic data, but the "
                             f"sinogram has one frame")
        if layout.frames < self.world.size:
            raise InputError(f"{layout.path}: {layout.frames} frames for {self.world.size} ranks; "
                             f"--algorithm nmf needs at least one frame per rank")
        if decomp not in ("auto", "frames"):
            raise InputError(f"--decomp {decomp}: --algorithm nmf spreads frames over the ranks")
        if self.resume or self.checkpoint_every:
            raise InputError("--algorithm nmf does not checkpoint: leave out --resume and "
                             "--checkpoint-every")
        if not 1 <= self.settings.components <= layout.frames:
            raise InputError(f"--components {self.settings.components}: expected 1 to the "
                             f"{layout.frames} frames")
        return "frames"

    def _truth_path(self, truth):
        """The known activity to compare with: ``--truth``, else (with ``--png``) the activity
        the data were simulated from when it is still there on the output grid."""
        if truth is not None:
            _, grid = read_image(truth, ndim=(3,))
            check_same_grid(truth, grid, self.out, self.grid, "truth")
            return Path(truth)
        if self.png is None:
            return None
        source = self._simulated_from()
        if source is None or not source.is_file():
            return None
        try:
            _, grid = read_image(source, ndim=(3,))
            check_same_grid(source, grid, self.out, self.grid, "truth")
        except InputError:
            return None
        return source

    def _simulated_from(self) -> Path | None:
        try:
            with h5py.File(self.layout.path, "r") as h5:
                activity = h5.attrs.get("activity")
        except OSError:
            return None
        return Path(activity) if isinstance(activity, str) and activity else None

    # -- plan --------------------------------------------------------------------------
    def plan(self) -> dict:
        """The decomposition and every rank's share and memory estimate."""
        scanner, size = self.layout.scanner, self.world.size
        shares = []
        for rank in range(size):
            share = {"rank": rank, "memory": decomposition.memory_per_rank(
                scanner, self.grid.shape, self.mode, size, rank, self.layout.tof_bins,
                self.settings.n_subsets)}
            if self.mode == "views":
                share["views_per_subset"] = [len(v) for v in decomposition.views_of_rank(
                    scanner.n_views, self.settings.n_subsets, size, rank)]
            elif self.mode == "planes":
                share["planes"] = list(decomposition.planes_of_rank(scanner.rings, size, rank))
            else:
                share["frames_static_estimate"] = list(decomposition.frames_of_rank(
                    self.layout.frames, size, rank))
            shares.append(share)
        return {"decomposition": self.mode, "scanner": scanner.name,
                "sinogram_shape": list(self.layout.prompts_shape), "image_shape": list(self.grid.shape),
                "lors": scanner.n_lors, "frames": self.layout.frames, "tof": self.layout.tof,
                "tof_calibration": self._timing_path(),
                "settings": asdict(self.settings), "ranks_detail": shares}

    # -- shares --------------------------------------------------------------------------
    def _projector(self, xstart, xend, image_shape, origin_mm):
        return JosephProjector(xstart.reshape(-1, 3), xend.reshape(-1, 3), image_shape, origin_mm,
                               self.voxel_mm, device=self.run.device, tof=self.tof)

    def _sinogram_projector(self, views):
        return sinogram_projector(self.layout.scanner, self.grid.shape, self.origin_mm,
                                  self.voxel_mm, views=views, device=self.run.device, tof=self.tof,
                                  timing=self.timing)

    def _share(self, projector, prompts, multiplicative, additive) -> SubsetShare:
        with self.run.stage("host to device", "transfer"):
            arrays = [backend.to_device(np.ascontiguousarray(a, dtype=np.float32).reshape(-1),
                                        self.run.device)
                      for a in (prompts, multiplicative, additive)]
        return SubsetShare(projector, *arrays, tof_bins=self.layout.tof_bins)

    def view_shares(self, views_per_subset, world: World, frame=None,
                    projectors=None) -> list[SubsetShare]:
        """Shares of every subset's given views, all planes (fully 3-D).

        The rank's views of all subsets are read in one pass: subsets interleave
        views, so reading subset by subset would decompress every chunk (8 views)
        once per subset. Bad values found by any rank of ``world`` stop all of them.
        ``projectors``: shares of the same views whose projectors these reuse (other frames).
        """
        wanted = np.unique(np.concatenate([np.asarray(v, np.int64) for v in views_per_subset]))
        with self.run.stage("read sinogram", "io"):
            block = world.agree_all(lambda: corrected_block(
                self.corrections, self.layout, read_block(self.layout, views=wanted, frame=frame),
                wanted, slice(None), self.run.device))
        shares = []
        for index, views in enumerate(views_per_subset):
            columns = np.searchsorted(wanted, views)
            if projectors is not None:
                projector = projectors[index].projector
            else:
                with self.run.stage("LOR geometry", "other"):
                    projector = self._sinogram_projector(views)
            shares.append(self._share(projector, block.prompts[:, columns],
                                      block.multiplicative[:, columns],
                                      block.additive[:, columns]))
        return shares

    def plane_shares(self, start: int, stop: int) -> list[SubsetShare]:
        """Shares of rebinned planes ``[start, stop)``: single-slice rebinning of the
        oblique planes onto the plane of their mean ring, every subset."""
        scanner = self.layout.scanner
        ring_sum = plane_ring_sums(scanner)
        members = np.diff(plane_members(scanner)[1]).astype(np.float32)
        wanted = np.flatnonzero((ring_sum >= start) & (ring_sum < stop))
        with self.run.stage("read sinogram", "io"):
            block = self.world.agree_all(lambda: corrected_block(
                self.corrections, self.layout, read_block(self.layout, planes=wanted),
                slice(None), wanted, self.run.device) if wanted.size else None)
        with self.run.stage("rebin", "other"):
            shape = (scanner.n_radial, scanner.n_views, stop - start)
            tof_shape = shape + ((self.layout.tof_bins,) if self.layout.tof else ())
            prompts = np.zeros(tof_shape, np.float32)
            additive = np.zeros(tof_shape, np.float32)
            multiplicative = np.zeros(shape, np.float32)
            if block is not None:
                target = ring_sum[wanted] - start
                np.add.at(prompts, (slice(None), slice(None), target), block.prompts)
                np.add.at(additive, (slice(None), slice(None), target), block.additive)
                np.add.at(multiplicative, (slice(None), slice(None), target),
                          block.multiplicative * members[wanted])
        slab_origin = self.origin_mm.copy()
        slab_origin[2] += start * self.voxel_mm[2]
        slab_shape = (stop - start,) + tuple(self.grid.shape[1:])
        plane_z = slab_origin[2] + self.voxel_mm[2] * np.arange(stop - start, dtype=np.float32)
        first_direct_plane = np.flatnonzero(direct_planes(scanner))[:1]
        shares = []
        for views in decomposition.views_of_rank(scanner.n_views, self.settings.n_subsets, 1, 0):
            with self.run.stage("LOR geometry", "other"):
                xstart, xend = lor_endpoints(scanner, views=views, planes=first_direct_plane)
                xstart = np.repeat(xstart, stop - start, axis=2)
                xend = np.repeat(xend, stop - start, axis=2)
                xstart[..., 2] = plane_z
                xend[..., 2] = plane_z
                projector = self._projector(xstart, xend, slab_shape, slab_origin)
            shares.append(self._share(projector, prompts[:, views], multiplicative[:, views],
                                      additive[:, views]))
        return shares

    # -- running -----------------------------------------------------------------------
    def execute(self) -> None:
        """Reconstruct and write every output (rank 0 writes)."""
        if self.run.dry_run:
            self.run.print_plan(self.plan())
            return
        self.world.agree(self._check_outputs)
        if self.sensitivity_cache is not None and self.mode != "views":
            self.run.log.notice(f"--sensitivity-cache is used with --decomp views only, not "
                                f"{self.mode}: computing the sensitivity images")
            self.sensitivity_cache = None
        self.run.log.info(f"pet-recon: {self.settings.algorithm}, {self.settings.iterations} "
                          f"iteration(s) x {self.settings.n_subsets} subset(s), decomposition "
                          f"{self.mode} over {self.world.size} rank(s), device {self.run.device}")
        image, history = self.compute()
        with publish_together():  # the image, picture, log and --timings appear together
            if self.world.is_root:
                with self.run.stage("write", "io"):
                    self._write_outputs(image, history)
            document = self.run.finish({"decomposition": self.mode})
            if self.world.is_root:
                self._append_timings(document)
        last = history[-1] if history else None
        self.run.summary.update(iterations=self.settings.iterations,
                                subsets=self.settings.n_subsets, decomposition=self.mode,
                                log_likelihood=last[-1] if isinstance(last, list) else last)

    def compute(self):
        """Reconstruct; return ``(image, log-likelihood history)`` on rank 0, ``(None, None)``
        elsewhere (views: the image on every rank)."""
        if self.settings.algorithm == "nmf":
            return self._reconstruct_nmf()
        if self.mode == "frames":
            return self._reconstruct_frames()
        if self.mode == "planes":
            return self._reconstruct_planes()
        return self._reconstruct_views()

    def _check_outputs(self) -> None:
        check_image_output(self.out, self.run.overwrite)
        if self.settings.algorithm == "nmf":
            check_output_path(self.factors_path(), self.run.overwrite, (".h5",))
        for path, suffixes in ((self.log_path, (".json",)), (self.png, (".png",))):
            if path is not None:
                check_output_path(path, self.run.overwrite, suffixes)

    def _checkpointer(self, world, path: Path, fingerprint_extra=None, signals=None,
                      quiet: bool = False) -> Checkpointer:
        fingerprint = {"sinogram": str(self.layout.path.resolve()), "mode": self.mode,
                       "ranks": self.world.size, **asdict(self.settings),
                       "image_shape": list(self.grid.shape),
                       **corrections_fingerprint(getattr(self, "corrections", None)),
                       **_timing_fingerprint(getattr(self, "timing", None)),
                       **(fingerprint_extra or {})}
        resume = self.resume and world.agree(path.exists)
        if self.resume and not resume and not quiet:
            self.run.log.notice(f"--resume: no checkpoint at {path}; starting from the beginning")
        return Checkpointer(world, path, every=self.checkpoint_every, resume=resume,
                            fingerprint=fingerprint, signals=signals)

    def _iterate(self, reconstructor: OsemReconstructor, checkpointer,
                 quiet: bool = False) -> ReconState:
        state = ReconState(image=reconstructor.initial_image())
        loaded = checkpointer.load() if checkpointer is not None else None
        if loaded is not None:
            iteration, saved = loaded
            state = ReconState(image=np.asarray(saved["image"], np.float32), iteration=iteration,
                               log_likelihood=list(np.asarray(saved["log_likelihood"])))
            (self.run.log.debug if quiet else self.run.log.info)(
                f"resuming from iteration {iteration} ({checkpointer.path})")
        return reconstructor.run_iterations(state, checkpointer,
                                            progress=None if quiet else self.run.log.progress)

    def _reconstruct_views(self):
        scanner = self.layout.scanner
        views = decomposition.views_of_rank(scanner.n_views, self.settings.n_subsets,
                                            self.world.size, self.world.rank)
        shares = self.view_shares(views, self.world)
        kind, extra = OsemReconstructor, {}
        if self.settings.algorithm == "dip":
            from medhpc.pet.dip import DipReconstructor

            kind, extra = DipReconstructor, {"prior": self.prior, "seed": self.run.seed}
        reconstructor = kind(self.run, shares, self.grid.shape, self.voxel_mm, self.settings,
                             reduce=self.world, sensitivities=self._cached_sensitivities(),
                             support=self.support, **extra)
        self._cache_sensitivities(reconstructor)
        with self._checkpointer(self.world, self.checkpoint_path) as checkpointer:
            state = self._iterate(reconstructor, checkpointer)
        if self.world.is_root:
            self.checkpoint_path.unlink(missing_ok=True)
        return reconstructor.postfilter(state.image, self.voxel_mm), state.log_likelihood

    def _cached_sensitivities(self):
        """The subsets' sensitivity images from ``--sensitivity-cache`` (views), or None."""
        if self.sensitivity_cache is None:
            return None
        expected = sensitivity_cache.fingerprint(self.layout.path, self.settings, self.grid,
                                                 self.layout.tof)
        expected.update(corrections_fingerprint(self.corrections))
        expected.update(_timing_fingerprint(self.timing))
        with self.run.stage("read sensitivity cache", "io"):
            images = self.world.agree_all(lambda: sensitivity_cache.load(self.sensitivity_cache,
                                                                         expected))
            if self.world.any(images is None):
                images = None
        if images is None:
            self.run.log.info(f"computing sensitivity images for {self.sensitivity_cache}")
        else:
            self.run.log.info(f"sensitivity images read from {self.sensitivity_cache}")
        self._sensitivity_fingerprint, self._sensitivities_cached = expected, images is not None
        return images

    def _cache_sensitivities(self, reconstructor) -> None:
        if self.sensitivity_cache is None or self._sensitivities_cached:
            return
        if self.world.is_root:
            with self.run.stage("write sensitivity cache", "io"):
                sensitivity_cache.save(self.sensitivity_cache, self._sensitivity_fingerprint,
                                       [backend.to_host(image)
                                        for image in reconstructor.sensitivities])

    def _reconstruct_planes(self):
        start, stop = decomposition.planes_of_rank(self.layout.scanner.rings, self.world.size,
                                                   self.world.rank)
        alone = self.world.split(self.world.rank)
        shares = self.plane_shares(start, stop)
        slab_shape = (stop - start,) + tuple(self.grid.shape[1:])
        reconstructor = OsemReconstructor(self.run, shares, slab_shape, self.voxel_mm,
                                          self.settings, reduce=alone, transaxial_only=True,
                                          support=self.support)
        path = self.checkpoint_path.with_name(f"{_stem(self.out)}.checkpoint.rank{self.world.rank}.h5")
        with self._checkpointer(alone, path, {"rank": self.world.rank}) as checkpointer:
            state = self._iterate(reconstructor, checkpointer)
        path.unlink(missing_ok=True)
        slab = reconstructor.postfilter(state.image, self.voxel_mm)
        with self.run.stage("gather", "comm"):
            slabs = self.world.gather(slab)
            histories = self.world.gather(state.log_likelihood)
        if not self.world.is_root:
            return None, None
        history = list(np.sum(np.asarray(histories, dtype=np.float64), axis=0))
        return np.concatenate(slabs, axis=0), history

    def _reconstruct_nmf(self):
        """Frames in blocks over the ranks, one low-rank model (:mod:`medhpc.pet.nmf`)."""
        from medhpc.pet.nmf import NmfReconstructor

        alone = self.world.split(self.world.rank)
        start, stop = block_range(self.layout.frames, self.world.size, self.world.rank)
        views = decomposition.views_of_rank(self.layout.scanner.n_views, self.settings.n_subsets,
                                            1, 0)
        first = self.view_shares(views, alone, frame=start)
        frame_shares = [first]
        for frame in range(start + 1, stop):
            shares = self.view_shares(views, alone, frame=frame, projectors=first)
            frame_shares.append(shares)
        models, starts = [], []
        for shares in frame_shares:  # the frames share the first's sensitivity images
            sensitivities = ([backend.to_host(image) for image in models[0].sensitivities]
                             if models else None)
            models.append(OsemReconstructor(
                self.run, shares, self.grid.shape, self.voxel_mm,
                replace(self.settings, algorithm="osem", iterations=1), reduce=alone,
                sensitivities=sensitivities, support=self.support))
            with self.run.stage("initial frames", "other"):  # one OSEM iteration per frame
                starts.append(models[-1].run_iterations(
                    ReconState(image=models[-1].initial_image())).image)
        reconstructor = NmfReconstructor(self.run, models, range(start, stop), self.layout.frames,
                                         self.settings, self.world, support=self.support,
                                         initial_frames=starts)
        history = reconstructor.run_iterations(progress=self.run.log.progress)
        images = [postfiltered(self.run, image, self.settings, self.voxel_mm)
                  for image in reconstructor.frame_images()]
        with self.run.stage("gather", "comm"):
            blocks = self.world.gather(images)
        self._nmf = {"factors": reconstructor.factors.astype(np.float32),
                     "curves": reconstructor.curves}
        if not self.world.is_root:
            return None, None
        return np.stack([image for block in blocks for image in block]), history

    def frame_checkpoint_path(self, frame: int) -> Path:
        """Where frame ``frame`` keeps its iteration state, and its result once finished."""
        return self.checkpoint_path.with_name(f"{_stem(self.out)}.checkpoint.frame{frame:04d}.h5")

    def _reconstruct_frames(self):
        """Frames dealt to the ranks as they finish; each frame checkpoints on its own (every
        ``--checkpoint-every`` iterations, on a stop signal, and when finished), so
        ``--resume`` redoes neither the finished frames nor the finished iterations."""
        alone = self.world.split(self.world.rank)
        n_views = self.layout.scanner.n_views
        views = decomposition.views_of_rank(n_views, self.settings.n_subsets, 1, 0)
        frames = list(range(self.layout.frames))

        def reconstruct_frame(frame):
            if signals.received:  # stopping: start no other frame
                raise CheckpointStop(signals.received, 0, self.frame_checkpoint_path(frame))
            shares = self.view_shares(views, alone, frame=frame)
            reconstructor = OsemReconstructor(self.run, shares, self.grid.shape,
                                              self.voxel_mm, self.settings, reduce=alone,
                                              support=self.support)
            with signals.at_once_until_busy(), self._checkpointer(
                    alone, self.frame_checkpoint_path(frame), {"frame": frame},
                    signals=signals, quiet=True) as checkpointer:
                state = self._iterate(reconstructor, checkpointer, quiet=True)
                if checkpointer.saved_iteration != state.iteration:
                    with self.run.stage("checkpoint", "io"):  # a finished frame is kept
                        checkpointer.save(state.iteration, reconstructor.checkpoint_state(state))
            self.run.log.debug(f"frame {frame} done")
            return reconstructor.postfilter(state.image, self.voxel_mm), state.log_likelihood

        show = self.run.log.counter("frames reconstructed")
        with StopSignals(raise_while_idle=False) as signals:
            try:
                results = map_items(self.world, frames, reconstruct_frame, schedule="dynamic",
                                    gather_to="root", progress=show)
            except (CheckpointStop, StoppedBeforeFirstIteration) as stop:
                show.end()
                kept = self.world.agree(lambda: sum(
                    self.frame_checkpoint_path(f).exists() for f in frames))
                raise CheckpointStop(stop.signum, getattr(stop, "iteration", 0),
                                     self.checkpoint_path.parent, message=(
                    f"{signal.Signals(stop.signum).name} received: stopped with {kept} of "
                    f"{len(frames)} frame(s) checkpointed (finished or part-way) in "
                    f"{self.checkpoint_path.parent}; rerun with --resume to continue")) from None
        show.end()
        if self.world.is_root:
            for frame in frames:
                self.frame_checkpoint_path(frame).unlink(missing_ok=True)
        if results is None:
            return None, None
        images = np.stack([image for image, _ in results])
        return images, [history for _, history in results]

    # -- outputs -------------------------------------------------------------------------
    def _write_outputs(self, image, history) -> None:
        write_image(self.out, image, self.grid, overwrite=self.run.overwrite, units="a.u.")
        self.run.log.info(f"image written to {self.out}")
        self._log_document = {
            "sinogram": str(self.layout.path), "image": str(self.out),
            "decomposition": self.mode, "ranks": self.world.size, "device": self.run.device,
            "settings": asdict(self.settings), "subsets": self.settings.n_subsets,
            "log_likelihood_per_subiteration": history, **self.log_extra,
        }
        if self.timing is not None:
            self._log_document["tof_calibration"] = self._timing_path()
        if getattr(self, "_nmf", None) is not None:
            self._write_factors()
        truth, comparison = None, None
        if self.truth_path is not None:
            from medhpc.pet.figures import compare_with_truth
            from medhpc.phantoms.pet_files import phantom_of

            truth, _ = read_image(self.truth_path, ndim=(3,))
            comparison = compare_with_truth(image, truth, phantom_of(self.truth_path, truth))
            self._log_document["truth"] = {"path": str(self.truth_path), **comparison}
            self.run.log.info(f"against {self.truth_path}: NRMSE {comparison['nrmse']:.4f}")
        if self.png is not None:
            from medhpc.pet.figures import recon_figure

            recon_figure(image, self.grid, history, self.png, subsets=self.settings.n_subsets,
                         overwrite=self.run.overwrite, truth=truth, comparison=comparison,
                         curves=None if getattr(self, "_nmf", None) is None
                         else self._nmf["curves"],
                         title=f"{self.settings.algorithm.upper()} {self.settings.iterations} it x "
                               f"{self.settings.n_subsets} subsets, {self.world.size} rank(s)")
            self.run.log.info(f"picture written to {self.png}")

    def factors_path(self) -> Path:
        """Where --algorithm nmf keeps its factors: ``<stem>.factors.h5`` beside --out."""
        return self.out.with_name(_stem(self.out) + ".factors.h5")

    def _write_factors(self) -> None:
        path = self.factors_path()
        with atomic_path(path, overwrite=self.run.overwrite) as tmp:
            with h5py.File(tmp, "w") as h5:
                h5.create_dataset("spatial_factors", data=self._nmf["factors"],
                                  compression="gzip", compression_opts=1)
                h5["time_activity_curves"] = self._nmf["curves"]
                h5.attrs["image_affine"] = np.asarray(self.grid.affine)
        self._log_document["time_activity_curves"] = np.asarray(self._nmf["curves"]).tolist()
        self.run.log.info(f"factors written to {path}")

    def _append_timings(self, timings: dict) -> None:
        write_run_log(self.log_path, "pet-recon", self._log_document, timings,
                      overwrite=self.run.overwrite)
        self.run.log.info(f"log written to {self.log_path}")


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".h5", ".hdf5"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _timing_fingerprint(timing) -> dict:
    return {} if timing is None else timing.fingerprint()
