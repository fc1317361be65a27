"""A whole registration: pyramid levels from coarse to fine, velocity carried up.

Both images are on the fixed grid (see :mod:`medhpc.lddmm.transform`). Level ``l``
halves the grid ``levels - 1 - l`` times by 2x2x2 averaging; the velocity of a level
is resampled to the next finer grid and doubled (it is measured in voxels). Every
rank holds its z-slab of the velocity and its owned planes of both images at every
level (:class:`LevelImages`, scattered from rank 0 by :func:`scatter_pyramids`); the
symmetric method reaches the other planes through :class:`~medhpc.lddmm.flows.ImageWindow`,
the Beg method gathers each level's images whole. The code is the same for one rank
(one slab) and many.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from medhpc.lddmm.flows import ImageWindow
from medhpc.lddmm.grid import LevelGrid, check_split, halo_for
from medhpc.lddmm.optimise import LevelOptimiser, LevelState, resolved
from medhpc.lddmm.settings import Settings
from medhpc.lddmm.symmetric import SymmetricOptimiser, level_halo
from medhpc.lddmm.transform import sample
from medhpc.parallel.comm import World
from medhpc.parallel.geometry import block_range, slab
from medhpc.parallel.slabs import fetch_planes, gather_volume, scatter_planes


def pyramid_shapes(shape, levels: int) -> list[tuple]:
    """Grid shapes from the coarsest level to the finest (``shape``)."""
    shapes = [tuple(int(n) for n in shape)]
    for _ in range(levels - 1):
        shapes.append(tuple((n + 1) // 2 for n in shapes[-1]))
    return shapes[::-1]


def downsample(image: np.ndarray) -> np.ndarray:
    """Average 2x2x2 blocks (an odd axis gets its last plane repeated first)."""
    pad = [(0, n % 2) for n in image.shape]
    padded = np.pad(image, pad, mode="edge")
    nz, ny, nx = padded.shape
    blocks = padded.reshape(nz // 2, 2, ny // 2, 2, nx // 2, 2)
    return blocks.mean(axis=(1, 3, 5), dtype=np.float64).astype(np.float32)


def image_pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """The image at every level, coarsest first."""
    images = [np.ascontiguousarray(image, np.float32)]
    for _ in range(levels - 1):
        images.append(downsample(images[-1]))
    return images[::-1]


@dataclass
class LevelImages:
    """This rank's owned planes of both images (and masks) at every level, coarsest first.

    ``fixed_mask`` and ``moving_mask`` are lists like ``fixed`` or both None.
    """

    shapes: list
    fixed: list
    moving: list
    fixed_mask: list | None = None
    moving_mask: list | None = None

    @classmethod
    def from_whole(cls, world: World, levels: int, fixed, moving, fixed_mask=None,
                   moving_mask=None) -> "LevelImages":
        """Pyramids of whole images that every rank holds, cut to this rank's planes."""
        shapes = pyramid_shapes(fixed.shape, levels)
        masked = fixed_mask is not None or moving_mask is not None
        ones = np.ones(fixed.shape, np.float32) if masked else None
        pyramids = [image_pyramid(image, levels) if image is not None else None
                    for image in (fixed, moving,
                                  (ones if fixed_mask is None else fixed_mask) if masked else None,
                                  (ones if moving_mask is None else moving_mask) if masked
                                  else None)]

        def owned(pyramid):
            if pyramid is None:
                return None
            return [np.ascontiguousarray(image[slice(*block_range(image.shape[0], world.size,
                                                                   world.rank))])
                    for image in pyramid]

        return cls(shapes, *(owned(pyramid) for pyramid in pyramids))


def scatter_pyramids(world: World, levels: int, fixed=None, moving=None, fixed_mask=None,
                     moving_mask=None) -> LevelImages:
    """Build the pyramids on rank 0 (whole images there, None elsewhere) and hand every
    rank its owned planes of each level; no rank but 0 ever holds a whole image."""
    masked = world.bcast(fixed_mask is not None or moving_mask is not None)
    shape = world.bcast(None if fixed is None else tuple(fixed.shape))
    shapes = pyramid_shapes(shape, levels)
    names = ("fixed", "moving") + (("fixed_mask", "moving_mask") if masked else ())
    images = {name: None for name in ("fixed", "moving", "fixed_mask", "moving_mask")}
    if world.is_root:
        whole = {"fixed": fixed, "moving": moving}
        if masked:
            ones = np.ones(shape, np.float32)
            whole["fixed_mask"] = ones if fixed_mask is None else fixed_mask
            whole["moving_mask"] = ones if moving_mask is None else moving_mask
    for name in names:
        pyramid = image_pyramid(whole.pop(name), levels) if world.is_root else [None] * levels
        images[name] = [scatter_planes(world, level) for level in pyramid]
        del pyramid
    return LevelImages(shapes, images["fixed"], images["moving"], images["fixed_mask"],
                       images["moving_mask"])


