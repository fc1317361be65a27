"""pet-scatter: a single-scatter estimate for a sinogram, tail-fitted, as a sinogram file.

1. Check the sinogram's layout, the activity (a reconstruction of the data, counts per mm)
   and the mu-map (1/mm), once.
2. Rank 0 runs SSS on the sampled bins (:mod:`medhpc.pet.scatter`) and shares them.
3. Each rank interpolates its block of views to every bin, applies the normalisation and
   sums its tails (LORs that miss the body); the sums give one scale for all.
4. Rank 0 gathers the blocks and writes ``scatter`` (expected counts, the prompts' shape
   without frames) with the scale and settings as attributes.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import h5py
import numpy as np

from medhpc.errors import InputError
from medhpc.io.atomic import atomic_path, check_output_path
from medhpc.io.images import check_nonnegative, read_image
from medhpc.parallel.geometry import block_range
from medhpc.pet.corrections import attenuation_factors, mu_map_corrections, read_mu_map
from medhpc.pet.projector import axis_aligned_grid
from medhpc.pet.scatter import (interpolate_to_sinogram, single_scatter, tail_scale,
                                tail_sums)
from medhpc.pet.settings import ScatterSettings
from medhpc.pet.sinogram import read_block, read_layout, read_stored_factor


class ScatterEstimate:
    """One pet-scatter run on every rank (see the module notes)."""

    def __init__(self, run, sinogram, activity, mu_map, out, settings: ScatterSettings,
                 fit_tails: bool = True, overwrite: bool | None = None):
        self.run = run
        self.world = run.world
        self.settings = settings
        self.fit_tails = fit_tails
        self.out = Path(out)
        self.overwrite = run.overwrite if overwrite is None else overwrite
        (self.layout, self.activity, self.activity_grid, self.mu, self.mu_grid) = \
            self.world.agree(lambda: self._validated(sinogram, activity, mu_map))

    def _validated(self, sinogram, activity_path, mu_path):
        low, high = self.settings.window_kev
        if not 0 < low < 511 < high:
            raise InputError(f"--window-kev {low:g},{high:g}: expected 0 < low < 511 < high (keV)")
        check_output_path(self.out, self.overwrite, (".h5", ".hdf5"))
        layout = read_layout(sinogram)
        if layout.frames > 1:
            raise InputError(f"{layout.path}: {layout.frames} frames; pet-scatter estimates one "
                             f"static acquisition")
        activity, activity_grid = read_image(activity_path, ndim=(3,))
        check_nonnegative(activity_path, activity, "activity")
        mu, mu_grid = read_mu_map(mu_path)
        axis_aligned_grid(activity_grid, activity_path)
        axis_aligned_grid(mu_grid, mu_path)
        return layout, activity.astype(np.float32), activity_grid, mu.astype(np.float32), mu_grid

    def execute(self) -> None:
        """Estimate, fit and write (rank 0 writes)."""
        if self.run.dry_run:
            self.run.print_plan({"sinogram": str(self.layout.path), "settings": asdict(self.settings),
                                 "lors": self.layout.scanner.n_lors})
            return
        scatter, document = self.compute()
        if self.world.is_root:
            with self.run.stage("write", "io"):
                self._write(scatter, document)
            self.run.log.info(f"scatter written to {self.out}: scale {document['scale']:.4g}, "
                              f"scatter fraction {document['scatter_fraction']:.3f}")
        self.run.finish({"scale": document["scale"]})
        self.run.summary.update(scale=document["scale"],
                                scatter_fraction=document["scatter_fraction"])

    def compute(self):
        """``(scatter on rank 0 or None, document)``."""
        scanner = self.layout.scanner
        activity_origin, activity_voxel = axis_aligned_grid(self.activity_grid, "activity")
        mu_origin, mu_voxel = axis_aligned_grid(self.mu_grid, "mu-map")
        with self.run.stage("single scatter", "kernel"):
            bins, values = self.world.agree(lambda: single_scatter(
                scanner, self.activity, activity_origin, activity_voxel, self.mu, mu_origin,
                mu_voxel, self.settings, self.run.device))
        views = np.arange(*block_range(scanner.n_views, self.world.size, self.world.rank))
        with self.run.stage("interpolate", "other"):
            scatter = interpolate_to_sinogram(scanner, bins, values, views).astype(np.float32)
        with self.run.stage("read sinogram", "io"):
            block = self.world.agree_all(lambda: read_block(self.layout, views=views)
                                         if views.size else None)
            normalisation = self._stored("normalisation", views)
            attenuation = self._stored("attenuation", views)
        if normalisation is not None:
            scatter *= normalisation
        if attenuation is None and views.size:
            with self.run.stage("attenuation", "kernel"):
                attenuation = self._attenuation(views, mu_origin, mu_voxel)
        numerator = denominator = tails = 0
        prompts_sum = additive_sum = 0.0
        if views.size:
            numerator, denominator, tails = tail_sums(scatter, block.prompts, block.additive,
                                                      attenuation)
            prompts_sum = float(np.sum(block.prompts, dtype=np.float64))
            additive_sum = float(np.sum(block.additive, dtype=np.float64))
        with self.run.stage("allreduce", "comm"):
            numerator, denominator = self.world.sum(numerator), self.world.sum(denominator)
            tails, prompts_sum = self.world.sum(tails), self.world.sum(prompts_sum)
            additive_sum = self.world.sum(additive_sum)
            unscaled_sum = self.world.sum(float(np.sum(scatter, dtype=np.float64)))
        scale = tail_scale(numerator, denominator) if self.fit_tails else 1.0
        if self.fit_tails and tails == 0:
            self.run.log.notice("no LOR misses the body: the scatter estimate is not tail-fitted")
        scatter *= np.float32(scale)
        if self.layout.tof:  # spread evenly over the TOF bins
            scatter = np.repeat(scatter[..., None] / self.layout.tof_bins, self.layout.tof_bins,
                                axis=-1)
        with self.run.stage("gather", "comm"):
            blocks = self.world.gather(scatter)
        document = {"scale": scale, "tail_bins": int(tails), "fitted": bool(self.fit_tails),
                    "scatter_fraction": scale * unscaled_sum / max(prompts_sum - additive_sum,
                                                                   1e-30),
                    "settings": asdict(self.settings)}
        if blocks is None:
            return None, document
        return np.concatenate(blocks, axis=1), document

    def _stored(self, name, views):
        return read_stored_factor(self.layout, name, views) if views.size else None

    def _attenuation(self, views, mu_origin, mu_voxel):
        return attenuation_factors(mu_map_corrections(self.mu, mu_origin, mu_voxel),
                                   self.layout.scanner, views, slice(None), self.run.device)

    def _write(self, scatter, document) -> None:
        with atomic_path(self.out, overwrite=self.overwrite) as tmp:
            with h5py.File(tmp, "w") as h5:
                h5.create_dataset("scatter", data=scatter, compression="gzip", compression_opts=1,
                                  shuffle=True)
                h5.attrs["format"] = "medhpc-scatter"
                h5.attrs["sinogram"] = str(self.layout.path)
                for key in ("scale", "tail_bins", "fitted", "scatter_fraction"):
                    h5.attrs[key] = document[key]


class ScatterLoop:
    """pet-recon --scatter-iterations K: reconstruct, estimate the scatter from that image,
    and again with the estimate, K times; then the final reconstruction with the last
    estimate, which is kept beside the image (``<stem>.scatter.h5``).

    ``make_recon(scatter_file, target, **overrides)`` builds the :class:`PetRecon` of the
    command line with that scatter file.
    """

    def __init__(self, run, make_recon, sinogram, mu_map, out, loops: int,
                 settings: ScatterSettings = ScatterSettings()):
        from medhpc.pet.run import _stem

        self.run, self.world = run, run.world
        self.make_recon, self.sinogram, self.mu_map = make_recon, sinogram, mu_map
        self.loops, self.settings = int(loops), settings
        out = Path(out)
        self.scatter_path = out.with_name(_stem(out) + ".scatter.h5")
        self.image_path = out.with_name(_stem(out) + ".scatter-loop.h5")
        self.world.agree(lambda: check_output_path(self.scatter_path, run.overwrite,
                                                   (".h5",)))

    def execute(self) -> None:
        """Loop, then run the final reconstruction (which writes every output)."""
        from medhpc.io.images import write_image

        if self.run.dry_run:
            self.make_recon().execute()
            return
        self.world.agree(self.make_recon()._check_outputs)  # before any work
        history, current = [], None
        for loop in range(self.loops):
            recon = self.make_recon(current, self.image_path, png=False, truth=None,
                                    checkpoint_every=0, resume=False)
            image, _ = recon.compute()
            if self.world.is_root:
                with self.run.stage("write", "io"):
                    write_image(self.image_path, image, recon.grid, overwrite=True)
            self.world.barrier()
            estimate = ScatterEstimate(self.run, self.sinogram, self.image_path, self.mu_map,
                                       self.scatter_path, self.settings, overwrite=True)
            scatter, document = estimate.compute()
            if self.world.is_root:
                with self.run.stage("write", "io"):
                    estimate._write(scatter, document)
            self.world.barrier()
            self.run.log.info(f"scatter loop {loop + 1}/{self.loops}: scale "
                              f"{document['scale']:.4g}, scatter fraction "
                              f"{document['scatter_fraction']:.3f}")
            history.append({key: document[key] for key in ("scale", "scatter_fraction",
                                                            "tail_bins")})
            current = str(self.scatter_path)
        if self.world.is_root:
            self.image_path.unlink(missing_ok=True)
        final = self.make_recon(current)
        final.log_extra["scatter_loops"] = history
        final.execute()
