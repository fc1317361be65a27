"""Folders of 2-D section images (histology, serial sections).

TIFF sections are read with tifffile (a core dependency). PNG and JPEG need
Pillow (``pip install pillow``; scikit-image and imageio bring it along).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medhpc.errors import InputError
from medhpc.io.tiff import is_tiff_path, read_tiff_stack

SECTION_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
_SUFFIX_LIST = ", ".join(SECTION_SUFFIXES)
_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key that orders ``s2.png`` before ``s10.png`` (case-insensitive)."""
    parts = _DIGITS.split(name.lower())
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in parts)


def list_sections(directory) -> list[Path]:
    """Return the section images of a folder in natural order.

    Parameters
    ----------
    directory : str or Path
        Folder holding ``.png``, ``.tif``, ``.tiff``, ``.jpg`` or ``.jpeg``
        files (extension in any case). Hidden files and sub-folders are ignored.

    Returns
    -------
    list of Path
        Sorted so that ``s2.png`` comes before ``s10.png``.
    """
    directory = Path(directory)
    if not directory.exists():
        raise InputError(f"{directory}: folder not found; expected a folder of section "
                         f"images ({_SUFFIX_LIST})")
    if not directory.is_dir():
        raise InputError(f"{directory}: is not a folder; expected a folder of section "
                         f"images ({_SUFFIX_LIST})")
    sections = [entry for entry in directory.iterdir()
                if not entry.name.startswith(".") and entry.is_file()
                and entry.suffix.lower() in SECTION_SUFFIXES]
    if not sections:
        raise InputError(f"{directory}: no section images found; expected files ending "
                         f"in {_SUFFIX_LIST}")
    return sorted(sections, key=lambda entry: (natural_key(entry.name), entry.name))


def read_section(path) -> np.ndarray:
    """Read one section as ``[y, x]`` (grey) or ``[y, x, c]`` (colour).

    TIFF is read with tifffile; PNG and JPEG with Pillow, applying the EXIF
    orientation and expanding palette images to RGB(A).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found; expected a section image ({_SUFFIX_LIST})")
    suffix = path.suffix.lower()
    if suffix not in SECTION_SUFFIXES:
        raise InputError(f"{path}: unknown section format '{path.suffix}'; expected one of "
                         f"{_SUFFIX_LIST}")
    if is_tiff_path(path):
        stack = read_tiff_stack(path)
        if stack.shape[0] != 1:
            raise InputError(f"{path}: TIFF holds {stack.shape[0]} planes; expected one "
                             "2-D section per file")
        return stack[0]
    return _read_with_pillow(path)


def _read_with_pillow(path: Path) -> np.ndarray:
    try:
        from PIL import Image, ImageOps, UnidentifiedImageError
    except ImportError as error:
        raise InputError(f"{path}: reading PNG/JPEG needs Pillow, which is not installed; "
                         "expected `pip install pillow` or TIFF sections") from error
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode == "P":
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            return np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        message = " ".join(str(error).split())
        raise InputError(f"{path}: cannot be read as an image ({message}); expected a "
                         f"valid {path.suffix.lower().lstrip('.').upper()} file") from error