def upsample_velocity(world: World, velocity: list, coarse: LevelGrid,
                      fine: LevelGrid) -> list:
    """Carry a level's velocity to the next finer level (this rank's fine planes).

    The coarse slabs are gathered on every rank (an eighth of a fine field each),
    sampled trilinearly at the fine voxel centres and doubled (voxels halve).
    """
    gathered = world.allgather([np.ascontiguousarray(v) for v in velocity])
    whole = [np.concatenate([parts[i] for parts in gathered], axis=1)
             for i in range(len(velocity))]
    z = np.arange(fine.z_first, fine.z_first + fine.owned, dtype=np.float32)
    y = np.arange(fine.shape[1], dtype=np.float32)
    x = np.arange(fine.shape[2], dtype=np.float32)
    points = np.stack(np.meshgrid(z, y, x, indexing="ij"))
    points = (points + 0.5) / 2.0 - 0.5
    result = []
    for field in whole:
        result.append(np.stack([2.0 * sample(np.ascontiguousarray(c), points) for c in field])
                      .astype(np.float32))
    return result


def level_spacings(shape, spacing_zyx_mm, levels: int) -> list[tuple]:
    """Voxel size of every level, coarsest first."""
    shapes = pyramid_shapes(shape, levels)
    finest = np.asarray(shapes[-1], np.float64)
    return [tuple(h * f for h, f in zip(spacing_zyx_mm, finest / np.asarray(level_shape)))
            for level_shape in shapes]


def level_halos(settings: Settings, shape, spacing_zyx_mm) -> list[int]:
    """Ghost planes of every level, coarsest first."""
    if settings.method == "beg":
        return [halo_for(settings.max_step_voxels, settings)] * settings.levels
    return [level_halo(settings, min(spacing))
            for spacing in level_spacings(shape, spacing_zyx_mm, settings.levels)]


def check_level_split(settings: Settings, shape, spacing_zyx_mm, size: int) -> None:
    """Raise :class:`InputError` unless every level splits over ``size`` ranks."""
    check_split(pyramid_shapes(shape, settings.levels), size,
                level_halos(settings, shape, spacing_zyx_mm))


@dataclass
class RegistrationResult:
    """This rank's share of the outcome at the finest level."""

    grid: LevelGrid
    velocity: list
    forward: np.ndarray
    inverse: np.ndarray
    warped: np.ndarray
    history: list
    stopped: list


