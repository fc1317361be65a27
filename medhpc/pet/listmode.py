"""List-mode data: coincidence events as crystal pairs, from medhpc's HDF5 layout or CASToR.

Crystal IDs are ``ring * crystals_per_ring + crystal`` with the crystal counted from
+x towards +y and the ring from -z (:func:`medhpc.pet.scanner.crystal_ids`).

medhpc list-mode file (HDF5, ``format = "medhpc-listmode"``, version 1)
    - ``events/crystal1``, ``events/crystal2``: uint32 crystal IDs;
    - ``events/time_ms``: uint32, non-decreasing (ms from the acquisition start);
    - ``events/tof_bin`` (TOF data): int16, the scanner's TOF bin counted along the
      LOR from crystal 1 towards crystal 2 (bin ``k`` centred
      ``(k - (tof_bins - 1) / 2) * tof_bin_mm`` from the LOR's midpoint);
    - ``multiplicative`` (radial x view x plane) and ``additive`` (the sinogram's
      prompts shape), optional: attenuation x normalisation of every LOR and the
      expected randoms + scatter counts over the whole acquisition; optionally
      ``attenuation`` and ``normalisation``, the two parts of ``multiplicative``;
    - attributes: ``scanner`` (JSON), ``image_shape``, ``image_affine``, ``duration_s``
      and ``tof``.

CASToR list-mode data (``.cdh`` header + ``.cdf`` records), PET only
    Each record holds, in this order and only where the header's flag is 1: time (ms,
    uint32), attenuation correction factor, scatter rate, randoms rate (counts/s),
    normalisation correction factor, TOF time difference ``t1 - t2`` (ps, float32),
    then the two crystal IDs (uint32). An event's multiplicative factor is
    ``1 / (ACF * NCF)`` and its additive term ``(scatter + randoms rate) * window s``.
    Crystal IDs must follow medhpc's numbering above for the scanner given with
    ``--scanner``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from medhpc.errors import InputError
from medhpc.io.atomic import atomic_path
from medhpc.io.geometry import ImageGeometry
from medhpc.pet.scanner import (SPEED_OF_LIGHT_MM_PER_PS, ScannerGeometry, default_image_grid,
                                scanner_from_dict, scanner_to_dict)

FORMAT = "medhpc-listmode"
VERSION = 1
CASTOR_FIELDS = (  # (header flag, record field) in record order, between time and crystals
    ("Attenuation correction flag", "attenuation"),
    ("Scatter correction flag", "scatter_rate"),
    ("Random correction flag", "randoms_rate"),
    ("Normalization correction flag", "normalisation"),
    ("TOF information flag", "tof_ps"),
)


@dataclass(frozen=True)
class ListModeLayout:
    """What a list-mode file holds, read without its events.

    Attributes
    ----------
    path : Path
        The HDF5 file or the CASToR header.
    kind : {'medhpc', 'castor'}
    scanner : ScannerGeometry
    image : ImageGeometry
        The stored grid (medhpc) or the scanner's default grid (CASToR).
    n_events : int
    duration_s : float
    tof : bool
        Events carry a TOF measurement.
    event_fields : tuple of str
        Per-event corrections in the file (CASToR: ``attenuation``, ``scatter_rate``,
        ``randoms_rate``, ``normalisation``).
    has_factors : bool
        The file holds the ``multiplicative`` and ``additive`` sinograms (medhpc).
    data_path : Path
        Where the events are (the HDF5 file or the ``.cdf``).
    tof_quantisation_ps : float
        CASToR: the TOF time step of the records (0 when not stated).
    """

    path: Path
    kind: str
    scanner: ScannerGeometry
    image: ImageGeometry
    n_events: int
    duration_s: float
    tof: bool
    event_fields: tuple = ()
    has_factors: bool = False
    data_path: Path | None = None
    tof_quantisation_ps: float = 0.0
    record_dtype: object = field(default=None, compare=False)

    @property
    def frames(self) -> int:
        """Time frames stored (list mode: one; windows select frames)."""
        return 1

    @property
    def tof_bins(self) -> int:
        """TOF bins of the scanner's sinogram (1 without TOF)."""
        return self.scanner.tof_bins if self.tof else 1


