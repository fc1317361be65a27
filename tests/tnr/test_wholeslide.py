"""Whole-slide inputs (pyramidal JPEG OME-TIFF, SVS-like TIFF), streamed full-resolution warp,
pyramidal OME-Zarr / OME-TIFF outputs, and bad whole-slide input."""

import json
import shutil

import numpy as np
import pytest
import tifffile
import zarr

from medhpc.phantoms.wholeslide import SlideStackSettings
from tests.helpers import run_medhpc
from tests.tnr.conftest import serial_run
from tests.tnr.wholeslide_helpers import (FACTOR, FAST, OME, SVS, WSI_SETTINGS,
                                          CapturingRegistration, make_stack, whole_image_warp,
                                          zarr_level)
from medhpc.tnr.settings import OutputSettings


@pytest.fixture(scope="session")
def ome_stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wsi_ome") / "slides"
    make_stack(folder, OME)
    return folder


@pytest.fixture(scope="session")
def svs_stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("wsi_svs") / "slides"
    make_stack(folder, SVS)
    return folder


def test_ome_tiff_run_reads_the_working_level_and_writes_an_ome_zarr_pyramid(ome_stack,
                                                                             tmp_path):
    out = tmp_path / "v.ome.zarr"
    result = run_medhpc("tnr-register", "--input", ome_stack, "--out", out, "--downsample",
                        str(FACTOR), "--full-res", "--tile", "256", *FAST, timeout=600)
    assert result.returncode == 0, result.stderr
    log = json.loads((tmp_path / "v.json").read_text())
    # 1024 px level 0 at 0.5 um with levels 512 and 256: working level 256 px is level 2
    assert all(r["level"] == 2 and r["block"] == 1 for r in log["levels_read"].values()), log
    assert len(log["levels_read"]) == 4
    assert log["pixel_size_um"] == [0.5, 0.5] and log["output_pixel_size_um"] == [0.5, 0.5]
    memory = log["memory"]
    assert 0 < memory["peak_rss_mb_per_rank"][0] <= memory["plan_mb_per_rank"][0], memory
    group = zarr.open_group(str(out), mode="r")
    multiscales = group.attrs["multiscales"][0]
    assert [group[d["path"]].shape for d in multiscales["datasets"]] == [
        (3, 4, 1024, 1024), (3, 4, 512, 512), (3, 4, 256, 256)]
    assert group["0"].chunks == (3, 1, 256, 256)
    scales = [d["coordinateTransformations"][0]["scale"] for d in multiscales["datasets"]]
    assert scales == [[1.0, 1.0, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0]]
    assert {a["name"]: a.get("unit") for a in multiscales["axes"]}["x"] == "micrometer"


def test_svs_run_writes_a_multifile_pyramidal_ome_tiff(svs_stack, tmp_path):
    out = tmp_path / "w.ome.tif"
    result = run_medhpc("tnr-register", "--input", svs_stack, "--out", out, "--downsample",
                        "8", "--full-res", "--tile", "256", *FAST, ranks=2, timeout=600)
    assert result.returncode == 0, result.stderr
    log = json.loads((tmp_path / "w.json").read_text())
    # SVS levels 1024 and 256 px: working level 128 px is level 1 averaged 2 x 2
    assert all(r["level"] == 1 and r["block"] == 2 for r in log["levels_read"].values()), log
    assert log["pixel_size_um"] == [0.25, 0.25]
    peaks, plans = log["memory"]["peak_rss_mb_per_rank"], log["memory"]["plan_mb_per_rank"]
    assert len(peaks) == 2 and all(p <= q for p, q in zip(peaks, plans)), log["memory"]
    assert sorted(p.name for p in (tmp_path / "w.ome.tif.parts").iterdir()) == [
        f"z{z:04d}.ome.tif" for z in range(4)]
    with tifffile.TiffFile(out) as tif:
        series = tif.series[0]
        assert series.shape == (4, 1024, 1024, 3) and series.axes == "ZYXS"
        assert [level.shape for level in series.levels] == [
            (4, 1024, 1024, 3), (4, 512, 512, 3), (4, 256, 256, 3)]
        assert series.keyframe.is_tiled and series.keyframe.tilewidth == 256
        assert series.keyframe.compression == tifffile.COMPRESSION.JPEG
        assert '<Pixels' in tif.ome_metadata and 'PhysicalSizeX="0.25"' in tif.ome_metadata
        level1 = series.levels[1].keyframe
        x_res = level1.tags["XResolution"].value
        assert abs(1e4 * x_res[1] / x_res[0] - 0.5) < 1e-6  # um per pixel of level 1
        volume = series.asarray()
        assert volume.shape == (4, 1024, 1024, 3) and volume[:, 512].std() > 5


