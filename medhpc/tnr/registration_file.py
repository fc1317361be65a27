"""The saved registration: what ``tnr-apply`` needs from a tnr-register ``--fields`` file.

tnr-register's ``--fields`` HDF5 holds the dense ``displacement`` (a virtual
dataset over per-rank parts), the rigid chain and the trajectories. To apply the
registration exactly and at any resolution, :func:`append_registration` adds the
per-section coarse warp grids (:class:`~medhpc.tnr.warpfield.SectionWarp`) and the
geometry of the registered input and output::

    warps/displacement     (z, gy, gx, 2) float64  input - output (y, x), working px,
                                                   on nodes every ``step`` working px
    warps/step             ()  int                 node spacing, working px
    warps/working_shape    (2,) int                working-level (y, x)
    sections/names         (z,) str                the registered sections, in order
    sections/shape         (z, 2) int              each section's own (y, x), input px
    sections/offset        (z, 2) int              where it sits in the padded section
                                                   (top, left), input px
    attributes: format, version, downsample (input px per working px), input_shape
    (padded (y, x), input px), output_shape (y, x), full_res, interpolation,
    input_kind (folder, tiff, hdf5), input_source, channels

:func:`load_registration` reads it back as a :class:`SavedRegistration`, checking
every dataset once (one :class:`~medhpc.errors.InputError` line naming the file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medhpc.errors import InputError
from medhpc.tnr.warpfield import SectionWarp

FORMAT = "medhpc.tnr.registration"
VERSION = 1
REQUIRED_DATASETS = ("warps/displacement", "warps/step", "warps/working_shape",
                     "sections/names", "sections/shape", "sections/offset")
REQUIRED_ATTRIBUTES = ("downsample", "input_shape", "output_shape", "full_res",
                       "interpolation", "input_kind")


def centred_offsets(shapes, padded_shape) -> np.ndarray:
    """(top, left) of each section inside the padded section, as tnr's input stack pads
    them (centred, the odd pixel below and to the right); ``(z, 2)`` int."""
    shapes = np.asarray(shapes, np.int64).reshape(-1, 2)
    return (np.asarray(padded_shape, np.int64)[None, :] - shapes) // 2


@dataclass(frozen=True)
class SavedRegistration:
    """A tnr-register result, enough to warp any stain of the same sections.

    Coordinates follow tnr-register: pixel ``(i, j)`` of any level has its centre at
    ``(y, x) = (i, j)``; a level ``f`` times finer than the working level maps to it by
    ``w = (p + 0.5) / f - 0.5``.
    """

    path: str
    names: tuple                     # registered section names, in order
    section_shapes: np.ndarray       # (z, 2) own (y, x) of each section, input px
    section_offsets: np.ndarray      # (z, 2) (top, left) inside the padded section
    input_shape: tuple               # padded (y, x), input px
    downsample: int                  # input px per working px
    working_shape: tuple             # (y, x) working px
    step: int                        # warp grid step, working px
    displacement: np.ndarray         # (z, gy, gx, 2) input - output, working px
    output_shape: tuple              # (y, x) of tnr-register's volume
    full_res: bool                   # tnr-register's volume was at the input resolution
    interpolation: str               # bicubic or bilinear
    input_kind: str                  # folder, tiff or hdf5
    weights: np.ndarray | None = None  # (z,) say of each section in the solve (flags)
    stain: str = "hematoxylin"       # tnr-register's stain channel
    normalise: str = "none"          # tnr-register's output intensity normalisation

    @property
    def count(self) -> int:
        """Number of sections."""
        return len(self.names)

    @property
    def output_factor(self) -> float:
        """Output pixels per working pixel of tnr-register's volume."""
        return float(self.downsample) if self.full_res else 1.0

    def warp(self, index: int) -> SectionWarp:
        """Section ``index``'s output -> input map."""
        return SectionWarp(tuple(self.working_shape), self.step, self.displacement[index])


