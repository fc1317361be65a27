"""tnr-register's settings: every default that decides a result or its file, in one place.

Light on purpose (no numpy or scipy): the command line reads its defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medhpc.errors import InputError

MODES = ("tnr", "pairwise", "none")
STAINS = ("gray", "od", "hematoxylin")
NORMALISATIONS = ("histogram", "none")
PLACEMENTS = ("rigid", "affine")
INTERPOLATION_ORDER = {"bilinear": 1, "bicubic": 3}
#: --compression: auto, or one of the pyramid writer's codecs (medhpc.io.pyramid.COMPRESSIONS).
OUTPUT_COMPRESSIONS = ("auto", "jpeg", "zlib", "none")
DEFAULT_TILE = 1024


@dataclass(frozen=True)
class MatchSettings:
    """Patch size, search radius and grid step (working-level pixels) and rejection limits."""

    patch: int = 64
    search: int = 32
    grid: int = 64
    min_ncc: float = 0.6
    max_second_ratio: float = 0.92
    max_curvature_ratio: float = 10.0
    max_deviation_px: float = 4.0
    min_texture: float = 0.05


@dataclass(frozen=True)
class TnrSettings:
    """Everything that decides the result (the fingerprint of ``--resume``)."""

    mode: str = "tnr"
    sigma: float = 3.0
    stain: str = "hematoxylin"
    downsample: int = 1
    match: MatchSettings = field(default_factory=MatchSettings)
    max_angle_deg: float = 180.0
    mirror: bool = True
    tps_smoothing: float = 0.1
    min_accepted_fraction: float = 0.2
    interpolation: str = "bicubic"
    full_res: bool = False
    normalise: str = "histogram"
    placement: str = "rigid"

    def check(self) -> None:
        if self.mode not in MODES:
            raise InputError(f"--mode {self.mode}: expected one of {', '.join(MODES)}")
        if self.stain not in STAINS:
            raise InputError(f"--stain {self.stain}: expected one of {', '.join(STAINS)}")
        if self.sigma <= 0 and self.mode == "tnr":
            raise InputError(f"--sigma {self.sigma}: expected a positive number of sections")
        m = self.match
        if m.patch < 8 or m.search < 1 or m.grid < 4:
            raise InputError(f"--patch {m.patch} --search {m.search} --grid {m.grid}: expected "
                             "patch >= 8, search >= 1, grid >= 4 pixels")
        if self.downsample < 1:
            raise InputError(f"--downsample {self.downsample}: expected an integer >= 1")
        if self.placement not in PLACEMENTS:
            raise InputError(f"placement {self.placement}: expected affine or rigid")
        if self.normalise not in NORMALISATIONS:
            raise InputError(f"--normalise {self.normalise}: expected one of "
                             f"{', '.join(NORMALISATIONS)}")


@dataclass(frozen=True)
class OutputSettings:
    """How the registered stack is written (does not change its values).

    Attributes
    ----------
    tile : int
        Side of the square output tiles (warp step, zarr chunks, TIFF tiles), a
        multiple of 16.
    compression : str
        Pyramidal outputs: ``jpeg`` (uint8 only), ``zlib`` or ``none``; ``auto`` is
        JPEG for 8-bit RGB inputs compressed with JPEG, zlib otherwise.
    """

    tile: int = DEFAULT_TILE
    compression: str = "auto"

    def check(self) -> None:
        if self.tile < 64 or self.tile % 16:
            raise InputError(f"--tile {self.tile}: expected a multiple of 16, at least 64 px")
        if self.compression not in OUTPUT_COMPRESSIONS:
            raise InputError(f"--compression {self.compression}: expected one of "
                             f"{', '.join(OUTPUT_COMPRESSIONS)}")

    def resolved_compression(self, stack) -> str:
        if self.compression != "auto":
            return self.compression
        jpeg_input = bool(stack.slides) and all(s.compression.startswith("JPEG")
                                                for s in stack.slides)
        return "jpeg" if (jpeg_input and stack.channels == 3 and stack.dtype == "uint8") \
            else "zlib"
