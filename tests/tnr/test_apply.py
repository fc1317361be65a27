"""tnr-apply: a saved registration applied to the same sections, another resolution, points,
GeoJSON; bad input fails clearly; ranks do not change the result."""

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from medhpc.errors import InputError
from medhpc.tnr.apply import (Annotations, Application, ApplySettings, _bilinear, detect_scale,
                              invert_warp)
from medhpc.tnr.registration_file import load_registration
from tests.helpers import run_medhpc
from tests.tnr.conftest import SETTINGS, register, serial_run

SECTIONS = 6
CROPPED = 2                      # this section is cropped, so the stack pads it
REGISTERED = replace(SETTINGS, downsample=2, full_res=True)
DOT_SIGMA_PX = 3.0               # at the 2x copy's resolution


def make_registration(phantom_folder, base: Path) -> SimpleNamespace:
    """Register six phantom sections (one cropped) at --downsample 2 --full-res --fields."""
    folder = base / "sections"
    folder.mkdir(parents=True)
    for i, path in enumerate(sorted((phantom_folder / "sections").glob("*.png"))[:SECTIONS]):
        image = np.asarray(Image.open(path))
        if i == CROPPED:
            image = image[3:, 2:-2]            # odd padding in y
        Image.fromarray(image).save(folder / path.name)
    out = base / "he.h5"
    _, volume = register(folder, out, settings=REGISTERED)
    return SimpleNamespace(folder=folder, volume=volume,
                           fields=out.with_name("he-fields.h5"), base=base)


@pytest.fixture(scope="module")
def registered(phantom_folder, tmp_path_factory):
    return make_registration(phantom_folder, tmp_path_factory.mktemp("tnr_apply"))


def apply(registration, source, out, settings=ApplySettings(), run=None, **annotations):
    Application(run or serial_run("tnr-apply"), registration, source, out, settings,
                Annotations(**annotations)).execute()


def read_volume(path):
    with h5py.File(path, "r") as h5:
        return h5["volume"][()]


def section_images(folder):
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


# -- the saved registration --------------------------------------------------------------------
def test_saved_registration_is_self_contained(registered):
    saved = load_registration(registered.fields)
    assert saved.count == SECTIONS and saved.downsample == 2 and saved.full_res
    assert saved.names[CROPPED] == f"section_{CROPPED:03d}.png"
    assert saved.input_shape == (128, 128) and saved.output_shape == (128, 128)
    assert saved.working_shape == (64, 64)
    assert tuple(saved.section_shapes[CROPPED]) == (125, 124)
    assert tuple(saved.section_offsets[CROPPED]) == (1, 2)
    with h5py.File(registered.fields, "r") as h5:
        dense = h5["displacement"][()]
    for i in range(SECTIONS):
        np.testing.assert_allclose(saved.warp(i).dense(), dense[:, i], atol=1e-4)


def test_inverse_warp_round_trip():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:9, 0:9]
    grid = np.stack([2.5 * np.sin(yy / 3.0) + 0.3 * xx, 1.5 * np.cos(xx / 2.0) - 0.2 * yy],
                    axis=-1)
    outputs = rng.uniform(-5, 70, (200, 2))
    targets = outputs + _bilinear(grid, 8, outputs)[0]
    found, converged = invert_warp(grid, 8, targets)
    assert converged.all()
    np.testing.assert_allclose(found, outputs, atol=1e-5)


def test_scale_is_detected_snapped_and_checked():
    registered = [(125, 124), (128, 128)]
    assert detect_scale([(250, 248), (256, 256)], registered, "x") == 2.0
    assert detect_scale([(63, 62), (64, 64)], registered, "x") == 0.5
    with pytest.raises(InputError, match="section 1 is 300x256 px.*one scale"):
        detect_scale([(250, 248), (256, 300)], registered, "x")


# -- images ------------------------------------------------------------------------------------
def test_same_sections_reproduce_the_registered_volume(registered, tmp_path):
    apply(registered.fields, str(registered.folder), tmp_path / "again.h5")
    again = read_volume(tmp_path / "again.h5")
    assert again.shape == registered.volume.shape == (3, SECTIONS, 128, 128)
    assert np.abs(again.astype(int) - registered.volume.astype(int)).max() <= 1


def test_twice_the_resolution_gives_the_full_res_registration(registered, tmp_path):
    finer = tmp_path / "ihc"
    finer.mkdir()
    for name, image in section_images(registered.folder).items():   # other extension
        tifffile.imwrite(finer / name.replace(".png", ".tif"),
                         np.repeat(np.repeat(image, 2, axis=0), 2, axis=1), photometric="rgb")
    apply(registered.fields, str(finer), tmp_path / "ihc.ome.tif",
          ApplySettings(downsample=2.0))
    warped = np.moveaxis(tifffile.imread(tmp_path / "ihc.ome.tif"), -1, 0)
    assert warped.shape == registered.volume.shape
    assert np.abs(warped.astype(int) - registered.volume.astype(int)).max() <= 1
    apply(registered.fields, str(finer), tmp_path / "ihc-full.h5", ApplySettings(full_res=True))
    assert read_volume(tmp_path / "ihc-full.h5").shape == (3, SECTIONS, 256, 256)