@dataclass
class EventBlock:
    """Consecutive events of a file.

    ``tof_mm`` is the TOF position along the LOR from its midpoint towards crystal 2
    (None without TOF); ``tof_bin`` the medhpc TOF bin (None for CASToR);
    ``multiplicative`` / ``additive`` the per-event CASToR corrections (None when the
    file has none; ``additive`` in counts per second).
    """

    crystal1: np.ndarray
    crystal2: np.ndarray
    time_ms: np.ndarray
    tof_mm: np.ndarray | None = None
    tof_bin: np.ndarray | None = None
    multiplicative: np.ndarray | None = None
    additive_rate: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.crystal1.shape[0])


# ---------------------------------------------------------------- medhpc HDF5 layout

def write_listmode(path, scanner: ScannerGeometry, image: ImageGeometry, events: dict,
                   duration_s: float, multiplicative=None, additive=None,
                   overwrite: bool = False, attrs: dict | None = None,
                   factors: dict | None = None) -> None:
    """Write a medhpc list-mode file atomically.

    ``events`` maps ``crystal1``, ``crystal2``, ``time_ms`` and optionally ``tof_bin`` to
    equal-length arrays (see the module notes for the layout).
    """
    with atomic_path(path, overwrite=overwrite) as tmp:
        with h5py.File(tmp, "w") as h5:
            h5.attrs["format"] = FORMAT
            h5.attrs["version"] = VERSION
            h5.attrs["scanner"] = json.dumps(scanner_to_dict(scanner))
            h5.attrs["image_shape"] = np.asarray(image.shape, dtype=np.int64)
            h5.attrs["image_affine"] = np.asarray(image.affine, dtype=np.float64)
            h5.attrs["duration_s"] = float(duration_s)
            h5.attrs["tof"] = "tof_bin" in events
            for key, value in (attrs or {}).items():
                h5.attrs[key] = value
            group = h5.create_group("events")
            dtypes = {"crystal1": np.uint32, "crystal2": np.uint32, "time_ms": np.uint32,
                      "tof_bin": np.int16}
            for name, dtype in dtypes.items():
                if name in events:
                    data = np.asarray(events[name], dtype=dtype)
                    group.create_dataset(name, data=data, chunks=(min(max(len(data), 1), 1 << 20),),
                                         compression="gzip", compression_opts=1, shuffle=True)
            arrays = {"multiplicative": multiplicative, "additive": additive, **(factors or {})}
            for name, array in arrays.items():
                if array is not None:
                    h5.create_dataset(name, data=np.asarray(array, np.float32),
                                      compression="gzip", compression_opts=1, shuffle=True)


