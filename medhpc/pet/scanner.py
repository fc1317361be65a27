"""Cylindrical PET scanner geometry and its sinogram layout.

Coordinates are (x, y, z) in mm with the scanner axis along z and the scanner
centre at the origin.

Crystals
    Crystal ``c`` of a ring sits on a circle of radius ``radius_mm`` at the angle
    ``phi_c = 2 pi c / crystals_per_ring`` from +x towards +y, or, with
    ``modules_per_ring``, on the face of module ``c // crystals_per_module``: a regular
    polygon whose faces are ``radius_mm`` from the axis, each face centred on its crystals'
    mean angle. The LOR end point is ``doi_mm`` behind the face. Ring ``k`` sits at
    ``z_k = k * ring_spacing_mm`` plus ``ring_gap_mm`` per axial block before it, centred
    on 0.

Sinogram (radial, view, plane[, tof]), "interleaved" views
    With ``N = crystals_per_ring``, radial index ``r`` and view ``v``, let
    ``d = radial_trim + r`` (``radial_trim <= d <= N - radial_trim``) and
    ``s = 2 v + (d mod 2)``. The LOR joins transaxial crystals
    ``a = ((s + d) / 2) mod N`` (start) and ``b = ((s - d) / 2) mod N`` (end).
    Its normal points at the angle ``pi s / N`` (views alternate between two
    angles half a crystal apart: the interleaving) and its signed distance from
    the axis along that normal is ``radius_mm * cos(pi d / N)``, which falls
    from about +FOV radius at ``r = 0`` through 0 at ``d = N / 2`` to about
    -FOV radius at the last radial bin. Hence
    ``n_radial = N + 1 - 2 * radial_trim`` and ``n_views = N / 2``.

Planes
    Plane ``p`` is the ring pair ``(r1, r2)``: the LOR starts on crystal ``a``
    of ring ``r1`` and ends on crystal ``b`` of ring ``r2``. Planes are grouped
    in segments of ring difference ``r2 - r1 = 0, +1, -1, +2, -2, ...`` up to
    ``max_ring_difference``; within a segment they are ordered by ``r1``
    (that is, by mean ring). At span 1 each ring pair is its own plane.

Axial compression (span ``S > 1``, odd)
    Segment 0 holds the ring differences ``-(S - 1) / 2 .. (S - 1) / 2``, segment
    ``+k`` the next ``S`` positive ones (``k S - (S - 1) / 2 .. k S + (S - 1) / 2``),
    segment ``-k`` their negatives, in the order ``0, +1, -1, +2, -2, ...``; the last
    segment must be full (``max_ring_difference = (S - 1) / 2 + K S``). A plane is
    the ring sum ``r1 + r2`` within a segment, ascending: segment 0 has ``2 rings - 1``
    planes, a segment whose smallest ``|r2 - r1|`` is ``m`` has ``2 rings - 1 - 2 m``.
    The plane's value is the sum over its ring pairs (its *members*, see
    :func:`plane_members`), as STIR stores span-S data.

TOF
    TOF bin ``t`` is centred ``(t - (tof_bins - 1) / 2) * tof_bin_mm`` from the
    LOR's midpoint, positive towards its end point (crystal ``b``).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

import numpy as np

from medhpc.errors import InputError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

SPEED_OF_LIGHT_MM_PER_PS = 0.299792458
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548

_INT_FIELDS = ("crystals_per_ring", "rings", "radial_trim", "max_ring_difference", "span",
               "tof_bins", "modules_per_ring", "rings_per_module")
_FLOAT_FIELDS = ("radius_mm", "ring_spacing_mm", "crystal_size_mm", "tof_resolution_ps",
                 "tof_bin_mm", "module_crystal_pitch_mm", "doi_mm", "ring_gap_mm")
_REQUIRED_KEYS = ("crystals_per_ring", "rings", "radius_mm", "ring_spacing_mm",
                  "crystal_size_mm", "radial_trim", "max_ring_difference")


@dataclass(frozen=True)
class ScannerGeometry:
    """A cylindrical PET scanner and its sinogram layout.

    Parameters
    ----------
    name : str
        Label of the scanner.
    crystals_per_ring : int
        Crystals on one ring (even, >= 4).
    rings : int
        Number of crystal rings (>= 1).
    radius_mm : float
        Radius of the crystal circle (the LOR end points).
    ring_spacing_mm : float
        Axial distance between neighbouring rings.
    crystal_size_mm : float
        Transaxial crystal width, at most the crystal pitch.
    radial_trim : int
        Radial bins dropped at each edge of the full ``N + 1`` (>= 1).
    max_ring_difference : int
        Largest ``|r1 - r2|`` kept, ``0 <= max_ring_difference < rings``.
    span : int
        Axial compression: 1 (none) or an odd number >= 3 (see the module notes).
    tof_bins : int
        Number of TOF bins; 0 for non-TOF.
    tof_resolution_ps : float
        Coincidence timing resolution (FWHM) in ps; required when TOF.
    tof_bin_mm : float or None
        TOF bin width along the LOR. None: the bins together span the ring
        diameter (``2 radius_mm / tof_bins``). Set to 0 for non-TOF scanners.
    modules_per_ring : int
        0: crystals on a circle of ``radius_mm``. Else the crystals sit in this many flat
        modules on a regular polygon whose faces are ``radius_mm`` from the axis, a module's
        crystals ``module_crystal_pitch_mm`` apart along its face (0: the face evenly filled).
    doi_mm : float
        Effective depth of interaction: LOR end points this far behind the crystal face,
        along the module's normal (the circle's radius).
    rings_per_module, ring_gap_mm : int, float
        Rings in axial blocks of ``rings_per_module`` with ``ring_gap_mm`` more between
        blocks (0: evenly spaced rings).
    """

    name: str
    crystals_per_ring: int
    rings: int
    radius_mm: float
    ring_spacing_mm: float
    crystal_size_mm: float
    radial_trim: int
    max_ring_difference: int
    span: int = 1
    tof_bins: int = 0
    tof_resolution_ps: float = 0.0
    tof_bin_mm: float | None = field(default=None)
    modules_per_ring: int = 0
    module_crystal_pitch_mm: float = 0.0
    doi_mm: float = 0.0
    rings_per_module: int = 0
    ring_gap_mm: float = 0.0

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise InputError(f"scanner name must be a non-empty string, got {self.name!r}")
        for key in _INT_FIELDS:
            value = getattr(self, key)
            if not _is_int(value):
                raise InputError(f"scanner {self.name!r}: {key} = {value!r} is not an integer")
            object.__setattr__(self, key, int(value))
        for key in _FLOAT_FIELDS:
            value = getattr(self, key)
            if key == "tof_bin_mm" and value is None:
                continue
            if not _is_real(value) or not math.isfinite(value):
                raise InputError(f"scanner {self.name!r}: {key} = {value!r} is not a finite number")
            object.__setattr__(self, key, float(value))
        if self.tof_bin_mm is None:
            default = 2.0 * self.radius_mm / self.tof_bins if self.tof_bins > 0 else 0.0
            object.__setattr__(self, "tof_bin_mm", default)
        self._validate()

    def _validate(self):
        def fail(message):
            raise InputError(f"scanner {self.name!r}: {message}")

        n = self.crystals_per_ring
        if n < 4 or n % 2:
            fail(f"crystals_per_ring = {n}: expected an even number >= 4")
        if self.rings < 1:
            fail(f"rings = {self.rings}: expected >= 1")
        if self.radius_mm <= 0:
            fail(f"radius_mm = {self.radius_mm}: expected > 0")
        if self.ring_spacing_mm <= 0:
            fail(f"ring_spacing_mm = {self.ring_spacing_mm}: expected > 0")
        self._validate_layout(fail)
        pitch = self.crystal_pitch_mm
        if not 0 < self.crystal_size_mm <= pitch * (1 + 1e-6):
            fail(f"crystal_size_mm = {self.crystal_size_mm}: expected > 0 and at most the "
                 f"crystal pitch {pitch:.4g} mm")
        if not 1 <= self.radial_trim <= n // 2:
            fail(f"radial_trim = {self.radial_trim}: expected 1 <= radial_trim <= {n // 2}")
        if not 0 <= self.max_ring_difference <= self.rings - 1:
            fail(f"max_ring_difference = {self.max_ring_difference}: expected 0 <= "
                 f"max_ring_difference <= {self.rings - 1} (rings - 1)")
        if self.span != 1:
            half = (self.span - 1) // 2
            if self.span < 3 or self.span % 2 == 0:
                fail(f"span = {self.span}: expected 1 (no axial compression) or an odd "
                     f"number >= 3")
            if (self.max_ring_difference - half) % self.span or \
                    self.max_ring_difference < half:
                fail(f"max_ring_difference = {self.max_ring_difference} at span {self.span}: "
                     f"expected {half} + k x {self.span} (full segments), for example "
                     f"{half + self.span * max(0, (self.max_ring_difference - half) // self.span)}")
        if self.tof_bins < 0:
            fail(f"tof_bins = {self.tof_bins}: expected >= 0 (0 for non-TOF)")
        if self.tof_bins > 0:
            if self.tof_resolution_ps <= 0:
                fail(f"tof_resolution_ps = {self.tof_resolution_ps}: expected > 0 with "
                     f"tof_bins = {self.tof_bins}")
            if self.tof_bin_mm <= 0:
                fail(f"tof_bin_mm = {self.tof_bin_mm}: expected > 0 with tof_bins = {self.tof_bins}")
        elif self.tof_resolution_ps < 0 or self.tof_bin_mm < 0:
            fail("tof_resolution_ps and tof_bin_mm must be >= 0")

    def _validate_layout(self, fail) -> None:
        modules = self.modules_per_ring
        if modules < 0 or (modules and (modules < 3 or self.crystals_per_ring % modules)):
            fail(f"modules_per_ring = {modules}: expected 0 (a circle) or a divisor >= 3 of "
                 f"crystals_per_ring = {self.crystals_per_ring}")
        if modules and self.module_crystal_pitch_mm < 0:
            fail("module_crystal_pitch_mm must be >= 0 (0: the module face evenly filled)")
        if modules and self.module_crystal_pitch_mm * self.crystals_per_module > \
                self.module_face_mm * (1 + 1e-6):
            fail(f"{self.crystals_per_module} crystals at {self.module_crystal_pitch_mm} mm do "
                 f"not fit on a module face of {self.module_face_mm:.4g} mm")
        if not 0 <= self.doi_mm < self.radius_mm:
            fail(f"doi_mm = {self.doi_mm}: expected 0 <= doi_mm < radius_mm")
        if self.rings_per_module < 0 or (self.rings_per_module
                                         and self.rings % self.rings_per_module):
            fail(f"rings_per_module = {self.rings_per_module}: expected 0 or a divisor of "
                 f"rings = {self.rings}")
        if self.ring_gap_mm < 0 or (self.ring_gap_mm and not self.rings_per_module):
            fail(f"ring_gap_mm = {self.ring_gap_mm}: expected >= 0, and rings_per_module with "
                 f"a gap")

    @property
    def crystals_per_module(self) -> int:
        """Crystals of a ring in one module (all of them on a circle)."""
        return self.crystals_per_ring // self.modules_per_ring if self.modules_per_ring \
            else self.crystals_per_ring

    @property
    def module_face_mm(self) -> float:
        """Width of a module's face on the polygon (0 on a circle)."""
        if not self.modules_per_ring:
            return 0.0
        return 2.0 * self.radius_mm * math.tan(math.pi / self.modules_per_ring)

    @property
    def crystal_pitch_mm(self) -> float:
        """Distance between neighbouring crystals of a ring (of a module on a polygon)."""
        if self.modules_per_ring:
            return self.module_crystal_pitch_mm or self.module_face_mm / self.crystals_per_module
        return 2.0 * math.pi * self.radius_mm / self.crystals_per_ring

    @property
    def has_ring_gaps(self) -> bool:
        """Whether the rings are not evenly spaced."""
        return self.ring_gap_mm > 0

    @property
    def is_tof(self) -> bool:
        """Whether the sinogram has a TOF axis."""
        return self.tof_bins > 0

    @property
    def n_radial(self) -> int:
        """Radial bins: ``crystals_per_ring + 1 - 2 radial_trim``."""
        return self.crystals_per_ring + 1 - 2 * self.radial_trim

    @property
    def n_views(self) -> int:
        """Views: ``crystals_per_ring // 2``."""
        return self.crystals_per_ring // 2

    @property
    def n_planes(self) -> int:
        """Sinogram planes: ring pairs with ``|r1 - r2| <= max_ring_difference`` at span 1,
        ring sums per segment at span > 1."""
        return sum(segment_plane_count(self, low, high) for low, high in segment_ranges(self))

    @property
    def n_ring_pairs(self) -> int:
        """Ring pairs with ``|r1 - r2| <= max_ring_difference`` (the planes' members)."""
        m = self.max_ring_difference
        return self.rings * (2 * m + 1) - m * (m + 1)

    @property
    def sinogram_shape(self) -> tuple[int, ...]:
        """``(radial, view, plane)``, with a trailing ``tof`` axis for TOF scanners."""
        shape = (self.n_radial, self.n_views, self.n_planes)
        return shape + (self.tof_bins,) if self.is_tof else shape

    @property
    def n_lors(self) -> int:
        """Geometric LORs (radial x view x plane), a Python int."""
        return self.n_radial * self.n_views * self.n_planes

    @property
    def n_bins(self) -> int:
        """Sinogram bins including the TOF axis, a Python int."""
        return math.prod(self.sinogram_shape)

    @property
    def tof_sigma_mm(self) -> float:
        """Standard deviation of the TOF kernel along the LOR (0 for non-TOF)."""
        return SPEED_OF_LIGHT_MM_PER_PS * self.tof_resolution_ps / 2.0 / FWHM_PER_SIGMA

    @property
    def radial_fov_mm(self) -> float:
        """Radius of the transaxial field of view covered by every view."""
        return self.radius_mm * math.cos(math.pi * self.radial_trim / self.crystals_per_ring)

    @property
    def ring_z_mm(self) -> np.ndarray:
        """Axial positions of the rings, centred on 0 (float64)."""
        ring = np.arange(self.rings)
        z = ring * self.ring_spacing_mm
        if self.rings_per_module:
            z = z + (ring // self.rings_per_module) * self.ring_gap_mm
        return z - 0.5 * (z[0] + z[-1])


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


# ---------------------------------------------------------------- loading and storing

def available_presets() -> list[str]:
    """Return the names of the bundled scanner presets."""
    folder = resources.files("medhpc.pet") / "presets"
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".toml"))


