"""tnr-apply: apply a saved tnr-register registration to another stain and to annotations.

1. Read the saved registration (:func:`~medhpc.tnr.registration_file.load_registration`)
   and check the other inputs once: the other stain's sections are matched to the
   registered ones by name (or, for stacks, by order), and the scale between their
   sizes and the registered sizes is detected (one scale for every section).
2. Each rank warps its block of sections with the saved coarse warps, at the
   output grid asked for, and writes it (HDF5 parts behind one virtual dataset, or
   gathered on rank 0 for TIFF/NIfTI), as tnr-register does.
3. On rank 0, points and GeoJSON annotations are mapped input -> output by
   inverting the output -> input warp (Newton's method on the bilinear grid).

Coordinates: pixel ``(i, j)`` of any image has its centre at ``(y, x) = (i, j)``
(``--origin pixel-corner`` shifts annotations by half a pixel). Positions are
carried between levels by ``p_coarse = (p_fine + 0.5) / f - 0.5``. A section of
the other stain, ``s`` times the registered size, maps to the registered padded
section by ``P = (p + 0.5) / s - 0.5 + offset``, ``offset`` being where the
registered section sat in the padded section.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from medhpc import backend
from medhpc.errors import InputError
from medhpc.io.atomic import check_output_free
from medhpc.io.geometry import ImageGeometry
from medhpc.parallel.geometry import block_range, slab
from medhpc.tnr.annotations import (SectionLookup, map_geojson, read_geojson, read_points_csv,
                                    section_stem, write_geojson, write_points_csv)
from medhpc.tnr.preprocess import downsample
from medhpc.tnr.intensity import IntensityMaps
from medhpc.runtime.timing import peak_memory_mb
from medhpc.tnr.run import _cast, write_section_volume
from medhpc.tnr.settings import INTERPOLATION_ORDER, NORMALISATIONS, OutputSettings
from medhpc.tnr.wholeslide import memory_plan, output_tiles, region_cap_pixels, warp_tile
from medhpc.tnr.registration_file import SavedRegistration, centred_offsets, load_registration
from medhpc.tnr.sources import SectionStack, open_stack

ORIGINS = ("pixel-centre", "pixel-corner")
VOLUME_SUFFIXES = (".h5", ".hdf5", ".tif", ".tiff", ".nii", ".nii.gz", ".ome.zarr")
NEWTON_ITERATIONS = 60
NEWTON_TOLERANCE_PX = 1e-6
CONVERGED_PX = 1e-3


# -- geometry ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputGrid:
    """The output sections: ``factor`` output pixels per working pixel, ``shape`` (y, x)."""

    factor: float
    shape: tuple


@dataclass(frozen=True)
class StainPlacement:
    """Where another stain's sections lie relative to the registered sections.

    ``order[i]`` is the other stack's section for registered section ``i``; ``scale``
    is other pixels per registered input pixel (the same for every section).
    """

    scale: float
    order: tuple


def detect_scale(other_shapes, registered_shapes, where: str) -> float:
    """One scale (other / registered size) for every section and both axes.

    The scale is the median of the sections' ratios, snapped to an integer or its
    reciprocal when within half a pixel of it; a section more than ``max(1, scale)`` px
    away from ``scale`` times its registered size raises InputError.
    """
    other = np.asarray(other_shapes, np.float64).reshape(-1, 2)
    registered = np.asarray(registered_shapes, np.float64).reshape(-1, 2)
    scale = float(np.median(other / registered))
    largest = float(registered.max())
    for candidate in (round(scale), 1.0 / max(1, round(1.0 / scale))):
        if candidate > 0 and abs(candidate - scale) * largest < 0.5:
            scale = float(candidate)
            break
    tolerance = max(1.0, scale)
    error = np.abs(other - scale * registered)
    bad = np.flatnonzero(np.any(error > tolerance, axis=1))
    if len(bad):
        i = int(bad[0])
        ratio = other[i] / registered[i]
        raise InputError(
            f"{where}: section {i} is {int(other[i, 1])}x{int(other[i, 0])} px, "
            f"{ratio[1]:.3f}x{ratio[0]:.3f} times the registered {int(registered[i, 1])}x"
            f"{int(registered[i, 0])} px, but the stack's scale is {scale:.3f}; expected every "
            "section at one scale of the registered sections (the same sections in another "
            "stain)")
    return scale


def match_sections(registration: SavedRegistration, stack: SectionStack) -> tuple:
    """The other stack's section index for each registered section.

    Folders of images are matched by file name (with or without the extension);
    when either side is a stack (TIFF or HDF5 pages), the same count in the same
    order is accepted.
    """
    if registration.input_kind == "folder" and stack.kind == "folder":
        by_name = {}
        for index, name in enumerate(stack.names):
            for key in {name, section_stem(name)}:
                by_name.setdefault(key, []).append(index)
        order, missing = [], []
        for name in registration.names:
            found = by_name.get(name) or by_name.get(section_stem(name)) or []
            if len(found) != 1:
                missing.append(name)
            else:
                order.append(found[0])
        if missing:
            listed = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise InputError(f"{stack.source}: no single section named like the registered "
                             f"{listed} ({len(missing)} of {registration.count}); expected "
                             "the registered sections' names (any extension)")
        extra = sorted(set(range(stack.count)) - set(order))
        if extra:
            listed = ", ".join(stack.names[i] for i in extra[:3])
            raise InputError(f"{stack.source}: section(s) {listed} are not in the registration "
                             f"{registration.path}; expected only the registered sections")
        return tuple(order)
    if stack.count != registration.count:
        raise InputError(f"{stack.source}: {stack.count} sections; the registration "
                         f"{registration.path} has {registration.count}; expected the same "
                         "sections in the same order")
    return tuple(range(stack.count))


def output_grid(registration: SavedRegistration, scale: float, full_res: bool,
                downsample_factor: float | None) -> OutputGrid:
    """The output grid: tnr-register's by default; ``full_res``: the other stain's own
    resolution; ``downsample_factor`` D: the other stain's resolution / D."""
    if not full_res and downsample_factor is None:
        return OutputGrid(registration.output_factor, tuple(registration.output_shape))
    per_output = 1.0 if full_res else float(downsample_factor)
    factor = registration.downsample * scale / per_output
    shape = tuple(max(1, int(math.floor(n * scale / per_output + 1e-6)))
                  for n in registration.input_shape)
    return OutputGrid(factor, shape)


