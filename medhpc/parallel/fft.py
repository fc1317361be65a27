"""Distributed 3-D real FFT of z-slab volumes: serial FFTs around one all-to-all transpose.

Layouts (global shape ``(nz, ny, nx)``, ``size`` ranks, this rank ``rank``):

- real space: z-slabs, the owned planes ``block_range(nz, size, rank)`` as a
  ``(nz_local, ny, nx)`` array (no halos);
- Fourier space: y-blocks, a complex ``(nz, ny_local, nx // 2 + 1)`` array
  holding ``numpy.fft.rfftn(volume)[:, y0:y1, :]`` with
  ``(y0, y1) = block_range(ny, size, rank)``.

Ranks may own no planes or no y rows (more ranks than ``nz`` or ``ny``): their
arrays are empty and they still take part in the transposes. float32 input
gives complex64 spectra, everything else complex128. Host (NumPy) arrays only.
The serial FFTs are SciPy's, in the input's precision, on the rank's numba
thread count; on one rank the transposes are skipped.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from medhpc.parallel.comm import World
from medhpc.parallel.geometry import block_range, block_ranges


def _scipy_fft():
    """scipy.fft, imported on first use (it costs 0.2 s at start-up otherwise)."""
    import scipy.fft

    return scipy.fft


def _complex_type(dtype) -> np.dtype:
    return np.dtype(np.complex64) if np.dtype(dtype) == np.float32 else np.dtype(np.complex128)


def _real_type(dtype) -> np.dtype:
    return np.dtype(np.float32) if np.dtype(dtype) == np.complex64 else np.dtype(np.float64)


def _workers() -> int:
    """Threads for the serial FFTs: the rank's numba thread count (``--threads``)."""
    import numba

    return max(1, numba.get_num_threads())


def spectrum_shape(world: World, global_shape: Sequence[int]) -> tuple[int, int, int]:
    """Shape of this rank's block of the spectrum: ``(nz, ny_local, nx // 2 + 1)``."""
    nz, ny, nx = global_shape
    y0, y1 = block_range(ny, world.size, world.rank)
    return nz, y1 - y0, nx // 2 + 1


def rfftn_slabs(world: World, local_real: np.ndarray, nz_global: int) -> np.ndarray:
    """Forward real FFT of a z-slab distributed volume.

    Parameters
    ----------
    world : World
    local_real : numpy.ndarray
        This rank's owned planes ``(nz_local, ny, nx)`` (real; no halos).
    nz_global : int
        Global number of z planes.

    Returns
    -------
    numpy.ndarray
        This rank's y-block of the spectrum, ``(nz, ny_local, nx // 2 + 1)``.
    """
    if local_real.ndim != 3:
        raise ValueError(f"expected a (z, y, x) slab, got shape {local_real.shape}")
    z0, z1 = block_range(nz_global, world.size, world.rank)
    if local_real.shape[0] != z1 - z0:
        raise ValueError(f"rank {world.rank} owns {z1 - z0} of {nz_global} planes, "
                         f"slab has {local_real.shape[0]}")
    _, ny, nx = local_real.shape
    complex_type = _complex_type(local_real.dtype)
    real = np.asarray(local_real, dtype=_real_type(complex_type))
    if world.size == 1:
        return _scipy_fft().rfftn(real, workers=_workers())
    planes = _scipy_fft().rfft2(real, axes=(1, 2), workers=_workers())
    nxh = nx // 2 + 1
    y_blocks = block_ranges(ny, world.size)
    z_blocks = block_ranges(nz_global, world.size)
    send = np.concatenate([planes[:, y0:y1, :].reshape(-1) for y0, y1 in y_blocks])
    y0, y1 = y_blocks[world.rank]
    spectrum = np.empty((nz_global, y1 - y0, nxh), dtype=complex_type)
    world.alltoallv_(send, [(z1 - z0) * (b1 - b0) * nxh for b0, b1 in y_blocks],
                     spectrum, [(b1 - b0) * (y1 - y0) * nxh for b0, b1 in z_blocks])
    return _scipy_fft().fft(spectrum, axis=0, overwrite_x=True, workers=_workers())