def append_registration(h5, warps: list[SectionWarp], stack, settings, output_shape,
                        weights=None) -> None:
    """Write the warp grids and geometry of a tnr-register run into an open ``--fields`` file.

    Parameters
    ----------
    h5 : h5py.File
        The ``--fields`` file, open for writing.
    warps : list of SectionWarp
        One per section, in order (all on one grid).
    stack : SectionStack
        The registered input (names, own and padded shapes, kind).
    settings : TnrSettings
        The run's settings (downsample, full_res, interpolation).
    output_shape : tuple of int
        (y, x) of the registered volume.
    weights : (z,) array, optional
        Each section's weight in the solve (0 excluded, below 1 flagged).
    """
    steps = {warp.step for warp in warps}
    grids = {warp.displacement.shape for warp in warps}
    if len(steps) != 1 or len(grids) != 1:
        raise ValueError(f"section warps on different grids (steps {steps}, grids {grids})")
    group = h5.require_group("warps")
    group.create_dataset("displacement", data=np.stack([w.displacement for w in warps])
                         .astype(np.float64), compression="gzip")
    group.create_dataset("step", data=int(warps[0].step))
    group.create_dataset("working_shape", data=np.asarray(warps[0].shape, np.int64))
    group.attrs["description"] = ("input - output displacement (y, x) in working pixels on "
                                  "nodes every `step` working pixels, bilinear between nodes")
    sections = h5.require_group("sections")
    sections.create_dataset("names", data=np.array(list(stack.names), dtype=object),
                            dtype=_string_type())
    sections.create_dataset("shape", data=np.asarray(stack.shapes, np.int64).reshape(-1, 2))
    sections.create_dataset("offset", data=centred_offsets(stack.shapes, stack.shape))
    if weights is not None:
        sections.create_dataset("weight", data=np.asarray(weights, np.float64))
    h5.attrs.update({
        "format": FORMAT, "version": VERSION, "downsample": int(settings.downsample),
        "input_shape": np.asarray(stack.shape, np.int64),
        "output_shape": np.asarray(output_shape, np.int64),
        "full_res": bool(settings.full_res), "interpolation": settings.interpolation,
        "input_kind": stack.kind, "input_source": str(stack.source),
        "channels": int(stack.channels), "stain": settings.stain,
        "normalise": settings.normalise,
    })


def _string_type():
    import h5py

    return h5py.string_dtype("utf-8")


def load_registration(path) -> SavedRegistration:
    """Read and check a saved registration (a tnr-register ``--fields`` file).

    Raises
    ------
    InputError
        One line naming the file when it is missing, not HDF5, or lacks or has
        inconsistent warp datasets.
    """
    import h5py

    path = Path(path)
    expected = ("expected the --fields file of tnr-register (with warps/ and sections/; "
                "rerun tnr-register with --fields)")
    if not path.is_file():
        raise InputError(f"{path}: registration not found; {expected}")
    try:
        h5 = h5py.File(path, "r")
    except OSError as error:
        raise InputError(f"{path}: cannot be read as HDF5 ({' '.join(str(error).split())}); "
                         f"{expected}") from None
    with h5:
        missing = [name for name in REQUIRED_DATASETS if name not in h5]
        missing += [f"attribute {name}" for name in REQUIRED_ATTRIBUTES if name not in h5.attrs]
        if missing:
            raise InputError(f"{path}: no {', '.join(missing)}; {expected}")
        displacement = np.asarray(h5["warps/displacement"][()], np.float64)
        step = int(h5["warps/step"][()])
        working_shape = tuple(int(n) for n in h5["warps/working_shape"][()])
        names = tuple(_text(n) for n in h5["sections/names"][()])
        shapes = np.asarray(h5["sections/shape"][()], np.int64)
        offsets = np.asarray(h5["sections/offset"][()], np.int64)
        attrs = h5.attrs
        registration = SavedRegistration(
            path=str(path), names=names, section_shapes=shapes, section_offsets=offsets,
            input_shape=tuple(int(n) for n in attrs["input_shape"]),
            downsample=int(attrs["downsample"]), working_shape=working_shape, step=step,
            displacement=displacement,
            output_shape=tuple(int(n) for n in attrs["output_shape"]),
            full_res=bool(attrs["full_res"]), interpolation=_text(attrs["interpolation"]),
            input_kind=_text(attrs["input_kind"]),
            weights=(np.asarray(h5["sections/weight"][()], np.float64)
                     if "sections/weight" in h5 else None),
            stain=_text(attrs.get("stain", "hematoxylin")),
            normalise=_text(attrs.get("normalise", "none")))
    _check(registration, expected)
    return registration


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check(registration: SavedRegistration, expected: str) -> None:
    """Raise InputError when the datasets of a registration do not fit together."""
    path, count = registration.path, registration.count
    displacement = registration.displacement
    problems = []
    if displacement.ndim != 4 or displacement.shape[0] != count or displacement.shape[3] != 2:
        problems.append(f"warps/displacement has shape {displacement.shape}, expected "
                        f"({count}, gy, gx, 2)")
    elif not np.all(np.isfinite(displacement)):
        problems.append("warps/displacement holds NaN or infinite values")
    if registration.step < 1 or len(registration.working_shape) != 2:
        problems.append(f"warps/step {registration.step} or warps/working_shape "
                        f"{registration.working_shape} is not a positive step and a (y, x) shape")
    for name, array in (("sections/shape", registration.section_shapes),
                        ("sections/offset", registration.section_offsets)):
        if array.shape != (count, 2):
            problems.append(f"{name} has shape {array.shape}, expected ({count}, 2)")
    if registration.downsample < 1:
        problems.append(f"downsample {registration.downsample} is below 1")
    if registration.interpolation not in ("bilinear", "bicubic"):
        problems.append(f"interpolation {registration.interpolation!r} is not bilinear or "
                        "bicubic")
    if count < 1:
        problems.append("no sections")
    if problems:
        raise InputError(f"{path}: {'; '.join(problems)}; {expected}")
