"""The input stack: section images, whole slides, a multi-page (OME-)TIFF, or an HDF5 stack.

:func:`open_stack` checks the input once (count, readable headers, sizes) and
returns a :class:`SectionStack` that any rank can read single sections from.
Sections of different sizes are padded (centred) to the largest size with the
background (white for 8-bit brightfield images, 0 otherwise); the stack says
which ones.

Whole slides (a folder or a list of pyramidal TIFF/OME-TIFF/SVS/NDPI files or
OME-Zarr folders; see :mod:`medhpc.io.wholeslide`) are never read whole:
:meth:`SectionStack.read_working` reads the pyramid level nearest to the working
resolution and :meth:`SectionStack.regions` reads level-0 regions. They must
share one size, channel count, type and pixel size (checked, with a cheap
preflight of every file, before any compute).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medhpc.errors import InputError
from medhpc.io.lists import is_stdin, read_list_text
from medhpc.io.sections import SECTION_SUFFIXES, list_sections, natural_key, read_section
from medhpc.io.tiff import is_tiff_path
from medhpc.io.wholeslide import (Slide, block_mean, choose_level, describe_slide, extend_to,
                                  is_slide_path, open_slide, preflight_slide, read_downsampled)

MIN_SECTIONS = 3
PIXEL_SIZE_TOLERANCE = 0.01   # relative difference of pixel sizes taken as equal
_SLIDE_ONLY = (".svs", ".ndpi", ".zarr")
_STACK_HELP = ("expected a folder or list (.txt, or --input repeated) of section images or "
               "whole slides, a multi-page TIFF or an HDF5 stack (file.h5[:dataset])")


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
    slides: list = field(default_factory=list)   # Slide per section (kind "slides")
    pixel_size_um: tuple | None = None            # level-0 (y, x), when known

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

    def read_working(self, index: int, factor: int) -> tuple[np.ndarray, dict]:
        """Section ``index`` block-averaged ``factor`` times, float32 in input units.

        Whole slides are read from the stored level nearest to (finer than or
        equal to) that resolution (never level 0 whole unless ``factor`` needs it);
        other inputs are read whole and averaged. Returns the image (``[y, x]`` or
        ``[y, x, 3]``, the working shape ``shape // factor``) and what was read.
        """
        out_shape = (self.shape[0] // factor, self.shape[1] // factor)
        if self.kind != "slides":
            image = block_mean(self.read(index), factor)[: out_shape[0], : out_shape[1]]
            return image, {"level": 0, "level_shape": list(self.shape), "block": factor}
        with open_slide(self.slides[index]) as reader:
            image, record = read_downsampled(reader, factor, out_shape)
        return _channels_float(image, self.channels), record

    @contextmanager
    def regions(self, index: int, block: int = 1):
        """Context giving ``region(rows, columns)`` of section ``index`` ``block`` times
        coarser than level 0 (float32 block means when ``block`` > 1).

        Slides are read by region (only the tiles touched are decoded) from the stored
        level :func:`choose_level` picks; other inputs are read whole once. ``rows`` and
        ``columns`` lie inside :attr:`shape` // ``block``.
        """
        if self.kind != "slides":
            section = self.read(index)
            if block > 1:
                section = block_mean(section, block)
            yield lambda rows, columns: section[rows, columns]
            return
        slide = self.slides[index]
        level, sub_block = choose_level(slide, block)
        level_y, level_x = slide.level_shapes[level]
        with open_slide(slide) as reader:
            def region(rows, columns):
                values = reader.region(level,
                                       slice(min(rows.start * sub_block, level_y - 1),
                                             min(level_y, rows.stop * sub_block)),
                                       slice(min(columns.start * sub_block, level_x - 1),
                                             min(level_x, columns.stop * sub_block)))
                # a level a pixel short at its far edge repeats its last row or column
                values = extend_to(_channels(values, self.channels),
                                   ((rows.stop - rows.start) * sub_block,
                                    (columns.stop - columns.start) * sub_block))
                return block_mean(values, sub_block) if sub_block > 1 else values
            yield region

    def read(self, index: int) -> np.ndarray:
        """Section ``index`` as ``[y, x]`` or ``[y, x, 3]``, padded to :attr:`shape`."""
        if self.kind == "slides":
            with open_slide(self.slides[index]) as reader:
                section = reader.region(0, slice(0, self.shape[0]), slice(0, self.shape[1]))
        elif self.kind == "folder":
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


def _channels_float(image: np.ndarray, channels: int) -> np.ndarray:
    if channels == 3 and image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if channels == 1 and image.ndim == 3:
        return image.mean(axis=2, dtype=np.float32)
    return image


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


def input_files(sources) -> list[Path] | None:
    """The files of a multi-file input: several ``--input``, a ``.txt`` list or ``-`` (the
    list on stdin); else None.

    A list holds one path per line (relative to the list file's folder, or to the working
    folder for stdin; blank lines and lines starting with ``#`` are skipped).
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    sources = list(sources)
    if len(sources) == 1 and not _is_list(sources[0]):
        return None
    files = []
    for source in sources:
        if _is_list(source):
            if not is_stdin(source) and not Path(source).exists():
                raise InputError(f"{source}: list file not found; {_STACK_HELP}")
            text, folder, source = read_list_text(source)
            for number, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if line and not line.startswith("#"):
                    path = Path(line)
                    path = path if path.is_absolute() else folder / path
                    if not path.exists():
                        raise InputError(f"{source}: unknown input: line {number} names "
                                         f"'{line}', which is not found; expected one "
                                         "whole-slide path per line")
                    files.append(path)
        else:
            files.append(Path(source))
    if not files:
        raise InputError(f"{', '.join(map(str, sources))}: the list names no files; "
                         f"{_STACK_HELP}")
    return files


def _is_list(source) -> bool:
    return is_stdin(source) or str(source).lower().endswith(".txt")


def _folder_slides(path: Path) -> list[Path] | None:
    """The whole slides of a folder, when it holds slides (else None: section images)."""
    entries = [e for e in path.iterdir() if not e.name.startswith(".")
               and ((e.is_file() and (e.suffix.lower() in SECTION_SUFFIXES or is_slide_path(e)))
                    or (e.is_dir() and is_slide_path(e)))]
    if not entries:
        return None
    slide_only = [e for e in entries if e.name.lower().endswith(_SLIDE_ONLY)]
    if not slide_only and not all(is_tiff_path(e) for e in entries):
        return None
    if not slide_only and not any(_is_pyramid_or_tiled(e) for e in entries):
        return None   # plain TIFF section images: read whole, smaller ones padded
    others = [e.name for e in entries if not is_slide_path(e)]
    if others:
        raise InputError(f"{path}: mixes whole slides and other images ({others[0]}); "
                         "expected one kind of section file")
    return sorted(entries, key=lambda entry: (natural_key(entry.name), entry.name))


def _is_pyramid_or_tiled(path: Path) -> bool:
    """True for a tiled or multi-level TIFF (a whole slide); False for a plain image or one
    that cannot be read (the section reader then says what is wrong with it)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return len(series.levels) > 1 or bool(tif.pages[0].is_tiled)
    except Exception:
        return False


def slide_stack(files: list[Path], source: str) -> SectionStack:
    """Describe and preflight whole slides; refuse differing sizes, types or pixel sizes."""
    slides: list[Slide] = []
    for path in files:
        if not Path(path).exists():
            raise InputError(f"{path}: not found; {_STACK_HELP}")
        if not is_slide_path(path):
            raise InputError(f"{path}: '{Path(path).suffix}' is not a whole-slide format; "
                             "expected .svs, .ndpi, .tif/.tiff/.ome.tif or .zarr/.ome.zarr")
        slide = describe_slide(path)
        preflight_slide(slide)
        slides.append(slide)
    first = slides[0]
    for slide in slides[1:]:
        if slide.shape != first.shape:
            raise InputError(f"{slide.path}: level 0 is {slide.shape[1]}x{slide.shape[0]} px; "
                             f"expected {first.shape[1]}x{first.shape[0]} px like {first.path}")
        if (slide.channels, slide.dtype) != (first.channels, first.dtype):
            raise InputError(f"{slide.path}: {slide.channels} channel(s) of {slide.dtype}; "
                             f"expected {first.channels} of {first.dtype} like {first.path}")
        if (slide.pixel_size_um is None) != (first.pixel_size_um is None) or (
                slide.pixel_size_um is not None and not np.allclose(
                    slide.pixel_size_um, first.pixel_size_um, rtol=PIXEL_SIZE_TOLERANCE)):
            raise InputError(f"{slide.path}: pixel size {_um(slide.pixel_size_um)}; expected "
                             f"{_um(first.pixel_size_um)} like {first.path}")
    names = [Path(s.path).name for s in slides]
    channels = 3 if first.channels in (3, 4) else 1
    return SectionStack("slides", source, names, [s.shape for s in slides], channels,
                        first.dtype, slides=slides, pixel_size_um=first.pixel_size_um)


def _um(size) -> str:
    return "unknown" if size is None else f"{size[1]:.4g} x {size[0]:.4g} um"


def open_stack(source) -> SectionStack:
    """Check the input and describe it (raises InputError with one line).

    ``source`` is one path or a sequence of paths (several whole slides, or ``.txt``
    lists of them).
    """
    files = input_files(source)
    if files is not None:
        stack = slide_stack(files, ";".join(str(s) for s in (
            [source] if isinstance(source, (str, Path)) else source)))
        return _enough(stack, Path(str(files[0])))
    if not isinstance(source, (str, Path)):
        source = list(source)[0]
    text = str(source)
    path = Path(text.split(":")[0] if (".h5:" in text or ".hdf5:" in text) else text)
    if not path.exists():
        raise InputError(f"{path}: not found; {_STACK_HELP}")
    slides = _folder_slides(path) if path.is_dir() and not is_slide_path(path) else None
    if slides is not None:
        stack = slide_stack(slides, str(path))
    elif path.is_dir() and is_slide_path(path):
        raise InputError(f"{path}: one OME-Zarr slide; {_STACK_HELP}")
    elif path.is_dir():
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
    return _enough(stack, path)


def _enough(stack: SectionStack, path: Path) -> SectionStack:
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