# -- annotations -------------------------------------------------------------------------------
def dot_sections(registered, folder: Path):
    """Grey float sections at twice the registered size, with Gaussian dots at known (x, y)."""
    folder.mkdir()
    saved = load_registration(registered.fields)
    rng = np.random.default_rng(7)
    dots = []
    for i, name in enumerate(saved.names):
        ny, nx = 2 * saved.section_shapes[i]
        image = np.zeros((ny, nx), np.float32)
        yy, xx = np.mgrid[0:ny, 0:nx]
        for y0 in (70.0, 128.0, 180.0):
            for x0 in (70.0, 128.0, 180.0):
                x, y = x0 + rng.uniform(-3, 3), y0 + rng.uniform(-3, 3)
                image += 100.0 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * DOT_SIGMA_PX ** 2))
                dots.append((name if len(dots) % 2 else str(i), x, y))
        tifffile.imwrite(folder / name.replace(".png", ".tif"), image)
    return dots


def write_points(path, rows, header=("section", "x", "y", "label")):
    with open(path, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(header)
        for n, row in enumerate(rows):
            writer.writerow([*row, f"p{n}"][: len(header)])


def read_points(path):
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def centroid(plane, x, y, radius=5):
    y0, x0 = int(round(y)), int(round(x))
    window = np.clip(plane[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1], 0, None)
    yy, xx = np.mgrid[y0 - radius:y0 + radius + 1, x0 - radius:x0 + radius + 1]
    return float((window * xx).sum() / window.sum()), float((window * yy).sum() / window.sum())


def test_points_land_where_the_image_warp_puts_them(registered, tmp_path):
    dots = dot_sections(registered, tmp_path / "dots")
    write_points(tmp_path / "points.csv", dots + [("section_001.png", -900.0, 40.0)])
    apply(registered.fields, str(tmp_path / "dots"), tmp_path / "dots.h5",
          points=tmp_path / "points.csv", points_out=tmp_path / "mapped.csv")
    volume = read_volume(tmp_path / "dots.h5")
    rows = read_points(tmp_path / "mapped.csv")
    assert list(rows[0]) == ["section", "x", "y", "z", "inside", "label"]
    assert len(rows) == len(dots) + 1 and rows[-1]["inside"] == "false"
    errors = []
    for row in rows[:-1]:
        assert row["inside"] == "true"
        x, y, z = float(row["x"]), float(row["y"]), int(row["z"])
        cx, cy = centroid(volume[z], x, y)
        errors.append(np.hypot(cx - x, cy - y))
    assert [int(r["z"]) for r in rows[:9]] == [0] * 9
    assert max(errors) < 1.0, max(errors)


def test_geojson_round_trip(registered, tmp_path):
    square = [[40.0, 40.0], [40.0, 90.0], [90.0, 90.0], [90.0, 40.0], [40.0, 40.0]]
    features = [
        {"type": "Feature", "properties": {"section": "section_003.png", "name": "poly"},
         "geometry": {"type": "Polygon", "coordinates": [square]}},
        {"type": "Feature", "properties": {"section": 4},
         "geometry": {"type": "MultiPolygon", "coordinates": [[square], [square[::-1]]]}},
        {"type": "Feature", "properties": {"section": "section_000"},
         "geometry": {"type": "LineString", "coordinates": square[:3]}},
        {"type": "Feature", "properties": {"section": 1},
         "geometry": {"type": "Point", "coordinates": [70.0, 60.0, 7.0]}},
        {"type": "Feature", "properties": {"section": 2},
         "geometry": {"type": "MultiPoint", "coordinates": square[:2]}},
    ]
    (tmp_path / "in.geojson").write_text(json.dumps({"type": "FeatureCollection",
                                                     "features": features}))
    reference = [(f["properties"]["section"], *p) for f in features
                 for p in _flat(f["geometry"]["coordinates"])]
    write_points(tmp_path / "points.csv", [r[:3] for r in reference], ("section", "x", "y"))
    per_section = tmp_path / "per-section"
    per_section.mkdir()
    (per_section / "section_003.geojson").write_text(json.dumps(features[0]))
    apply(registered.fields, None, None, geojson=tmp_path / "in.geojson",
          geojson_out=tmp_path / "out.geojson", points=tmp_path / "points.csv",
          points_out=tmp_path / "mapped.csv")
    apply(registered.fields, None, None, geojson=per_section, geojson_out=tmp_path / "out-dir")
    mapped = json.loads((tmp_path / "out.geojson").read_text())
    assert mapped["type"] == "FeatureCollection" and len(mapped["features"]) == len(features)
    for before, after in zip(features, mapped["features"]):
        assert after["geometry"]["type"] == before["geometry"]["type"]
        assert (np.shape(after["geometry"]["coordinates"])
                == np.shape(before["geometry"]["coordinates"]))
        assert after["properties"]["inside"] is True
    assert mapped["features"][0]["properties"] == {"section": "section_003.png", "name": "poly",
                                                   "z": 3, "inside": True}
    assert mapped["features"][3]["geometry"]["coordinates"][2] == 7.0
    points = read_points(tmp_path / "mapped.csv")
    flat = [p for f in mapped["features"] for p in _flat(f["geometry"]["coordinates"])]
    np.testing.assert_allclose([p[:2] for p in flat],
                               [[float(r["x"]), float(r["y"])] for r in points], atol=1e-3)
    moved = np.abs(np.array([p[:2] for p in flat]) - np.array([r[1:3] for r in reference])).max()
    assert moved > 0.5         # the warp moved them
    write_points(tmp_path / "corner.csv", [(r[0], r[1] + 0.5, r[2] + 0.5) for r in reference],
                 ("section", "x", "y"))
    apply(registered.fields, None, None, ApplySettings(origin="pixel-corner"),
          points=tmp_path / "corner.csv", points_out=tmp_path / "corner-out.csv")
    np.testing.assert_allclose([[float(r["x"]), float(r["y"])] for r in
                                read_points(tmp_path / "corner-out.csv")],
                               [[float(r["x"]) + 0.5, float(r["y"]) + 0.5] for r in points],
                               atol=1e-3)
    folder_copy = json.loads((tmp_path / "out-dir" / "section_003.geojson").read_text())
    assert folder_copy["geometry"] == mapped["features"][0]["geometry"]


def _flat(coordinates):
    if isinstance(coordinates[0], (int, float)):
        return [coordinates]
    return [p for item in coordinates for p in _flat(item)]


# -- bad input -------------------------------------------------------------------------------
def expect_input_error(tmp_path, args, message, ranks=None):
    out = tmp_path / "out.h5"
    result = run_medhpc("tnr-apply", "--out", out, *args, "--device", "cpu", ranks=ranks,
                        timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not out.exists() and not (tmp_path / "mapped.csv").exists()


def test_missing_registration_datasets(registered, tmp_path):
    broken = tmp_path / "broken.h5"
    shutil.copy(registered.fields, broken)
    with h5py.File(broken, "a") as h5:
        del h5["warps/step"]
    expect_input_error(tmp_path, ["--registration", broken, "--input", registered.folder],
                       f"{broken}: no warps/step", ranks=2)


def test_section_names_that_do_not_match(registered, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for path in registered.folder.glob("*.png"):
        shutil.copy(path, other / path.name.replace("section", "slide"))
    expect_input_error(tmp_path, ["--registration", registered.fields, "--input", other],
                       "no single section named like the registered section_000.png")


def test_points_with_a_missing_column(registered, tmp_path):
    write_points(tmp_path / "points.csv", [("0", 1.0)], ("section", "x"))
    expect_input_error(tmp_path, ["--registration", registered.fields, "--input",
                                  registered.folder, "--points", tmp_path / "points.csv",
                                  "--points-out", tmp_path / "mapped.csv"],
                       "points.csv: no column(s) y")


def test_points_section_out_of_range(registered, tmp_path):
    write_points(tmp_path / "points.csv", [("1", 3.0, 4.0), ("9", 1.0, 2.0)],
                 ("section", "x", "y"))
    expect_input_error(tmp_path, ["--registration", registered.fields, "--input",
                                  registered.folder, "--points", tmp_path / "points.csv",
                                  "--points-out", tmp_path / "mapped.csv"],
                       "points.csv line 3: section 9 is out of range")


# -- ranks -----------------------------------------------------------------------------------
@pytest.mark.mpi
def test_two_ranks_equal_one_rank(phantom_folder, tmp_path):
    from medhpc.parallel.comm import get_world
    from medhpc.runtime.context import start_run

    world = get_world()
    shared = Path(world.bcast(str(tmp_path)))
    if world.is_root:
        make_registration(phantom_folder, shared / "reg")
        write_points(shared / "points.csv", [("3", 60.0, 70.0), ("section_001.png", 90.0, 50.5)])
    world.barrier()
    fields, folder = shared / "reg" / "he-fields.h5", shared / "reg" / "sections"
    run = start_run("tnr-apply", device="cpu", verbosity=-1, overwrite=True, world=world)
    apply(fields, str(folder), shared / "ranks.h5", ApplySettings(downsample=2.0), run=run,
          points=shared / "points.csv", points_out=shared / "ranks.csv")
    world.barrier()
    if not world.is_root:
        return
    apply(fields, str(folder), shared / "one.h5", ApplySettings(downsample=2.0),
          points=shared / "points.csv", points_out=shared / "one.csv")
    np.testing.assert_array_equal(read_volume(shared / "ranks.h5"), read_volume(shared / "one.h5"))
    assert read_points(shared / "ranks.csv") == read_points(shared / "one.csv")