def load_scanner(name_or_path) -> ScannerGeometry:
    """Load a scanner from a preset name or a TOML file with a ``[scanner]`` table.

    Parameters
    ----------
    name_or_path : str or path-like
        A preset (see :func:`available_presets`) or a path to a ``.toml`` file.

    Returns
    -------
    ScannerGeometry

    Raises
    ------
    InputError
        Unknown preset, missing or unreadable file, bad TOML, or a missing,
        unknown or mistyped key (the message names the file and key).
    """
    text = str(name_or_path)
    path = Path(text)
    looks_like_path = (isinstance(name_or_path, Path) or path.suffix == ".toml"
                       or "/" in text or "\\" in text or path.exists())
    if looks_like_path:
        if not path.is_file():
            raise InputError(f"{path}: scanner file does not exist: expected a TOML file "
                             f"with a [scanner] table or a preset name "
                             f"({', '.join(available_presets())})")
        try:
            content = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{path}: cannot read the scanner file ({exc})") from None
        return _from_toml(content, str(path), default_name=path.stem)
    presets = available_presets()
    if text not in presets:
        raise InputError(f"unknown scanner preset {text!r}: expected one of "
                         f"{', '.join(presets)} or a path to a .toml file")
    resource = resources.files("medhpc.pet") / "presets" / f"{text}.toml"
    return _from_toml(resource.read_text(encoding="utf-8"), f"preset {text}", default_name=text)


