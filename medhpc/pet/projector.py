"""Joseph ray-driven PET projector (non-TOF and TOF) on the CPU or one GPU.

The projector maps an image ``[z, y, x]`` to one value per LOR (non-TOF) or
one per LOR and TOF bin; its back-projection is the exact adjoint. LORs are
processed in chunks so that device memory stays bounded for any scanner size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medhpc import backend
from medhpc.errors import InputError
from medhpc.io.geometry import ImageGeometry

CUDA_CHUNK_LORS = 4 * 1024 * 1024
#: Share of the GPU's memory that resident LOR end points leave free (images, sinograms, work).
DEVICE_RESERVE = 0.3


@dataclass(frozen=True)
class TofSpec:
    """Time-of-flight binning along each LOR.

    Bin ``k`` is centred at ``(k - (bins - 1) / 2) * bin_mm`` from the LOR
    midpoint towards ``xend``; the kernel is a Gaussian of ``sigma_mm``
    truncated at ``cutoff_sigmas`` and renormalised.
    """

    bins: int
    bin_mm: float
    sigma_mm: float
    cutoff_sigmas: float = 3.0

    def __post_init__(self):
        if self.bins < 1 or not self.bin_mm > 0 or not self.sigma_mm > 0:
            raise ValueError(f"TOF needs bins >= 1, bin_mm > 0 and sigma_mm > 0, got {self}")
        if not (self.cutoff_sigmas > 0 and math.isfinite(self.cutoff_sigmas)):
            raise ValueError(f"TOF cutoff_sigmas must be finite and > 0, got {self.cutoff_sigmas}")


@dataclass(frozen=True)
class LorTofKernels:
    """Each LOR's TOF kernel: Gaussian width and centre offset in mm (timing calibration).

    ``offset_mm[i]`` moves LOR ``i``'s kernel towards ``xend`` (a measured TOF position
    ``offset_mm`` beyond the true one). Arrays of length 1 apply to every LOR.
    """

    sigma_mm: np.ndarray
    offset_mm: np.ndarray

    def __post_init__(self):
        sigma = np.ascontiguousarray(self.sigma_mm, dtype=np.float32).reshape(-1)
        offset = np.ascontiguousarray(self.offset_mm, dtype=np.float32).reshape(-1)
        if sigma.size == 1 and offset.size > 1:
            sigma = np.full(offset.size, sigma[0], np.float32)
        if offset.size == 1 and sigma.size > 1:
            offset = np.full(sigma.size, offset[0], np.float32)
        if sigma.size != offset.size or sigma.size == 0:
            raise ValueError(f"TOF kernel widths ({sigma.size}) and offsets ({offset.size}) "
                             f"must be one per LOR")
        if not (np.all(sigma > 0) and np.all(np.isfinite(sigma)) and
                np.all(np.isfinite(offset))):
            raise ValueError("TOF kernel widths must be finite and > 0, offsets finite")
        object.__setattr__(self, "sigma_mm", sigma)
        object.__setattr__(self, "offset_mm", offset)

    @classmethod
    def uniform(cls, sigma_mm: float, offset_mm: float = 0.0) -> "LorTofKernels":
        """One kernel for every LOR."""
        return cls(np.array([sigma_mm], np.float32), np.array([offset_mm], np.float32))

    @property
    def n_lors(self) -> int:
        """LORs described (1: all alike)."""
        return self.sigma_mm.shape[0]


def tof_spec(scanner) -> TofSpec:
    """The TOF kernel of a TOF scanner."""
    return TofSpec(bins=scanner.tof_bins, bin_mm=scanner.tof_bin_mm, sigma_mm=scanner.tof_sigma_mm)


def axis_aligned_grid(geometry: ImageGeometry, source) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(origin_mm, voxel_mm)`` as (x, y, z) of an axis-aligned image grid."""
    rotation = np.asarray(geometry.affine)[:3, :3]
    spacing = np.diag(rotation)
    if not np.allclose(rotation, np.diag(spacing), atol=1e-6) or np.any(spacing <= 0):
        raise InputError(f"{source}: image grid is rotated or flipped (affine {rotation.tolist()}); "
                         f"expected an axis-aligned grid with positive spacing")
    return (np.asarray(geometry.origin_mm, dtype=np.float32),
            np.asarray(spacing, dtype=np.float32))


