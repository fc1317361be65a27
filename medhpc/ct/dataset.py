"""The prepared CT dataset: one chunked HDF5 file with every case and its geometry.

Layout::

    /cases/<case>/image    float32 [z, y, x] HU (clipped to --clip-hu), geometry attributes
    /cases/<case>/labels   uint8   [z, y, x], 0 = background, 1..n = the classes
    root attributes        classes (JSON), clip_hu, spacing_mm, intensity (JSON: the
                           foreground percentiles, mean and std used to normalise),
                           fingerprint (JSON, :mod:`medhpc.ct.fingerprint`)

Each case keeps the geometry it was stored on and, under ``original_affine`` /
``original_shape``, the grid of its source file (they differ after resampling
with ``--spacing-mm``). :func:`prepare_dataset` spreads the cases over the ranks:
each rank converts its block into a part file, rank 0 copies the parts into the
final file (compressed chunks are copied as they are) and removes them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medhpc.ct.fingerprint import case_entry, dataset_fingerprint, target_spacing
from medhpc.errors import InputError
from medhpc.io.atomic import atomic_path, check_output_path
from medhpc.io.geometry import ImageGeometry
from medhpc.io.nifti import NIFTI_SUFFIXES, is_nifti_path

CHUNK = (32, 64, 64)
FOREGROUND_SAMPLES = 20_000


@dataclass(frozen=True)
class CaseFiles:
    """The inputs of one case: an image (NIfTI file or DICOM folder) and optional labels."""

    name: str
    image: Path
    labels: Path | None = None


def case_name(path) -> str:
    """``case_001.nii.gz`` -> ``case_001``; a DICOM folder's name as it is."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_cases(images, labels=None) -> list[CaseFiles]:
    """List the cases of an image folder (NIfTI files and DICOM series folders) or file list.

    With ``labels`` (a folder), every case needs ``labels/<case>.nii[.gz]``.
    """
    if isinstance(images, (str, Path)) and Path(images).is_dir():
        folder = Path(images)
        entries = sorted(p for p in folder.iterdir()
                         if (p.is_file() and is_nifti_path(p)) or p.is_dir())
        if not entries:
            raise InputError(f"{folder}: empty dataset, no NIfTI images or DICOM series "
                             f"folders; expected at least one case")
    else:
        entries = [Path(p) for p in ([images] if isinstance(images, (str, Path)) else images)]
        if not entries:
            raise InputError("empty dataset: no images given; expected at least one case")
        for entry in entries:
            if not entry.exists():
                raise InputError(f"{entry}: not found; expected a NIfTI image or a DICOM folder")
    names = [case_name(p) for p in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise InputError(f"{entries[0].parent}: case name(s) {', '.join(duplicates)} appear "
                         f"twice; expected one image per case")
    cases = []
    for name, entry in zip(names, entries):
        label_path = None
        if labels is not None:
            candidates = [Path(labels) / f"{name}{suffix}" for suffix in NIFTI_SUFFIXES]
            label_path = next((p for p in candidates if p.exists()), None)
            if label_path is None:
                raise InputError(f"{candidates[-1]}: label map of case {name} not found; "
                                 f"expected one NIfTI label map per image")
        cases.append(CaseFiles(name, entry, label_path))
    return cases


def read_ct(path) -> tuple[np.ndarray, ImageGeometry]:
    """Read a CT volume in HU from a NIfTI file or a DICOM series folder."""
    from medhpc.io.images import read_image

    if Path(path).is_dir():
        from medhpc.ct.dicom import read_dicom_series

        return read_dicom_series(path)
    image, geometry = read_image(path, ndim=3)
    return image.astype(np.float32, copy=False), geometry


def read_labels(path, image_path, image_geometry: ImageGeometry, n_classes: int) -> np.ndarray:
    """Read a label map and check it against its image's grid and the class range."""
    from medhpc.io.images import check_same_grid, read_image

    labels, geometry = read_image(path, ndim=3)
    if labels.shape != image_geometry.shape:
        raise InputError(f"{path}: label map is {labels.shape[::-1]} voxels (x,y,z), image "
                         f"{image_path} is {image_geometry.shape[::-1]}; expected the same grid")
    check_same_grid(path, geometry, image_path, image_geometry)
    if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
        raise InputError(f"{path}: label map holds non-integer values; expected integer labels "
                         f"0..{n_classes}")
    low, high = float(labels.min()), float(labels.max())
    if low < 0 or high > n_classes:
        raise InputError(f"{path}: labels range {low:g}..{high:g}, outside the class range "
                         f"0..{n_classes} (0 = background, {n_classes} classes)")
    return labels.astype(np.uint8)


def source_geometry(path) -> ImageGeometry:
    """A case's geometry from its headers (NIfTI header, DICOM slice headers)."""
    if Path(path).is_dir():
        from medhpc.ct.dicom import dicom_series_geometry

        return dicom_series_geometry(path)
    if is_nifti_path(path):
        from medhpc.io.nifti import read_nifti_geometry

        return read_nifti_geometry(path)
    return read_ct(path)[1]


def normalised_hu(image: np.ndarray, stats: dict) -> np.ndarray:
    """``(clip(image, low, high) - mean) / std`` with the dataset's intensity statistics."""
    from medhpc.ct import augment_cpu

    out = np.empty(image.shape, dtype=np.float32)
    augment_cpu.normalise_hu(np.ascontiguousarray(image, dtype=np.float32),
                             np.float32(stats["low"]), np.float32(stats["high"]),
                             np.float32(stats["mean"]), np.float32(stats["std"]), out)
    return out


def intensity_fill(stats: dict) -> float:
    """The normalised value of the window's low end (what lies outside a volume)."""
    return (stats["low"] - stats["mean"]) / stats["std"]


def resampled_geometry(geometry: ImageGeometry, spacing_mm) -> ImageGeometry:
    """The grid over the same extent with voxels of ``spacing_mm`` (x, y, z), same directions."""
    old = np.array(geometry.spacing_mm)
    new = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    counts_xyz = np.maximum(1, np.round(np.array(geometry.shape[::-1]) * old / new)).astype(int)
    affine = geometry.affine.copy()
    affine[:3, :3] = geometry.affine[:3, :3] / old * new
    return ImageGeometry(tuple(counts_xyz[::-1]), affine)


def resample(array: np.ndarray, source: ImageGeometry, target: ImageGeometry,
             labels: bool, fill: float = 0.0) -> np.ndarray:
    """Resample ``array`` from ``source`` onto ``target`` (trilinear, or nearest for labels)."""
    from medhpc.ct import augment_cpu

    # target voxel (x, y, z) -> world -> source voxel; then written in (z, y, x) order
    to_source = np.linalg.inv(source.affine) @ target.affine
    reverse = [2, 1, 0]
    matrix = to_source[:3, :3][np.ix_(reverse, reverse)].astype(np.float32)
    offset = to_source[:3, 3][reverse].astype(np.float32)
    displacement = np.zeros((3, 1, 1, 1), dtype=np.float32)
    if labels:
        out = np.empty(target.shape, dtype=np.uint8)
        augment_cpu.warp_labels(np.ascontiguousarray(array, dtype=np.uint8), matrix, offset,
                                displacement, out)
    else:
        out = np.empty(target.shape, dtype=np.float32)
        augment_cpu.warp_image(np.ascontiguousarray(array, dtype=np.float32), matrix, offset,
                               displacement, np.float32(fill), out)
    return out


def convert_case(case: CaseFiles, n_classes: int, clip_hu=None, spacing_mm=None) -> dict:
    """Read, check, clip and optionally resample one case; return arrays and geometries."""
    image, geometry = read_ct(case.image)
    labels = None
    if case.labels is not None:
        labels = read_labels(case.labels, case.image, geometry, n_classes)
    if clip_hu is not None:
        np.clip(image, clip_hu[0], clip_hu[1], out=image)
    stored = geometry
    if spacing_mm is not None:
        stored = resampled_geometry(geometry, spacing_mm)
        fill = float(clip_hu[0]) if clip_hu is not None else float(image.min())
        image = resample(image, geometry, stored, labels=False, fill=fill)
        if labels is not None:
            labels = resample(labels, geometry, stored, labels=True)
    return {"name": case.name, "image": image, "labels": labels, "geometry": stored,
            "original": geometry, "source": str(case.image),
            "fingerprint": case_entry(case.name, geometry, labels, n_classes)}


def foreground_sample(image, labels, rng) -> np.ndarray:
    """Up to :data:`FOREGROUND_SAMPLES` HU values from labelled voxels (for normalisation)."""
    if labels is None:
        return np.empty(0, dtype=np.float32)
    values = image[labels > 0]
    if values.size > FOREGROUND_SAMPLES:
        values = rng.choice(values, FOREGROUND_SAMPLES, replace=False)
    return values.astype(np.float32)


def intensity_statistics(samples: np.ndarray, window=None) -> dict:
    """The normalisation window and the foreground mean and std inside it.

    The window is ``window`` (``--clip-hu``) when given, else the foreground's
    0.5 and 99.5 percentiles (nnU-Net's CT normalisation).
    """
    if samples.size == 0:
        low, high = window if window is not None else (-1000.0, 1000.0)
        return {"low": float(low), "high": float(high), "mean": 0.0, "std": 1000.0}
    if window is not None:
        low, high = window
    else:
        low, high = np.percentile(samples, [0.5, 99.5])
    clipped = np.clip(samples, low, high)
    return {"low": float(low), "high": float(high), "mean": float(clipped.mean()),
            "std": float(max(clipped.std(), 1e-3))}


def write_cases(path, converted: list[dict]) -> None:
    """Write converted cases into a new HDF5 file (a part file), atomically."""
    import h5py

    with atomic_path(path, overwrite=True, output=False) as tmp:
        with h5py.File(tmp, "w") as h5:
            group = h5.create_group("cases")
            for case in converted:
                _write_case(group.create_group(case["name"]), case)


def _write_case(group, case: dict) -> None:
    chunks = tuple(min(c, n) for c, n in zip(CHUNK, case["image"].shape))
    options = {"chunks": chunks, "compression": "gzip", "compression_opts": 1, "shuffle": True}
    image = group.create_dataset("image", data=case["image"], **options)
    image.attrs.update(case["geometry"].to_attrs())
    image.attrs["units"] = "HU"
    if case["labels"] is not None:
        labels = group.create_dataset("labels", data=case["labels"], **options)
        labels.attrs.update(case["geometry"].to_attrs())
    group.attrs["original_affine"] = case["original"].affine
    group.attrs["original_shape"] = np.array(case["original"].shape, dtype=np.int64)
    group.attrs["source"] = case["source"]


def assemble(out, parts, names: list[str], attrs: dict, overwrite: bool) -> None:
    """Copy the cases of the part files, in ``names`` order, into ``out``; remove the parts."""
    import h5py

    with atomic_path(out, overwrite) as tmp:
        with h5py.File(tmp, "w") as h5:
            cases = h5.create_group("cases")
            for part in parts:
                with h5py.File(part, "r") as source:
                    for name in source["cases"]:
                        source.copy(source["cases"][name], cases, name=name)
            for key, value in attrs.items():
                h5.attrs[key] = value
            h5.attrs["case_order"] = json.dumps(names)
    for part in parts:
        Path(part).unlink()


def part_path(out, rank: int) -> Path:
    """The part file rank ``rank`` writes beside ``out``."""
    out = Path(out)
    return out.with_name(f".{out.stem}.part{rank}.h5")


class CtDataset:
    """Read access to a prepared dataset (:func:`prepare_dataset`'s file)."""

    def __init__(self, path):
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: dataset not found; expected the output of "
                             f"medhpc ct-prepare")
        try:
            with h5py.File(self.path, "r") as h5:
                self.names = json.loads(h5.attrs["case_order"])
                self.classes = json.loads(h5.attrs["classes"])
                self.intensity = json.loads(h5.attrs["intensity"])
                self.spacing_mm = json.loads(h5.attrs["spacing_mm"])
                self.shapes = {n: tuple(h5["cases"][n]["image"].shape) for n in self.names}
                self.spacings_zyx = {n: tuple(float(v) for v in ImageGeometry.from_attrs(
                    h5["cases"][n]["image"].attrs).spacing_mm[::-1]) for n in self.names}
                self.labelled = {n: "labels" in h5["cases"][n] for n in self.names}
                self.fingerprint = json.loads(h5.attrs["fingerprint"]) \
                    if "fingerprint" in h5.attrs else None
        except (OSError, KeyError, ValueError) as error:
            raise InputError(f"{self.path}: not a medhpc CT dataset ({error}); expected the "
                             f"output of medhpc ct-prepare") from None
        if not self.names:
            raise InputError(f"{self.path}: empty dataset; expected at least one case")

    @property
    def median_shape(self) -> tuple:
        """The median stored case shape (z, y, x)."""
        return tuple(np.median(np.array(list(self.shapes.values())), axis=0))

    @property
    def median_spacing_zyx(self) -> tuple:
        """The median stored voxel size (z, y, x, mm)."""
        return tuple(np.median(np.array(list(self.spacings_zyx.values())), axis=0))

    @property
    def n_classes(self) -> int:
        """Foreground classes (labels 1..n_classes)."""
        return len(self.classes)

    def read(self, name: str) -> tuple[np.ndarray, np.ndarray | None, ImageGeometry]:
        """Return ``(image_hu, labels_or_None, geometry)`` of one case."""
        import h5py

        with h5py.File(self.path, "r") as h5:
            group = h5["cases"][name]
            image = group["image"][()]
            geometry = ImageGeometry.from_attrs(group["image"].attrs)
            labels = group["labels"][()] if "labels" in group else None
        return image, labels, geometry