def _from_toml(content: str, source: str, default_name: str) -> ScannerGeometry:
    try:
        document = tomllib.loads(content)
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{source}: invalid TOML ({exc})") from None
    unknown_tables = sorted(set(document) - {"scanner"})
    if unknown_tables:
        raise InputError(f"{source}: unknown top-level key {unknown_tables[0]!r}: "
                         f"expected only a [scanner] table")
    table = document.get("scanner")
    if not isinstance(table, dict):
        raise InputError(f"{source}: missing [scanner] table")
    table = dict(table)
    table.setdefault("name", default_name)
    return scanner_from_dict(table, source=source, key_prefix="[scanner] ")


def scanner_to_dict(scanner: ScannerGeometry) -> dict:
    """Return the scanner's fields as plain Python scalars (for JSON or HDF5 attributes)."""
    return {f.name: getattr(scanner, f.name) for f in fields(ScannerGeometry)}


def scanner_from_dict(mapping, source: str = "scanner", key_prefix: str = "") -> ScannerGeometry:
    """Build a scanner from a mapping as written by :func:`scanner_to_dict`.

    Accepts NumPy scalars and bytes names (as read back from HDF5 attributes).

    Parameters
    ----------
    mapping : mapping
        Field name -> value; ``span``, ``tof_bins``, ``tof_resolution_ps`` and
        ``tof_bin_mm`` are optional.
    source : str
        Names the origin (a file) in error messages.
    key_prefix : str
        Prefix of key names in error messages (``"[scanner] "`` for TOML).

    Raises
    ------
    InputError
        Missing, unknown or mistyped keys, or invalid values.
    """
    known = {f.name for f in fields(ScannerGeometry)}
    values = {}
    for key, value in mapping.items():
        if key not in known:
            raise InputError(f"{source}: unknown key {key_prefix}{key!r}: expected one of "
                             f"{', '.join(sorted(known))}")
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        values[key] = value
    missing = [key for key in ("name",) + _REQUIRED_KEYS if key not in values]
    if missing:
        raise InputError(f"{source}: missing key {key_prefix}{missing[0]!r}")
    for key, value in values.items():
        if key in _INT_FIELDS and not _is_int(value):
            raise InputError(f"{source}: {key_prefix}{key} = {value!r} has the wrong type: "
                             f"expected an integer")
        if key in _FLOAT_FIELDS and not _is_real(value) and not (key == "tof_bin_mm"
                                                                 and value is None):
            raise InputError(f"{source}: {key_prefix}{key} = {value!r} has the wrong type: "
                             f"expected a number")
        if key == "name" and not isinstance(value, str):
            raise InputError(f"{source}: {key_prefix}name = {value!r} has the wrong type: "
                             f"expected a string")
    try:
        return ScannerGeometry(**values)
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None


