"""A damaged stack completes and says which sections are odd; bad input fails clearly."""

import json

import numpy as np
import pytest
from PIL import Image

from medhpc.errors import InputError
from medhpc.tnr.sources import open_stack
from tests.helpers import run_medhpc
from tests.tnr.conftest import register

FAST = ("--patch", "32", "--search", "10", "--grid", "16", "--sigma", "2", "--device", "cpu")


def test_blank_and_restained_sections_complete_and_are_flagged(damaged_folder, tmp_path):
    displacement, volume = register(damaged_folder / "sections", tmp_path / "out.h5")
    assert volume.shape == (3, 10, 128, 128)
    assert np.all(np.isfinite(displacement))
    log = json.loads((tmp_path / "out.json").read_text())
    flagged = log["flagged_sections"]
    assert set(flagged) == {"4", "7"}, flagged
    assert any(r.startswith("blank") for r in flagged["4"]["reasons"])
    assert any(r.startswith("stain differs") for r in flagged["7"]["reasons"])
    assert 4 not in log["matched_sections"] and 7 in log["matched_sections"]
    assert any(row["pair"] == [3, 5] and row["bridge"] for row in log["pairs"])
    # the restained section still matches its neighbours about as well as other pairs do
    rows = {tuple(row["pair"]): row for row in log["pairs"]}
    typical = np.median([row["accepted_fraction"] for row in log["pairs"]
                         if 4 not in row["pair"]])
    assert min(rows[(6, 7)]["accepted_fraction"], rows[(7, 8)]["accepted_fraction"]) \
        >= 0.75 * typical, rows
    assert flagged["7"]["role"] == "down-weighted" and flagged["4"]["role"] == "excluded"


def _write_sections(folder, sizes, colour=True):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (ny, nx) in enumerate(sizes):
        shape = (ny, nx, 3) if colour else (ny, nx)
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(folder / f"s{i}.png")
    return folder


def test_mixed_sizes_are_padded_centred(tmp_path):
    folder = _write_sections(tmp_path / "mixed", [(40, 50), (44, 50), (40, 46)])
    stack = open_stack(folder)
    assert stack.shape == (44, 50) and stack.padded == [0, 2]
    section = stack.read(2)
    assert section.shape == (44, 50, 3)
    assert np.all(section[:2] == 255) and np.all(section[:, :2] == 255)


def test_mixed_sizes_run_says_so(phantom_folder, tmp_path):
    folder = tmp_path / "sections"
    folder.mkdir()
    for i, path in enumerate(sorted((phantom_folder / "sections").glob("*.png"))[:5]):
        image = np.asarray(Image.open(path))
        if i == 2:
            image = image[4:-4, 2:-2]
        Image.fromarray(image).save(folder / path.name)
    result = run_medhpc("tnr-register", "--input", folder, "--out", tmp_path / "v.ome.tif",
                        "--png", *FAST, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "padded" in result.stderr and "section_002.png" in result.stderr
    log = json.loads((tmp_path / "v.json").read_text())
    assert log["padded_sections"] == ["section_002.png"]
    import tifffile

    assert tifffile.imread(tmp_path / "v.ome.tif").shape == (5, 128, 128, 3)
    assert (tmp_path / "v.png").read_bytes()[:4] == b"\x89PNG"


def test_unreadable_image_exits_2_once(phantom_folder, tmp_path):
    folder = tmp_path / "sections"
    folder.mkdir()
    for path in sorted((phantom_folder / "sections").glob("*.png"))[:4]:
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "section_002.png").write_bytes(b"not a png at all")
    result = run_medhpc("tnr-register", "--input", folder, "--out", tmp_path / "v.h5", *FAST,
                        ranks=2, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("section_002.png: cannot be read as an image") == 1, result.stderr
    assert not (tmp_path / "v.h5").exists()


def test_fewer_than_three_sections(tmp_path):
    folder = _write_sections(tmp_path / "two", [(64, 64), (64, 64)])
    with pytest.raises(InputError, match="2 section.*at least 3"):
        open_stack(folder)


def test_bad_input_kinds(tmp_path):
    with pytest.raises(InputError, match="not found"):
        open_stack(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="unknown input"):
        open_stack(tmp_path / "notes.txt")


def test_stack_inputs_tiff_and_hdf5(phantom_folder, tmp_path):
    import h5py
    import tifffile

    images = np.stack([np.asarray(Image.open(p)) for p in
                       sorted((phantom_folder / "sections").glob("*.png"))[:4]])
    tifffile.imwrite(tmp_path / "stack.tif", images, photometric="rgb")
    with h5py.File(tmp_path / "stack.h5", "w") as h5:
        h5["sections"] = images[..., 0]
    tiff = open_stack(tmp_path / "stack.tif")
    assert (tiff.count, tiff.channels, tiff.shape) == (4, 3, (128, 128))
    np.testing.assert_array_equal(tiff.read(3), images[3])
    hdf5 = open_stack(f"{tmp_path / 'stack.h5'}:sections")
    assert (hdf5.count, hdf5.channels) == (4, 1)
    np.testing.assert_array_equal(hdf5.read(1), images[1, ..., 0])
