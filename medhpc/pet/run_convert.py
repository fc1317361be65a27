"""pet-convert: projection data between medhpc, STIR and CASToR (rank 0 reads and writes).

- STIR ``.hs`` -> medhpc sinogram ``.h5``: the prompts, with STIR's normalisation and
  attenuation correction factors (``--norm``, ``--acf``: their reciprocals multiply the
  forward model) and the expected randoms and scatter (``--randoms``, ``--scatter``).
- CASToR histogram ``.cdh`` -> medhpc sinogram ``.h5`` (``--scanner`` names the crystals).
- medhpc sinogram ``.h5`` -> STIR ``.hs``: one dataset of one frame; the factors
  (``multiplicative``, ``attenuation``, ``normalisation``) as STIR correction factors.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medhpc.errors import InputError
from medhpc.io.atomic import check_output_path
from medhpc.io.geometry import ImageGeometry
from medhpc.pet import interchange
from medhpc.pet.scanner import default_image_grid, load_scanner
from medhpc.pet.sinogram import read_block, read_layout, read_stored_factor, write_sinogram

STIR_CORRECTIONS = ("norm", "acf", "randoms", "scatter")
FACTOR_DATASETS = ("multiplicative", "attenuation", "normalisation")


def _reciprocal(values: np.ndarray) -> np.ndarray:
    return np.where(values > 0, 1.0 / np.maximum(values, 1e-30), 0.0).astype(np.float32)


class Conversion:
    """One pet-convert run: checked on rank 0 at construction, executed by rank 0."""

    def __init__(self, run, source, out, scanner=None, corrections: dict | None = None,
                 dataset: str = "prompts", frame: int = 0):
        self.run, self.source, self.out = run, Path(source), Path(out)
        self.scanner_request, self.dataset, self.frame = scanner, dataset, frame
        self.corrections = {key: value for key, value in (corrections or {}).items() if value}
        self.plan = run.world.agree(self._checked)

    def _checked(self) -> dict:
        source = self.source
        if interchange.is_stir_path(source) or interchange.is_castor_path(source):
            check_output_path(self.out, self.run.overwrite, (".h5", ".hdf5"))
        else:
            check_output_path(self.out, self.run.overwrite, (interchange.STIR_SUFFIX,))
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
        interchange.write_stir_check(self.out, layout.scanner)
        return {"kind": "medhpc", "scanner": layout.scanner, "layout": layout}

    def execute(self) -> None:
        """Read, convert and write (rank 0)."""
        if self.run.dry_run:
            self.run.print_plan({"source": str(self.source), "kind": self.plan["kind"],
                                 "scanner": self.plan["scanner"].name, "out": str(self.out)})
            return
        if not self.run.world.is_root:
            return
        converter = {"stir": self._from_stir, "castor": self._from_castor,
                     "medhpc": self._to_stir}[self.plan["kind"]]
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