def irfftn_slabs(world: World, local_spectrum: np.ndarray,
                 global_shape: Sequence[int]) -> np.ndarray:
    """Inverse of :func:`rfftn_slabs`: this rank's real z-slab (owned planes, no halos).

    Parameters
    ----------
    world : World
    local_spectrum : numpy.ndarray
        This rank's y-block ``(nz, ny_local, nx // 2 + 1)``.
    global_shape : sequence of int
        ``(nz, ny, nx)`` of the real volume (``nx`` cannot be told from the spectrum).

    Returns
    -------
    numpy.ndarray
        ``numpy.fft.irfftn(spectrum, s=global_shape)[z0:z1]``, float32 for complex64 input.
    """
    nz, ny, nx = global_shape
    expected = spectrum_shape(world, global_shape)
    if tuple(local_spectrum.shape) != expected:
        raise ValueError(f"rank {world.rank} expects a spectrum block {expected}, "
                         f"got {local_spectrum.shape}")
    complex_type = np.dtype(np.complex64) if local_spectrum.dtype == np.complex64 \
        else np.dtype(np.complex128)
    if world.size == 1:
        return _scipy_fft().irfftn(local_spectrum, s=(nz, ny, nx), workers=_workers())
    nxh = nx // 2 + 1
    along_z = np.ascontiguousarray(_scipy_fft().ifft(local_spectrum, axis=0, workers=_workers()),
                                   dtype=complex_type)
    y_blocks = block_ranges(ny, world.size)
    z_blocks = block_ranges(nz, world.size)
    y0, y1 = y_blocks[world.rank]
    z0, z1 = z_blocks[world.rank]
    received = np.empty((z1 - z0) * ny * nxh, dtype=complex_type)
    world.alltoallv_(along_z, [(b1 - b0) * (y1 - y0) * nxh for b0, b1 in z_blocks],
                     received, [(z1 - z0) * (b1 - b0) * nxh for b0, b1 in y_blocks])
    planes = np.empty((z1 - z0, ny, nxh), dtype=complex_type)
    offset = 0
    for b0, b1 in y_blocks:
        count = (z1 - z0) * (b1 - b0) * nxh
        planes[:, b0:b1, :] = received[offset:offset + count].reshape(z1 - z0, b1 - b0, nxh)
        offset += count
    return _scipy_fft().irfft2(planes, s=(ny, nx), axes=(1, 2), overwrite_x=True,
                            workers=_workers())


def fourier_frequencies_local(world: World,
                              global_shape: Sequence[int]) -> tuple[np.ndarray, ...]:
    """Integer frequency indices of this rank's spectrum block, ready to broadcast.

    Returns
    -------
    kz, ky, kx : numpy.ndarray
        Shapes ``(nz, 1, 1)``, ``(1, ny_local, 1)`` and ``(1, 1, nx // 2 + 1)``;
        ``kz`` and ``ky`` are signed (``numpy.fft.fftfreq(n, 1 / n)``), ``kx``
        runs ``0 .. nx // 2``. The physical frequency along an axis of ``n``
        voxels of spacing ``h`` is ``k / (n * h)``.
    """
    nz, ny, nx = global_shape
    y0, y1 = block_range(ny, world.size, world.rank)
    kz = np.fft.fftfreq(nz, 1.0 / nz).round().astype(np.int64)
    ky = np.fft.fftfreq(ny, 1.0 / ny).round().astype(np.int64)[y0:y1]
    kx = np.arange(nx // 2 + 1, dtype=np.int64)
    return kz[:, None, None], ky[None, :, None], kx[None, None, :]


def apply_fourier_multiplier(world: World, local_real: np.ndarray, global_shape: Sequence[int],
                             multiplier_fn: Callable[[np.ndarray, np.ndarray, np.ndarray],
                                                     np.ndarray]) -> np.ndarray:
    """Multiply a z-slab volume by a function of frequency: ``irfftn(m * rfftn(f))``.

    Parameters
    ----------
    world : World
    local_real : numpy.ndarray
        Owned planes ``(nz_local, ny, nx)``, or ``(c, nz_local, ny, nx)``
        (each channel is filtered alike, e.g. the components of a velocity field).
    global_shape : sequence of int
        ``(nz, ny, nx)`` of one channel.
    multiplier_fn : callable
        ``multiplier_fn(kz, ky, kx)`` with the arrays of
        :func:`fourier_frequencies_local`; returns the multiplier (real or
        complex) broadcastable to the local spectrum block. For a smoothing
        kernel ``K = (L^T L)^-1`` it returns ``1 / eigenvalue(L^T L)``.

    Returns
    -------
    numpy.ndarray
        A new array of ``local_real``'s shape and dtype.
    """
    global_shape = tuple(global_shape)
    if local_real.ndim == 4:
        return np.stack([apply_fourier_multiplier(world, channel, global_shape, multiplier_fn)
                         for channel in local_real])
    spectrum = rfftn_slabs(world, local_real, global_shape[0])
    multiplier = np.asarray(multiplier_fn(*fourier_frequencies_local(world, global_shape)))
    spectrum *= multiplier.astype(spectrum.dtype, copy=False)
    return irfftn_slabs(world, spectrum, global_shape).astype(local_real.dtype, copy=False)
