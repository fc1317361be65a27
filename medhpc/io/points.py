"""World points in a CSV: ``x, y, z`` in mm (RAS, as NIfTI), then any other columns.

A header row is optional: the first row is a header when its first three cells are not
all numbers. Blank lines and lines starting with ``#`` are skipped. The written file keeps
the input's header (if it had one), its other columns as they were, and one row per point
in the input's order.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medhpc.errors import InputError
from medhpc.io.atomic import atomic_path

_EXPECTED = "expected a CSV of x,y,z (world RAS mm) per line, other columns allowed"


@dataclass
class WorldPoints:
    """The rows of a world points CSV."""

    path: str
    xyz: np.ndarray           # (N, 3) world RAS mm
    header: list | None       # the header row as written, or None
    extra: list               # (N,) lists of the cells after x, y, z


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_world_points(path) -> WorldPoints:
    """Read and check a world points CSV (:class:`InputError` naming the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: points file {'is a folder' if path.exists() else 'not found'}"
                         f"; {_EXPECTED}")
    header, xyz, extra = None, [], []
    try:
        with open(path, newline="", encoding="utf-8-sig") as stream:
            for line, row in enumerate(csv.reader(stream), start=1):
                cells = [cell.strip() for cell in row]
                if not any(cells) or cells[0].startswith("#"):
                    continue
                where = f"{path} line {line}"
                if len(cells) < 3:
                    raise InputError(f"{where}: {len(cells)} column(s); {_EXPECTED}")
                if header is None and not xyz and not all(map(_is_number, cells[:3])):
                    header = list(row)
                    continue
                try:
                    point = [float(cell) for cell in cells[:3]]
                except ValueError:
                    raise InputError(f"{where}: x, y, z = {','.join(cells[:3])}; expected "
                                     f"numbers (mm)") from None
                if not all(map(math.isfinite, point)):
                    raise InputError(f"{where}: x, y, z = {point}; expected finite numbers")
                xyz.append(point)
                extra.append(list(row[3:]))
    except UnicodeDecodeError:
        raise InputError(f"{path}: not text; {_EXPECTED}") from None
    except csv.Error as error:
        raise InputError(f"{path}: unreadable CSV ({error}); {_EXPECTED}") from None
    if not xyz:
        raise InputError(f"{path}: no points; {_EXPECTED}")
    return WorldPoints(str(path), np.asarray(xyz, np.float64), header, extra)


def write_world_points(path, points: WorldPoints, xyz: np.ndarray,
                       overwrite: bool = False) -> Path:
    """Write ``points`` with new positions ``xyz (N, 3)`` (mm, 6 decimals), atomically."""
    xyz = np.asarray(xyz, np.float64).reshape(-1, 3)
    if len(xyz) != len(points.extra):
        raise ValueError(f"{len(xyz)} positions for {len(points.extra)} points")
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            if points.header is not None:
                writer.writerow(points.header)
            for position, extra in zip(xyz, points.extra):
                writer.writerow([f"{value:.6f}" for value in position] + extra)
    return path
