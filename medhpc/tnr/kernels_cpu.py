"""TNR kernels on the CPU (twins of :mod:`medhpc.tnr.kernels_cuda`).

``zncc_scores`` computes zero-mean normalised cross-correlation maps of a batch
of templates, each inside its own search window, the fast way: the numerator is
a correlation by real FFTs (float32) of the zero-mean template with the window,
and the window's sum and sum of squares under every template position come from
integral images (float64), so the cost does not depend on the template size
(Lewis, "Fast normalized cross-correlation", 1995).

``remap`` resamples a 2-D image at given coordinates (bilinear or bicubic).
"""

import math

import numba
import numpy as np
import scipy.fft

FFT_BATCH = 2
FLAT_VARIANCE = 1e-10


def _fft_size(window: int) -> int:
    """Smallest FFT-friendly length >= ``window`` (circular correlation stays valid there)."""
    return scipy.fft.next_fast_len(window, real=True)


@numba.njit(parallel=True, cache=True)
def _normalise(numerator, windows, template_norms, out):
    """out = numerator / (|T'| * sqrt(sum W^2 - (sum W)^2 / n)) via integral images."""
    batch, ny, nx = windows.shape
    oy, ox = out.shape[1], out.shape[2]
    py, px = ny - oy + 1, nx - ox + 1
    n = py * px
    for b in numba.prange(batch):
        shift = windows[b, ny // 2, nx // 2]
        s1 = np.zeros((ny + 1, nx + 1))
        s2 = np.zeros((ny + 1, nx + 1))
        for y in range(ny):
            row1 = 0.0
            row2 = 0.0
            for x in range(nx):
                value = np.float64(windows[b, y, x]) - shift
                row1 += value
                row2 += value * value
                s1[y + 1, x + 1] = s1[y, x + 1] + row1
                s2[y + 1, x + 1] = s2[y, x + 1] + row2
        norm_t = template_norms[b]
        for y in range(oy):
            for x in range(ox):
                sum1 = s1[y + py, x + px] - s1[y, x + px] - s1[y + py, x] + s1[y, x]
                sum2 = s2[y + py, x + px] - s2[y, x + px] - s2[y + py, x] + s2[y, x]
                variance = sum2 - sum1 * sum1 / n
                if norm_t > 0.0 and variance > FLAT_VARIANCE * n:
                    out[b, y, x] = numerator[b, y, x] / (norm_t * math.sqrt(variance))
                else:
                    out[b, y, x] = 0.0


def _correlate(templates, windows, size, span):
    """sum_t T[t] W[t + s] for s in [0, span)^2 by real FFTs of length ``size``.

    The transforms skip what is known to be zero or not needed: the template's
    padding rows on the way in, the rows beyond ``span`` on the way out.
    """
    spectrum_t = scipy.fft.fft(scipy.fft.rfft(templates, n=size, axis=2, workers=1), n=size,
                               axis=1, workers=1, overwrite_x=True)
    spectrum = scipy.fft.rfft2(windows, s=(size, size), workers=1)
    np.conjugate(spectrum_t, out=spectrum_t)
    spectrum *= spectrum_t
    columns = scipy.fft.ifft(spectrum, axis=1, workers=1, overwrite_x=True)[:, :span]
    return scipy.fft.irfft(columns, n=size, axis=2, workers=1)[:, :, :span]


def zncc_scores(templates, windows, out):
    """Zero-mean NCC of every template at every position inside its window.

    Parameters
    ----------
    templates : float32 ndarray, (B, P, P)
    windows : float32 ndarray, (B, W, W) with W >= P
    out : float32 ndarray, (B, W - P + 1, W - P + 1)
        ``out[b, dy, dx]`` is the NCC of ``templates[b]`` with
        ``windows[b, dy:dy + P, dx:dx + P]``; 0 where either is flat.
    """
    batch, p, _ = templates.shape
    w = windows.shape[1]
    size = _fft_size(w)
    span = w - p + 1
    centred = templates - templates.mean(axis=(1, 2), keepdims=True, dtype=np.float64)
    centred = centred.astype(np.float32)
    norms = np.sqrt(np.einsum("bij,bij->b", centred, centred, dtype=np.float64))
    numerator = np.empty((batch, span, span), np.float32)
    for start in range(0, batch, FFT_BATCH):
        stop = min(batch, start + FFT_BATCH)
        block = windows[start:stop]
        shifted = block - block[:, w // 2: w // 2 + 1, w // 2: w // 2 + 1]
        numerator[start:stop] = _correlate(centred[start:stop], shifted, size, span)
    _normalise(numerator, windows, norms, out)


@numba.njit(cache=True, inline="always")
def _cubic_weight(t):
    """Keys cubic convolution kernel, a = -0.5."""
    t = abs(t)
    if t < 1.0:
        return (1.5 * t - 2.5) * t * t + 1.0
    if t < 2.0:
        return ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0
    return 0.0


@numba.njit(cache=True)
def _sample(image, y, x, order, fill):
    ny, nx = image.shape
    if not (-0.5 <= y <= ny - 0.5 and -0.5 <= x <= nx - 0.5):
        return fill
    y = min(max(y, 0.0), ny - 1.0)
    x = min(max(x, 0.0), nx - 1.0)
    y0 = int(math.floor(y))
    x0 = int(math.floor(x))
    fy = y - y0
    fx = x - x0
    if order == 1:
        y1 = min(y0 + 1, ny - 1)
        x1 = min(x0 + 1, nx - 1)
        top = (1.0 - fx) * image[y0, x0] + fx * image[y0, x1]
        bottom = (1.0 - fx) * image[y1, x0] + fx * image[y1, x1]
        return (1.0 - fy) * top + fy * bottom
    total = 0.0
    for j in range(-1, 3):
        wy = _cubic_weight(fy - j)
        yy = min(max(y0 + j, 0), ny - 1)
        row = 0.0
        for i in range(-1, 3):
            xx = min(max(x0 + i, 0), nx - 1)
            row += _cubic_weight(fx - i) * image[yy, xx]
        total += wy * row
    return total


@numba.njit(parallel=True, cache=True)
def remap(image, coord_y, coord_x, order, fill, out):
    """out[i, j] = image sampled at (coord_y[i, j], coord_x[i, j]) (pixels).

    ``order`` 1 is bilinear, 3 bicubic (Keys, edge pixels repeated); points more
    than half a pixel outside the image get ``fill``.
    """
    for i in numba.prange(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = _sample(image, np.float64(coord_y[i, j]), np.float64(coord_x[i, j]),
                                order, fill)