def test_streamed_full_res_equals_whole_image_warp(ome_stack, tmp_path):
    out = tmp_path / "s.ome.zarr"
    reconstruction = CapturingRegistration(serial_run(), ome_stack, out, WSI_SETTINGS,
                                             output=OutputSettings(tile=128))
    reconstruction.execute()
    streamed = zarr_level(out)
    slides = sorted(ome_stack.iterdir())
    for index in range(4):
        reference = whole_image_warp(slides[index], reconstruction.warps[index], FACTOR)
        difference = np.abs(streamed[:, index].astype(int) - reference.astype(int))
        assert difference.max() <= 1, (index, difference.max())


def test_dry_run_prints_levels_tiles_and_memory(ome_stack, tmp_path):
    result = run_medhpc("tnr-register", "--input", ome_stack, "--out", tmp_path / "d.ome.zarr",
                        "--downsample", "4", "--full-res", "--tile", "512", "--dry-run", *FAST,
                        timeout=120)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["output"]["tiles_per_section"] == 4 and plan["output"]["pyramid"]
    assert plan["levels_read"]["section_000.ome.tif"] == {"level": 2, "block": 1}
    assert plan["ranks_detail"][0]["memory"]["total_bytes"] > 0
    assert not (tmp_path / "d.ome.zarr").exists()


def test_multi_file_input_list_and_repeated_input(ome_stack, tmp_path):
    slides = sorted(ome_stack.iterdir())
    listing = tmp_path / "slides.txt"
    listing.write_text("# sections\n" + "\n".join(str(p) for p in slides[:3]) + "\n")
    from medhpc.tnr.sources import open_stack

    stack = open_stack(listing)
    assert stack.kind == "slides" and stack.names == [p.name for p in slides[:3]]
    repeated = open_stack([str(p) for p in slides[1:]])
    assert repeated.count == 3 and repeated.pixel_size_um == (0.5, 0.5)


def _copy_stack(source, folder):
    shutil.copytree(source, folder)
    return sorted(folder.iterdir())


def _assert_one_line_exit_2(result, name, words, out):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if name in line]
    assert len(lines) == 1 and words in lines[0], result.stderr
    assert not out.exists()


def test_truncated_slide_exits_2_once(ome_stack, tmp_path):
    slides = _copy_stack(ome_stack, tmp_path / "slides")
    data = slides[2].read_bytes()
    slides[2].write_bytes(data[: int(0.6 * len(data))])
    out = tmp_path / "v.ome.zarr"
    result = run_medhpc("tnr-register", "--input", tmp_path / "slides", "--out", out,
                        "--downsample", "4", "--full-res", *FAST, ranks=2, timeout=120)
    _assert_one_line_exit_2(result, slides[2].name, "truncated", out)


def test_unsupported_compression_exits_2(ome_stack, tmp_path):
    slides = _copy_stack(ome_stack, tmp_path / "slides")
    with tifffile.TiffFile(slides[1], mode="r+b") as tif:
        tif.pages[0].tags["Compression"].overwrite(9)  # JBIG, which no decoder here reads
    out = tmp_path / "v.ome.tif"
    result = run_medhpc("tnr-register", "--input", tmp_path / "slides", "--out", out,
                        "--downsample", "4", *FAST, timeout=120)
    _assert_one_line_exit_2(result, slides[1].name, "compression", out)


def test_undecodable_tile_exits_2(ome_stack, tmp_path):
    slides = _copy_stack(ome_stack, tmp_path / "slides")
    with tifffile.TiffFile(slides[0]) as tif:
        offset = tif.pages[0].dataoffsets[5]
    data = bytearray(slides[0].read_bytes())
    data[offset: offset + 64] = b"\x00" * 64
    slides[0].write_bytes(bytes(data))
    out = tmp_path / "v.ome.zarr"
    result = run_medhpc("tnr-register", "--input", tmp_path / "slides", "--out", out,
                        "--downsample", "4", *FAST, timeout=120)
    _assert_one_line_exit_2(result, slides[0].name, "tile 5 of level 0", out)


def test_mismatched_pixel_size_exits_2(tmp_path):
    folder = tmp_path / "slides"
    make_stack(folder, SlideStackSettings(sections=3, size=512, tile=256, pixel_size_um=0.5))
    odd = make_stack(tmp_path / "odd", SlideStackSettings(sections=1, size=512, tile=256,
                                                          pixel_size_um=0.25))[0]
    shutil.move(str(odd), folder / "section_003.ome.tif")
    out = tmp_path / "v.ome.zarr"
    result = run_medhpc("tnr-register", "--input", folder, "--out", out, "--downsample", "4",
                        *FAST, timeout=120)
    _assert_one_line_exit_2(result, "section_003.ome.tif", "pixel size", out)
