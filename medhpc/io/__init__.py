"""Formats with geometry: NIfTI, HDF5, TIFF/OME-TIFF and section folders.

Volumes are NumPy arrays ``[z, y, x]`` or ``[c_or_t, z, y, x]`` paired with an
:class:`ImageGeometry` (NIfTI-style affine in mm). Every output is written
atomically; every input problem is a one-line :class:`~medhpc.errors.InputError`.
"""

from medhpc.io.atomic import atomic_path, check_output_free
from medhpc.io.geometry import ImageGeometry
from medhpc.io.hdf5 import (VolumeInfo, list_datasets, plane_chunks, read_planes,
                            read_volume, volume_info, write_volume)
from medhpc.io.images import (SUPPORTED_SUFFIXES, check_finite, check_ndim,
                              check_nonnegative, check_same_grid, image_format, read_image,
                              split_dataset, write_image)
from medhpc.io.nifti import read_nifti, write_nifti
from medhpc.io.sections import SECTION_SUFFIXES, list_sections, natural_key, read_section
from medhpc.io.tiff import read_tiff_page, read_tiff_stack, tiff_spacing_mm, write_tiff_stack

__all__ = [
    "SECTION_SUFFIXES", "SUPPORTED_SUFFIXES", "ImageGeometry", "VolumeInfo", "atomic_path",
    "check_finite", "check_ndim", "check_nonnegative", "check_output_free", "check_same_grid",
    "image_format", "list_datasets", "list_sections", "natural_key", "plane_chunks",
    "read_image", "read_nifti", "read_planes", "read_section", "read_tiff_page",
    "read_tiff_stack", "read_volume", "split_dataset", "tiff_spacing_mm", "volume_info",
    "write_image", "write_nifti", "write_tiff_stack", "write_volume",
]