# -- the inverse warp --------------------------------------------------------------------------
def _bilinear(displacement: np.ndarray, step: int, positions: np.ndarray):
    """Displacement (N, 2) and its Jacobian (N, 2, 2) at working positions (N, 2) (y, x),
    bilinear between nodes and constant beyond the first and last (as SectionWarp)."""
    nodes = np.array(displacement.shape[:2])
    scaled = positions / step
    clipped = np.clip(scaled, 0.0, nodes - 1.0)
    inside = (scaled > 0.0) & (scaled < nodes - 1.0)
    below = np.minimum(np.floor(clipped).astype(np.int64), nodes - 2)
    fraction = clipped - below
    iy, ix = below[:, 0], below[:, 1]
    fy, fx = fraction[:, 0:1], fraction[:, 1:2]
    d00, d01 = displacement[iy, ix], displacement[iy, ix + 1]
    d10, d11 = displacement[iy + 1, ix], displacement[iy + 1, ix + 1]
    value = (1 - fy) * ((1 - fx) * d00 + fx * d01) + fy * ((1 - fx) * d10 + fx * d11)
    jacobian = np.empty(positions.shape + (2,))
    jacobian[:, :, 0] = ((1 - fx) * (d10 - d00) + fx * (d11 - d01)) / step * inside[:, 0:1]
    jacobian[:, :, 1] = ((1 - fy) * (d01 - d00) + fy * (d11 - d10)) / step * inside[:, 1:2]
    return value, jacobian