def read_listmode_layout(path, scanner: ScannerGeometry | None = None) -> ListModeLayout:
    """Read and check a list-mode file's description: medhpc HDF5 or a CASToR ``.cdh``.

    ``scanner`` is required for CASToR data (its header names the scanner only); for a
    medhpc file it must match the stored one when given.

    Raises :class:`InputError` naming the file and what is wrong.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: list-mode file not found")
    if path.suffix.lower() == ".cdh":
        return _castor_layout(path, scanner)
    try:
        h5 = h5py.File(path, "r")
    except OSError:
        raise InputError(f"{path}: not an HDF5 file or a CASToR header (.cdh); expected a "
                         f"list-mode file written by 'medhpc pet-simulate --listmode'") from None
    with h5:
        if h5.attrs.get("format") != FORMAT:
            raise InputError(f"{path}: not a medhpc list-mode file (attribute format is "
                             f"{h5.attrs.get('format')!r}, expected {FORMAT!r})")
        stored = scanner_from_dict(json.loads(h5.attrs["scanner"]), source=str(path))
        if scanner is not None and scanner_to_dict(scanner) != scanner_to_dict(stored):
            raise InputError(f"{path}: recorded with scanner '{stored.name}', which differs from "
                             f"--scanner '{scanner.name}'; leave --scanner out for medhpc files")
        tof = bool(h5.attrs.get("tof", False))
        missing = [name for name in ("crystal1", "crystal2", "time_ms") + (("tof_bin",) if tof else ())
                   if f"events/{name}" not in h5]
        if missing:
            raise InputError(f"{path}: dataset 'events/{missing[0]}' is missing; a list-mode file "
                             f"needs events/crystal1, crystal2 and time_ms (and tof_bin with TOF)")
        n_events = int(h5["events/crystal1"].shape[0])
        for name in ("crystal2", "time_ms") + (("tof_bin",) if tof else ()):
            if h5[f"events/{name}"].shape != (n_events,):
                raise InputError(f"{path}: 'events/{name}' has shape {h5[f'events/{name}'].shape}; "
                                 f"expected ({n_events},) like events/crystal1")
        if tof and stored.tof_bins < 1:
            raise InputError(f"{path}: events carry TOF bins but scanner '{stored.name}' has none")
        has_factors = "multiplicative" in h5 or "additive" in h5
        layout = ListModeLayout(
            path=path, kind="medhpc", scanner=stored,
            image=ImageGeometry(shape=tuple(int(n) for n in h5.attrs["image_shape"]),
                                affine=np.asarray(h5.attrs["image_affine"])),
            n_events=n_events, duration_s=float(h5.attrs.get("duration_s", 0.0)), tof=tof,
            has_factors=has_factors, data_path=path)
        if has_factors:
            check_factor_shapes(layout, {name: tuple(h5[name].shape) for name in
                                         ("multiplicative", "additive") if name in h5}, path)
    _check_duration(layout)
    return layout


def check_factor_shapes(layout: ListModeLayout, shapes: dict, source) -> None:
    """Raise :class:`InputError` unless the factor sinograms fit the layout's scanner and TOF."""
    scanner = layout.scanner
    expected = {"multiplicative": tuple(scanner.sinogram_shape[:3]),
                "additive": tuple(scanner.sinogram_shape[:3])
                + ((scanner.tof_bins,) if layout.tof and layout.kind == "medhpc" else ())}
    for name in ("multiplicative", "additive"):
        if name not in shapes:
            raise InputError(f"{source}: '{name}' is missing; the factors need both "
                             f"multiplicative and additive")
        if shapes[name] != expected[name]:
            raise InputError(f"{source}: '{name}' has shape {shapes[name]}, but the list-mode "
                             f"data of scanner '{scanner.name}' need {expected[name]}")


def _check_duration(layout: ListModeLayout) -> None:
    if not (math.isfinite(layout.duration_s) and layout.duration_s > 0):
        raise InputError(f"{layout.path}: acquisition duration {layout.duration_s!r} s; expected "
                         f"a positive number of seconds")


# ---------------------------------------------------------------- CASToR

def read_castor_header(path) -> dict:
    """The ``key: value`` lines of a CASToR header (keys as written, values stripped)."""
    entries = {}
    try:
        text = Path(path).read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the CASToR header ({exc})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if ":" not in line:
            raise InputError(f"{path}: line {number} {line!r} is not 'key: value'")
        key, value = line.split(":", 1)
        entries[key.strip()] = value.strip()
    return entries


def _castor_number(entries, key, path, kind=float, default=None):
    if key not in entries:
        if default is None:
            raise InputError(f"{path}: missing key '{key}:'")
        return default
    try:
        return kind(entries[key])
    except ValueError:
        raise InputError(f"{path}: '{key}: {entries[key]}' is not a {kind.__name__}") from None


def read_castor_pet_header(path, mode: str, hint: str):
    """``(entries, data path, Number of events)`` of a CASToR PET header of ``Data mode``
    ``mode`` (``hint`` ends the error when it is another)."""
    path = Path(path)
    entries = read_castor_header(path)
    for key, expected in (("Data mode", mode), ("Data type", "PET")):
        value = entries.get(key)
        if value is None:
            raise InputError(f"{path}: missing key '{key}:'")
        if value.lower() != expected.lower():
            raise InputError(f"{path}: '{key}: {value}'; expected '{expected}' ({hint})")
    if "Data filename" not in entries:
        raise InputError(f"{path}: missing key 'Data filename:'")
    return (entries, path.parent / entries["Data filename"],
            _castor_number(entries, "Number of events", path, int))


