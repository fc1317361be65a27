"""Low-rank dynamic reconstruction: frames as a non-negative product of factors (NMF).

Frame ``t`` is ``x_t = sum_k H[k, t] W_k``: ``K`` spatial factors ``W_k`` shared by all
frames and their time-activity curves ``H``. Both are estimated from all frames jointly by
the EM-type multiplicative updates of the Poisson likelihood through the projector
(subset ``s``, ratio back projection ``b_t = G^T A_s^T (m y_t / ybar_t)``, sensitivity
``s_s``)::

    W_k    <- W_k  sum_t H[k, t] b_t / (s_s sum_t H[k, t])          (numerator all-reduced)
    H[k,t] <- H[k,t] <W_k, b_t> / <W_k, s_s>                         (with b_t of the new W)

Each update keeps its factor non-negative and does not lower the likelihood of the subset.
Frames are spread over the ranks in blocks; every rank holds all views of its frames and the
whole ``W``; the sums over frames are all-reduced. The start: ``W_k`` = 1 in the field of view
and smooth, distinct curves ``H[k]`` (early to late), refined by a factorisation in image
space of a few OSEM sub-iterations of every frame, so the factors separate before the
projector iterations.
"""

from __future__ import annotations

import numpy as np

from medhpc import backend
from medhpc.pet.settings import ReconSettings


def initial_curves(components: int, frames: int) -> np.ndarray:
    """``(components, frames)`` smooth bumps centred from the first to the last frame."""
    time = np.arange(frames) / max(frames - 1, 1)
    centres = np.linspace(0.0, 1.0, components) if components > 1 else np.array([0.5])
    curves = np.exp(-0.5 * ((time[None, :] - centres[:, None]) / 0.35) ** 2)
    return (0.1 + curves).astype(np.float64)


