"""Annotations of sections: a points CSV and GeoJSON features, read, checked, mapped, written.

This module owns the two formats; it knows nothing of warps. Mapping goes
through a ``mapper(sections, xy) -> (xy_out, z, inside)`` callable (see
:meth:`medhpc.tnr.apply.Application.map_points`), called once per file with every
point of the file.

Points CSV: a header with at least ``section``, ``x`` and ``y``; ``section`` is a
section's name (file name, with or without its extension) or its index (0-based,
in the registered order). The output has ``section, x, y, z, inside`` and then
the input's other columns unchanged.

GeoJSON: a FeatureCollection, a single Feature or a list of Features, with Point,
MultiPoint, LineString, MultiLineString, Polygon or MultiPolygon geometries; the
section is the feature's ``properties.section``, or, for a folder of GeoJSON
files, the file's name (``section_003.geojson`` for ``section_003.png``). The
structure is kept; positions ``[x, y, ...]`` get their mapped ``x, y`` (other
values kept) and each feature gets the properties ``z`` (its section index) and
``inside`` (every position converged and inside the output).
"""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medhpc.errors import InputError
from medhpc.io.atomic import atomic_path

POINT_COLUMNS = ("section", "x", "y")
GEOJSON_SUFFIXES = (".geojson", ".json")
# geometry type -> nesting depth of its coordinates above one position
GEOMETRY_DEPTHS = {"Point": 0, "MultiPoint": 1, "LineString": 1, "MultiLineString": 2,
                   "Polygon": 2, "MultiPolygon": 3}


class SectionLookup:
    """Resolve a section given by name or index to its registered index.

    Parameters
    ----------
    count : int
        Number of registered sections.
    names : dict
        ``{name: index}``; each name is also found without its extension.
    """

    def __init__(self, count: int, names: dict):
        self.count = count
        self.names = {}
        ambiguous = set()
        for name, index in names.items():
            for key in {str(name), section_stem(str(name))}:
                if self.names.get(key, index) != index:
                    ambiguous.add(key)
                self.names[key] = index
        for key in ambiguous:
            self.names.pop(key)

    def index(self, text, where: str) -> int:
        """The registered index of section ``text``; ``where`` names the place for errors."""
        text = str(text).strip()
        if text in self.names:
            return self.names[text]
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not value.is_integer():
            raise InputError(f"{where}: section {text!r} is not a section of the registration; "
                             f"expected a section name or an index 0..{self.count - 1}")
        if not 0 <= value < self.count:
            raise InputError(f"{where}: section {int(value)} is out of range; expected an "
                             f"index 0..{self.count - 1} or a section name")
        return int(value)


