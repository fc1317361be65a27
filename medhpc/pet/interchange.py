"""Projection data of other PET software: STIR Interfile sinograms and CASToR histograms.

STIR projection data (``.hs`` header + raw data, usually ``.s``)
    Non-arc-corrected cylindrical data at span 1 or an odd span > 1 (segment 0 of
    ring differences ``-(S - 1) / 2 .. (S - 1) / 2``, full segments of ``S`` beside it),
    without view mashing, one time frame, no TOF. The data are segments in the order of
    the header's ``minimum`` / ``maximum ring difference per segment`` lists, each ``view
    x axial x tangential`` or ``axial x view x tangential`` (``matrix axis label [3]``
    and ``[2]``), tangential fastest. STIR pairs detectors as

        det1 = (view + floor(t / 2)) mod N,  det2 = (view - floor((t + 1) / 2) + N / 2) mod N

    for tangential position ``t`` (index ``t + T // 2`` of ``T``), on rings whose
    difference ``ring2 - ring1`` is in the segment's range; the axial position is the
    smaller ring at span 1 and ``ring1 + ring2 - m`` at span > 1, ``m`` the segment's
    smallest ``|ring difference|`` (medhpc's plane order within a segment). STIR's
    detector ``k`` sits at angle ``2 pi k / N - pi / 2`` from +x
    (``View offset (degrees) := 0``), which is medhpc's crystal ``(k - N / 4) mod N``.
    The scanner comes from the ``Scanner parameters`` block: rings, detectors per
    ring, inner ring diameter and average depth of interaction (the LOR end points sit
    at their sum), ring distance. A medhpc sinogram has ``radial_trim = N / 2 - T // 2``
    so that every STIR bin is a medhpc LOR; medhpc LORs STIR does not store (the last
    tangential position when ``T`` is even) get prompts and multiplicative factor 0.

    STIR's normalisation and attenuation sinograms hold correction factors
    (``data x factor`` corrects the data); medhpc's factors multiply the forward model,
    so ``--norm file.hs`` is read as ``1 / factor``.

CASToR histograms (``.cdh`` header + ``.cdf`` records, ``Data mode: histogram``)
    Each record holds, in this order and only where the header's flag is 1: time (ms,
    uint32), attenuation correction factor, randoms rate (counts/s), normalisation
    correction factor, the counts (float32), the scatter rate, then the two crystal
    IDs (uint32, medhpc numbering, :func:`medhpc.pet.scanner.crystal_ids`). A LOR's
    multiplicative factor is ``1 / (ACF * NCF)``, its additive term ``(scatter +
    randoms rate) * Duration (s)``; LORs without a record get factor 0 (not measured).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medhpc.errors import InputError
from medhpc.io.atomic import atomic_path
from medhpc.io.interfile import data_dtype, data_file, header_number, read_header
from medhpc.pet.listmode import _castor_number, read_castor_pet_header
from medhpc.pet.scanner import (ScannerGeometry, crystal_ids, crystal_pair_lors, plane_members,
                                segment_plane_count, segment_ranges, sinogram_crystals)

STIR_SUFFIX = ".hs"
CASTOR_SUFFIX = ".cdh"
_STORAGE_AXES = {("view", "axial coordinate"): True, ("axial coordinate", "view"): False}
_VIEW_BLOCK = 16  # views converted at once (bounds the index arrays' memory)


def is_stir_path(path) -> bool:
    """True for a STIR projection-data header (``.hs``, any case)."""
    return str(path).lower().endswith(STIR_SUFFIX)


def is_castor_path(path) -> bool:
    """True for a CASToR header (``.cdh``, any case)."""
    return str(path).lower().endswith(CASTOR_SUFFIX)


@dataclass(frozen=True)
class StirLayout:
    """Where a STIR sinogram's values are, read without them.

    Attributes
    ----------
    path, data_path : Path
        The header and its data file.
    dtype : numpy.dtype
    offset : int
        Bytes before the first value.
    scale : float
        ``image scaling factor[1]``.
    view_major : bool
        Segments stored ``view x axial x tangential`` (else ``axial x view x tangential``).
    segments : tuple of (int, int)
        Smallest and largest ring difference of each segment, in file order.
    n_tangential : int
        Tangential positions ``T``.
    scanner : ScannerGeometry
        The scanner described by the header, with the medhpc sinogram that holds every
        STIR bin.
    """

    path: Path
    data_path: Path
    dtype: np.dtype
    offset: int
    scale: float
    view_major: bool
    segments: tuple
    n_tangential: int
    scanner: ScannerGeometry

    @property
    def segment_sizes(self) -> np.ndarray:
        """Axial positions of each segment (``rings - |ring difference|`` at span 1)."""
        return np.array([segment_plane_count(self.scanner, low, high)
                         for low, high in self.segments], np.int64)

    @property
    def n_values(self) -> int:
        """Values in the data file."""
        return int(self.segment_sizes.sum()) * self.scanner.n_views * self.n_tangential


def _integer_list(entries, key, path) -> list[int]:
    if key not in entries:
        raise InputError(f"{path}: missing key '{key} :='")
    text = entries[key].strip()
    try:
        return [int(part) for part in text.strip("{}").split(",") if part.strip()]
    except ValueError:
        raise InputError(f"{path}: '{key} := {text}' is not a list of whole numbers like "
                         f"{{-1,0,1}}") from None


def read_stir_layout(path) -> StirLayout:
    """Read and check a STIR projection-data header (``.hs``); see the module notes.

    Raises :class:`InputError` naming the file, the key and what is supported.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: STIR sinogram header not found")
    entries = read_header(path)

    def refuse(what):
        raise InputError(f"{path}: {what}; medhpc reads non-arc-corrected, unmashed, "
                         f"non-TOF STIR sinograms of one frame at span 1 or an odd span")

    data_type = entries.get("pet data type", "Emission").lower()
    if data_type == "image":
        raise InputError(f"{path}: 'PET data type := Image' is an image; read it as .hv")
    dimensions = header_number(entries, "number of dimensions", path, int)
    if dimensions == 5:
        refuse("TOF projection data (5 dimensions)")
    if dimensions != 4:
        refuse(f"'number of dimensions := {dimensions}'; expected 4")
    labels = [entries.get(f"matrix axis label[{axis}]", "").lower() for axis in (4, 3, 2, 1)]
    if labels[0] != "segment" or labels[3] != "tangential coordinate" \
            or (labels[1], labels[2]) not in _STORAGE_AXES:
        refuse(f"axis labels {labels} (axes 4 to 1); expected segment, then view and axial "
               f"coordinate in either order, then tangential coordinate")
    view_major = _STORAGE_AXES[(labels[1], labels[2])]
    if "arc correction" in entries.get("applied corrections", "").lower():
        refuse("arc-corrected data ('applied corrections' lists arc correction)")
    frames = header_number(entries, "number of time frames", path, int, 1)
    if frames != 1:
        refuse(f"{frames} time frames")
    geometry = entries.get("scanner geometry (blocksoncylindrical/cylindrical/generic)",
                           entries.get("scanner geometry", "Cylindrical"))
    if geometry.lower() != "cylindrical":
        refuse(f"scanner geometry '{geometry}'; expected Cylindrical")
    low = _integer_list(entries, "minimum ring difference per segment", path)
    high = _integer_list(entries, "maximum ring difference per segment", path)
    n_segments = header_number(entries, "matrix size[4]", path, int)
    if len(low) != n_segments or len(high) != n_segments:
        refuse(f"{n_segments} segments but ring differences for {len(low)} and {len(high)}")
    rings = header_number(entries, "number of rings", path, int)
    detectors = header_number(entries, "number of detectors per ring", path, int)
    segments = list(zip(low, high))
    span = high[0] - low[0] + 1 if segments else 1
    largest = max([max(abs(a), abs(b)) for a, b in segments] or [0])
    layout_text = ", ".join(f"{a}..{b}" for a, b in segments)
    if any(b - a + 1 != span for a, b in segments) or (span > 1 and span % 2 == 0):
        refuse(f"segments of ring differences {layout_text}; expected every segment one "
               f"ring difference (span 1) or the same odd number of them")
    if span > 1 and (largest - (span - 1) // 2) % span:
        refuse(f"span {span} up to ring difference {largest}; expected full segments "
               f"(largest ring difference {(span - 1) // 2} + k x {span})")
    if largest >= rings:
        refuse(f"ring difference {largest} of {rings} rings")
    view_size = header_number(entries, f"matrix size[{3 if view_major else 2}]", path, int)
    axial_sizes = _integer_list(entries, f"matrix size[{2 if view_major else 3}]", path)
    if detectors % 4 or detectors < 8:
        refuse(f"{detectors} detectors per ring; expected a multiple of 4")
    if view_size != detectors // 2:
        refuse(f"{view_size} views of {detectors} detectors (view mashing); expected "
               f"{detectors // 2}")
    offset_degrees = header_number(entries, "view offset (degrees)", path, float, 0.0)
    if offset_degrees != 0.0:
        refuse(f"'View offset (degrees) := {offset_degrees:g}'; expected 0")
    n_tangential = header_number(entries, "matrix size[1]", path, int)
    if not 1 <= n_tangential <= detectors:
        refuse(f"{n_tangential} tangential positions; expected 1 to {detectors}")
    radius_mm = 5.0 * header_number(entries, "inner ring diameter (cm)", path, float)
    name = entries.get("originating system") or entries.get("scanner type") or path.stem
    scanner = ScannerGeometry(
        name=name, crystals_per_ring=detectors, rings=rings, radius_mm=radius_mm,
        ring_spacing_mm=10.0 * header_number(entries, "distance between rings (cm)", path, float),
        crystal_size_mm=2.0 * math.pi * radius_mm / detectors,
        radial_trim=max(1, detectors // 2 - n_tangential // 2), max_ring_difference=largest,
        span=span, doi_mm=10.0 * header_number(entries, "average depth of interaction (cm)",
                                               path, float, 0.0))
    if sorted(segments) != sorted(segment_ranges(scanner)):
        refuse(f"segments of ring differences {layout_text}; span {span} up to {largest} "
               f"has {', '.join(f'{a}..{b}' for a, b in sorted(segment_ranges(scanner)))}, "
               f"each once")
    expected_axial = [segment_plane_count(scanner, a, b) for a, b in segments]
    if axial_sizes != expected_axial:
        refuse(f"axial positions {axial_sizes} per segment; {rings} rings at span {span} "
               f"need {expected_axial}")
    dtype = data_dtype(entries, path)
    layout_values = sum(expected_axial) * view_size * n_tangential
    data_path, offset = data_file(entries, path, layout_values * dtype.itemsize,
                                  f"{n_segments} segments of {view_size} views x "
                                  f"{n_tangential} tangential positions ({layout_values} values "
                                  f"of {dtype.itemsize} bytes)")
    return StirLayout(path=path, data_path=data_path, dtype=dtype, offset=offset,
                      scale=header_number(entries, "image scaling factor[1]", path, float, 1.0),
                      view_major=view_major, segments=tuple(segments), n_tangential=n_tangential,
                      scanner=scanner)


def stir_detector_pairs(n_detectors: int):
    """STIR's ``(view, t)`` of every ordered detector pair, inverting its pairing.

    Returns
    -------
    view, tangential : ndarray, int64, shape (N, N)
        ``[det_a, det_b]``: the bin of the LOR between the two detectors (-1 on the
        diagonal).
    swapped : ndarray, bool, shape (N, N)
        True where the bin's detector 1 is ``det_b``.
    """
    n = n_detectors
    view, tangential = np.meshgrid(np.arange(n // 2), np.arange(-n // 2 + 1, n // 2 + 1),
                                   indexing="ij")
    det1 = (view + np.right_shift(tangential, 1)) % n
    det2 = (view - np.right_shift(tangential + 1, 1) + n // 2) % n
    keep = det1 != det2
    det1, det2, view, tangential = det1[keep], det2[keep], view[keep], tangential[keep]
    views = np.full((n, n), -1, np.int64)
    tangentials = np.full((n, n), -1, np.int64)
    swapped = np.zeros((n, n), bool)
    views[det1, det2], tangentials[det1, det2] = view, tangential
    views[det2, det1], tangentials[det2, det1] = view, tangential
    swapped[det2, det1] = True
    return views, tangentials, swapped


def stir_bin_index(stir: StirLayout, scanner: ScannerGeometry, views, planes) -> np.ndarray:
    """Index into the STIR data of each medhpc LOR (radial x view x plane, -1: not stored).

    ``views`` and ``planes`` are index arrays of ``scanner``'s sinogram, whose crystals
    and rings must be the STIR scanner's.
    """
    n, rings, n_tangential = scanner.crystals_per_ring, scanner.rings, stir.n_tangential
    start, end = sinogram_crystals(scanner, views)
    stir_views, tangential, swapped = stir_detector_pairs(n)
    det_a, det_b = (start + n // 4) % n, (end + n // 4) % n
    view = stir_views[det_a, det_b][:, :, None]
    position = tangential[det_a, det_b][:, :, None] + n_tangential // 2
    swap = swapped[det_a, det_b][:, :, None]
    members, first_member = plane_members(scanner, np.asarray(planes, np.int64))
    pairs = members[first_member[:-1]]  # one ring pair stands for its plane
    ring1 = np.where(swap, pairs[None, None, :, 1], pairs[None, None, :, 0])
    ring2 = np.where(swap, pairs[None, None, :, 0], pairs[None, None, :, 1])
    segment_of = np.full(2 * rings - 1, -1, np.int64)
    smallest = np.zeros(len(stir.segments), np.int64)
    for index, (low, high) in enumerate(stir.segments):
        segment_of[low + rings - 1:high + rings] = index
        smallest[index] = 0 if low <= 0 <= high else min(abs(low), abs(high))
    segment = segment_of[ring2 - ring1 + rings - 1]
    sizes = stir.segment_sizes
    first = np.concatenate([[0], np.cumsum(sizes)[:-1]]) * stir.scanner.n_views * n_tangential
    axial = (ring1 + ring2 - smallest[segment]) // (2 if stir.scanner.span == 1 else 1)
    stored = (segment >= 0) & (view >= 0) & (position >= 0) & (position < n_tangential)
    segment = np.where(stored, segment, 0)
    if stir.view_major:
        inner = view * sizes[segment] + axial
    else:
        inner = axial * stir.scanner.n_views + view
    index = first[segment] + inner * n_tangential + position
    return np.where(stored, index, -1)


def read_stir_values(stir: StirLayout, index: np.ndarray) -> np.ndarray:
    """The STIR values at ``index`` (float32, 0 where ``index`` is -1), scaled."""
    data = np.memmap(stir.data_path, dtype=stir.dtype, mode="r", offset=stir.offset,
                     shape=(stir.n_values,))
    values = np.asarray(data[np.where(index >= 0, index, 0)], np.float32)
    values[index < 0] = 0.0
    if stir.scale != 1.0:
        values *= np.float32(stir.scale)
    return values


def check_stir_scanner(stir: StirLayout, scanner: ScannerGeometry, what: str) -> None:
    """Raise :class:`InputError` unless ``scanner``'s rings and crystals are the STIR data's."""
    theirs = stir.scanner
    if (theirs.crystals_per_ring, theirs.rings, theirs.span) != \
            (scanner.crystals_per_ring, scanner.rings, scanner.span) \
            or theirs.max_ring_difference < scanner.max_ring_difference:
        raise InputError(f"{stir.path}: {what} of {theirs.rings} rings x "
                         f"{theirs.crystals_per_ring} detectors at span {theirs.span} up to ring "
                         f"difference {theirs.max_ring_difference}, but the sinogram is of "
                         f"scanner '{scanner.name}' ({scanner.rings} x "
                         f"{scanner.crystals_per_ring}, span {scanner.span}, ring difference "
                         f"{scanner.max_ring_difference})")


def read_stir_sinogram(stir: StirLayout, scanner: ScannerGeometry | None = None) -> np.ndarray:
    """The whole STIR sinogram in medhpc order (radial x view x plane of ``scanner``,
    by default the STIR layout's own), a block of views at a time."""
    scanner = stir.scanner if scanner is None else scanner
    out = np.empty(scanner.sinogram_shape[:3], np.float32)
    planes = np.arange(scanner.n_planes)
    for first in range(0, scanner.n_views, _VIEW_BLOCK):
        views = np.arange(first, min(first + _VIEW_BLOCK, scanner.n_views))
        out[:, views] = read_stir_values(stir, stir_bin_index(stir, scanner, views, planes))
    return out


def stir_stored_mask(stir: StirLayout, scanner: ScannerGeometry) -> np.ndarray:
    """Which LORs of ``scanner``'s sinogram the STIR data store (bool, radial x view x plane)."""
    out = np.empty(scanner.sinogram_shape[:3], bool)
    planes = np.arange(scanner.n_planes)
    for first in range(0, scanner.n_views, _VIEW_BLOCK):
        views = np.arange(first, min(first + _VIEW_BLOCK, scanner.n_views))
        out[:, views] = stir_bin_index(stir, scanner, views, planes) >= 0
    return out


def write_stir_check(path, scanner: ScannerGeometry) -> None:
    """Raise :class:`InputError` unless ``scanner``'s sinogram can be written as STIR data."""
    path = Path(path)
    if not is_stir_path(path):
        raise InputError(f"{path}: a STIR sinogram header ends in .hs")
    n = scanner.crystals_per_ring
    if scanner.modules_per_ring or scanner.has_ring_gaps or n % 4:
        raise InputError(f"{path}: STIR cylindrical data need crystals on a circle, evenly "
                         f"spaced rings and detectors per ring divisible by 4; scanner "
                         f"'{scanner.name}' has {scanner.modules_per_ring} modules, ring gap "
                         f"{scanner.ring_gap_mm:g} mm, {n} crystals per ring")


def write_stir(path, scanner: ScannerGeometry, sinogram: np.ndarray,
               overwrite: bool = False) -> Path:
    """Write a medhpc sinogram (radial x view x plane) as STIR projection data.

    Segments ``-M..M`` in that order, each ``view x axial x tangential``, float32
    little-endian, ``T = n_radial`` tangential positions: every medhpc bin is one STIR
    bin. The header goes to ``path`` (``.hs``), the data beside it (``.s``).
    """
    path = Path(path)
    write_stir_check(path, scanner)
    sinogram = np.asarray(sinogram, np.float32)
    if sinogram.shape != tuple(scanner.sinogram_shape[:3]):
        raise InputError(f"{path}: sinogram of shape {sinogram.shape}; STIR output takes one "
                         f"non-TOF frame of shape {scanner.sinogram_shape[:3]}")
    segments = tuple(sorted(segment_ranges(scanner)))
    data_path = path.with_suffix(".s")
    stir = StirLayout(path=path, data_path=data_path, dtype=np.dtype("<f4"), offset=0, scale=1.0,
                      view_major=True, segments=segments, n_tangential=scanner.n_radial,
                      scanner=scanner)
    values = np.zeros(stir.n_values, "<f4")
    planes = np.arange(scanner.n_planes)
    for first in range(0, scanner.n_views, _VIEW_BLOCK):
        views = np.arange(first, min(first + _VIEW_BLOCK, scanner.n_views))
        values[stir_bin_index(stir, scanner, views, planes)] = sinogram[:, views]
    with atomic_path(data_path, overwrite=overwrite) as tmp:
        values.tofile(tmp)
    with atomic_path(path, overwrite=overwrite) as tmp:
        Path(tmp).write_text(_stir_header(stir), encoding="latin-1")
    return path


def _stir_header(stir: StirLayout) -> str:
    scanner = stir.scanner
    lowest = "{" + ",".join(str(low) for low, _ in stir.segments) + "}"
    highest = "{" + ",".join(str(high) for _, high in stir.segments) + "}"
    axial = "{" + ",".join(str(int(value)) for value in stir.segment_sizes) + "}"
    bin_cm = scanner.crystal_pitch_mm / 10.0
    lines = [
        "!INTERFILE :=", "!imaging modality := PT", f"name of data file := {stir.data_path.name}",
        f"originating system := {scanner.name}", "!version of keys := STIR4.0",
        "!GENERAL DATA :=", "!GENERAL IMAGE DATA :=", "!type of data := PET",
        "imagedata byte order := LITTLEENDIAN", "!PET STUDY (General) :=",
        "!PET data type := Emission", "applied corrections := {None}",
        "!number format := float", "!number of bytes per pixel := 4",
        "number of dimensions := 4",
        "matrix axis label [4] := segment", f"!matrix size [4] := {len(stir.segments)}",
        "matrix axis label [3] := view", f"!matrix size [3] := {scanner.n_views}",
        "matrix axis label [2] := axial coordinate", f"!matrix size [2] := {axial}",
        "matrix axis label [1] := tangential coordinate",
        f"!matrix size [1] := {stir.n_tangential}",
        f"minimum ring difference per segment := {lowest}",
        f"maximum ring difference per segment := {highest}",
        "Scanner parameters :=", f"Scanner type := {scanner.name}",
        "Scanner geometry (BlocksOnCylindrical/Cylindrical/Generic) := Cylindrical",
        f"Number of rings := {scanner.rings}",
        f"Number of detectors per ring := {scanner.crystals_per_ring}",
        f"Inner ring diameter (cm) := {scanner.radius_mm / 5.0:.9g}",
        f"Average depth of interaction (cm) := {scanner.doi_mm / 10.0:.9g}",
        f"Distance between rings (cm) := {scanner.ring_spacing_mm / 10.0:.9g}",
        f"Default bin size (cm) := {bin_cm:.9g}", "View offset (degrees) := 0",
        f"Maximum number of non-arc-corrected bins := {stir.n_tangential}",
        f"Default number of arc-corrected bins := {stir.n_tangential}",
        "End scanner parameters :=", f"effective central bin size (cm) := {bin_cm:.9g}",
        "number of time frames := 1", "image scaling factor[1] := 1",
        "data offset in bytes[1] := 0", "!END OF INTERFILE :="]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- CASToR histograms

def castor_histogram_dtype(entries: dict, path) -> np.dtype:
    """The record of a CASToR PET histogram (see the module notes)."""
    flags = {}
    for key in ("Attenuation correction flag", "Random correction flag",
                "Normalization correction flag", "Scatter correction flag"):
        flags[key] = _castor_number(entries, key, path, int, default=0)
        if flags[key] not in (0, 1):
            raise InputError(f"{path}: '{key}: {flags[key]}'; expected 0 or 1")
    tof_bins = _castor_number(entries, "Histo TOF number of bins", path, int, default=1)
    if tof_bins != 1 or _castor_number(entries, "TOF information flag", path, int, 0):
        raise InputError(f"{path}: TOF histogram ({tof_bins} TOF bins); medhpc reads non-TOF "
                         f"CASToR histograms")
    lines = _castor_number(entries, "Maximum number of lines per event", path, int, default=1)
    if lines != 1:
        raise InputError(f"{path}: 'Maximum number of lines per event: {lines}'; expected 1 "
                         f"(compressed multi-pair bins are not read)")
    record = [("time_ms", "<u4")]
    for key, name in (("Attenuation correction flag", "attenuation"),
                      ("Random correction flag", "randoms_rate"),
                      ("Normalization correction flag", "normalisation")):
        if flags[key]:
            record.append((name, "<f4"))
    record.append(("counts", "<f4"))
    if flags["Scatter correction flag"]:
        record.append(("scatter_rate", "<f4"))
    return np.dtype(record + [("crystal1", "<u4"), ("crystal2", "<u4")])


def write_castor_histogram(path, scanner: ScannerGeometry, prompts, multiplicative, additive,
                           duration_s: float, attenuation=None, normalisation=None,
                           overwrite: bool = False) -> int:
    """Write a span-1, non-TOF medhpc sinogram as a CASToR PET histogram (``.cdh`` header,
    ``.cdf`` records beside it); the conventions :func:`read_castor_histogram` reads.

    One record per LOR with a non-zero factor, crystal IDs as :func:`crystal_ids`; the
    attenuation (when given apart) as ACF = 1 / attenuation, the rest of ``multiplicative`` as
    NCF = 1 / factor, ``additive / duration_s`` as the random rate. Returns the records.
    """
    path = Path(path)
    if not is_castor_path(path):
        raise InputError(f"{path}: a CASToR histogram header ends in {CASTOR_SUFFIX}")
    if scanner.span != 1:
        raise InputError(f"{path}: CASToR histogram bins are crystal pairs; scanner "
                         f"'{scanner.name}' has span {scanner.span} (a plane sums several)")
    multiplicative = np.asarray(multiplicative, np.float64)
    if attenuation is not None and normalisation is None:
        attenuation = np.asarray(attenuation, np.float64)
        normalisation = multiplicative / np.where(attenuation > 0, attenuation, 1.0)
    keep = (multiplicative > 0).ravel()
    start, end = sinogram_crystals(scanner)
    pairs = plane_members(scanner)[0]
    shape = tuple(scanner.sinogram_shape[:3])
    radial, view, plane = np.unravel_index(np.flatnonzero(keep), shape)
    fields = [("time_ms", "<u4")]
    if attenuation is not None:
        fields.append(("attenuation", "<f4"))
    fields += [("randoms_rate", "<f4"), ("normalisation", "<f4"), ("counts", "<f4"),
               ("crystal1", "<u4"), ("crystal2", "<u4")]
    records = np.zeros(radial.size, np.dtype(fields))
    if attenuation is not None:
        records["attenuation"] = 1.0 / np.asarray(attenuation, np.float64).ravel()[keep]
    factor = multiplicative if attenuation is None else np.asarray(normalisation, np.float64)
    records["normalisation"] = 1.0 / factor.ravel()[keep]
    records["randoms_rate"] = np.asarray(additive, np.float64).ravel()[keep] / duration_s
    records["counts"] = np.asarray(prompts, np.float32).ravel()[keep]
    records["crystal1"] = crystal_ids(scanner, start[radial, view], pairs[plane, 0])
    records["crystal2"] = crystal_ids(scanner, end[radial, view], pairs[plane, 1])
    data_path = path.with_suffix(".cdf")
    with atomic_path(data_path, overwrite=overwrite) as tmp:
        records.tofile(tmp)
    header = [f"Data filename: {data_path.name}", f"Number of events: {records.size}",
              "Data mode: histogram", "Data type: PET", "Start time (s): 0",
              f"Duration (s): {duration_s:.9g}", f"Scanner name: {scanner.name}",
              f"Attenuation correction flag: {int(attenuation is not None)}",
              "Normalization correction flag: 1", "Random correction flag: 1",
              "Scatter correction flag: 0"]
    with atomic_path(path, overwrite=overwrite) as tmp:
        Path(tmp).write_text("\n".join(header) + "\n", encoding="latin-1")
    return int(records.size)


def read_castor_histogram(path, scanner: ScannerGeometry) -> dict:
    """A CASToR PET histogram as medhpc sinograms (radial x view x plane of ``scanner``).

    Returns
    -------
    dict
        ``prompts``, ``multiplicative``, ``additive`` (float32) and, where the records
        carry them, ``attenuation`` (``1 / ACF``) and ``normalisation`` (``1 / NCF``);
        ``outside``: records whose crystal pair is no LOR of the sinogram (dropped) and
        ``outside_counts``, their counts.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: CASToR header not found")
    entries, data_path, n_records = read_castor_pet_header(
        path, "histogram", "list-mode data go to pet-recon --listmode")
    duration_s = _castor_number(entries, "Duration (s)", path, float)
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise InputError(f"{path}: 'Duration (s): {duration_s}'; expected a positive number")
    dtype = castor_histogram_dtype(entries, path)
    if not data_path.is_file():
        raise InputError(f"{path}: data file {data_path} (Data filename) not found")
    size = data_path.stat().st_size
    if size != n_records * dtype.itemsize:
        raise InputError(f"{data_path}: {size} bytes, but {n_records} histogram bins of "
                         f"{dtype.itemsize} bytes ({', '.join(dtype.names)}) need "
                         f"{n_records * dtype.itemsize}")
    records = np.fromfile(data_path, dtype=dtype, count=n_records)
    n_crystals = scanner.crystals_per_ring * scanner.rings
    for name in ("crystal1", "crystal2"):
        if n_records and int(records[name].max()) >= n_crystals:
            raise InputError(f"{data_path}: {name} ID {int(records[name].max())}; scanner "
                             f"'{scanner.name}' has {n_crystals} crystals (IDs 0.."
                             f"{n_crystals - 1})")
    for name in dtype.names[1:-2]:
        values = records[name]
        if not np.all(np.isfinite(values) & (values >= 0)):
            raise InputError(f"{data_path}: '{name}' has negative or non-finite values; "
                             f"expected counts, rates and correction factors >= 0")
    lor, _ = crystal_pair_lors(scanner, records["crystal1"], records["crystal2"])
    inside = lor >= 0
    outside_counts = float(np.sum(records["counts"][~inside], dtype=np.float64))
    lor, records = lor[inside], records[inside]
    n_lors = scanner.n_lors
    shape = tuple(scanner.sinogram_shape[:3])

    def histogram(values):
        out = np.zeros(n_lors, np.float64)
        np.add.at(out, lor, values)
        return out.reshape(shape).astype(np.float32)

    measured = np.zeros(n_lors, bool)
    measured[lor] = True
    result = {"prompts": histogram(records["counts"]),
              "outside": int((~inside).sum()),
              "outside_counts": outside_counts}
    multiplicative = measured.reshape(shape).astype(np.float32)
    for name in ("attenuation", "normalisation"):
        if name in dtype.names:
            factor = np.zeros(n_lors, np.float32)
            correction = records[name].astype(np.float64)
            factor[lor] = np.where(correction > 0, 1.0 / np.maximum(correction, 1e-30), 0.0)
            result[name] = factor.reshape(shape)
            multiplicative = multiplicative * result[name]
    result["multiplicative"] = multiplicative
    rate = np.zeros(len(records), np.float64)
    for name in ("randoms_rate", "scatter_rate"):
        if name in dtype.names:
            rate += records[name]
    result["additive"] = histogram(rate * duration_s)
    return result
