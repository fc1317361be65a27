"""tnr-apply on whole slides: read by region from the right level, written as pyramids with the
input's physical pixel size, equal to warping each whole slide at once."""

import json
from dataclasses import replace

import numpy as np
import pytest
import tifffile
import zarr

from medhpc.tnr.apply import Annotations, Application, ApplySettings
from medhpc.tnr.registration_file import load_registration
from medhpc.tnr.settings import OutputSettings
from tests.helpers import run_medhpc
from tests.tnr.conftest import serial_run
from tests.tnr.wholeslide_helpers import FACTOR, FAST, OME, make_stack, whole_image_warp


@pytest.fixture(scope="module")
def registered_slides(tmp_path_factory):
    base = tmp_path_factory.mktemp("tnr_apply_wsi")
    slides = base / "slides"
    make_stack(slides, OME)
    fields = base / "reg-fields.h5"
    result = run_medhpc("tnr-register", "--input", slides, "--out", base / "reg.h5",
                        "--fields", fields, "--downsample", str(FACTOR), "--normalise",
                        "none", *FAST, timeout=600)
    assert result.returncode == 0, result.stderr
    return slides, fields


def apply_slides(slides, fields, out, tile=128, **settings):
    Application(serial_run("tnr-apply"), fields, str(slides), out,
                ApplySettings(normalise="none", **settings), Annotations(),
                OutputSettings(tile=tile, compression="zlib")).execute()


def test_full_res_streamed_from_regions_equals_whole_slide_warp(registered_slides, tmp_path):
    slides, fields = registered_slides
    out = tmp_path / "other.ome.zarr"
    apply_slides(slides, fields, out, full_res=True)
    streamed = np.asarray(zarr.open_group(str(out), mode="r")["0"][:])
    assert streamed.shape == (3, OME.sections, OME.size, OME.size)
    registration = load_registration(fields)
    for index, path in enumerate(sorted(slides.iterdir())):
        reference = whole_image_warp(path, registration.warp(index), FACTOR)
        difference = np.abs(streamed[:, index].astype(int) - reference.astype(int))
        assert difference.max() <= 1, (index, difference.max())


def test_coarser_output_reads_the_stored_level_and_keeps_physical_size(registered_slides,
                                                                        tmp_path):
    slides, fields = registered_slides
    out = tmp_path / "half.ome.tif"
    timings = tmp_path / "half-timings.json"
    result = run_medhpc("tnr-apply", "--registration", fields, "--input", slides, "--out", out,
                        "--downsample", "2", "--tile", "128", "--normalise", "histogram",
                        "--timings", timings, "--device", "cpu", timeout=300)
    assert result.returncode == 0, result.stderr
    document = json.loads(timings.read_text())
    # 1024 px level 0 with stored levels of 512 and 256 px: half resolution is level 1 (the
    # intensity statistics read the working level, 256 px)
    assert sorted(document["levels_read"]) == sorted(p.name for p in slides.iterdir())
    assert all(r == {"level": 1, "block": 1} for r in document["levels_read"].values())
    memory = document["memory"]
    assert 0 < memory["peak_rss_mb_per_rank"][0] <= memory["plan_mb_per_rank"][0], memory
    with tifffile.TiffFile(out) as tif:
        series = tif.series[0]
        assert [level.shape for level in series.levels] == [
            (4, 512, 512, 3), (4, 256, 256, 3), (4, 128, 128, 3)]
        assert series.keyframe.is_tiled and series.keyframe.tilewidth == 128
        assert 'PhysicalSizeX="1"' in tif.ome_metadata   # 0.5 um slides, 2 px per output px
        assert series.asarray()[:, 256].std() > 5


def test_dry_run_plans_memory_and_the_pyramid(registered_slides, tmp_path):
    slides, fields = registered_slides
    out = tmp_path / "plan.ome.zarr"
    result = run_medhpc("tnr-apply", "--registration", fields, "--input", slides, "--out", out,
                        "--full-res", "--dry-run", "--device", "cpu", ranks=None, timeout=120)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["output"]["pyramid"] and plan["output"]["pixel_size_um"] == [0.5, 0.5]
    assert plan["ranks_detail"][0]["memory"]["held_output_bytes"] == 0
    assert not out.exists()


@pytest.mark.mpi
def test_ranks_write_their_own_sections_of_the_same_pyramid(tmp_path):
    from pathlib import Path

    from medhpc.parallel.comm import get_world
    from medhpc.runtime.context import start_run
    from medhpc.tnr.run import StackRegistration
    from tests.tnr.wholeslide_helpers import WSI_SETTINGS

    world = get_world()
    shared = Path(world.bcast(str(tmp_path)))
    slides, fields = shared / "slides", shared / "reg-fields.h5"
    if world.is_root:
        make_stack(slides, OME)
        StackRegistration(serial_run(), slides, shared / "reg.h5",
                          replace(WSI_SETTINGS, full_res=False), fields=fields).execute()
    world.barrier()
    run = start_run("tnr-apply", device="cpu", verbosity=-1, overwrite=True, world=world)
    Application(run, fields, str(slides), shared / "ranks.ome.zarr",
                ApplySettings(normalise="none", full_res=True), Annotations(),
                OutputSettings(tile=128, compression="zlib")).execute()
    world.barrier()
    if not world.is_root:
        return
    apply_slides(slides, fields, shared / "one.ome.zarr", full_res=True)
    for level in ("0", "1"):
        ranks = zarr.open_group(str(shared / "ranks.ome.zarr"), mode="r")[level][:]
        one = zarr.open_group(str(shared / "one.ome.zarr"), mode="r")[level][:]
        np.testing.assert_array_equal(ranks, one)