class Registration:
    """Register ``moving`` to ``fixed`` (whole images on the fixed grid) across ``world``.

    Parameters
    ----------
    world : World
    kernels : module
    settings : Settings
    fixed, moving : numpy.ndarray
    spacing_zyx_mm : tuple of float
        Voxel size of the fixed grid.
    fixed_mask, moving_mask : numpy.ndarray or None
        Weights in [0, 1] on the fixed grid (``symmetric`` only): only voxels inside
        both, followed to the middle space, drive the registration.
    stage : callable
        The run's ``stage(name, kind)``.
    log : medhpc.runtime.log.Log or None
    """

    def __init__(self, world: World, kernels, settings: Settings, fixed, moving,
                 spacing_zyx_mm, stage, log=None, fixed_mask=None, moving_mask=None):
        self.world = world
        self.kernels = kernels
        self.spacing = tuple(float(h) for h in spacing_zyx_mm)
        shape = fixed.shapes[-1] if isinstance(fixed, LevelImages) else fixed.shape
        settings = resolved(settings, shape, self.spacing)
        self.settings = settings
        self.stage = stage
        self.log = log
        self.shapes = pyramid_shapes(shape, settings.levels)
        self.halos = level_halos(settings, shape, self.spacing)
        check_level_split(settings, shape, self.spacing, world.size)
        if isinstance(fixed, LevelImages):
            self.images = fixed
        else:
            with stage("pyramid", "other"):
                self.images = LevelImages.from_whole(world, settings.levels, fixed, moving,
                                                     fixed_mask, moving_mask)

    def level_images(self, level: int) -> tuple:
        """``(moving, fixed, masks)`` of a level as the method takes them: windows for
        symmetric, whole images for beg; ``masks`` is None or (fixed, moving) windows."""
        images, nz = self.images, self.shapes[level][0]
        if self.settings.method == "beg":
            with self.stage("gather images", "comm"):
                return tuple(fetch_planes(self.world, part[level], nz, 0, nz)
                             for part in (images.moving, images.fixed)) + (None,)
        windows = [ImageWindow(self.world, part[level], nz)
                   for part in (images.moving, images.fixed)]
        masks = None
        if images.fixed_mask is not None:
            masks = (ImageWindow(self.world, images.fixed_mask[level], nz),
                     ImageWindow(self.world, images.moving_mask[level], nz))
        return windows[0], windows[1], masks

    def grid(self, level: int) -> LevelGrid:
        factor = np.asarray(self.shapes[-1], np.float64) / np.asarray(self.shapes[level])
        spacing = tuple(h * f for h, f in zip(self.spacing, factor))
        return LevelGrid.build(self.shapes[level], spacing, self.world.size, self.world.rank,
                               self.halos[level])

    def iterations(self, level: int) -> int:
        budget = self.settings.iterations
        return int(budget[level]) if level < len(budget) else int(budget[-1])

    def run(self, checkpointer=None) -> RegistrationResult:
        """Every level, coarse to fine; checkpoint through ``checkpointer`` when due."""
        loaded = checkpointer.load() if checkpointer is not None else None
        start_level = int(loaded[1]["level"]) if loaded else 0
        history, stopped, done_before = [], [], 0
        if loaded:
            history = json.loads(loaded[1]["history"])
            stopped = json.loads(loaded[1]["stopped"])
            done_before = int(loaded[1]["done_before"])
            if self.log:
                self.log.info(f"resuming at level {start_level}, iteration {loaded[0]}")
        velocity, previous_grid = None, None
        for level in range(start_level, self.settings.levels):
            grid = self.grid(level)
            optimiser_class = (LevelOptimiser if self.settings.method == "beg"
                               else SymmetricOptimiser)
            moving, fixed, masks = self.level_images(level)
            optimiser = optimiser_class(self.world, grid, self.kernels, self.settings,
                                        moving, fixed, self.stage, level)
            if masks is not None:
                optimiser.set_masks(*masks)
            if loaded and level == start_level:
                state = self._restored_state(loaded[1], grid)
                state.history = [entry for entry in history if entry["level"] == level]
                history = [entry for entry in history if entry["level"] < level]
            else:
                if velocity is None:
                    velocity, regularity = optimiser.zero_velocity(), 0.0
                else:
                    with self.stage("carry velocity up", "comm"):
                        velocity = upsample_velocity(self.world, velocity, previous_grid, grid)
                    regularity = optimiser.regularity(velocity)
                state = LevelState(velocity, regularity, self.settings.step)
            velocity = None  # the state holds it (a second reference would pin a stale field)

            def after_iteration(state, level=level, done_before=done_before):
                self._checkpoint(checkpointer, level, state, done_before, history, stopped)

            state, forward = optimiser.run(state, self.iterations(level), after_iteration,
                                           progress=self.log.status if self.log else None)
            if self.log:
                self.log.end_status()
                first, last = state.history[0]["energy"], state.history[-1]["energy"]
                self.log.info(f"level {level} ({'x'.join(map(str, grid.shape[::-1]))}): "
                              f"{state.iteration} iterations, energy {first:.5g} -> {last:.5g}"
                              f" ({state.stopped or 'iterations'})")
            history.extend(state.history)
            stopped.append(state.stopped or "iterations")
            done_before += state.iteration
            velocity, previous_grid = state.velocity, grid
        flows = optimiser.flows
        if self.settings.method == "beg":
            with self.stage("inverse map", "other"):
                inverse = flows.inverse_map(velocity)
            forward, warped = forward.displacement, forward.template[-1][1:-1]
        else:
            forward, inverse = optimiser.final_maps(velocity)
            warped = flows.warp(moving, forward, 0)
        return RegistrationResult(grid=grid, velocity=velocity, forward=forward,
                                  inverse=inverse, warped=warped,
                                  history=history, stopped=stopped)

    # -- checkpoints ----------------------------------------------------------------------
    def _checkpoint(self, checkpointer, level, state, done_before, history, stopped) -> None:
        iteration = done_before + state.iteration
        if checkpointer is None or not checkpointer.due(iteration):
            return
        with self.stage("checkpoint", "io"):
            grid = self.grid(level)
            owned = slab(grid.shape[0], self.world.size, self.world.rank, 0)
            velocity = np.stack(state.velocity, axis=0)
            whole = gather_volume(self.world, np.ascontiguousarray(
                velocity.reshape((-1,) + velocity.shape[2:])), owned)
            if whole is not None:
                whole = whole.reshape((len(state.velocity), 3) + tuple(grid.shape))
            checkpointer.save(iteration, {
                "level": level, "velocity": whole, "regularity": state.regularity,
                "step": state.step, "done_before": done_before,
                "history": json.dumps(history + state.history), "stopped": json.dumps(stopped)})

    def _restored_state(self, saved: dict, grid: LevelGrid) -> LevelState:
        velocity = np.asarray(saved["velocity"], np.float32)
        z0, z1 = grid.z_first, grid.z_first + grid.owned
        return LevelState(velocity=[np.ascontiguousarray(v[:, z0:z1]) for v in velocity],
                          regularity=float(saved["regularity"]), step=float(saved["step"]),
                          iteration=int(self._iteration_of(saved)))

    @staticmethod
    def _iteration_of(saved: dict) -> int:
        history = json.loads(saved["history"])
        level = int(saved["level"])
        return max((entry["iteration"] for entry in history if entry["level"] == level),
                   default=0)


def settings_record(settings: Settings) -> dict:
    return {key: (list(value) if isinstance(value, tuple) else value)
            for key, value in asdict(settings).items()}