def prepare_dataset(run, images, labels, out, classes, clip_hu=None, spacing_mm=None) -> dict:
    """Convert every case into one HDF5 dataset, cases spread over the ranks (collective).

    ``spacing_mm`` (x, y, z) resamples every case; ``"auto"`` resamples to the target
    spacing planned from the cases' headers (:func:`medhpc.ct.fingerprint.target_spacing`).
    """
    from medhpc.parallel.work import static_items

    world = run.world
    auto = isinstance(spacing_mm, str)

    def check():
        check_output_path(out, run.overwrite, (".h5", ".hdf5"))
        if clip_hu is not None and clip_hu[0] >= clip_hu[1]:
            raise InputError(f"--clip-hu {clip_hu[0]:g},{clip_hu[1]:g}: expected low < high")
        if not auto and spacing_mm is not None and min(spacing_mm) <= 0:
            raise InputError(f"--spacing-mm {spacing_mm}: expected positive sizes")
        return find_cases(images, labels)

    cases = world.agree(check)
    mine = static_items(world, len(cases))
    if auto:
        spacing_mm = planned_spacing(run, cases, mine)

    def convert_mine():
        converted, samples = [], []
        for index in mine:
            with run.stage("read and convert", "io"):
                case = convert_case(cases[index], len(classes), clip_hu, spacing_mm)
            samples.append(foreground_sample(case["image"], case["labels"],
                                             np.random.default_rng(index)))
            converted.append(case)
        with run.stage("write part", "io"):
            write_cases(part_path(out, world.rank), converted)
        samples = np.concatenate(samples) if samples else np.empty(0, dtype=np.float32)
        return samples, [case["fingerprint"] for case in converted]

    try:
        samples, entries = world.agree_all(convert_mine)
    except Exception:
        part = part_path(out, world.rank)
        if part.exists():
            part.unlink()
        raise
    with run.stage("gather statistics", "comm"):
        gathered = world.gather(samples)
        gathered_entries = world.gather(entries)
    summary = None
    if world.is_root:
        statistics = intensity_statistics(np.concatenate(gathered), clip_hu)
        by_name = {e["name"]: e for part in gathered_entries for e in part}
        fingerprint = dataset_fingerprint([by_name[c.name] for c in cases], list(classes),
                                          statistics)
        attrs = {"classes": json.dumps(list(classes)), "intensity": json.dumps(statistics),
                 "clip_hu": json.dumps(list(clip_hu) if clip_hu is not None else None),
                 "spacing_mm": json.dumps(list(spacing_mm) if spacing_mm is not None else None),
                 "fingerprint": json.dumps(fingerprint)}
        with run.stage("assemble", "io"):
            assemble(out, [part_path(out, r) for r in range(world.size)],
                     [c.name for c in cases], attrs, run.overwrite)
        summary = {"cases": len(cases), "labelled": sum(c.labels is not None for c in cases),
                   "intensity": statistics,
                   "spacing_mm": list(spacing_mm) if spacing_mm is not None else None,
                   "target_spacing_mm": fingerprint["target_spacing_zyx"][::-1]}
    return world.bcast(summary)


def planned_spacing(run, cases: list[CaseFiles], mine) -> list[float]:
    """The target spacing (x, y, z, mm) of ``cases`` from their headers (collective)."""
    world = run.world

    def read_mine():
        with run.stage("read headers", "io"):
            return [source_geometry(cases[index].image) for index in mine]

    geometries = world.agree_all(read_mine)
    with run.stage("gather statistics", "comm"):
        gathered = world.gather([(g.spacing_mm[::-1], g.shape) for g in geometries])
    spacing = None
    if world.is_root:
        pairs = [pair for part in gathered for pair in part]
        target = target_spacing([p[0] for p in pairs], [p[1] for p in pairs])
        spacing = [round(v, 6) for v in target[::-1]]
    return world.bcast(spacing)