# ---------------------------------------------------------------- crystals and planes

def crystal_xy(scanner: ScannerGeometry) -> np.ndarray:
    """Transaxial ``(x, y)`` mm of the LOR end point on each crystal of a ring (float64,
    shape (crystals_per_ring, 2)): on the circle, or on the module faces of the polygon,
    moved ``doi_mm`` outwards (see :class:`ScannerGeometry`)."""
    n = scanner.crystals_per_ring
    if not scanner.modules_per_ring:
        angle = 2.0 * np.pi * np.arange(n) / n
        radius = scanner.radius_mm + scanner.doi_mm
        return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
    per_module = scanner.crystals_per_module
    crystal = np.arange(n)
    module, index = np.divmod(crystal, per_module)
    # module m is centred on its crystals' angles, as the circle's crystals sit
    angle = 2.0 * np.pi * module / scanner.modules_per_ring + np.pi * (per_module - 1) / n
    normal = np.stack([np.cos(angle), np.sin(angle)], axis=1)
    tangent = np.stack([-np.sin(angle), np.cos(angle)], axis=1)
    along = (index - (per_module - 1) / 2.0) * scanner.crystal_pitch_mm
    return ((scanner.radius_mm + scanner.doi_mm) * normal + along[:, None] * tangent)


def crystal_positions(scanner: ScannerGeometry) -> np.ndarray:
    """Return crystal centres (LOR end points) on the detector.

    Returns
    -------
    ndarray, float32, shape (crystals_per_ring, rings, 3)
        ``(x, y, z)`` in mm of crystal ``c`` of ring ``k`` (see the module notes).
    """
    xy = crystal_xy(scanner)
    positions = np.empty((scanner.crystals_per_ring, scanner.rings, 3), dtype=np.float32)
    positions[:, :, 0] = xy[:, 0, None]
    positions[:, :, 1] = xy[:, 1, None]
    positions[:, :, 2] = scanner.ring_z_mm[None, :]
    return positions