def section_stem(name: str) -> str:
    """A section name without its extension (``section_003.png`` -> ``section_003``)."""
    lower = name.lower()
    for suffix in (".ome.tiff", ".ome.tif"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem if "." in name else name


# -- points CSV --------------------------------------------------------------------------------
@dataclass
class PointTable:
    """The rows of a points CSV: section index and (x, y) per point, the other columns kept."""

    path: str
    sections: np.ndarray            # (N,) registered section index
    xy: np.ndarray                  # (N, 2) input pixels
    labels: list                    # (N,) the section column as written
    extra_columns: list = field(default_factory=list)
    extra_values: list = field(default_factory=list)   # (N,) lists of strings


def read_points_csv(path, lookup: SectionLookup) -> PointTable:
    """Read and check a points CSV (raises InputError naming the file and line)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: points file not found; expected a CSV with columns "
                         f"{', '.join(POINT_COLUMNS)}")
    with open(path, newline="", encoding="utf-8-sig") as stream:
        reader = csv.reader(stream)
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in POINT_COLUMNS if name not in header]
        if missing:
            raise InputError(f"{path}: no column(s) {', '.join(missing)} in the header "
                             f"{','.join(header) or '(empty)'}; expected columns "
                             f"{', '.join(POINT_COLUMNS)}")
        column = {name: header.index(name) for name in POINT_COLUMNS}
        extra = [i for i, name in enumerate(header) if name not in POINT_COLUMNS]
        sections, xy, labels, extra_values = [], [], [], []
        for line, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            where = f"{path} line {line}"
            if len(row) < len(header):
                raise InputError(f"{where}: {len(row)} values; expected {len(header)} "
                                 f"({','.join(header)})")
            sections.append(lookup.index(row[column["section"]], where))
            try:
                position = [float(row[column["x"]]), float(row[column["y"]])]
            except ValueError:
                raise InputError(f"{where}: x {row[column['x']]!r}, y {row[column['y']]!r}; "
                                 "expected numbers (pixels)") from None
            if not np.all(np.isfinite(position)):
                raise InputError(f"{where}: x, y = {position}; expected finite numbers")
            xy.append(position)
            labels.append(row[column["section"]].strip())
            extra_values.append([row[i] for i in extra])
    return PointTable(str(path), np.asarray(sections, np.int64),
                      np.asarray(xy, np.float64).reshape(-1, 2), labels,
                      [header[i] for i in extra], extra_values)


def write_points_csv(path, table: PointTable, xy_out, z, inside, overwrite: bool) -> None:
    """Write mapped points: ``section, x, y, z, inside`` and the input's other columns."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as stream:
            writer = csv.writer(stream)
            writer.writerow(["section", "x", "y", "z", "inside", *table.extra_columns])
            for i, label in enumerate(table.labels):
                writer.writerow([label, f"{xy_out[i, 0]:.4f}", f"{xy_out[i, 1]:.4f}",
                                 int(z[i]), "true" if inside[i] else "false",
                                 *table.extra_values[i]])


# -- GeoJSON -----------------------------------------------------------------------------------
@dataclass
class GeoJsonDocument:
    """One GeoJSON file: its parsed content and, per feature, the registered section."""

    path: str
    name: str                       # file name (written under the same name in a folder)
    content: object                 # parsed JSON
    features: list                  # the Feature dicts inside ``content``
    sections: list                  # registered section index per feature


def read_geojson(path, lookup: SectionLookup) -> list[GeoJsonDocument]:
    """Read a GeoJSON file, or a folder of one GeoJSON file per section (checked)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.is_file() and p.suffix.lower() in GEOJSON_SUFFIXES)
        if not files:
            raise InputError(f"{path}: no .geojson files; expected one GeoJSON file per "
                             "section, named after the section")
        return [_read_document(file, lookup, lookup.index(section_stem(file.name),
                                                          f"{file} (file name)"))
                for file in files]
    if not path.is_file():
        raise InputError(f"{path}: GeoJSON not found; expected a GeoJSON file or a folder of "
                         "them")
    return [_read_document(path, lookup, None)]


def _read_document(path: Path, lookup: SectionLookup, file_section) -> GeoJsonDocument:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not valid JSON ({error}); expected GeoJSON") from None
    if isinstance(content, list):
        features = content
    elif isinstance(content, dict) and content.get("type") == "FeatureCollection":
        features = content.get("features")
    elif isinstance(content, dict) and content.get("type") == "Feature":
        features = [content]
    else:
        features = None
    if not isinstance(features, list):
        raise InputError(f"{path}: not a FeatureCollection, Feature or list of Features; "
                         "expected GeoJSON features")
    sections = []
    for number, feature in enumerate(features):
        where = f"{path} feature {number}"
        if not isinstance(feature, dict) or feature.get("type") != "Feature":
            raise InputError(f"{where}: not a Feature; expected GeoJSON features")
        geometry = feature.get("geometry")
        if geometry is not None:
            kind = geometry.get("type") if isinstance(geometry, dict) else None
            if kind not in GEOMETRY_DEPTHS:
                raise InputError(f"{where}: geometry {kind!r}; expected one of "
                                 f"{', '.join(GEOMETRY_DEPTHS)}")
            _positions(geometry.get("coordinates"), GEOMETRY_DEPTHS[kind], where)
        properties = feature.get("properties") or {}
        if file_section is not None:
            sections.append(file_section)
        elif "section" in properties:
            sections.append(lookup.index(properties["section"], where))
        else:
            raise InputError(f"{where}: no 'section' property; expected the section's name or "
                             "index in properties.section, or a folder of one file per section")
    return GeoJsonDocument(str(path), path.name, content, features, sections)


def _positions(coordinates, depth: int, where: str) -> list:
    """The position lists ``[x, y, ...]`` inside ``coordinates`` (checked), in order."""
    if depth == 0:
        if (not isinstance(coordinates, list) or len(coordinates) < 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                           for v in coordinates)):
            raise InputError(f"{where}: position {str(coordinates)[:40]}; expected [x, y]")
        return [coordinates]
    if not isinstance(coordinates, list):
        raise InputError(f"{where}: coordinates {str(coordinates)[:40]}; expected nested "
                         "lists of [x, y] positions")
    found = []
    for item in coordinates:
        found.extend(_positions(item, depth - 1, where))
    return found


def map_geojson(document: GeoJsonDocument, mapper) -> tuple[object, int]:
    """A mapped copy of a document's content and the number of positions not inside."""
    content = copy.deepcopy(document.content)
    features = (content if isinstance(content, list) else
                content["features"] if content.get("type") == "FeatureCollection" else [content])
    positions, owners, sections = [], [], []
    for number, (feature, section) in enumerate(zip(features, document.sections)):
        geometry = feature.get("geometry")
        if geometry is None:
            continue
        found = _positions(geometry["coordinates"], GEOMETRY_DEPTHS[geometry["type"]], "")
        positions.extend(found)
        owners.extend([number] * len(found))
        sections.extend([section] * len(found))
    outside = 0
    feature_inside = [True] * len(features)
    if positions:
        xy = np.array([[p[0], p[1]] for p in positions], np.float64)
        xy_out, _, inside = mapper(np.asarray(sections, np.int64), xy)
        for position, (x, y), flag, owner in zip(positions, xy_out, inside, owners):
            position[0], position[1] = float(x), float(y)
            if not flag:
                feature_inside[owner] = False
                outside += 1
    for feature, section, flag in zip(features, document.sections, feature_inside):
        properties = feature.get("properties")
        if properties is None:
            properties = feature["properties"] = {}
        properties["z"] = int(section)
        properties["inside"] = bool(flag)
    return content, outside


def write_geojson(path, documents: list[GeoJsonDocument], contents: list, folder: bool,
                  overwrite: bool) -> None:
    """Write mapped GeoJSON: one file, or a folder with a file per input file."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        if folder:
            tmp.mkdir()
            for document, content in zip(documents, contents):
                (tmp / document.name).write_text(json.dumps(content), encoding="utf-8")
        else:
            tmp.write_text(json.dumps(contents[0]), encoding="utf-8")
