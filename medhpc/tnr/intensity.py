"""Intensities of the output volume made alike between sections.

Staining strength, section thickness and scanning vary from section to
section, so a registered stack looks streaky in its side views. Each section's
tissue intensities are mapped channel by channel onto the stack's: the tissue
quantiles recorded while matching (:data:`medhpc.tnr.preprocess.QUANTILES`, at
the working level) are moved to the median quantiles of the sections that were
not flagged, piecewise linearly; black and full intensity (glass in brightfield)
stay where they are, so the background does not change.
"""

from __future__ import annotations

import numpy as np



class IntensityMaps:
    """Per-section, per-channel piecewise-linear intensity maps (input scale)."""

    def __init__(self, knots_in: np.ndarray | None, knots_out: np.ndarray | None):
        self.knots_in = knots_in     # (count, channels, K) or None (identity)
        self.knots_out = knots_out

    @classmethod
    def identity(cls) -> "IntensityMaps":
        return cls(None, None)

    @classmethod
    def from_statistics(cls, statistics: dict, count: int, weights: np.ndarray,
                        scale: float) -> "IntensityMaps":
        """Maps from every section's tissue quantiles onto the median of the full-weight
        sections' (``weights == 1``); sections without statistics keep their intensities.

        ``scale`` is the input's full intensity (255 for 8-bit).
        """
        rows = [statistics.get(i, {}).get("quantiles") for i in range(count)]
        if not any(rows):
            return cls.identity()
        shape = np.asarray(next(r for r in rows if r)).shape
        quantiles = np.array([r if r else np.full(shape, np.nan) for r in rows], np.float64)
        reference_rows = [i for i in range(count) if rows[i] and weights[i] >= 1.0]
        if not reference_rows:
            reference_rows = [i for i in range(count) if rows[i]]
        reference = np.median(quantiles[reference_rows], axis=0)
        knots_in = np.empty((count, shape[0], shape[1] + 2))
        knots_out = np.empty_like(knots_in)
        for i in range(count):
            for c in range(shape[0]):
                source = quantiles[i, c] if rows[i] else reference[c]
                knots_in[i, c] = _increasing(np.concatenate([[0.0], source, [1.0]])) * scale
                knots_out[i, c] = _increasing(np.concatenate([[0.0], reference[c], [1.0]])) * scale
        return cls(knots_in, knots_out)

    def __call__(self, section: int, channel: int, values: np.ndarray) -> np.ndarray:
        """``values`` (any shape, input scale) of one channel of one section, mapped."""
        if self.knots_in is None:
            return values
        channel = min(channel, self.knots_in.shape[1] - 1)
        return np.interp(values, self.knots_in[section, channel],
                         self.knots_out[section, channel]).astype(values.dtype, copy=False)

    def to_arrays(self) -> dict:
        """The knots for a registration file (empty when the maps are the identity)."""
        if self.knots_in is None:
            return {}
        return {"knots_in": self.knots_in.astype(np.float32),
                "knots_out": self.knots_out.astype(np.float32)}


def _increasing(values: np.ndarray) -> np.ndarray:
    """Strictly increasing knots from nearly increasing ones."""
    values = np.clip(np.maximum.accumulate(values), 0.0, 1.0)
    return values + np.arange(len(values)) * 1e-7
