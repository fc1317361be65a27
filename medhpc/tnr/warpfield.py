"""Dense per-section warps from scattered correspondences, and their evaluation at any level.

A :class:`SectionWarp` maps output pixels to input pixels of one section. It
stores the displacement ``input - output`` on a coarse grid of working-level
output pixels (every ``step`` pixels), fitted by a thin-plate spline with
smoothing through the (output, input) point pairs of the section's
trajectories; between nodes it is bilinear. :meth:`SectionWarp.coordinates`
evaluates it for any block of output rows at any resolution (factor ``f``
between the output and the working level), which the tile-by-tile warp uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import RBFInterpolator

from medhpc.tnr import rigid

MIN_POINTS = 4
NEIGHBOURS = 64


@dataclass
class SectionWarp:
    """Output -> input map of one section on a coarse grid of working-level pixels."""

    shape: tuple              # working-level output shape (y, x)
    step: int                 # grid step in working pixels
    displacement: np.ndarray  # (gy, gx, 2) input - output, working pixels

    def coordinates(self, rows: slice, width: int, factor: float = 1.0,
                    columns: slice | None = None):
        """Input coordinates (y, x) of output rows ``rows`` of an image ``factor`` times finer
        than the working level, ``width`` pixels wide; float32 arrays (rows, width).
        ``columns`` (within ``width``) restricts them to one tile: (rows, columns)."""
        out_y = np.arange(rows.start, rows.stop, dtype=np.float64)
        columns = columns or slice(0, width)
        out_x = np.arange(columns.start, columns.stop, dtype=np.float64)
        weights_y = _linear_weights(((out_y + 0.5) / factor - 0.5) / self.step,
                                    self.displacement.shape[0])
        weights_x = _linear_weights(((out_x + 0.5) / factor - 0.5) / self.step,
                                    self.displacement.shape[1])
        coords = []
        for c, base in ((0, out_y[:, None]), (1, out_x[None, :])):
            node_values = np.ascontiguousarray(self.displacement[..., c], np.float32) * factor
            shift = weights_y @ node_values @ weights_x.T
            shift += base.astype(np.float32)
            coords.append(shift)
        return coords[0], coords[1]

    def dense(self) -> np.ndarray:
        """Displacement (2, y, x) at every working-level output pixel."""
        coord_y, coord_x = self.coordinates(slice(0, self.shape[0]), self.shape[1])
        yy, xx = np.mgrid[0:self.shape[0], 0:self.shape[1]]
        return np.stack([coord_y - yy, coord_x - xx]).astype(np.float32)


def _linear_weights(positions: np.ndarray, nodes: int) -> np.ndarray:
    """(len(positions), nodes) matrix of linear interpolation weights at fractional node
    positions, constant beyond the first and last node (the grid is separable, so a block
    of the field is two small matrix products)."""
    positions = np.clip(positions, 0.0, nodes - 1.0)
    below = np.minimum(np.floor(positions).astype(np.int64), max(nodes - 2, 0))
    fraction = positions - below
    weights = np.zeros((len(positions), nodes), np.float32)
    rows = np.arange(len(positions))
    weights[rows, below] = 1.0 - fraction
    if nodes > 1:
        weights[rows, below + 1] += fraction
    return weights


def _nodes(shape, step: int) -> np.ndarray:
    ys = np.arange(0, shape[0] + step, step, dtype=np.float64)
    xs = np.arange(0, shape[1] + step, step, dtype=np.float64)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], axis=1), (len(ys), len(xs))


def rigid_warp(matrix: np.ndarray, shape, step: int) -> SectionWarp:
    """The warp of a rigid transform (output pixel p -> input pixel matrix p)."""
    nodes, grid_shape = _nodes(shape, step)
    displacement = rigid.apply(matrix, nodes) - nodes
    return SectionWarp(tuple(shape), step, displacement.reshape(*grid_shape, 2))


def fitted_warp(output_points: np.ndarray, input_points: np.ndarray, shape, step: int,
                smoothing: float, fallback: np.ndarray) -> SectionWarp:
    """Thin-plate-spline warp through point pairs (NaN pairs skipped).

    ``smoothing`` is the spline's smoothing parameter (0 interpolates); with fewer
    than :data:`MIN_POINTS` pairs the rigid ``fallback`` matrix is used.
    """
    keep = np.all(np.isfinite(output_points), axis=1) & np.all(np.isfinite(input_points), axis=1)
    if np.count_nonzero(keep) < MIN_POINTS:
        return rigid_warp(fallback, shape, step)
    source, target = output_points[keep], input_points[keep]
    nodes, grid_shape = _nodes(shape, step)
    neighbours = NEIGHBOURS if len(source) > 4 * NEIGHBOURS else None
    spline = RBFInterpolator(source, target - source, kernel="thin_plate_spline",
                             smoothing=smoothing * len(source), degree=1, neighbors=neighbours)
    return SectionWarp(tuple(shape), step, spline(nodes).reshape(*grid_shape, 2))