def plane_ring_pairs(scanner: ScannerGeometry) -> np.ndarray:
    """Return the ring pair ``(r1, r2)`` of every plane, in plane order (span 1).

    Returns
    -------
    ndarray, int64, shape (n_planes, 2)
        Segments ``r2 - r1 = 0, +1, -1, +2, -2, ...``; within one, ``r1`` ascending.

    Raises
    ------
    ValueError
        At span > 1, where a plane has several ring pairs (see :func:`plane_members`).
    """
    if scanner.span != 1:
        raise ValueError(f"scanner {scanner.name!r} has span {scanner.span}: a plane has "
                         f"several ring pairs (use plane_members)")
    return plane_members(scanner)[0]


def plane_members(scanner: ScannerGeometry, planes=None) -> tuple[np.ndarray, np.ndarray]:
    """The ring pairs summed in each plane (one per plane at span 1).

    Parameters
    ----------
    scanner : ScannerGeometry
    planes : None, int, slice or array of int
        Planes to return; None for all.

    Returns
    -------
    pairs : ndarray, int64, shape (n_members, 2)
        ``(r1, r2)`` of the selected planes' members, plane after plane; within a plane
        ``r1`` ascending.
    first : ndarray, int64, shape (n_selected + 1,)
        Plane ``i``'s members are ``pairs[first[i]:first[i + 1]]``.
    """
    rings = scanner.rings
    pairs, counts = [], []
    for low, high in segment_ranges(scanner):
        if scanner.span == 1:
            first = np.arange(max(0, -low), rings - max(0, low))
            pairs.append(np.stack([first, first + low], axis=1))
            counts.append(np.ones(len(first), np.int64))
            continue
        differences = np.arange(low, high + 1)
        smallest = 0 if low <= 0 <= high else min(abs(low), abs(high))
        for ring_sum in range(smallest, 2 * rings - 1 - smallest):
            d = differences[(differences + ring_sum) % 2 == 0]
            r1 = (ring_sum - d) // 2
            keep = (r1 >= 0) & (r1 + d >= 0) & (r1 < rings) & (r1 + d < rings)
            members = np.stack([r1[keep], r1[keep] + d[keep]], axis=1)
            pairs.append(members[np.argsort(members[:, 0], kind="stable")])
            counts.append(np.array([keep.sum()]))
    pairs = np.concatenate(pairs).astype(np.int64)
    counts = np.concatenate(counts).astype(np.int64)
    first = np.concatenate([[0], np.cumsum(counts)])
    if planes is None:
        return pairs, first
    plane_index = _selection(planes, len(counts), "plane")
    chosen = [np.arange(first[p], first[p + 1]) for p in plane_index]
    index = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    return pairs[index], np.concatenate([[0], np.cumsum(counts[plane_index])]).astype(np.int64)