class JosephProjector:
    """Joseph projector for LORs given by their end points.

    Parameters
    ----------
    xstart, xend : (n, 3) array
        LOR end points (x, y, z) in mm.
    image_shape : tuple of int
        Image shape (nz, ny, nx).
    origin_mm : (3,) array
        (x, y, z) centre of voxel [0, 0, 0] in mm.
    voxel_mm : (3,) array
        Voxel size along (x, y, z) in mm.
    device : {'cpu', 'cuda'}
        Where the kernels run (resolved by the caller; not checked here).
    tof : TofSpec, optional
        TOF binning; None for non-TOF.
    chunk_lors : int, optional
        LORs per kernel call; default all on the CPU, ``CUDA_CHUNK_LORS`` on CUDA.
    tof_kernels : LorTofKernels, optional
        Each LOR's own TOF kernel width and centre offset (timing calibration); default
        ``tof.sigma_mm`` and no offset for every LOR.
    """

    def __init__(self, xstart, xend, image_shape, origin_mm, voxel_mm, device="cpu", tof=None,
                 chunk_lors=None, tof_kernels=None):
        self.xstart = np.ascontiguousarray(xstart, dtype=np.float32)
        self.xend = np.ascontiguousarray(xend, dtype=np.float32)
        if self.xstart.ndim != 2 or self.xstart.shape[1:] != (3,) or \
                self.xstart.shape != self.xend.shape:
            raise ValueError(f"xstart and xend must both be (n, 3), got {self.xstart.shape} "
                             f"and {self.xend.shape}")
        self.image_shape = tuple(int(s) for s in image_shape)
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"image_shape must be 3 positive sizes (nz, ny, nx), "
                             f"got {image_shape}")
        self.origin_mm = np.ascontiguousarray(origin_mm, dtype=np.float32).reshape(3)
        self.voxel_mm = np.ascontiguousarray(voxel_mm, dtype=np.float32).reshape(3)
        self.device = device
        self.tof = tof
        self.tof_kernels = self._checked_tof_kernels(tof, tof_kernels, self.n_lors)
        self._kernels = backend.kernels("medhpc.pet", device)
        if chunk_lors is None:
            chunk_lors = CUDA_CHUNK_LORS if device == "cuda" else max(self.n_lors, 1)
        self.chunk_lors = int(chunk_lors)
        self._resident = []  # CUDA: chunks kept on the GPU between calls

    @property
    def n_lors(self) -> int:
        """Number of LORs."""
        return self.xstart.shape[0]

    @property
    def shape_out(self) -> tuple:
        """Projection shape: (n_lors,) or (n_lors, tof.bins)."""
        return (self.n_lors,) if self.tof is None else (self.n_lors, self.tof.bins)

    @staticmethod
    def _checked_tof_kernels(tof, tof_kernels, n_lors):
        if tof_kernels is None:
            return None if tof is None else LorTofKernels.uniform(tof.sigma_mm)
        if tof is None:
            raise ValueError("per-LOR TOF kernels given to a non-TOF projector")
        if tof_kernels.n_lors not in (1, n_lors):
            raise ValueError(f"per-LOR TOF kernels for {tof_kernels.n_lors} LORs; the projector "
                             f"has {n_lors}")
        return tof_kernels

    def _tof_args(self, sigma_mm, offset_mm):
        if self.tof is None:
            return ()
        return (self.tof.bin_mm, sigma_mm, offset_mm, self.tof.cutoff_sigmas)

    def _chunks(self):
        """Yield (slice, xstart, xend, TOF arguments) per chunk, on the kernels' device.

        On CUDA the chunks uploaded by the first call stay on the GPU for every later
        forward and back projection, as long as the card keeps :data:`DEVICE_RESERVE` of
        its memory free; chunks beyond that are uploaded on every call.
        """
        for index, start in enumerate(range(0, self.n_lors, self.chunk_lors)):
            if index < len(self._resident):
                yield self._resident[index]
                continue
            part = slice(start, min(start + self.chunk_lors, self.n_lors))
            chunk = (part, backend.to_device(self.xstart[part], self.device),
                     backend.to_device(self.xend[part], self.device),
                     self._tof_args(*self._chunk_tof_kernels(part)))
            if self.device == "cuda" and index == len(self._resident) and self._room_for(chunk):
                self._resident.append(chunk)
            yield chunk

    def _chunk_tof_kernels(self, part):
        if self.tof is None:
            return None, None
        kernels = self.tof_kernels
        if kernels.n_lors > 1:
            kernels = LorTofKernels(kernels.sigma_mm[part], kernels.offset_mm[part])
        return (backend.to_device(kernels.sigma_mm, self.device),
                backend.to_device(kernels.offset_mm, self.device))

    @staticmethod
    def _room_for(chunk) -> bool:
        from numba import cuda

        free, total = cuda.current_context().get_memory_info()
        resident = chunk[1].nbytes + chunk[2].nbytes + sum(
            getattr(argument, "nbytes", 0) for argument in chunk[3])
        return free - resident >= DEVICE_RESERVE * total

    def forward(self, image):
        """Project ``image`` (nz, ny, nx) to float32 values of :attr:`shape_out`.

        A host array gives a host result. On CUDA a device image gives a device
        result, so iterative algorithms keep their arrays on the GPU.
        """
        on_device = self.device == "cuda" and backend.is_device_array(image)
        if not on_device:
            image = backend.to_device(self._checked(image, self.image_shape, "image"), self.device)
        out = backend.empty(self.shape_out, np.float32, self.device if on_device else "cpu")
        forward = self._kernels.joseph_forward if self.tof is None else \
            self._kernels.joseph_forward_tof
        for part, xstart, xend, tof_args in self._chunks():
            if self.device == "cuda" and not on_device:
                out_part = backend.empty(out[part].shape, np.float32, "cuda")
            else:
                out_part = out[part]
            forward(image, xstart, xend, self.origin_mm, self.voxel_mm, *tof_args, out_part)
            if self.device == "cuda" and not on_device:
                out[part] = out_part.copy_to_host()
        return out

    def back(self, values):
        """Back-project ``values`` of :attr:`shape_out` into a new float32 image.

        Host values give a host image; on CUDA, device values give a device image.
        """
        back = self._kernels.joseph_back if self.tof is None else self._kernels.joseph_back_tof
        return self._back_with(back, values, self.shape_out)

    def back_every_bin(self, values):
        """Back-project per-LOR ``values`` (n_lors,) given alike to every TOF bin.

        With TOF this is the TOF back projection of ``values`` repeated in each bin (the TOF
        sensitivity image), computed as one non-TOF back projection in which every sample
        carries the sum of its TOF weights over the bins (1 wherever the bins cover the
        kernel): ``1 / tof.bins`` of the work. Without TOF it is :meth:`back`.
        """
        if self.tof is None:
            return self.back(values)
        return self._back_with(self._kernels.joseph_back_tof_summed, values, (self.n_lors,),
                               (self.tof.bins,))

    def _back_with(self, kernel, values, shape, leading_args=()):
        on_device = self.device == "cuda" and backend.is_device_array(values)
        if not on_device:
            values = self._checked(values, shape, "values")
        image = backend.zeros(self.image_shape, np.float32, self.device)
        for part, xstart, xend, tof_args in self._chunks():
            chunk = values[part] if on_device else backend.to_device(values[part], self.device)
            kernel(chunk, xstart, xend, self.origin_mm, self.voxel_mm, *leading_args, *tof_args,
                   image)
        return image if on_device else backend.to_host(image)

    def adjointness_error(self, rng) -> float:
        """Relative |<A x, y> - <x, A^T y>| / |<A x, y>| for random x, y (float64 sums)."""
        return adjointness_error(self, rng)

    @staticmethod
    def _checked(array, shape, name):
        array = np.ascontiguousarray(array, dtype=np.float32)
        if array.shape != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {array.shape}")
        return array


