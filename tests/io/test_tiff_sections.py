"""TIFF/OME-TIFF stacks and folders of section images."""

import numpy as np
import pytest
import tifffile

from medhpc.io import (list_sections, natural_key, read_section, read_tiff_page,
                       read_tiff_stack, tiff_spacing_mm, write_tiff_stack)
from tests.io import raises_input_error


def _stack(shape=(3, 10, 12), dtype=np.uint16):
    return (np.arange(np.prod(shape)) % 251).astype(dtype).reshape(shape)


@pytest.mark.parametrize("name", ["s.tif", "s.tiff", "s.ome.tif", "S.OME.TIFF"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_stack_round_trip_with_spacing(tmp_path, name, dtype):
    stack = _stack(dtype=dtype)
    write_tiff_stack(tmp_path / name, stack, spacing_mm=(0.5, 0.25, 2.0))
    array = read_tiff_stack(tmp_path / name)
    assert array.dtype == stack.dtype
    np.testing.assert_array_equal(array, stack)
    np.testing.assert_allclose(tiff_spacing_mm(tmp_path / name), (0.5, 0.25, 2.0))
    with tifffile.TiffFile(tmp_path / name) as tif:
        assert tif.is_ome == name.lower().startswith("s.ome")
        assert tif.pages[0].compression == tifffile.COMPRESSION.ADOBE_DEFLATE


@pytest.mark.parametrize("name", ["rgb.tif", "rgb.ome.tif"])
def test_rgb_stack_and_pages(tmp_path, name):
    rgb = _stack((2, 8, 9, 3), np.uint8)
    write_tiff_stack(tmp_path / name, rgb)
    np.testing.assert_array_equal(read_tiff_stack(tmp_path / name), rgb)
    np.testing.assert_array_equal(read_tiff_page(tmp_path / name, 1), rgb[1])
    assert tiff_spacing_mm(tmp_path / name) is None


def test_single_page_is_one_plane(tmp_path):
    plane = _stack((10, 12))
    write_tiff_stack(tmp_path / "p.tif", plane)
    assert read_tiff_stack(tmp_path / "p.tif").shape == (1, 10, 12)
    np.testing.assert_array_equal(read_tiff_page(tmp_path / "p.tif", 0), plane)


def test_big_planes_are_tiled(tmp_path):
    stack = np.zeros((1, 2100, 40), np.uint8)
    stack[0, ::7, ::3] = 200
    write_tiff_stack(tmp_path / "big.tif", stack)
    with tifffile.TiffFile(tmp_path / "big.tif") as tif:
        assert tif.pages[0].is_tiled
    np.testing.assert_array_equal(read_tiff_stack(tmp_path / "big.tif"), stack)


def test_foreign_multipage_and_imagej_files(tmp_path):
    stack = _stack()
    for name, metadata in (("pages.tif", {}), ("plain.tif", None)):
        with tifffile.TiffWriter(tmp_path / name) as writer:
            for plane in stack:
                writer.write(plane, contiguous=False, metadata=metadata)
        np.testing.assert_array_equal(read_tiff_stack(tmp_path / name), stack)
    tifffile.imwrite(tmp_path / "ij.tif", stack, imagej=True, resolution=(2.0, 4.0),
                     photometric="minisblack",
                     metadata={"axes": "ZYX", "spacing": 3.0, "unit": "um"})
    np.testing.assert_array_equal(read_tiff_stack(tmp_path / "ij.tif"), stack)
    np.testing.assert_allclose(tiff_spacing_mm(tmp_path / "ij.tif"), (5e-4, 2.5e-4, 3e-3))


def test_time_and_z_stack_is_refused(tmp_path):
    path = tmp_path / "tz.ome.tif"
    tifffile.imwrite(path, np.zeros((2, 3, 4, 5), np.uint8), ome=True, metadata={"axes": "TZYX"})
    assert "'TZYX'" in raises_input_error(path, read_tiff_stack, path)


def test_tiff_errors(tmp_path):
    missing = tmp_path / "missing.tif"
    assert "not found" in raises_input_error(missing, read_tiff_stack, missing)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"this is not a tiff file")
    raises_input_error(junk, read_tiff_stack, junk)
    write_tiff_stack(tmp_path / "s.tif", _stack())
    message = raises_input_error(tmp_path / "s.tif", read_tiff_page, tmp_path / "s.tif", 3)
    assert "3 page(s)" in message
    with pytest.raises(ValueError):
        write_tiff_stack(tmp_path / "bad.tif", np.zeros((2, 3, 4, 5)))


def test_natural_sort_order_and_filtering(tmp_path):
    names = ["s10.png", "s2.PNG", "S1.tif", "s3.JPG", "s20.jpeg", "s11.TIFF"]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / ".s0.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub.png").mkdir()
    listed = [p.name for p in list_sections(tmp_path)]
    assert listed == ["S1.tif", "s2.PNG", "s3.JPG", "s10.png", "s11.TIFF", "s20.jpeg"]
    assert sorted(["a10b2", "a2b10", "a2b3"], key=natural_key) == ["a2b3", "a2b10", "a10b2"]


def test_section_folder_errors(tmp_path):
    missing = tmp_path / "nowhere"
    assert "not found" in raises_input_error(missing, list_sections, missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    assert ".png" in raises_input_error(empty, list_sections, empty)
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"")
    raises_input_error(a_file, list_sections, a_file)


def test_read_png_jpeg_and_tiff_sections(tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    rgb = _stack((6, 7, 3), np.uint8)
    grey = _stack((6, 7), np.uint8)
    image_module.fromarray(rgb).save(tmp_path / "rgb.png")
    image_module.fromarray(grey).save(tmp_path / "grey.PNG")
    image_module.fromarray(rgb).save(tmp_path / "photo.jpg", quality=95)
    image_module.fromarray(grey).convert("P").save(tmp_path / "palette.png")
    write_tiff_stack(tmp_path / "rgb.tif", rgb[np.newaxis])
    np.testing.assert_array_equal(read_section(tmp_path / "rgb.png"), rgb)
    np.testing.assert_array_equal(read_section(tmp_path / "grey.PNG"), grey)
    np.testing.assert_array_equal(read_section(tmp_path / "rgb.tif"), rgb)
    assert read_section(tmp_path / "photo.jpg").shape == (6, 7, 3)
    assert read_section(tmp_path / "palette.png").shape == (6, 7, 3)


def test_section_file_errors(tmp_path):
    pytest.importorskip("PIL")
    missing = tmp_path / "missing.png"
    assert "not found" in raises_input_error(missing, read_section, missing)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    raises_input_error(broken, read_section, broken)
    other = tmp_path / "scan.bmp"
    other.write_bytes(b"BM")
    assert ".png" in raises_input_error(other, read_section, other)
    write_tiff_stack(tmp_path / "stack.tif", _stack())
    raises_input_error(tmp_path / "stack.tif", read_section, tmp_path / "stack.tif")