def sum_over_members(values, first) -> np.ndarray:
    """Sum axis 2 (ring pairs, :func:`plane_members`) of ``values`` into planes."""
    values = np.asarray(values)
    if len(first) - 1 == values.shape[2]:
        return values
    return np.add.reduceat(values, np.asarray(first[:-1]), axis=2)


def mean_over_members(values, first) -> np.ndarray:
    """Mean over each plane's ring pairs of axis 2 of ``values``."""
    counts = np.diff(np.asarray(first)).reshape((-1,) + (1,) * (np.ndim(values) - 3))
    return sum_over_members(values, first) / counts


def plane_ring_sums(scanner: ScannerGeometry) -> np.ndarray:
    """Return ``r1 + r2`` of every plane (the same for all its members; int64)."""
    pairs, first = plane_members(scanner)
    return pairs[first[:-1]].sum(axis=1)


def plane_segments(scanner: ScannerGeometry) -> np.ndarray:
    """Return the ring difference ``r2 - r1`` at the centre of each plane's segment (its
    only one at span 1; int64, shape (n_planes,))."""
    ranges = segment_ranges(scanner)
    sizes = [segment_plane_count(scanner, low, high) for low, high in ranges]
    return np.repeat([(low + high) // 2 for low, high in ranges], sizes).astype(np.int64)


def direct_planes(scanner: ScannerGeometry) -> np.ndarray:
    """Return a bool mask over planes: True where every member has ``r1 == r2``."""
    pairs, first = plane_members(scanner)
    direct = (pairs[:, 0] == pairs[:, 1]).astype(np.int64)
    return np.add.reduceat(direct, first[:-1]) == np.diff(first)


def ring_pair_to_plane(scanner: ScannerGeometry) -> np.ndarray:
    """Return the plane index of each ring pair ``[r1, r2]``, -1 where not recorded."""
    table = np.full((scanner.rings, scanner.rings), -1, dtype=np.int64)
    pairs, first = plane_members(scanner)
    table[pairs[:, 0], pairs[:, 1]] = np.repeat(np.arange(len(first) - 1), np.diff(first))
    return table


def segment_plane_count(scanner: ScannerGeometry, low: int, high: int) -> int:
    """Planes of the segment of ring differences ``low .. high``."""
    if low == high:
        return scanner.rings - abs(low)
    smallest = 0 if low <= 0 <= high else min(abs(low), abs(high))
    return 2 * scanner.rings - 1 - 2 * smallest


def segment_ranges(scanner: ScannerGeometry) -> list[tuple[int, int]]:
    """``(lowest, highest)`` ring difference ``r2 - r1`` of each segment, in plane order."""
    span, largest = scanner.span, scanner.max_ring_difference
    if span == 1:
        ranges = [(0, 0)]
        for step in range(1, largest + 1):
            ranges += [(step, step), (-step, -step)]
        return ranges
    half = (span - 1) // 2
    ranges = [(-half, half)]
    for k in range(1, (largest - half) // span + 1):
        ranges += [(k * span - half, k * span + half), (-k * span - half, -k * span + half)]
    return ranges


# ---------------------------------------------------------------- LORs

def sinogram_crystals(scanner: ScannerGeometry, views=None) -> tuple[np.ndarray, np.ndarray]:
    """Return the transaxial crystals ``(a, b)`` of every (radial, view) bin.

    Parameters
    ----------
    scanner : ScannerGeometry
    views : None, int, slice or array of int
        Views to return; None for all.

    Returns
    -------
    start_crystal, end_crystal : ndarray, int64, shape (n_radial, n_views_selected)
        ``a = ((s + d) / 2) mod N``, ``b = ((s - d) / 2) mod N`` with
        ``d = radial_trim + r`` and ``s = 2 v + (d mod 2)``.
    """
    view_index = _selection(views, scanner.n_views, "view")
    d = scanner.radial_trim + np.arange(scanner.n_radial, dtype=np.int64)[:, None]
    s = 2 * view_index[None, :] + d % 2
    n = scanner.crystals_per_ring
    return (s + d) // 2 % n, (s - d) // 2 % n


def lor_endpoints(scanner: ScannerGeometry, views=None, planes=None):
    """Return the start and end points of LORs in sinogram order.

    Parameters
    ----------
    scanner : ScannerGeometry
    views : None, int, slice or array of int
        Views to generate; None for all (see :func:`subset_views`).
    planes : None, int, slice or array of int
        Planes to generate; None for all.

    Returns
    -------
    xstart, xend : ndarray, float32, shape (n_radial, n_views_selected, n_members, 3)
        ``(x, y, z)`` in mm of crystal ``a`` on ring ``r1`` and crystal ``b`` on
        ring ``r2`` (see the module notes), for each member ring pair of the selected
        planes (:func:`plane_members`; one per plane at span 1).
    """
    start_crystal, end_crystal = sinogram_crystals(scanner, views)
    ring_pairs = plane_members(scanner, planes)[0]
    ring_z = scanner.ring_z_mm.astype(np.float32)
    xy = crystal_xy(scanner)
    ring_x = xy[:, 0].astype(np.float32)
    ring_y = xy[:, 1].astype(np.float32)
    shape = start_crystal.shape + (len(ring_pairs), 3)
    endpoints = []
    for crystal, ring in ((start_crystal, ring_pairs[:, 0]), (end_crystal, ring_pairs[:, 1])):
        points = np.empty(shape, dtype=np.float32)
        points[..., 0] = ring_x[crystal][:, :, None]
        points[..., 1] = ring_y[crystal][:, :, None]
        points[..., 2] = ring_z[ring][None, None, :]
        endpoints.append(points)
    return endpoints[0], endpoints[1]


def crystal_ids(scanner: ScannerGeometry, crystal, ring) -> np.ndarray:
    """Crystal ID of list-mode data: ``ring * crystals_per_ring + crystal`` (int64)."""
    return np.asarray(ring, np.int64) * scanner.crystals_per_ring + np.asarray(crystal, np.int64)


def crystal_pair_lors(scanner: ScannerGeometry, crystal1, crystal2):
    """The sinogram LOR joining each pair of crystal IDs (see :func:`crystal_ids`).

    Inverts the sinogram's crystal pairing (module notes): with ``a``, ``b`` the
    transaxial crystals, ``d = (a - b) mod N`` and ``s = a + b + N [b > a]`` taken
    modulo ``2 N``; the pair is the bin's own orientation when ``s < N``, else the
    reversed one (crystal 2 is the bin's start).

    Returns
    -------
    lor : ndarray, int64
        Flat index into ``radial x view x plane`` (C order), -1 where the pair is not a
        LOR of the sinogram (radial bin trimmed, ring difference not recorded, same
        crystal, or an ID outside the scanner).
    reversed_pair : ndarray, bool
        True where the bin's LOR runs from crystal 2 to crystal 1.
    """
    n = scanner.crystals_per_ring
    ids1 = np.asarray(crystal1, np.int64)
    ids2 = np.asarray(crystal2, np.int64)
    n_crystals = n * scanner.rings
    inside = (ids1 >= 0) & (ids1 < n_crystals) & (ids2 >= 0) & (ids2 < n_crystals)
    ring1, a = np.divmod(np.where(inside, ids1, 0), n)
    ring2, b = np.divmod(np.where(inside, ids2, 0), n)
    d = (a - b) % n
    s = (a + b + n * (b > a)) % (2 * n)
    reversed_pair = s >= n
    d = np.where(reversed_pair, n - d, d)
    s = np.where(reversed_pair, s - n, s)
    start_ring = np.where(reversed_pair, ring2, ring1)
    end_ring = np.where(reversed_pair, ring1, ring2)
    radial = d - scanner.radial_trim
    view = (s - d % 2) // 2
    plane = ring_pair_to_plane(scanner)[start_ring, end_ring]
    valid = inside & (d > 0) & (radial >= 0) & (radial < scanner.n_radial) & (plane >= 0)
    lor = (radial * scanner.n_views + view) * scanner.n_planes + plane
    return np.where(valid, lor, -1), reversed_pair


def tof_bin_centres_mm(scanner: ScannerGeometry) -> np.ndarray:
    """Return TOF bin centres along the LOR from its midpoint, towards its end (float64)."""
    return (np.arange(scanner.tof_bins) - (scanner.tof_bins - 1) / 2.0) * scanner.tof_bin_mm


def subset_views(n_views: int, n_subsets: int, subset: int) -> np.ndarray:
    """Return the views of an ordered subset: ``subset, subset + n_subsets, ...``.

    Raises
    ------
    InputError
        ``n_subsets`` outside ``[1, n_views]`` or ``subset`` outside ``[0, n_subsets)``.
    """
    if not (_is_int(n_views) and _is_int(n_subsets) and _is_int(subset)):
        raise InputError(f"subset_views needs integers, got n_views={n_views!r}, "
                         f"n_subsets={n_subsets!r}, subset={subset!r}")
    if n_views < 1:
        raise InputError(f"n_views = {n_views}: expected >= 1")
    if not 1 <= n_subsets <= n_views:
        raise InputError(f"number of subsets {n_subsets}: expected between 1 and the number "
                         f"of views ({n_views})")
    if not 0 <= subset < n_subsets:
        raise InputError(f"subset {subset}: expected 0 <= subset < {n_subsets}")
    return np.arange(subset, n_views, n_subsets, dtype=np.int64)


def _selection(selection, n: int, what: str) -> np.ndarray:
    if selection is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(selection, slice):
        return np.arange(n, dtype=np.int64)[selection]
    index = np.atleast_1d(np.asarray(selection))
    if index.ndim != 1 or not (index.size == 0 or np.issubdtype(index.dtype, np.integer)):
        raise InputError(f"{what} selection must be a slice or a 1-D array of integers")
    if index.size and (index.min() < 0 or index.max() >= n):
        raise InputError(f"{what} index out of range: expected 0 <= {what} < {n}")
    return index.astype(np.int64)


def default_image_grid(scanner: ScannerGeometry) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """The usual image grid of a scanner: ``(shape_zyx, voxel_mm_xyz)``.

    Planes every half ring spacing (``2 * rings - 1`` of them, the rebinned
    planes), square voxels of that size across 85% of the transaxial field of
    view (for ``ge-dmi-4ring``: 216 x 216 x 71 at 2.78 mm).
    """
    voxel = scanner.ring_spacing_mm / 2.0
    across = int(2.0 * scanner.radial_fov_mm * 0.85 / voxel)
    extent = scanner.ring_z_mm[-1] - scanner.ring_z_mm[0]
    planes = int(round(extent / voxel)) + 1  # 2 * rings - 1 without ring gaps
    return (planes, across, across), (voxel, voxel, voxel)


def field_of_view_mask(scanner: ScannerGeometry, image_shape, origin_mm, voxel_mm) -> np.ndarray:
    """Transaxial mask (ny, nx) of the voxels whose centre lies inside the radial field of
    view (:attr:`ScannerGeometry.radial_fov_mm`), where every view measures."""
    _, ny, nx = image_shape
    x = origin_mm[0] + voxel_mm[0] * np.arange(nx)
    y = origin_mm[1] + voxel_mm[1] * np.arange(ny)
    return (x[None, :] ** 2 + y[:, None] ** 2) <= scanner.radial_fov_mm ** 2