def _castor_layout(path: Path, scanner: ScannerGeometry | None) -> ListModeLayout:
    if scanner is None:
        raise InputError(f"{path}: CASToR data name the scanner only; pass --scanner (a preset "
                         f"or TOML file whose crystals match the IDs in the data)")
    entries, data_path, n_events = read_castor_pet_header(path, "list-mode",
                                                          "only PET list-mode data are read")
    lines = _castor_number(entries, "Maximum number of lines per event", path, int, default=1)
    if lines != 1:
        raise InputError(f"{path}: 'Maximum number of lines per event: {lines}'; expected 1 "
                         f"(compressed multi-pair events are not read)")
    if _castor_number(entries, "Coincidence kind flag", path, int, default=0):
        raise InputError(f"{path}: 'Coincidence kind flag: 1'; records with a coincidence kind "
                         f"are not read (write the list mode without it)")
    flags = {name: _castor_number(entries, key, path, int, default=0)
             for key, name in CASTOR_FIELDS}
    for (key, name) in CASTOR_FIELDS:
        if flags[name] not in (0, 1):
            raise InputError(f"{path}: '{key}: {flags[name]}'; expected 0 or 1")
    record = [("time_ms", "<u4")] + [(name, "<f4") for _, name in CASTOR_FIELDS if flags[name]]
    record += [("crystal1", "<u4"), ("crystal2", "<u4")]
    dtype = np.dtype(record)
    if not data_path.is_file():
        raise InputError(f"{path}: data file {data_path} (Data filename) not found")
    size = data_path.stat().st_size
    if size != n_events * dtype.itemsize:
        raise InputError(f"{data_path}: {size} bytes, but {n_events} events of {dtype.itemsize} "
                         f"bytes ({', '.join(dtype.names)}) need {n_events * dtype.itemsize}")
    tof = bool(flags["tof_ps"])
    quantisation = _castor_number(entries, "List TOF quantization bin size (ps)", path, float,
                                  default=0.0)
    if tof and scanner.tof_bins < 1:
        raise InputError(f"{path}: events carry TOF but scanner '{scanner.name}' has no TOF "
                         f"resolution; use a TOF scanner")
    shape, voxel = default_image_grid(scanner)
    layout = ListModeLayout(
        path=path, kind="castor", scanner=scanner, image=ImageGeometry.from_spacing(shape, voxel),
        n_events=n_events, duration_s=_castor_number(entries, "Duration (s)", path, float),
        tof=tof, event_fields=tuple(name for _, name in CASTOR_FIELDS[:4] if flags[name]),
        data_path=data_path, tof_quantisation_ps=quantisation, record_dtype=dtype)
    _check_duration(layout)
    return layout


# ---------------------------------------------------------------- events

def read_events(layout: ListModeLayout, start: int, stop: int) -> EventBlock:
    """Events ``[start, stop)`` of the file, checked (IDs in range, times non-decreasing)."""
    start, stop = int(start), int(max(stop, start))
    if layout.kind == "castor":
        records = np.memmap(layout.data_path, dtype=layout.record_dtype, mode="r",
                            shape=(layout.n_events,))[start:stop]
        block = EventBlock(crystal1=np.asarray(records["crystal1"], np.int64),
                           crystal2=np.asarray(records["crystal2"], np.int64),
                           time_ms=np.asarray(records["time_ms"], np.int64))
        if layout.tof:
            block.tof_mm = (0.5 * SPEED_OF_LIGHT_MM_PER_PS
                            * np.asarray(records["tof_ps"], np.float64)).astype(np.float32)
        if "attenuation" in layout.event_fields or "normalisation" in layout.event_fields:
            correction = np.ones(len(block), np.float64)
            for name in ("attenuation", "normalisation"):
                if name in layout.event_fields:
                    correction *= records[name]
            with np.errstate(divide="ignore"):
                block.multiplicative = np.where(correction > 0, 1.0 / correction,
                                                0.0).astype(np.float32)
        rates = [name for name in ("scatter_rate", "randoms_rate") if name in layout.event_fields]
        if rates:
            block.additive_rate = sum(np.asarray(records[n], np.float64) for n in rates).astype(
                np.float32)
    else:
        with h5py.File(layout.path, "r") as h5:
            events = h5["events"]
            block = EventBlock(crystal1=events["crystal1"][start:stop].astype(np.int64),
                               crystal2=events["crystal2"][start:stop].astype(np.int64),
                               time_ms=events["time_ms"][start:stop].astype(np.int64))
            if layout.tof:
                block.tof_bin = events["tof_bin"][start:stop].astype(np.int64)
        if layout.tof:
            bins = layout.scanner.tof_bins
            if len(block) and (block.tof_bin.min() < 0 or block.tof_bin.max() >= bins):
                raise InputError(f"{layout.path}: TOF bins {int(block.tof_bin.min())}.."
                                 f"{int(block.tof_bin.max())} in events {start}..{stop - 1}; "
                                 f"expected 0..{bins - 1} (scanner '{layout.scanner.name}')")
            block.tof_mm = ((block.tof_bin - (bins - 1) / 2.0)
                            * layout.scanner.tof_bin_mm).astype(np.float32)
    _check_block(layout, block, start)
    return block