def invert_warp(displacement: np.ndarray, step: int, targets: np.ndarray):
    """Output positions q with ``q + d(q) = targets`` (working px, (N, 2) (y, x)).

    Newton's method on the bilinear warp grid, started from ``targets - d(targets)``,
    with step halving when a step does not reduce the residual (and a fixed-point
    step where the Jacobian is singular).

    Returns
    -------
    positions : numpy.ndarray
        (N, 2) output positions, working px.
    converged : numpy.ndarray
        (N,) bool: residual below :data:`CONVERGED_PX`.
    """
    targets = np.asarray(targets, np.float64).reshape(-1, 2)
    value, _ = _bilinear(displacement, step, targets)
    positions = targets - value

    def residual_of(q, wanted):
        d, jac = _bilinear(displacement, step, q)
        return q + d - wanted, jac

    residual, jacobian = residual_of(positions, targets)
    norm = np.linalg.norm(residual, axis=1)
    for _ in range(NEWTON_ITERATIONS):
        active = np.flatnonzero(norm > NEWTON_TOLERANCE_PX)
        if not len(active):
            break
        matrix = jacobian[active] + np.eye(2)
        det = matrix[:, 0, 0] * matrix[:, 1, 1] - matrix[:, 0, 1] * matrix[:, 1, 0]
        r = residual[active]
        singular = np.abs(det) < 1e-8
        safe = np.where(singular, 1.0, det)
        newton = -np.stack([matrix[:, 1, 1] * r[:, 0] - matrix[:, 0, 1] * r[:, 1],
                            matrix[:, 0, 0] * r[:, 1] - matrix[:, 1, 0] * r[:, 0]], axis=1)
        newton /= safe[:, None]
        newton[singular] = -r[singular]
        alpha = np.ones(len(active))
        pending = np.ones(len(active), bool)
        for _halving in range(8):
            candidate = positions[active] + alpha[:, None] * newton
            new_residual, new_jacobian = residual_of(candidate, targets[active])
            new_norm = np.linalg.norm(new_residual, axis=1)
            better = pending & (new_norm < norm[active])
            chosen = active[better]
            positions[chosen] = candidate[better]
            residual[chosen] = new_residual[better]
            jacobian[chosen] = new_jacobian[better]
            norm[chosen] = new_norm[better]
            pending &= ~better
            if not pending.any():
                break
            alpha[pending] *= 0.5
        if pending.all():
            break
    return positions, norm < CONVERGED_PX


# -- settings and the run ----------------------------------------------------------------------
@dataclass(frozen=True)
class ApplySettings:
    """What decides a tnr-apply result besides its inputs."""

    full_res: bool = False
    downsample: float | None = None      # other-stain px per output px
    interpolation: str | None = None     # None: the registration's
    origin: str = "pixel-centre"         # where annotation coordinates put a pixel's centre
    normalise: str | None = None         # None: the registration's

    def check(self) -> None:
        if self.full_res and self.downsample is not None:
            raise InputError("--full-res and --downsample both given; expected one of them")
        if self.downsample is not None and not self.downsample > 0:
            raise InputError(f"--downsample {self.downsample}: expected a positive number of "
                             "input pixels per output pixel")
        if self.interpolation is not None and self.interpolation not in INTERPOLATION_ORDER:
            raise InputError(f"--interpolation {self.interpolation}: expected one of "
                             f"{', '.join(INTERPOLATION_ORDER)}")
        if self.normalise is not None and self.normalise not in NORMALISATIONS:
            raise InputError(f"--normalise {self.normalise}: expected one of "
                             f"{', '.join(NORMALISATIONS)}")
        if self.origin not in ORIGINS:
            raise InputError(f"--origin {self.origin}: expected one of {', '.join(ORIGINS)}")


@dataclass
class Annotations:
    """Paths of the annotation inputs and outputs (either pair may be None)."""

    points: str | None = None
    points_out: str | None = None
    geojson: str | None = None
    geojson_out: str | None = None


