"""Streamed full-resolution warp under MPI equals warping each whole image at once
(run under mpiexec at 2 and 3 ranks; 1 rank is in test_wholeslide.py)."""

from pathlib import Path

import numpy as np
import pytest
import tifffile

from medhpc.parallel.comm import get_world
from medhpc.runtime.context import start_run
from medhpc.tnr.settings import OutputSettings
from tests.tnr.wholeslide_helpers import (FACTOR, OME, WSI_SETTINGS, CapturingRegistration,
                                          make_stack, whole_image_warp, zarr_level)


@pytest.mark.mpi
@pytest.mark.parametrize("suffix", [".ome.zarr", ".ome.tif"])
def test_streamed_warp_equals_whole_image_warp(tmp_path, suffix):
    world = get_world()
    shared = Path(world.bcast(str(tmp_path)))
    if world.is_root:
        make_stack(shared / "slides", OME)
    world.barrier()
    run = start_run("tnr-register", device="cpu", verbosity=-1, overwrite=True, world=world)
    out = shared / f"ranks{suffix}"
    reconstruction = CapturingRegistration(run, shared / "slides", out, WSI_SETTINGS,
                                             output=OutputSettings(tile=128,
                                                                   compression="zlib"))
    reconstruction.execute()
    world.barrier()
    if not world.is_root:
        return
    if suffix == ".ome.zarr":
        streamed = zarr_level(out)
    else:
        with tifffile.TiffFile(out) as tif:
            assert len(tif.series[0].levels) == 4
            streamed = np.moveaxis(tif.series[0].asarray(), -1, 0)
    slides = sorted((shared / "slides").iterdir())
    for index in range(OME.sections):
        reference = whole_image_warp(slides[index], reconstruction.warps[index], FACTOR)
        difference = np.abs(streamed[:, index].astype(int) - reference.astype(int))
        assert difference.max() <= 1, (world.size, index, difference.max())
