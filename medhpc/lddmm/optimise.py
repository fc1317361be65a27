"""Gradient descent on the LDDMM energy at one pyramid level (Beg et al. 2005).

Energy of the velocity ``v = (v_0, ..., v_{T-1})``::

    E(v) = dt sum_i <v_i, K^-1 v_i>  +  D(I0 o phi_{1,0}, I1)

Its gradient in the metric of V at time point i is ``2 v_i - K b_i`` with the
force ``b_i = |D phi_{i,1}| r_i grad J0_i`` (:mod:`medhpc.lddmm.flows`). A step
of length ``eps`` gives ``v' = (1 - 2 eps) v + eps K b``, whose regularity term
follows from three inner products without another FFT::

    R(v') = (1 - 2 eps)^2 R(v) + 2 eps (1 - 2 eps) dt <v, b> + eps^2 dt <b, K b>

(``<K^-1 v, K b> = <v, b>`` as K is symmetric). Step control: a trial step that
lowers the energy is taken and the next step is 1.25x longer; otherwise the step
is halved and tried again. A level ends after its iteration budget, when no step
lowers the energy, or when the relative decrease stayed below ``tolerance`` for
three iterations in a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medhpc.lddmm import similarity
from medhpc.lddmm.flows import J0_HALO, Flows, ForwardFlow
from medhpc.lddmm.grid import LevelGrid
from medhpc.lddmm.reductions import inner
from medhpc.lddmm.regulariser import multiplier_on_block
from medhpc.parallel.fft import apply_fourier_multiplier
from medhpc.parallel.comm import World
from medhpc.parallel.geometry import slab
from medhpc.lddmm.settings import Settings

STEP_GROWTH = 1.25
STEP_SHRINK = 0.5
MAX_HALVINGS = 10
MAX_STEP = 1.0
PATIENCE = 3


COARSEST_SPACING_MM = 8.0
COARSEST_VOXELS = 16


def auto_levels(shape, spacing_zyx_mm) -> int:
    """Pyramid levels whose coarsest voxel is about ``COARSEST_SPACING_MM`` (at least
    ``COARSEST_VOXELS`` voxels along every axis)."""
    levels, spacing, size = 1, min(spacing_zyx_mm), min(shape)
    while spacing * 2 <= COARSEST_SPACING_MM and (size + 1) // 2 >= COARSEST_VOXELS:
        levels, spacing, size = levels + 1, spacing * 2, (size + 1) // 2
    return levels


def resolved(settings: Settings, shape, spacing_zyx_mm) -> Settings:
    """``settings`` with ``levels`` 0 replaced by :func:`auto_levels` for this grid, and the
    default iterations cut to the finest levels when there are fewer levels."""
    from dataclasses import fields, replace

    if not settings.levels:
        settings = replace(settings, levels=auto_levels(shape, spacing_zyx_mm))
    default = next(f.default for f in fields(Settings) if f.name == "iterations")
    if settings.iterations == default and len(default) > settings.levels:
        settings = replace(settings, iterations=default[len(default) - settings.levels:])
    return settings


@dataclass
class LevelState:
    """Where a level stands (what a checkpoint holds)."""

    velocity: list
    regularity: float
    step: float
    iteration: int = 0
    history: list = field(default_factory=list)
    stopped: str = ""


def _owned(slab_with_ghosts: np.ndarray, ghosts: int) -> np.ndarray:
    return slab_with_ghosts[ghosts:slab_with_ghosts.shape[0] - ghosts]


def converged(history: list, tolerance: float) -> bool:
    """True when the last ``PATIENCE`` iterations each lowered the energy by less than
    ``tolerance`` relative to it."""
    if len(history) <= PATIENCE:
        return False
    energies = [entry["energy"] for entry in history[-PATIENCE - 1:]]
    return all((before - after) <= tolerance * abs(before)
               for before, after in zip(energies, energies[1:]))


class LevelOptimiser:
    """Registers the template to the target on one level's grid.

    Parameters
    ----------
    world : World
    grid : LevelGrid
    kernels : module
    settings : Settings
    template, target : numpy.ndarray
        Whole images ``I0`` (moving) and ``I1`` (fixed) on this level's grid.
    stage : callable
        The run's ``stage(name, kind)``.
    level : int
    """

    def __init__(self, world: World, grid: LevelGrid, kernels, settings: Settings,
                 template: np.ndarray, target: np.ndarray, stage, level: int = 0):
        self.world = world
        self.grid = grid
        self.settings = settings
        self.template = np.ascontiguousarray(template, np.float32)
        self.target = np.ascontiguousarray(target, np.float32)
        self.target_owned = self.target[grid.z_first:grid.z_first + grid.owned]
        self.stage = stage
        self.level = level
        self.flows = Flows(world, grid, kernels, settings.timesteps, settings.max_step_voxels,
                           stage)
        self.dt = 1.0 / settings.timesteps
        self._multipliers = {}

    # -- terms ----------------------------------------------------------------------------
    def smooth(self, field: np.ndarray, inverse: bool = False) -> np.ndarray:
        """``K field`` (or ``K^-1 field``); the multiplier is computed once per level."""
        if inverse not in self._multipliers:
            self._multipliers[inverse] = multiplier_on_block(
                self.world, self.grid.shape, self.grid.spacing_zyx_mm, self.settings.metric_v,
                inverse)
        multiplier = self._multipliers[inverse]
        with self.stage("fft smoothing", "kernel"):
            return apply_fourier_multiplier(self.world, field, self.grid.shape,
                                            lambda kz, ky, kx: multiplier)

    def regularity(self, velocity: list) -> float:
        """``dt sum_i <v_i, K^-1 v_i>`` (one FFT pair per component and time point)."""
        local = sum(inner(v, self.smooth(v, inverse=True))
                    for v in velocity)
        return self.dt * self.world.sum(local)

    def similarity(self, forward: ForwardFlow) -> similarity.SimilarityValue:
        if self.settings.metric == "lncc":
            return self._local_correlation(forward)
        warped = _owned(forward.template[-1], J0_HALO)
        return similarity.evaluate(self.world, warped, self.target_owned, self.settings.metric,
                                   self.settings.similarity_sigma)

    def _local_correlation(self, forward: ForwardFlow) -> similarity.SimilarityValue:
        radius, grid = self.settings.radius, self.grid
        warped = self.flows.warp(self.template, forward.displacement, radius)
        target = np.zeros_like(warped)
        low = max(grid.z_first - radius, 0)
        high = min(grid.z_first + grid.owned + radius, grid.shape[0])
        offset = low - (grid.z_first - radius)
        target[offset:offset + high - low] = self.target[low:high]
        with self.stage("local correlation", "kernel"):
            return similarity.local_correlation(self.world, warped, target,
                                                slab(grid.shape[0], self.world.size,
                                                     self.world.rank, radius),
                                                radius, self.settings.similarity_sigma)

    def pulled_back_image(self, term: similarity.SimilarityValue) -> np.ndarray:
        """The whole image the backward flow pulls back: the target, or dD/dJ for lncc."""
        if term.derivative is None:
            return self.target
        with self.stage("gather derivative", "comm"):
            return np.ascontiguousarray(np.concatenate(self.world.allgather(term.derivative)))

    def zero_velocity(self) -> list:
        return [np.zeros(self.grid.owned_shape(3), np.float32)
                for _ in range(self.settings.timesteps)]

    # -- iteration ------------------------------------------------------------------------
    def run(self, state: LevelState, iterations: int, after_iteration=None,
            progress=None) -> tuple[LevelState, ForwardFlow]:
        """Iterate from ``state`` up to ``iterations``; return the state and the last flow.

        ``after_iteration(state)`` runs after every iteration (checkpointing).
        """
        forward = self.flows.towards_template(state.velocity, self.template)
        term = self.similarity(forward)
        energy = state.regularity + term.value
        if not state.history:
            state.history.append(self._entry(0, energy, term.value, state.regularity, 0.0,
                                             forward.substeps, float("nan")))
        while state.iteration < iterations and not state.stopped:
            if converged(state.history, self.settings.tolerance):
                state.stopped = "converged"
                break
            forces, _ = self.flows.backward_forces(state.velocity, self.pulled_back_image(term),
                                                   forward, term.coefficients)
            smoothed, v_dot_b, b_dot_kb = self._smoothed_forces(state.velocity, forces)
            gradient_norm = float(np.sqrt(max(4 * state.regularity - 4 * v_dot_b + b_dot_kb, 0.0)))
            for _ in range(MAX_HALVINGS):
                step = state.step
                keep = 1.0 - 2.0 * step
                trial = [keep * v + step * kb for v, kb in zip(state.velocity, smoothed)]
                trial_regularity = (keep * keep * state.regularity + 2 * step * keep * v_dot_b
                                    + step * step * b_dot_kb)
                trial_forward = self.flows.towards_template(trial, self.template)
                trial_term = self.similarity(trial_forward)
                trial_energy = trial_regularity + trial_term.value
                if trial_energy < energy:
                    state.velocity, state.regularity = trial, trial_regularity
                    forward, term, energy = trial_forward, trial_term, trial_energy
                    state.step = min(step * STEP_GROWTH, MAX_STEP)
                    break
                state.step = step * STEP_SHRINK
            else:
                state.stopped = "no step lowers the energy"
                break
            state.iteration += 1
            state.history.append(self._entry(state.iteration, energy, term.value,
                                             state.regularity, step, forward.substeps,
                                             gradient_norm))
            if progress is not None:
                progress(f"level {self.level} iteration {state.iteration}/{iterations}: "
                         f"energy {energy:.6g} (similarity {term.value:.6g}, regularity "
                         f"{state.regularity:.6g}), step {step:.3g}, substeps {forward.substeps}")
            if after_iteration is not None:
                after_iteration(state)
        return state, forward

    def _smoothed_forces(self, velocity: list, forces: list) -> tuple[list, float, float]:
        """``K b_i`` for every time point and ``dt <v, b>``, ``dt <b, K b>`` (one all-reduce)."""
        smoothed = []
        sums = np.zeros(2)
        for i, (v, b) in enumerate(zip(velocity, forces)):
            sums[0] += inner(v, b)
            kb = self.smooth(b)
            sums[1] += inner(b, kb)
            forces[i] = None
            smoothed.append(kb)
        with self.stage("reductions", "comm"):
            self.world.allreduce_(sums, "sum")
        return smoothed, self.dt * float(sums[0]), self.dt * float(sums[1])

    def _entry(self, iteration, energy, similarity_value, regularity, step, substeps,
               gradient_norm) -> dict:
        return {"level": self.level, "iteration": iteration, "energy": float(energy),
                "similarity": float(similarity_value), "regularity": float(regularity),
                "step": float(step), "substeps": int(substeps),
                "gradient_norm": float(gradient_norm)}
