"""OSEM, MLEM, OSEM with the relative difference prior (one-step-late) and BSREM.

The forward model is ``y_bar = m * A(G x) + a``: ``A`` the Joseph projector, ``G``
an optional image-space Gaussian resolution model, ``m`` the multiplicative
factors (attenuation x normalisation), ``a`` the additive term (randoms +
scatter). One OSEM sub-iteration over subset ``s``::

    p  = A_s G x                       forward projection
    r  = m y / (m p + a)               measured over expected, per bin
    b  = G^T A_s^T r                   back projection   (summed over ranks)
    x <- x * b / (G^T A_s^T m + beta dR/dx)

MLEM is OSEM with one subset. BSREM (block sequential regularised EM, relaxed, convergent
for the penalised objective ``L(x) - beta R(x)``) replaces the last step by::

    x <- max(0, x + a_k x / s_s (b - s_s - beta / S grad R(x))),  a_k = a_0 / (1 + g k)

with ``s_s`` the subset's sensitivity and ``k`` the iteration; with ``a_k = 1`` and
``beta = 0`` it is the OSEM step. Every rank holds a share of each subset's
measurements (:class:`SubsetShare`); the back projections are summed over the
ranks that share one image (``reduce``), so the result does not depend on how
the measurements were split.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medhpc import backend
from medhpc.filters.gaussian import GaussianFilter
from medhpc.pet.settings import ReconSettings


@dataclass
class SubsetShare:
    """A rank's measurements of one subset, on the compute device.

    Attributes
    ----------
    projector : JosephProjector
        Projects the image onto exactly these measurements.
    prompts, multiplicative, additive : array
        Flat float32 arrays in the projector's LOR order; ``prompts`` and
        ``additive`` have ``tof_bins`` values per LOR, TOF bin fastest.
    tof_bins : int
        TOF bins per LOR (1 without TOF).
    """

    projector: object
    prompts: object
    multiplicative: object
    additive: object
    tof_bins: int = 1

    @property
    def n_values(self) -> int:
        """Measurement bins in this share."""
        return int(self.prompts.shape[0])


@dataclass
class ReconState:
    """Where an iterative reconstruction stands (what a checkpoint holds)."""

    image: np.ndarray
    iteration: int = 0
    log_likelihood: list = field(default_factory=list)


class OsemReconstructor:
    """Runs OSEM-type updates on one image shared by the ranks in ``reduce``.

    Parameters
    ----------
    run : medhpc.runtime.context.Run
        Device, timer and log.
    shares : list of SubsetShare
        This rank's share of every subset (empty shares are allowed).
    image_shape : tuple
        ``(z, y, x)`` of the image (or of this rank's slab of it).
    voxel_mm : tuple
        ``(x, y, z)`` voxel size.
    settings : ReconSettings
    reduce : medhpc.parallel.comm.World
        The ranks whose back projections add up to one image.
    transaxial_only : bool
        Model resolution and post-filter within planes only (2-D multi-slice data).
    sensitivities : list of ndarray, optional
        The subsets' sensitivity images (from a cache); computed when not given.
    support : (ny, nx) bool array, optional
        Where the image may be non-zero in every plane (the scanner's field of view).
    """

    def __init__(self, run, shares, image_shape, voxel_mm, settings: ReconSettings, reduce,
                 transaxial_only: bool = False, sensitivities=None, support=None):
        self.support = support
        self.run = run
        self.device = run.device
        self.shares = shares
        self.image_shape = tuple(image_shape)
        self.settings = settings
        self.reduce = reduce
        self.em = backend.kernels("medhpc.pet", self.device, "em")
        self.iteration = 0
        self.transaxial_only = transaxial_only
        self.psf = GaussianFilter(settings.psf_fwhm_mm, voxel_mm, self.device, transaxial_only)
        if sensitivities is None:
            self.sensitivities = [self._sensitivity(share) for share in shares]
        else:
            self.sensitivities = [backend.to_device(image, self.device) for image in sensitivities]

    # -- the model --------------------------------------------------------------------
    def _zeros_image(self):
        return backend.zeros(self.image_shape, np.float32, self.device)

    def _forward(self, share: SubsetShare, image):
        with self.run.stage("resolution model", "kernel"):
            blurred = self.psf.apply(image)
        with self.run.stage("forward project", "kernel"):
            return share.projector.forward(blurred).reshape(-1)

    def _back(self, share: SubsetShare, values, stage: str = "back project",
              every_bin: bool = False):
        projector = share.projector
        with self.run.stage(stage, "kernel"):
            image = (projector.back_every_bin(values) if every_bin
                     else projector.back(values.reshape(projector.shape_out)))
        with self.run.stage("resolution model", "kernel"):
            image = self.psf.apply(image)
        with self.run.stage("allreduce", "comm"):
            self.reduce.allreduce_(image)
        return image

    def _sensitivity(self, share: SubsetShare):
        """G^T A_s^T m for one subset, summed over the ranks (with TOF, m is the same in
        every bin: ``JosephProjector.back_every_bin``)."""
        return self._back(share, share.multiplicative, stage="sensitivity", every_bin=True)

    # -- the algorithm -----------------------------------------------------------------
    def initial_image(self) -> np.ndarray:
        """A uniform image of ones where any subset is sensitive (and inside the support),
        zero elsewhere; the updates are multiplicative, so zeros stay zero."""
        total = np.zeros(self.image_shape, dtype=np.float32)
        for sensitivity in self.sensitivities:
            total += backend.to_host(sensitivity)
        inside = total > 0
        if self.support is not None:
            inside &= self.support[None]
        return inside.astype(np.float32)

    def subiteration(self, image, subset: int) -> float:
        """Update ``image`` (device array) in place with subset ``subset``; return the
        Poisson log-likelihood of the image before the update on this subset (all ranks)."""
        backprojection, likelihood = self.ratio_back_projection(image, subset)
        with self.run.stage("update", "kernel"):
            if self.settings.algorithm == "bsrem":
                self._bsrem_update(image, backprojection, subset)
            else:
                self.em.em_update(image, backprojection, self._denominator(image, subset))
        return likelihood

    def ratio_back_projection(self, image, subset: int):
        """``(G^T A_s^T (m y / ybar), log-likelihood)`` of ``image`` (device) on subset
        ``subset``, both summed over the ranks in ``reduce``."""
        share = self.shares[subset]
        projection = self._forward(share, image)
        with self.run.stage("likelihood", "kernel"):
            likelihood = self._likelihood(share, projection, image, subset)
        with self.run.stage("allreduce", "comm"):
            likelihood = self.reduce.sum(likelihood)
        with self.run.stage("ratio", "kernel"):
            ratio = backend.empty(share.n_values, np.float32, self.device)
            self.em.em_ratio(share.prompts, projection, share.multiplicative, share.additive,
                             share.tof_bins, ratio)
        return self._back(share, ratio), likelihood

    def _bsrem_update(self, image, backprojection, subset: int) -> None:
        """x += a_k x / s_s (A_s^T m y / ybar - s_s - beta / S grad R(x)), x >= 0."""
        gradient = self._zeros_image()
        if self.settings.rdp_beta > 0:
            self.em.rdp_gradient(image, self.settings.rdp_gamma, self.settings.rdp_epsilon,
                                 gradient)
        self.em.bsrem_update(image, backprojection, self.sensitivities[subset], gradient,
                             self.settings.rdp_beta / self.settings.n_subsets,
                             self.settings.bsrem_step_at(self.iteration))

    def _likelihood(self, share: SubsetShare, projection, image, subset: int) -> float:
        """This rank's part of the subset's Poisson log-likelihood (constant dropped)."""
        return self.em.poisson_log_likelihood(share.prompts, projection, share.multiplicative,
                                              share.additive, share.tof_bins)

    def _denominator(self, image, subset: int):
        sensitivity = self.sensitivities[subset]
        if self.settings.algorithm != "osem-rdp" or self.settings.rdp_beta <= 0:
            return sensitivity
        gradient = self._zeros_image()
        self.em.rdp_gradient(image, self.settings.rdp_gamma, self.settings.rdp_epsilon, gradient)
        denominator = self._zeros_image()
        beta = self.settings.rdp_beta / self.settings.n_subsets
        self.em.osl_denominator(sensitivity, gradient, beta, denominator)
        return denominator

    def run_iterations(self, state: ReconState, checkpointer=None, progress=None) -> ReconState:
        """Iterate from ``state`` to ``settings.iterations``; checkpoint when due."""
        image = backend.to_device(state.image, self.device)
        iterations = range(state.iteration, self.settings.iterations)
        if progress is not None:
            iterations = progress(iterations, desc="OSEM iterations")
        for iteration in iterations:
            self.iteration = iteration
            for subset in range(self.settings.n_subsets):
                state.log_likelihood.append(self.subiteration(image, subset))
            state.iteration = iteration + 1
            if checkpointer is not None and checkpointer.due(state.iteration):
                with self.run.stage("checkpoint", "io"):
                    state.image = backend.to_host(image)
                    checkpointer.save(state.iteration, self.checkpoint_state(state))
        state.image = backend.to_host(image)
        return state

    def checkpoint_state(self, state: ReconState) -> dict:
        """The arrays and numbers a checkpoint keeps."""
        return {"image": state.image, "iteration": state.iteration,
                "log_likelihood": np.asarray(state.log_likelihood, dtype=np.float64)}

    def postfilter(self, image: np.ndarray, voxel_mm) -> np.ndarray:
        """Apply the post-reconstruction Gaussian (host in, host out)."""
        return postfiltered(self.run, image, self.settings, voxel_mm, self.transaxial_only)


def postfiltered(run, image: np.ndarray, settings: ReconSettings, voxel_mm,
                 transaxial_only: bool = False) -> np.ndarray:
    """``image`` (host) smoothed by the post-reconstruction Gaussian of ``settings``."""
    if settings.postfilter_fwhm_mm <= 0:
        return image
    with run.stage("post-filter", "kernel"):
        smooth = GaussianFilter(settings.postfilter_fwhm_mm, voxel_mm, run.device,
                                transaxial_only)
        return backend.to_host(smooth.apply(backend.to_device(image, run.device)))


class ListModeReconstructor(OsemReconstructor):
    """OSEM over list-mode events: one measurement per event, subsets by event order.

    Each share's ``prompts`` are ones (one count per event), its projector holds the
    events' LORs (with TOF, each LOR centred on its event's TOF position and one bin
    wide) and ``multiplicative`` / ``additive`` are the events' factors. Every subset's
    sensitivity is ``1 / n_subsets`` of the scanner's, so ``sensitivity`` is given as
    ``G^T A^T m / n_subsets`` over every LOR of the scanner (all ranks summed) and shared.

    The log-likelihood of subset ``s`` is ``sum_e log ybar_e - <sensitivity, x> - a_s``
    with ``a_s`` the expected additive counts of the window over ``n_subsets``
    (``additive_total``); the subsets add up to the list-mode log-likelihood.
    """

    def __init__(self, run, shares, image_shape, voxel_mm, settings: ReconSettings, reduce,
                 sensitivity, additive_total: float = 0.0, support=None):
        super().__init__(run, shares, image_shape, voxel_mm, settings, reduce,
                         sensitivities=[sensitivity] * settings.n_subsets, support=support)
        self.additive_share = additive_total / settings.n_subsets

    def _likelihood(self, share: SubsetShare, projection, image, subset: int) -> float:
        events = self.em.listmode_log_likelihood(projection, share.multiplicative,
                                                 share.additive) if share.n_values else 0.0
        if self.reduce.rank != 0:  # the image terms once per image
            return events
        return events - self.em.image_dot(self.sensitivities[subset], image) - self.additive_share
