"""Interfile images: round trip, a header written by hand as STIR writes them, bad input."""

import numpy as np
import pytest

from medhpc.errors import InputError
from medhpc.io.geometry import ImageGeometry
from medhpc.io.images import check_image_output, read_image, write_image
from medhpc.io.interfile import normalised_key, read_interfile

STIR_STYLE = """!INTERFILE  :=
!imaging modality := PT
name of data file := {data}
!version of keys := STIR4.0
!GENERAL DATA :=
!GENERAL IMAGE DATA :=
!type of data := PET
imagedata byte order := BIGENDIAN
!PET STUDY (General) :=
!PET data type := Image
process status := Reconstructed
!number format := signed integer
!number of bytes per pixel := 2
number of dimensions := 3
matrix axis label [1] := x
!matrix size [1] := 4
scaling factor (mm/pixel) [1] := 2.5
matrix axis label [2] := y
!matrix size [2] := 3
scaling factor (mm/pixel) [2] := 2.5
matrix axis label [3] := z
!matrix size [3] := 2
scaling factor (mm/pixel) [3] := 3.27
first pixel offset (mm) [1] := -3.75
first pixel offset (mm) [2] := -2.5
first pixel offset (mm) [3] := 0
number of time frames := 1
image scaling factor[1] := 0.5
data offset in bytes[1] := 16
quantification units := 1
!END OF INTERFILE :=
"""


def test_keys_are_read_without_case_bang_or_spaces():
    assert normalised_key("!Matrix  Size [1] ") == "matrix size[1]"
    assert normalised_key("scaling factor (mm/pixel) [3]") == "scaling factor (mm/pixel)[3]"


def test_a_stir_style_header_written_by_hand(tmp_path):
    values = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    (tmp_path / "img.v").write_bytes(b"\0" * 16 + values.tobytes())
    (tmp_path / "img.hv").write_text(STIR_STYLE.format(data="img.v"))
    array, geometry = read_image(tmp_path / "img.hv")
    np.testing.assert_array_equal(array, values.astype(np.float32) * 0.5)
    assert geometry.spacing_mm == pytest.approx((2.5, 2.5, 3.27))
    assert geometry.origin_mm == pytest.approx((-3.75, -2.5, 0.0))


def test_round_trip_of_a_volume_and_of_frames(tmp_path):
    rng = np.random.default_rng(1)
    geometry = ImageGeometry.from_spacing((5, 6, 7), (2.0, 3.0, 4.0), (-6.0, 1.0, 10.0))
    volume = rng.random((5, 6, 7), dtype=np.float32)
    write_image(tmp_path / "v.hv", volume, geometry)
    assert (tmp_path / "v.v").stat().st_size == volume.nbytes
    array, read_geometry = read_image(tmp_path / "v.hv")
    np.testing.assert_array_equal(array, volume)
    np.testing.assert_allclose(read_geometry.affine, geometry.affine)
    frames = rng.random((3, 5, 6, 7), dtype=np.float32)
    write_image(tmp_path / "f.hv", frames, geometry)
    array, _ = read_interfile(tmp_path / "f.hv")
    np.testing.assert_array_equal(array, frames)


def test_missing_offsets_centre_the_image(tmp_path):
    header = "\n".join(line for line in STIR_STYLE.format(data="img.v").splitlines()
                       if "first pixel offset" not in line)
    (tmp_path / "img.hv").write_text(header)
    (tmp_path / "img.v").write_bytes(b"\0" * 64)
    _, geometry = read_interfile(tmp_path / "img.hv")
    assert geometry.origin_mm == pytest.approx((-3.75, -2.5, -1.635))


@pytest.mark.parametrize("change, message", [
    (("!INTERFILE  :=", "hello"), "not an Interfile header"),
    (("number of dimensions := 3", "number of dimensions := 4"), "expected 3"),
    (("!number of bytes per pixel := 2", "!number of bytes per pixel := 3"), "bytes per pixel"),
    (("imagedata byte order := BIGENDIAN", "imagedata byte order := MIDDLE"), "byte order"),
    (("!matrix size [2] := 3", "!matrix size [2] := 30"), "need"),
    (("!matrix size [1] := 4", "!matrix size [1] := four"), "is not a whole number"),
    (("name of data file := img.v", "name of data file := other.v"), "not found"),
])
def test_bad_headers_are_one_line(tmp_path, change, message):
    (tmp_path / "img.v").write_bytes(b"\0" * 64)
    (tmp_path / "img.hv").write_text(STIR_STYLE.format(data="img.v").replace(*change))
    with pytest.raises(InputError, match=message) as raised:
        read_image(tmp_path / "img.hv")
    assert "\n" not in str(raised.value) and "img.hv" in str(raised.value) or \
        "img.v" in str(raised.value)


def test_outputs_are_checked_before_work_and_grids_must_be_axis_aligned(tmp_path):
    (tmp_path / "old.v").write_bytes(b"")
    with pytest.raises(InputError, match="old.v"):
        check_image_output(tmp_path / "old.hv", overwrite=False)
    rotated = ImageGeometry((2, 2, 2), np.diag([-1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(InputError, match="axis-aligned"):
        write_image(tmp_path / "r.hv", np.zeros((2, 2, 2)), rotated)
    assert not (tmp_path / "r.hv").exists()