class Application:
    """One tnr-apply run on every rank: warp another stain and map annotations.

    Parameters
    ----------
    run : Run
    registration_path : path-like
        A tnr-register ``--fields`` file.
    source : str or None
        The other stain's sections (as tnr-register's ``--input``); None maps only
        annotations, which are then in the registered sections' pixels.
    out : path-like or None
        The warped stack; needs ``source``. ``.ome.tif`` and ``.ome.zarr`` are
        pyramidal, written tile by tile by every rank; ``.h5`` parts by every rank;
        ``.tif`` and ``.nii/.nii.gz`` gathered on rank 0.
    settings : ApplySettings
    annotations : Annotations
    output : OutputSettings
        Tile side and compression (as tnr-register's).
    """

    def __init__(self, run, registration_path, source, out, settings: ApplySettings,
                 annotations: Annotations | None = None, output: OutputSettings | None = None):
        self.run = run
        self.world = run.world
        self.settings = settings
        self.output = output or OutputSettings()
        self._levels_read = {}
        self._pyramid_output = None
        self.source = source
        self.out = Path(out) if out else None
        self.annotations = annotations or Annotations()
        self._points = None
        self._geojson = None
        self.registration, self.stack, self.placement, self.grid = self.world.agree(
            lambda: self._validated(registration_path))
        self.kernels = (backend.host_kernels("medhpc.tnr", run.device)
                        if self.stack is not None else None)

    # -- checking ------------------------------------------------------------------------
    def _validated(self, registration_path):
        """Check every input and output once (on rank 0); read the annotations there."""
        self.settings.check()
        self.output.check()
        notes = self.annotations
        for given, wanted, name in ((notes.points, notes.points_out, "--points"),
                                    (notes.geojson, notes.geojson_out, "--geojson")):
            if (given is None) != (wanted is None):
                raise InputError(f"{name} and {name}-out go together; expected both or neither")
        if (self.source is None) != (self.out is None):
            raise InputError("--input and --out go together; expected both (or neither, to map "
                             "only annotations)")
        if self.source is None and notes.points is None and notes.geojson is None:
            raise InputError("nothing to apply; expected --input and --out, --points and "
                             "--points-out, or --geojson and --geojson-out")
        if self.out is not None and not "".join(self.out.suffixes).lower().endswith(
                VOLUME_SUFFIXES):
            raise InputError(f"{self.out}: unknown output format; expected .h5, .ome.tif/.tif, "
                             ".ome.zarr or .nii/.nii.gz")
        registration = load_registration(registration_path)
        stack, placement = None, StainPlacement(1.0, tuple(range(registration.count)))
        names = {name: i for i, name in enumerate(registration.names)}
        if self.source is not None:
            stack = open_stack(self.source)
            order = match_sections(registration, stack)
            scale = detect_scale([stack.shapes[j] for j in order], registration.section_shapes,
                                 stack.source)
            placement = StainPlacement(scale, order)
            names.update({stack.names[j]: i for i, j in enumerate(order)})
        grid = output_grid(registration, placement.scale, self.settings.full_res,
                           self.settings.downsample)
        lookup = SectionLookup(registration.count, names)
        if notes.points is not None:
            self._points = read_points_csv(notes.points, lookup)
        if notes.geojson is not None:
            self._geojson = read_geojson(notes.geojson, lookup)
            if Path(notes.geojson).is_dir() and Path(notes.geojson_out).suffix:
                raise InputError(f"{notes.geojson_out}: --geojson is a folder, so --geojson-out "
                                 "is written as a folder; expected a folder name")
        if not self.run.dry_run:
            for path in (self.out, notes.points_out, notes.geojson_out):
                if path is not None:
                    check_output_free(path, self.run.overwrite)
        return registration, stack, placement, grid

    # -- plan ----------------------------------------------------------------------------
    @property
    def pyramid(self) -> bool:
        """The output is a pyramidal OME-Zarr or OME-TIFF, written tile by tile."""
        from medhpc.io.pyramid import is_zarr_path
        from medhpc.io.tiff import is_ome_path

        return self.out is not None and (is_zarr_path(self.out) or is_ome_path(self.out))

    def output_pixel_size_um(self):
        """Output pixel size (y, x) in um, from the other stain's; None when unknown."""
        if self.stack is None or self.stack.pixel_size_um is None:
            return None
        ratio = self.registration.downsample * self.placement.scale / self.grid.factor
        return tuple(float(size) * ratio for size in self.stack.pixel_size_um)

    def plan(self) -> dict:
        """The decomposition, geometry and memory per rank, for ``--dry-run``."""
        count = self.registration.count
        ranks = []
        if self.stack is not None:
            stack = self.stack
            input_tile_bytes = 0
            if stack.slides:
                ty, tx = stack.slides[0].tile_shape
                input_tile_bytes = ty * tx * stack.channels * np.dtype(stack.dtype).itemsize
            for r in range(self.world.size):
                first, last = block_range(count, self.world.size, r)
                memory = memory_plan(self.registration.working_shape, self.grid.shape,
                                     stack.channels, stack.dtype, self.output.tile,
                                     last - first, stack.kind == "slides", self.pyramid,
                                     False, input_tile_bytes)
                ranks.append({"rank": r, "sections_warped": [first, last], "memory": memory,
                              "memory_mb": round(memory["total_bytes"] / 2**20)})
        return {"registration": self.registration.path, "sections": count,
                "input": self.stack.source if self.stack else None,
                "scale": self.placement.scale, "output_shape": list(self.grid.shape),
                "output_per_working_px": self.grid.factor,
                "output": {"path": str(self.out) if self.out else None,
                           "pyramid": self.pyramid, "tile": self.output.tile,
                           "pixel_size_um": self.output_pixel_size_um()},
                "settings": asdict(self.settings), "ranks_detail": ranks}

    # -- running -------------------------------------------------------------------------
    def execute(self) -> None:
        """Warp and write the other stain (every rank), then map annotations (rank 0)."""
        if self.run.dry_run:
            self.run.print_plan(self.plan())
            return
        registration = self.registration
        if self.stack is not None:
            self.run.log.info(
                f"tnr-apply: {registration.count} sections of {self.stack.source} at "
                f"{self.placement.scale:g} times the registered size, output "
                f"{self.grid.shape[1]}x{self.grid.shape[0]} px, {self.world.size} rank(s)")
            local = self.warp_sections()
            self.write_volume(local)
        if self.annotations.points is not None or self.annotations.geojson is not None:
            with self.run.stage("annotations", "other"):
                self.world.agree(self._write_annotations)
        extra = {"command": "tnr-apply"}
        if self.stack is not None:
            plan = self.plan()["ranks_detail"]
            peaks = self.world.gather(peak_memory_mb())
            levels = self.world.gather(self._levels_read)
            if self.world.is_root:
                extra["memory"] = {"peak_rss_mb_per_rank": [round(p, 1) for p in peaks],
                                   "plan_mb_per_rank": [round(r["memory"]["total_bytes"]
                                                              / 2**20, 1) for r in plan]}
                extra["levels_read"] = {k: v for part in levels for k, v in part.items()}
        self.run.finish(extra)

    def warp_sections(self):
        """Warp this rank's block of sections tile by tile (``--tile`` square).

        Each output tile's coordinates are carried into the frame the other stain is
        sampled in (its pixels block-averaged by the whole part of its pixels per output
        pixel) and only the region they need is read: whole slides by region from the
        stored level nearest that frame (never level 0 whole), other inputs from their
        padded canvas. Pyramidal outputs (``.ome.tif``, ``.ome.zarr``) receive the
        tiles as they are made; other outputs are held for this rank's sections
        ``(c, z_local, y, x)`` and returned (None for pyramidal outputs).
        """
        registration, stack, grid = self.registration, self.stack, self.grid
        start, stop = block_range(registration.count, self.world.size, self.world.rank)
        ny, nx = grid.shape
        dtype = np.dtype(stack.dtype)
        pyramid = self._open_pyramid() if self.pyramid else None
        local = None if pyramid else np.zeros((stack.channels, stop - start, ny, nx), dtype)
        interpolation = self.settings.interpolation or registration.interpolation
        order = INTERPOLATION_ORDER[interpolation]
        # the other stain's pixels per output pixel; sections are block-averaged by its
        # whole part first (as tnr-register does at the working level)
        ratio = registration.downsample * self.placement.scale / grid.factor
        block = max(1, int(math.floor(ratio + 1e-6)))
        gain = np.float32(ratio / block)
        cap = region_cap_pixels(self.output.tile)
        intensity = self.intensity_maps(start, stop)

        def warp_block():
            for row, index in enumerate(range(start, stop)):
                warp = registration.warp(index)
                with self.sampled_frame(index, block) as (regions, frame_shape, offset):
                    # frame px = gain * (c + 0.5) - offset / block - 0.5, c: output-scaled
                    # coordinates of the registered padded section
                    shift = (-np.asarray(offset) / block - 0.5 + 0.5 * ratio / block) \
                        .astype(np.float32)
                    for rows, columns in output_tiles((ny, nx), self.output.tile):
                        with self.run.stage("warp", "kernel"):
                            coord_y, coord_x = warp.coordinates(rows, nx, grid.factor, columns)
                            coord_y = coord_y * gain + shift[0]
                            coord_x = coord_x * gain + shift[1]
                        tile = warp_tile(coord_y, coord_x, regions, frame_shape, cap,
                                         self.kernels.remap, order, stack.background,
                                         stack.channels, self.run.stage)
                        values = np.stack([_cast(intensity(index, c, tile[c]), dtype)
                                           for c in range(stack.channels)])
                        with self.run.stage("write volume", "io"):
                            if pyramid is not None:
                                pyramid.write_tile(index, rows, columns, values)
                            else:
                                local[:, row, rows, columns] = values

        try:
            self.world.agree_all(warp_block)
        except BaseException:
            if pyramid is not None:
                pyramid.abort()
            raise
        self._pyramid_output = pyramid
        return local

    @contextmanager
    def sampled_frame(self, index: int, block: int):
        """The other stain's section ``index`` as sampled: ``(regions, shape, offset)``.

        ``regions(rows, columns)`` gives pixels of the frame (the section block-averaged
        ``block`` times, float32 or input type); ``shape`` is the frame's (y, x);
        ``offset`` is where, in the other stain's pixels, the frame's origin lies
        relative to the registered padded section scaled (the section's placement).
        Whole slides are read by region from the level :func:`choose_level` picks;
        other inputs are placed on their padded canvas (:meth:`placed_section`).
        """
        registration, stack = self.registration, self.stack
        other = self.placement.order[index]
        exact = self.placement.scale * registration.section_offsets[index]
        if stack.kind == "slides":
            from medhpc.io.wholeslide import choose_level

            level, sub_block = choose_level(stack.slides[other], block)
            self._levels_read[stack.names[other]] = {"level": level, "block": sub_block}
            with stack.regions(other, block) as regions:
                yield regions, (stack.shape[0] // block, stack.shape[1] // block), exact
            return
        canvas, residual = self.placed_section(index)
        image = downsample(canvas, block)
        yield (lambda rows, columns: image[rows, columns]), image.shape[:2], residual

    def placed_section(self, index: int):
        """Registered section ``index`` of the other stain on its padded canvas, placed where
        the registered section lay in its padded input (float32), and the sub-pixel rest of
        that placement."""
        registration, stack = self.registration, self.stack
        other = self.placement.order[index]
        with self.run.stage("read sections", "io"):
            padded = stack.read(other)
        own_offsets = centred_offsets(stack.shapes, stack.shape)
        (top, left), (height, width) = own_offsets[other], stack.shapes[other]
        exact = self.placement.scale * registration.section_offsets[index]
        placed = np.round(exact).astype(np.int64)
        canvas = np.full(self._canvas_shape() + padded.shape[2:], stack.background, np.float32)
        canvas[placed[0]:placed[0] + height, placed[1]:placed[1] + width] = \
            padded[top:top + height, left:left + width]
        return canvas, exact - placed

    def intensity_maps(self, start: int, stop: int) -> IntensityMaps:
        """The other stain's intensity maps onto its own stack median, as tnr-register makes
        them (tissue quantiles of every section at the registration's working level)."""
        from medhpc.tnr.preprocess import intensity_scale, prepare_section

        registration, stack = self.registration, self.stack
        if (self.settings.normalise or registration.normalise) == "none":
            return IntensityMaps.identity()
        factor = max(1, int(round(registration.downsample * self.placement.scale)))
        statistics = {}
        with self.run.stage("intensity statistics", "kernel"):
            scale = np.float32(intensity_scale(stack.dtype))
            for index in range(start, stop):
                if stack.kind == "slides":  # from the stored level, never level 0 whole
                    working, _ = stack.read_working(self.placement.order[index], factor)
                    prepared = prepare_section(working / scale, registration.stain, 1)
                else:
                    canvas, _ = self.placed_section(index)
                    prepared = prepare_section(canvas / scale, registration.stain, factor)
                statistics[index] = {"quantiles": [list(row) for row in prepared.quantiles]}
        with self.run.stage("gather statistics", "comm"):
            merged = {}
            for part in self.world.allgather(statistics):
                merged.update(part)
        weights = (registration.weights if registration.weights is not None
                   else np.ones(registration.count))
        return IntensityMaps.from_statistics(merged, registration.count, weights,
                                             intensity_scale(stack.dtype))

    def _canvas_shape(self) -> tuple:
        """The other stain's padded section: the registered padded section at its scale,
        enlarged where a section placed at its scaled offset would not fit."""
        registration, scale = self.registration, self.placement.scale
        shape = np.ceil(np.asarray(registration.input_shape) * scale - 1e-6).astype(np.int64)
        for index, other in enumerate(self.placement.order):
            placed = np.round(scale * registration.section_offsets[index]).astype(np.int64)
            shape = np.maximum(shape, placed + np.asarray(self.stack.shapes[other]))
        return tuple(int(n) for n in shape)

    def _open_pyramid(self):
        from medhpc.io.pyramid import PyramidOutput, pyramid_layout

        stack = self.stack
        layout = pyramid_layout((self.registration.count,) + tuple(self.grid.shape),
                                stack.channels, stack.dtype, self.output.tile,
                                self.output_pixel_size_um(), stack.background)
        return PyramidOutput(self.world, self.out, layout,
                             self.output.resolved_compression(stack),
                             overwrite=self.run.overwrite)

    def write_volume(self, local) -> None:
        """Write the warped stack as tnr-register writes its volume (``local`` None: the
        pyramid's tiles are written; its levels and files are made here)."""
        count = self.registration.count
        with self.run.stage("write volume", "io"):
            if local is None:
                start, stop = block_range(count, self.world.size, self.world.rank)
                self._pyramid_output.finish(range(start, stop))
            else:
                ny, nx = self.grid.shape
                size_um = self.output_pixel_size_um()
                spacing = ((size_um[1] * 1e-3, size_um[0] * 1e-3) if size_um is not None else
                           (self.registration.downsample * self.placement.scale
                            / self.grid.factor,) * 2)
                geometry = ImageGeometry.from_spacing((count, ny, nx), spacing + (1.0,))
                volume = local if self.stack.channels == 3 else local[0]
                own = slab(count, self.world.size, self.world.rank)
                write_section_volume(self.world, self.out, volume, own, geometry,
                                     self.run.overwrite)
        self.run.log.info(f"volume written to {self.out}")

    # -- annotations ---------------------------------------------------------------------
    def map_points(self, sections: np.ndarray, xy: np.ndarray):
        """Map annotation positions input -> output.

        Parameters
        ----------
        sections : numpy.ndarray
            (N,) registered section index of each point.
        xy : numpy.ndarray
            (N, 2) (x, y) in the pixels of the input sections (the ``--input`` sections,
            or the registered ones without ``--input``), unpadded, at full resolution.

        Returns
        -------
        xy_out : numpy.ndarray
            (N, 2) (x, y) in output-volume pixels.
        z : numpy.ndarray
            (N,) output section (= section index).
        inside : numpy.ndarray
            (N,) bool: the inversion converged and the point lies inside the output.
        """
        registration, grid, scale = self.registration, self.grid, self.placement.scale
        corner = 0.5 if self.settings.origin == "pixel-corner" else 0.0
        own = np.asarray(xy, np.float64)[:, ::-1] - corner
        padded = (own + 0.5) / scale - 0.5 + registration.section_offsets[sections]
        working = (padded + 0.5) / registration.downsample - 0.5
        output = np.empty_like(working)
        converged = np.zeros(len(working), bool)
        for section in np.unique(sections):
            chosen = sections == section
            output[chosen], converged[chosen] = invert_warp(
                registration.displacement[section], registration.step, working[chosen])
        output = (output + 0.5) * grid.factor - 0.5
        limit = np.asarray(grid.shape, np.float64) - 0.5
        inside = converged & np.all((output >= -0.5) & (output <= limit), axis=1)
        return output[:, ::-1] + corner, np.asarray(sections, np.int64), inside

    def _write_annotations(self) -> None:
        """Map and write the points CSV and GeoJSON (rank 0; inside ``world.agree``)."""
        notes, log = self.annotations, self.run.log
        if self._points is not None:
            table = self._points
            xy_out, z, inside = self.map_points(table.sections, table.xy)
            write_points_csv(notes.points_out, table, xy_out, z, inside, self.run.overwrite)
            outside = int(np.count_nonzero(~inside))
            log.info(f"{len(inside)} points written to {notes.points_out}")
            if outside:
                log.notice(f"{outside} of {len(inside)} points fall outside the output (or did "
                           f"not converge): inside = false in {notes.points_out}")
        if self._geojson is not None:
            mapped = [map_geojson(document, self.map_points) for document in self._geojson]
            write_geojson(notes.geojson_out, self._geojson, [content for content, _ in mapped],
                          Path(notes.geojson).is_dir(), self.run.overwrite)
            outside = sum(count for _, count in mapped)
            log.info(f"GeoJSON written to {notes.geojson_out}")
            if outside:
                log.notice(f"{outside} GeoJSON position(s) fall outside the output (or did not "
                           f"converge): their features have inside = false")