class NmfReconstructor:
    """NMF reconstruction of this rank's frames (see the module notes).

    Parameters
    ----------
    run : medhpc.runtime.context.Run
    models : list of medhpc.pet.osem.OsemReconstructor
        One per frame of this rank (its subset shares, all views, and the subsets'
        sensitivities, the same for every frame), each reducing over this rank alone.
    frame_indices : sequence of int
        The frames' indices in the acquisition.
    frames : int
        Frames in the acquisition.
    settings : ReconSettings
        ``settings.components`` is ``K``.
    reduce : medhpc.parallel.comm.World
        The ranks that share the frames.
    support : (ny, nx) bool array, optional
        Where the factors may be non-zero.
    initial_frames : list of ndarray, optional
        Reconstructed frames (this rank's) to start from (:meth:`factorise_images`).
    """

    def __init__(self, run, models, frame_indices, frames: int, settings: ReconSettings,
                 reduce, support=None, initial_frames=None):
        self.run, self.device = run, run.device
        self.models = models
        self.frame_indices = list(frame_indices)
        self.frames = int(frames)
        self.settings = settings
        self.reduce = reduce
        self.sensitivities = [np.asarray(backend.to_host(image), np.float64)
                              for image in models[0].sensitivities]
        self.image_shape = self.sensitivities[0].shape
        inside = self.sensitivities[0] > 0
        if support is not None:
            inside &= support[None]
        self.inside = inside
        components = settings.components
        self.factors = np.repeat(inside[None].astype(np.float64), components, axis=0)
        self.curves = initial_curves(components, self.frames)
        if initial_frames is not None:
            self.factorise_images(initial_frames)

    def factorise_images(self, images, iterations: int = 100) -> None:
        """Start from a factorisation of reconstructed frames (this rank's, in order):
        Kullback-Leibler multiplicative updates in image space, sums over frames all-reduced."""
        images = [np.where(self.inside, np.maximum(np.asarray(image, np.float64), 0.0), 0.0)
                  for image in images]
        scale = self.reduce.sum(float(sum(image.sum() for image in images)))
        scale /= max(self.reduce.sum(float(sum(self.inside.sum() for _ in images))), 1.0)
        self.factors *= scale
        components = self.settings.components
        for _ in range(iterations):
            numerator = np.zeros_like(self.factors)
            curve_sums = np.zeros(components)
            for local, image in enumerate(images):
                model = np.maximum(self.frame_image(local), 1e-12)
                curve = self.curves[:, self.frame_indices[local]]
                numerator += curve[:, None, None, None] * (image / model)[None]
                curve_sums += curve
            self.reduce.allreduce_(numerator)
            curve_sums = np.asarray([self.reduce.sum(float(v)) for v in curve_sums])
            self.factors *= numerator / np.maximum(curve_sums, 1e-30)[:, None, None, None]
            curves = np.zeros_like(self.curves)
            totals = self.factors.reshape(components, -1).sum(axis=1)
            for local, image in enumerate(images):
                model = np.maximum(self.frame_image(local), 1e-12)
                frame = self.frame_indices[local]
                ratio = image / model
                for k in range(components):
                    if totals[k] > 0:
                        curves[k, frame] = (self.curves[k, frame]
                                            * np.vdot(self.factors[k], ratio) / totals[k])
            self.reduce.allreduce_(curves)
            self.curves = curves

    def frame_image(self, local: int) -> np.ndarray:
        """``x_t`` of this rank's ``local``-th frame (float64, host)."""
        curve = self.curves[:, self.frame_indices[local]]
        return np.tensordot(curve, self.factors, axes=1)

    def _ratio_back(self, local: int, subset: int):
        """``(G^T A_s^T (m y / ybar), log-likelihood)`` of this rank's ``local``-th frame."""
        image = backend.to_device(self.frame_image(local).astype(np.float32), self.device)
        back, likelihood = self.models[local].ratio_back_projection(image, subset)
        return np.asarray(backend.to_host(back), np.float64), likelihood

    # -- the algorithm -----------------------------------------------------------------------
    def subiteration(self, subset: int) -> float:
        """Update ``W`` then ``H`` with subset ``subset``; return the log-likelihood (all
        frames, all ranks) before the update."""
        sensitivity = self.sensitivities[subset]
        components = self.settings.components
        numerator = np.zeros((components,) + self.image_shape)
        curve_sums = np.zeros(components)
        likelihood = 0.0
        for local in range(len(self.models)):
            back, frame_likelihood = self._ratio_back(local, subset)
            likelihood += frame_likelihood
            curve = self.curves[:, self.frame_indices[local]]
            numerator += curve[:, None, None, None] * back[None]
            curve_sums += curve
        with self.run.stage("allreduce", "comm"):
            self.reduce.allreduce_(numerator)
            curve_sums = np.asarray([self.reduce.sum(float(v)) for v in curve_sums])
            likelihood = self.reduce.sum(likelihood)
        with self.run.stage("update", "other"):
            denominator = curve_sums[:, None, None, None] * sensitivity[None]
            safe = np.where(denominator > 0, denominator, 1.0)
            self.factors = np.where((denominator > 0) & self.inside[None],
                                    self.factors * numerator / safe, 0.0)
        curves = np.zeros_like(self.curves)
        weights = np.array([np.vdot(factor, sensitivity) for factor in self.factors])
        for local in range(len(self.models)):
            back, _ = self._ratio_back(local, subset)
            frame = self.frame_indices[local]
            with self.run.stage("update", "other"):
                for k in range(components):
                    if weights[k] > 0:
                        curves[k, frame] = (self.curves[k, frame]
                                            * np.vdot(self.factors[k], back) / weights[k])
        with self.run.stage("allreduce", "comm"):
            self.reduce.allreduce_(curves)  # each frame lives on one rank
        self.curves = curves
        return likelihood

    def run_iterations(self, progress=None) -> list[float]:
        """``settings.iterations`` passes over the subsets; the log-likelihood history."""
        history = []
        iterations = range(self.settings.iterations)
        if progress is not None:
            iterations = progress(iterations, desc="NMF iterations")
        for _ in iterations:
            for subset in range(self.settings.n_subsets):
                history.append(self.subiteration(subset))
        return history

    def frame_images(self) -> list[np.ndarray]:
        """This rank's frames as float32 images."""
        return [self.frame_image(local).astype(np.float32) for local in range(len(self.models))]
