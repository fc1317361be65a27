"""Sliding-window inference with Gaussian blending.

Windows of the training patch size tile the volume with a step of half a
window; each window's class probabilities are weighted by a Gaussian centred on
the window (sigma = 1/8 of its size), so voxels near window borders, which see
less context, count less; the sum is divided by the summed weights.
Volumes smaller than a window are padded with the background value. Test-time
mirroring (``mirror_axes``) averages each window's probabilities over every
combination of flips along those axes (8 for three axes), each flipped back; an
ensemble (:func:`segment_volume` with several models) averages the models'
probabilities before the argmax.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch


def gaussian_weights(patch_shape, sigma_fraction: float = 1 / 8) -> np.ndarray:
    """Separable Gaussian importance map of a window (peak 1, floored at 1e-3)."""
    axes = []
    for n in patch_shape:
        x = np.arange(n) - (n - 1) / 2
        sigma = max(n * sigma_fraction, 1e-3)
        axes.append(np.exp(-0.5 * (x / sigma) ** 2))
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(weights / weights.max(), 1e-3).astype(np.float32)


def window_starts(size: int, window: int, step_fraction: float = 0.5) -> list[int]:
    """Start indices of windows covering ``[0, size)`` with about ``step_fraction`` overlap."""
    if size <= window:
        return [0]
    count = int(np.ceil((size - window) / (window * step_fraction))) + 1
    return [int(round(v)) for v in np.linspace(0, size - window, count)]


def mirror_sets(mirror_axes) -> list[tuple]:
    """Every combination of flips along ``mirror_axes`` (spatial axes 0-2), no flip first."""
    axes = tuple(sorted(set(mirror_axes)))
    return [combo for r in range(len(axes) + 1) for combo in itertools.combinations(axes, r)]


def sliding_window_probabilities(model, image: np.ndarray, patch_shape, n_classes: int,
                                 device, fill: float, batch: int = 2,
                                 step_fraction: float = 0.5, amp: bool = False,
                                 mirror_axes=()) -> np.ndarray:
    """Class probabilities ``(C, z, y, x)`` of a normalised ``image`` by blended windows,
    averaged over the flips of ``mirror_axes`` (test-time mirroring)."""
    flips = [tuple(2 + axis for axis in combo) for combo in mirror_sets(mirror_axes)]
    shape = np.array(image.shape)
    padded_shape = np.maximum(shape, patch_shape)
    pad_before = (padded_shape - shape) // 2
    padded = np.full(padded_shape, fill, dtype=np.float32)
    inner = tuple(slice(b, b + n) for b, n in zip(pad_before, shape))
    padded[inner] = image
    weights = gaussian_weights(patch_shape)
    total = np.zeros((n_classes,) + tuple(padded_shape), dtype=np.float32)
    norm = np.zeros(tuple(padded_shape), dtype=np.float32)
    starts = list(itertools.product(*(window_starts(n, p, step_fraction)
                                      for n, p in zip(padded_shape, patch_shape))))
    weights_t = torch.from_numpy(weights).to(device)
    model.eval()
    with torch.no_grad():
        for first in range(0, len(starts), batch):
            group = starts[first: first + batch]
            windows = [tuple(slice(s, s + p) for s, p in zip(start, patch_shape))
                       for start in group]
            x = torch.from_numpy(np.stack([padded[w] for w in windows])[:, None]).to(device)
            mean = 0.0
            for dims in flips:
                flipped = torch.flip(x, dims) if dims else x
                with torch.autocast(device.type, enabled=amp, dtype=torch.float16
                                    if device.type == "cuda" else torch.bfloat16):
                    logits = model(flipped)
                p = torch.softmax(logits.float(), dim=1)
                mean = mean + (torch.flip(p, dims) if dims else p)
            probabilities = (mean / len(flips) * weights_t).cpu().numpy()
            for window, p in zip(windows, probabilities):
                total[(slice(None),) + window] += p
                norm[window] += weights
    total /= norm
    return total[(slice(None),) + inner]


def segment_volume(model, image: np.ndarray, patch_shape, n_classes: int, device, fill: float,
                   batch: int = 2, amp: bool = False, mirror_axes=()) -> np.ndarray:
    """Label map (uint8) of a normalised image: argmax of the blended probabilities.

    ``model`` may be a list of ``(model, patch_shape, amp)``: an ensemble (fold models),
    whose probabilities are averaged (``patch_shape`` and ``amp`` are then ignored).
    """
    members = model if isinstance(model, list) else [(model, patch_shape, amp)]
    total = None
    for network, patch, half in members:
        probabilities = sliding_window_probabilities(network, image, patch, n_classes, device,
                                                     fill, batch=batch, amp=half,
                                                     mirror_axes=mirror_axes)
        total = probabilities if total is None else total + probabilities
    return np.argmax(total, axis=0).astype(np.uint8)
