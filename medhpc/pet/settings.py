"""pet-recon's settings: every default of a reconstruction, in one place.

Light on purpose (no numpy or numba): the command line reads its defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass

ALGORITHMS = ("osem", "mlem", "osem-rdp", "bsrem", "nmf", "dip")
#: The algorithms with the relative difference prior.
PENALISED = ("osem-rdp", "bsrem")


@dataclass(frozen=True)
class ReconSettings:
    """What to reconstruct and how."""

    algorithm: str = "osem"  # one of ALGORITHMS
    iterations: int = 4
    subsets: int = 8
    psf_fwhm_mm: float = 0.0
    postfilter_fwhm_mm: float = 0.0
    rdp_beta: float = 0.1
    rdp_gamma: float = 2.0
    rdp_epsilon: float = 1e-3
    #: BSREM: sub-iteration step ``bsrem_step / (1 + bsrem_relaxation * iteration)``.
    bsrem_step: float = 1.0
    bsrem_relaxation: float = 0.1
    #: NMF (dynamic data): spatial factors of the low-rank model.
    components: int = 3
    #: DIP: Adam's learning rate and the U-Net's channels per stage.
    dip_lr: float = 1e-2
    dip_widths: tuple = (16, 32, 64)

    @property
    def n_subsets(self) -> int:
        """Subsets actually used (MLEM: one)."""
        return 1 if self.algorithm == "mlem" else self.subsets

    def bsrem_step_at(self, iteration: int) -> float:
        """BSREM's relaxed step in (0-based) iteration ``iteration``."""
        return self.bsrem_step / (1.0 + self.bsrem_relaxation * iteration)


@dataclass(frozen=True)
class ScatterSettings:
    """Energy window and resolution, and how finely SSS samples.

    Defaults: a 425-650 keV window and 12% FWHM energy resolution at 511 keV (a
    LYSO/LSO scanner), scatter points every 20 mm where mu > 0.003/mm, every 4th radial bin
    and view, and 3 of the rings (first, middle, last) at each end of a LOR.
    """

    window_kev: tuple = (425.0, 650.0)
    energy_resolution: float = 0.12
    scatter_point_mm: float = 20.0
    mu_threshold_per_mm: float = 0.003
    radial_step: int = 4
    view_step: int = 4
    rings_sampled: int = 3
