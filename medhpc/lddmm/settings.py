"""The lddmm command's settings: every default of a registration, in one place.

Light on purpose (no numpy or numba): the command line reads its defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("symmetric", "beg")
METRICS = ("lncc", "mi", "ncc", "ssd")
#: Histogram bins ``--metric mi`` takes: [0, 1] spans ``bins - 3`` bin widths (the cubic
#: window reaches past both ends), and the CUDA kernel keeps a block's histogram of at
#: most 64 x 64 bins in shared memory.
MIN_BINS, MAX_BINS = 8, 64
#: Longest update per iteration of the symmetric method by metric (voxels of a level).
DEFAULT_UPDATE_VOXELS = {"lncc": 0.6, "mi": 0.35}
#: The Beg method's similarity weight ``1/sigma^2`` by metric.
DEFAULT_SIGMA = {"ssd": 0.02, "ncc": 0.02, "lncc": 0.1}


@dataclass(frozen=True)
class Settings:
    """What a registration needs to know; the command line's defaults live here.

    ``method`` ``symmetric`` (stationary velocity, both images pulled half-way, local
    correlation or mutual information; :mod:`medhpc.lddmm.symmetric`) uses ``metric``
    (``lncc`` or ``mi``), ``radius`` (lncc), ``bins`` (mi: Parzen histogram bins per image;
    the normalised intensities [0, 1] span ``bins - 3`` bin widths),
    ``fluid_sigma_mm``, ``diffusion_sigma_mm``, ``sigma_floor_voxels``, ``update_voxels``; ``beg``
    (time-varying velocity, gradient descent in V, this module) uses ``metric``,
    ``sigma``, ``timesteps``, ``alpha``, ``gamma``, ``power`` and ``step``. ``levels``
    0 chooses the pyramid from the voxel size (:func:`auto_levels`).
    """

    method: str = "symmetric"
    metric: str = "lncc"
    sigma: float | None = None
    timesteps: int = 5
    alpha: float = 0.5
    gamma: float = 1.0
    power: int = 2
    levels: int = 0
    iterations: tuple = (60, 40, 30)
    step: float = 0.2
    tolerance: float = 0.0
    max_step_voxels: float = 2.0
    radius: int = 3
    fluid_sigma_mm: float = 3.0
    diffusion_sigma_mm: float = 1.5
    sigma_floor_voxels: float = 1.5
    update_voxels: float | None = None
    bins: int = 32

    @property
    def metric_v(self):
        """The metric of V, ``L = (-alpha Lap + gamma)^power``."""
        from medhpc.lddmm.regulariser import Metric

        return Metric(self.alpha, self.gamma, self.power)

    @property
    def update_step_voxels(self) -> float:
        """The symmetric method's longest update per iteration (per-metric default when
        unset: the mutual-information force of a voxel is noisier than the local
        correlation's and takes shorter steps)."""
        if self.update_voxels is None:
            return DEFAULT_UPDATE_VOXELS.get(self.metric, DEFAULT_UPDATE_VOXELS["lncc"])
        return float(self.update_voxels)

    @property
    def similarity_sigma(self) -> float:
        """The Beg similarity weight ``1/sigma^2`` (per-metric default when unset)."""
        return DEFAULT_SIGMA[self.metric] if self.sigma is None else float(self.sigma)