def _check_block(layout: ListModeLayout, block: EventBlock, start: int) -> None:
    n_crystals = layout.scanner.crystals_per_ring * layout.scanner.rings
    for name in ("crystal1", "crystal2"):
        ids = getattr(block, name)
        if len(block) and ids.max() >= n_crystals:
            raise InputError(f"{layout.data_path}: {name} ID {int(ids.max())} in events from "
                             f"{start}; scanner '{layout.scanner.name}' has {n_crystals} crystals "
                             f"(IDs 0..{n_crystals - 1})")
    if len(block) > 1 and np.any(np.diff(block.time_ms) < 0):
        raise InputError(f"{layout.data_path}: event times decrease within events {start}.."
                         f"{start + len(block) - 1}; expected time-ordered events")
    for name in ("multiplicative", "additive_rate"):
        values = getattr(block, name)
        if values is not None and not np.all(np.isfinite(values) & (values >= 0)):
            raise InputError(f"{layout.data_path}: per-event {name} has negative or non-finite "
                             f"values; expected finite corrections >= 0")


def window_events(layout: ListModeLayout, start_s: float, stop_s: float) -> tuple[int, int]:
    """The event range ``[first, last)`` with ``start_s <= time < stop_s`` (binary search)."""
    if layout.kind == "castor":
        times = np.memmap(layout.data_path, dtype=layout.record_dtype, mode="r",
                          shape=(layout.n_events,))["time_ms"]
        return (int(np.searchsorted(times, start_s * 1000.0, side="left")),
                int(np.searchsorted(times, stop_s * 1000.0, side="left")))
    with h5py.File(layout.path, "r") as h5:
        times = h5["events/time_ms"]
        return (_bisect(times, start_s * 1000.0, layout.n_events),
                _bisect(times, stop_s * 1000.0, layout.n_events))


def _bisect(times, value: float, n: int) -> int:
    low, high = 0, n
    while low < high:
        middle = (low + high) // 2
        if times[middle] < value:
            low = middle + 1
        else:
            high = middle
    return low


def parse_time_windows(text: str | None, duration_s: float, source="--time-windows"):
    """``"0:60,60:120"`` -> [(0, 60), (60, 120)] seconds; None -> the whole acquisition."""
    if not text:
        return [(0.0, float(duration_s))]
    windows = []
    for part in text.split(","):
        try:
            start, stop = (float(v) for v in part.split(":"))
        except ValueError:
            raise InputError(f"{source} {text!r}: {part!r} is not START:STOP in seconds") from None
        if not (0 <= start < stop) or not math.isfinite(stop):
            raise InputError(f"{source} {text!r}: window {part!r} needs 0 <= START < STOP")
        if start >= duration_s:
            raise InputError(f"{source} {text!r}: window {part!r} starts after the acquisition "
                             f"ends ({duration_s:g} s)")
        windows.append((start, min(stop, float(duration_s))))
    return windows