class CompressedProjector:
    """A sinogram projector whose planes each sum the LORs of several ring pairs (span > 1).

    ``A_c = C A``: the Joseph projection of every member LOR (``inner``, ordered ``row x
    member``), then ``C`` sums each plane's members; the back projection repeats each
    plane's value to its members (``C^T``) and back-projects them, the exact adjoint.

    Parameters
    ----------
    inner : JosephProjector
        LORs ``row x member`` (C order, members innermost).
    first : (planes + 1,) array of int
        Plane ``p``'s members are ``first[p] .. first[p + 1] - 1``.
    """

    def __init__(self, inner: JosephProjector, first):
        self.inner = inner
        self.first = np.ascontiguousarray(first, dtype=np.int64)
        self.n_members = int(self.first[-1])
        self.n_planes = len(self.first) - 1
        if self.n_members == 0 or inner.n_lors % self.n_members:
            raise ValueError(f"{inner.n_lors} LORs are not rows of {self.n_members} members")
        self.rows = inner.n_lors // self.n_members
        self.plane_of = np.repeat(np.arange(self.n_planes, dtype=np.int64), np.diff(self.first))
        self.device, self.tof, self.image_shape = inner.device, inner.tof, inner.image_shape
        self._device_tables = None

    @property
    def n_lors(self) -> int:
        """Sinogram LORs (rows x planes)."""
        return self.rows * self.n_planes

    @property
    def shape_out(self) -> tuple:
        """Projection shape: (n_lors,) or (n_lors, tof.bins)."""
        return (self.n_lors,) if self.tof is None else (self.n_lors, self.tof.bins)

    def forward(self, image):
        """Project ``image`` onto the span > 1 planes (host or device, as the image)."""
        return self._sum(self.inner.forward(image))

    def back(self, values):
        """Back-project ``values`` of :attr:`shape_out` into a new image."""
        return self.inner.back(self._repeat(values, self.shape_out))

    def back_every_bin(self, values):
        """Back-project per-LOR ``values`` given alike to every TOF bin."""
        return self.inner.back_every_bin(self._repeat(values, (self.n_lors,)))

    def adjointness_error(self, rng) -> float:
        """Relative |<A x, y> - <x, A^T y>| / |<A x, y>| for random x, y (float64 sums)."""
        return adjointness_error(self, rng)

    def _tables_for(self, array):
        """(device, kernels, (first, plane_of)) where ``array`` lives."""
        if self.device == "cuda" and backend.is_device_array(array):
            if self._device_tables is None:
                self._device_tables = (backend.to_device(self.first, "cuda"),
                                       backend.to_device(self.plane_of, "cuda"))
            return "cuda", backend.kernels("medhpc.pet", "cuda"), self._device_tables
        return "cpu", backend.kernels("medhpc.pet", "cpu"), (self.first, self.plane_of)

    def _sum(self, values):
        device, kernels, (first, _) = self._tables_for(values)
        bins = 1 if values.ndim == 1 else values.shape[1]
        out = backend.empty((self.n_lors,) + values.shape[1:], np.float32, device)
        kernels.sum_members(values.reshape(self.rows, self.n_members, bins), first,
                            out.reshape(self.rows, self.n_planes, bins))
        return out

    def _repeat(self, values, shape):
        device, kernels, (_, plane_of) = self._tables_for(values)
        if device == "cpu":
            values = JosephProjector._checked(values, shape, "values")
        bins = 1 if len(shape) == 1 else shape[1]
        out = backend.empty((self.inner.n_lors,) + tuple(shape[1:]), np.float32, device)
        kernels.repeat_members(values.reshape(self.rows, self.n_planes, bins), plane_of,
                               out.reshape(self.rows, self.n_members, bins))
        return out


