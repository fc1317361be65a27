"""The input stack: a folder of section images, a multi-page (OME-)TIFF, or an HDF5 stack.

:func:`open_stack` checks the input once (count, readable headers, sizes) and
returns a :class:`SectionStack` that any rank can read single sections from.
Sections of different sizes are padded (centred) to the largest size with the
background (white for 8-bit brightfield images, 0 otherwise); the stack says
which ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medhpc.errors import InputError
from medhpc.io.sections import SECTION_SUFFIXES, list_sections, read_section
from medhpc.io.tiff import is_tiff_path

MIN_SECTIONS = 3
_STACK_HELP = ("expected a folder of section images, a multi-page TIFF or an HDF5 stack "
               "(file.h5[:dataset])")


@dataclass
class SectionStack:
    """Where the sections are and what shape they have."""

    kind: str                      # "folder", "tiff" or "hdf5"
    source: str
    names: list                    # one label per section (file name or page index)
    shapes: list                   # (y, x) per section
    channels: int                  # 1 (grey) or 3
    dtype: str
    dataset: str = ""
    shape: tuple = field(default=())   # padded (y, x)

    def __post_init__(self):
        if not self.shape:
            self.shape = (max(s[0] for s in self.shapes), max(s[1] for s in self.shapes))

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def padded(self) -> list[int]:
        return [i for i, s in enumerate(self.shapes) if tuple(s) != tuple(self.shape)]

    @property
    def background(self) -> float:
        return 255.0 if (np.dtype(self.dtype) == np.uint8 and self.channels == 3) else 0.0

    def read(self, index: int) -> np.ndarray:
        """Section ``index`` as ``[y, x]`` or ``[y, x, 3]``, padded to :attr:`shape`."""
        if self.kind == "folder":
            section = read_section(Path(self.source) / self.names[index])
        elif self.kind == "tiff":
            from medhpc.io.tiff import read_tiff_page

            section = read_tiff_page(self.source, index)
        else:
            import h5py

            with h5py.File(self.source, "r") as h5:
                section = h5[self.dataset][index]
        section = _channels(np.asarray(section), self.channels)
        return self._pad(section)

    def _pad(self, section: np.ndarray) -> np.ndarray:
        ny, nx = section.shape[:2]
        if (ny, nx) == tuple(self.shape):
            return section
        top, left = (self.shape[0] - ny) // 2, (self.shape[1] - nx) // 2
        out = np.full(tuple(self.shape) + section.shape[2:], self.background, section.dtype)
        out[top:top + ny, left:left + nx] = section
        return out


def _channels(section: np.ndarray, channels: int) -> np.ndarray:
    if section.ndim == 3 and section.shape[2] == 4:
        section = section[..., :3]
    if channels == 3 and section.ndim == 2:
        section = np.repeat(section[..., None], 3, axis=2)
    if channels == 1 and section.ndim == 3:
        section = section.mean(axis=2).astype(section.dtype)
    return section


def _header(path: Path) -> tuple[tuple, int, str]:
    """(y, x), channels and dtype of a section image without decoding its pixels."""
    if is_tiff_path(path):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                shape, dtype = page.shape, str(page.dtype)
        except Exception as error:
            raise InputError(f"{path}: cannot be read as a TIFF image "
                             f"({' '.join(str(error).split())}); expected a valid TIFF") from None
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as image:
                image.verify()
            with Image.open(path) as image:
                mode, size = image.mode, image.size
                image.load()
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            message = " ".join(str(error).split())
            raise InputError(f"{path}: cannot be read as an image ({message}); expected a "
                             f"valid {path.suffix.lower().lstrip('.').upper()} file") from None
        channels = 1 if mode in ("L", "I", "F", "I;16", "1") else 3
        shape = (size[1], size[0]) + ((3,) if channels == 3 else ())
        dtype = "uint16" if mode.startswith("I;16") else ("float32" if mode == "F" else "uint8")
    return tuple(shape[:2]), (3 if len(shape) == 3 and shape[2] in (3, 4) else 1), dtype


def open_stack(source) -> SectionStack:
    """Check the input and describe it (raises InputError with one line)."""
    text = str(source)
    path = Path(text.split(":")[0] if (".h5:" in text or ".hdf5:" in text) else text)
    if not path.exists():
        raise InputError(f"{path}: not found; {_STACK_HELP}")
    if path.is_dir():
        files = list_sections(path)
        headers = [_header(f) for f in files]
        stack = SectionStack("folder", str(path), [f.name for f in files],
                             [h[0] for h in headers], max(h[1] for h in headers),
                             headers[0][2])
    elif is_tiff_path(path):
        stack = _tiff_stack(path)
    elif path.suffix.lower() in (".h5", ".hdf5"):
        stack = _hdf5_stack(path, text)
    else:
        raise InputError(f"{path}: unknown input '{path.suffix}'; {_STACK_HELP} "
                         f"(sections: {', '.join(SECTION_SUFFIXES)})")
    if stack.count < MIN_SECTIONS:
        raise InputError(f"{path}: {stack.count} section(s); expected at least {MIN_SECTIONS} "
                         "for a reconstruction")
    return stack


def _tiff_stack(path: Path) -> SectionStack:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape, dtype = series.axes, series.shape, str(series.dtype)
    except Exception as error:
        raise InputError(f"{path}: cannot be read as a TIFF stack "
                         f"({' '.join(str(error).split())}); {_STACK_HELP}") from None
    channels = 3 if axes.endswith("S") and shape[-1] in (3, 4) else 1
    plane = shape[-3:-1] if channels == 3 else shape[-2:]
    count = int(np.prod(shape[:-3] if channels == 3 else shape[:-2]))
    return SectionStack("tiff", str(path), [str(i) for i in range(count)], [tuple(plane)] * count,
                        channels, dtype)


def _hdf5_stack(path: Path, text: str) -> SectionStack:
    import h5py

    from medhpc.io.images import split_dataset

    file_path, dataset = split_dataset(text, "")
    try:
        with h5py.File(file_path, "r") as h5:
            if not dataset:
                names = [k for k in h5 if isinstance(h5[k], h5py.Dataset) and h5[k].ndim in (3, 4)]
                if not names:
                    raise InputError(f"{file_path}: no 3-D dataset; {_STACK_HELP}")
                dataset = "volume" if "volume" in names else names[0]
            data = h5[dataset]
            shape, dtype = data.shape, str(data.dtype)
    except OSError as error:
        raise InputError(f"{file_path}: cannot be read as HDF5 ({' '.join(str(error).split())}); "
                         f"{_STACK_HELP}") from None
    except KeyError:
        raise InputError(f"{file_path}: no dataset '{dataset}'; {_STACK_HELP}") from None
    if len(shape) == 4 and shape[-1] not in (3, 4):
        raise InputError(f"{file_path}:{dataset}: shape {shape}; expected (z, y, x) or "
                         "(z, y, x, 3)")
    if len(shape) not in (3, 4):
        raise InputError(f"{file_path}:{dataset}: {len(shape)}-D; expected (z, y, x) sections")
    channels = 3 if len(shape) == 4 else 1
    return SectionStack("hdf5", str(file_path), [str(i) for i in range(shape[0])],
                        [tuple(shape[1:3])] * shape[0], channels, dtype, dataset=dataset)
