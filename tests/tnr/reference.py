"""Direct (definition-by-definition) references for the TNR kernels."""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def direct_zncc(templates, windows):
    """Pearson correlation of each template with every same-size block of its window (float64)."""
    p = templates.shape[1]
    blocks = sliding_window_view(windows.astype(np.float64), (p, p), axis=(1, 2))
    t = templates.astype(np.float64)
    t = t - t.mean(axis=(1, 2), keepdims=True)
    centred = blocks - blocks.mean(axis=(3, 4), keepdims=True)
    numerator = np.einsum("byxij,bij->byx", centred, t)
    variance = (centred ** 2).sum(axis=(3, 4)) * (t ** 2).sum(axis=(1, 2))[:, None, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = numerator / np.sqrt(variance)
    return np.where(variance > 1e-12, scores, 0.0)


def random_case(rng, batch, patch, window, flat=False):
    templates = rng.random((batch, patch, patch), dtype=np.float32)
    windows = (rng.random((batch, window, window), dtype=np.float32) * 3 + 10).astype(np.float32)
    # plant each template somewhere so that peaks near 1 are covered too
    for b in range(batch):
        y, x = rng.integers(0, window - patch + 1, 2)
        windows[b, y:y + patch, x:x + patch] = 2 * templates[b] + 5 + 0.1 * rng.random((patch, patch))
    if flat:
        templates[0] = 0.5
        windows[-1] = 7.0
    return templates, windows
