"""Whole-slide test data and the whole-image reference warp."""

import numpy as np
import tifffile
import zarr

from medhpc.phantoms.wholeslide import SlideStackSettings, write_slide_stack
from medhpc.tnr import kernels_cpu
from medhpc.tnr.run import StackRegistration
from medhpc.tnr.settings import MatchSettings, TnrSettings

FACTOR = 4
WSI_SETTINGS = TnrSettings(sigma=2.0, downsample=FACTOR, full_res=True, normalise="none",
                           match=MatchSettings(patch=32, search=10, grid=16))
FAST = ("--patch", "32", "--search", "10", "--grid", "16", "--sigma", "2", "--device", "cpu")
OME = SlideStackSettings(sections=4, size=1024, tile=256, kind="ome", pixel_size_um=0.5)
SVS = SlideStackSettings(sections=4, size=1024, tile=128, kind="svs", pixel_size_um=0.25,
                         seed=3)


def make_stack(folder, settings):
    return write_slide_stack(folder, settings)


class CapturingRegistration(StackRegistration):
    """Keeps the warps every rank applied, on every rank (for the whole-image reference)."""

    def warp_sections(self, warps):
        self.warps = {i: w for part in self.world.allgather(warps) for i, w in part.items()}
        return super().warp_sections(warps)


def whole_image_warp(slide_path, warp, factor, order=3, fill=255.0):
    """Warp a section's whole level 0 at once: (c, y, x) uint8."""
    image = tifffile.imread(slide_path)
    ny, nx = image.shape[:2]
    coord_y, coord_x = warp.coordinates(slice(0, ny), nx, factor)
    out = np.empty((3, ny, nx), np.float32)
    plane_out = np.empty((ny, nx), np.float32)
    for c in range(3):
        kernels_cpu.remap(np.ascontiguousarray(image[..., c], np.float32), coord_y, coord_x,
                          order, fill, plane_out)
        out[c] = plane_out
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def zarr_level(path, level=0):
    return np.asarray(zarr.open_group(str(path), mode="r")[str(level)][:])
