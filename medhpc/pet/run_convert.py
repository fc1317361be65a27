"""pet-convert: projection data between medhpc, STIR and CASToR (rank 0 reads and writes).

- STIR ``.hs`` -> medhpc sinogram ``.h5``: the prompts, with STIR's normalisation and
  attenuation correction factors (``--norm``, ``--acf``: their reciprocals multiply the
  forward model) and the expected randoms and scatter (``--randoms``, ``--scatter``).
- CASToR histogram ``.cdh`` -> medhpc sinogram ``.h5`` (``--scanner`` names the crystals).
- medhpc sinogram ``.h5`` -> STIR ``.hs``: one dataset of one frame; the factors
  (``multiplicative``, ``attenuation``, ``normalisation``) as STIR correction factors.
- medhpc span-1 sinogram ``.h5`` -> CASToR histogram ``.cdh``: one frame's prompts with its
  correction factors and random rates (additive / ``duration_s``, 1 s when not recorded).
- medhpc span-1 sinogram ``.h5`` -> medhpc span-``S`` sinogram ``.h5`` (``--span S``): each
  plane's ring pairs summed (prompts, additive), the factors their mean over the pairs, every
  frame and TOF bin; ring pairs beyond the last full segment are dropped (with a notice).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from medhpc.errors import InputError
from medhpc.io.atomic import check_output_path
from medhpc.io.geometry import ImageGeometry
from medhpc.pet import interchange
from medhpc.pet.scanner import (ScannerGeometry, default_image_grid, load_scanner,
                                plane_members, ring_pair_to_plane)
from medhpc.pet.sinogram import read_block, read_layout, read_stored_factor, write_sinogram

STIR_CORRECTIONS = ("norm", "acf", "randoms", "scatter")
FACTOR_DATASETS = ("multiplicative", "attenuation", "normalisation")


def _reciprocal(values: np.ndarray) -> np.ndarray:
    return np.where(values > 0, 1.0 / np.maximum(values, 1e-30), 0.0).astype(np.float32)


class Conversion:
    """One pet-convert run: checked on rank 0 at construction, executed by rank 0."""

    def __init__(self, run, source, out, scanner=None, corrections: dict | None = None,
                 dataset: str = "prompts", frame: int = 0, span: int | None = None):
        self.run, self.source, self.out = run, Path(source), Path(out)
        self.scanner_request, self.dataset, self.frame = scanner, dataset, frame
        self.span = span
        self.corrections = {key: value for key, value in (corrections or {}).items() if value}
        self.plan = run.world.agree(self._checked)

    def _checked(self) -> dict:
        source = self.source
        if self.span is not None:
            return self._checked_compression()
        if interchange.is_stir_path(source) or interchange.is_castor_path(source):
            check_output_path(self.out, self.run.overwrite, (".h5", ".hdf5"))
        else:
            check_output_path(self.out, self.run.overwrite,
                              (interchange.STIR_SUFFIX, interchange.CASTOR_SUFFIX))
        if self.corrections and not interchange.is_stir_path(source):
            raise InputError(f"{source}: --{next(iter(self.corrections))} goes with a STIR "
                             f"sinogram (.hs) input")
        scanner = load_scanner(self.scanner_request) if self.scanner_request else None
        if interchange.is_stir_path(source):
            stir = interchange.read_stir_layout(source)
            scanner = scanner or stir.scanner
            interchange.check_stir_scanner(stir, scanner, "the prompts")
            layouts = {"prompts": stir}
            for key, path in self.corrections.items():
                layouts[key] = interchange.read_stir_layout(path)
                interchange.check_stir_scanner(layouts[key], scanner, f"--{key}")
            return {"kind": "stir", "scanner": scanner, "stir": layouts}
        if interchange.is_castor_path(source):
            if scanner is None:
                raise InputError(f"{source}: CASToR data name the scanner only; pass --scanner "
                                 f"(a preset or TOML file whose crystals match the IDs)")
            return {"kind": "castor", "scanner": scanner}
        layout = read_layout(source)
        if layout.tof:
            raise InputError(f"{source}: TOF sinogram; STIR output takes non-TOF data")
        if not 0 <= self.frame < layout.frames:
            raise InputError(f"--frame {self.frame}: {source} has {layout.frames} frame(s)")
        if self.dataset not in ("prompts", "additive") + FACTOR_DATASETS:
            raise InputError(f"--dataset {self.dataset}: expected prompts, additive, "
                             f"multiplicative, attenuation or normalisation")
        if self.dataset in ("attenuation", "normalisation") \
                and read_stored_factor(layout, self.dataset, views=[0], planes=[0]) is None:
            raise InputError(f"{source}: no dataset '{self.dataset}'")
        if interchange.is_castor_path(self.out):
            if layout.scanner.span != 1:
                raise InputError(f"{self.out}: CASToR histogram bins are crystal pairs; "
                                 f"{source} is span {layout.scanner.span}")
            if self.dataset != "prompts":
                raise InputError(f"--dataset {self.dataset}: a CASToR histogram holds the "
                                 f"prompts with their factors and additive term")
            return {"kind": "to-castor", "scanner": layout.scanner, "layout": layout}
        interchange.write_stir_check(self.out, layout.scanner)
        return {"kind": "medhpc", "scanner": layout.scanner, "layout": layout}

    def _checked_compression(self) -> dict:
        source = self.source
        if interchange.is_stir_path(source) or interchange.is_castor_path(source):
            raise InputError(f"{source}: --span compresses a medhpc sinogram (.h5); convert "
                             f"STIR or CASToR data to one first")
        if self.corrections or self.scanner_request:
            option = next(iter(self.corrections), "scanner")
            raise InputError(f"--{option}: --span compresses the medhpc sinogram as it is; "
                             f"expected no --{option}")
        check_output_path(self.out, self.run.overwrite, (".h5", ".hdf5"))
        layout = read_layout(source)
        if layout.scanner.span != 1:
            raise InputError(f"{source}: already span {layout.scanner.span}; --span "
                             f"compresses span-1 data")
        return {"kind": "compress", "scanner": compressed_scanner(layout.scanner, self.span,
                                                                  source),
                "layout": layout}

    def execute(self) -> None:
        """Read, convert and write (rank 0)."""
        if self.run.dry_run:
            self.run.print_plan({"source": str(self.source), "kind": self.plan["kind"],
                                 "scanner": self.plan["scanner"].name, "out": str(self.out)})
            return
        if not self.run.world.is_root:
            return
        converter = {"stir": self._from_stir, "castor": self._from_castor,
                     "medhpc": self._to_stir, "compress": self._compress,
                     "to-castor": self._to_castor}[self.plan["kind"]]
        converter()

    def _from_stir(self) -> None:
        scanner, layouts = self.plan["scanner"], self.plan["stir"]
        with self.run.stage("read", "io"):
            values = {key: interchange.read_stir_sinogram(stir, scanner)
                      for key, stir in layouts.items()}
            stored = interchange.stir_stored_mask(layouts["prompts"], scanner)
        factors = {}
        multiplicative = stored.astype(np.float32)
        for key, name in (("norm", "normalisation"), ("acf", "attenuation")):
            if key in values:
                factors[name] = _reciprocal(values[key])
                multiplicative *= factors[name]
        additive = np.zeros_like(multiplicative)
        for key in ("randoms", "scatter"):
            if key in values:
                additive += values[key]
        self._write_sinogram(scanner, values["prompts"], multiplicative, additive, factors)

    def _from_castor(self) -> None:
        scanner = self.plan["scanner"]
        with self.run.stage("read", "io"):
            data = interchange.read_castor_histogram(self.source, scanner)
        if data["outside"]:
            self.run.log.notice(f"{self.source}: {data['outside']:,} histogram bins "
                                f"({data['outside_counts']:.4g} counts) are no LOR of the "
                                f"sinogram of '{scanner.name}' (trimmed radial bins or ring "
                                f"differences) and were dropped")
        factors = {name: data[name] for name in ("attenuation", "normalisation") if name in data}
        self._write_sinogram(scanner, data["prompts"], data["multiplicative"], data["additive"],
                             factors)

    def _write_sinogram(self, scanner, prompts, multiplicative, additive, factors) -> None:
        shape, voxel = default_image_grid(scanner)
        with self.run.stage("write", "io"):
            write_sinogram(self.out, scanner, ImageGeometry.from_spacing(shape, voxel), prompts,
                           multiplicative, additive, overwrite=self.run.overwrite,
                           factors=factors, attrs={"converted_from": str(self.source)})
        self.run.log.info(f"wrote {self.out}: {scanner.name}, sinogram {prompts.shape}, "
                          f"{float(np.sum(prompts, dtype=np.float64)):.4g} prompts")

    def _to_stir(self) -> None:
        layout = self.plan["layout"]
        with self.run.stage("read", "io"):
            if self.dataset in ("attenuation", "normalisation"):
                values = read_stored_factor(layout, self.dataset)
            else:
                values = getattr(read_block(layout, frame=self.frame), self.dataset)
        if self.dataset in FACTOR_DATASETS:
            values = _reciprocal(values)
        with self.run.stage("write", "io"):
            interchange.write_stir(self.out, layout.scanner, values, overwrite=self.run.overwrite)
        self.run.log.info(f"wrote {self.out} (+ {self.out.with_suffix('.s').name}): "
                          f"{self.dataset} of {layout.scanner.name}")

    def _to_castor(self) -> None:
        layout = self.plan["layout"]
        with self.run.stage("read", "io"):
            block = read_block(layout, frame=self.frame)
            attenuation = read_stored_factor(layout, "attenuation")
            with h5py.File(layout.path, "r") as h5:
                duration_s = float(h5.attrs.get("duration_s", 0.0))
        if not duration_s > 0:
            duration_s = 1.0
            self.run.log.notice(f"{self.source}: no acquisition time (attribute duration_s); "
                                f"the histogram says 1 s, so its random rates are counts")
        with self.run.stage("write", "io"):
            records = interchange.write_castor_histogram(
                self.out, layout.scanner, block.prompts, block.multiplicative, block.additive,
                duration_s, attenuation=attenuation, overwrite=self.run.overwrite)
        self.run.log.info(f"wrote {self.out} (+ {self.out.with_suffix('.cdf').name}): "
                          f"{records:,} histogram bins of {layout.scanner.name}")

    def _compress(self) -> None:
        layout, scanner = self.plan["layout"], self.plan["scanner"]
        source_planes, first = compression_planes(layout.scanner, scanner)
        dropped = layout.scanner.n_planes - len(source_planes)
        if dropped:
            self.run.log.notice(f"{self.source}: {dropped} ring pairs beyond ring difference "
                                f"{scanner.max_ring_difference} (the last full span-"
                                f"{scanner.span} segment) are dropped")
        arrays, attrs = {}, {}
        with self.run.stage("read", "io"), h5py.File(layout.path, "r") as h5:
            for name in ("prompts", "additive", "multiplicative") + FACTOR_DATASETS[1:]:
                if name in h5:
                    arrays[name] = h5[name][...][:, :, source_planes]  # h5py: sorted only
            attrs = {key: value for key, value in h5.attrs.items()
                     if key not in ("format", "version", "frames", "tof", "scanner",
                                    "image_shape", "image_affine")}
        with self.run.stage("compress", "kernel"):
            counts = np.diff(first)
            for name, values in arrays.items():
                summed = np.add.reduceat(values.astype(np.float64), first[:-1], axis=2)
                if name not in ("prompts", "additive"):  # factors: the mean over the pairs
                    summed /= counts.reshape((1, 1, -1) + (1,) * (values.ndim - 3))
                arrays[name] = summed.astype(np.float32)
        factors = {name: arrays[name] for name in FACTOR_DATASETS[1:] if name in arrays}
        attrs.update(converted_from=str(self.source), span=scanner.span)
        with self.run.stage("write", "io"):
            write_sinogram(self.out, scanner, layout.image, arrays["prompts"],
                           arrays["multiplicative"], arrays["additive"], tof=layout.tof,
                           frames=layout.frames, overwrite=self.run.overwrite, factors=factors,
                           attrs=attrs)
        self.run.log.info(f"wrote {self.out}: {scanner.name}, {scanner.n_planes} planes of "
                          f"{len(source_planes)} ring pairs")


def compressed_scanner(scanner: ScannerGeometry, span: int, source) -> ScannerGeometry:
    """``scanner`` at ``span``, up to its last full segment (one :class:`InputError` line)."""
    half = (span - 1) // 2
    if span < 3 or span % 2 == 0:
        raise InputError(f"--span {span}: expected an odd span >= 3")
    if scanner.max_ring_difference < half:
        raise InputError(f"{source}: ring differences up to {scanner.max_ring_difference}; "
                         f"--span {span} needs at least {half}")
    largest = half + span * ((scanner.max_ring_difference - half) // span)
    return replace(scanner, name=f"{scanner.name}-span{span}", span=span,
                   max_ring_difference=largest)


def compression_planes(span1: ScannerGeometry, compressed: ScannerGeometry):
    """(span-1 plane of each ring pair of ``compressed``, in its plane order; the first pair
    of each compressed plane, plus the end)."""
    pairs, first = plane_members(compressed)
    return ring_pair_to_plane(span1)[pairs[:, 0], pairs[:, 1]], first