def adjointness_error(projector, rng) -> float:
    """Relative |<A x, y> - <x, A^T y>| / |<A x, y>| for random x, y (float64 sums)."""
    x = rng.random(projector.image_shape, dtype=np.float32)
    y = rng.random(projector.shape_out, dtype=np.float32)
    forward_dot = np.dot(projector.forward(x).ravel().astype(np.float64), y.ravel())
    back_dot = np.dot(x.ravel().astype(np.float64), projector.back(y).ravel())
    if forward_dot == 0.0:
        return abs(back_dot)
    return abs(forward_dot - back_dot) / abs(forward_dot)


def sinogram_projector(scanner, image_shape, origin_mm, voxel_mm, views=None, planes=None,
                       device="cpu", tof=None, move_endpoints=None, timing=None):
    """The projector of a block of a scanner's sinogram (``radial x views x planes``).

    Span 1: a :class:`JosephProjector` of the LORs; span > 1: a
    :class:`CompressedProjector` over the planes' ring pairs.
    ``move_endpoints(xstart, xend)`` may shift the end points (shape ``radial x view x
    member x 3``) before the projector is built; ``timing``, a
    :class:`~medhpc.pet.timing.TimingCalibration`, gives each LOR its own TOF kernel.
    """
    from medhpc.pet.timing import sinogram_kernels

    from medhpc.pet.scanner import lor_endpoints, plane_members

    xstart, xend = lor_endpoints(scanner, views=views, planes=planes)
    if move_endpoints is not None:
        xstart, xend = move_endpoints(xstart, xend)
    kernels = sinogram_kernels(timing, scanner, views, planes) if tof is not None else None
    inner = JosephProjector(xstart.reshape(-1, 3), xend.reshape(-1, 3), image_shape, origin_mm,
                            voxel_mm, device=device, tof=tof, tof_kernels=kernels)
    if scanner.span == 1:
        return inner
    return CompressedProjector(inner, plane_members(scanner, planes)[1])
