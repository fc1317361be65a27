"""tnr-register's CUDA kernels for bench/gpu_check.py: ZNCC matching and remap."""

import numpy as np

# batch, patch, window (window = patch + 2 * search)
ZNCC_SIZES = {"smoke": (2, 5, 9), "check": (16, 32, 64), "time": (512, 64, 192)}
# input side, output side
REMAP_SIZES = {"smoke": (9, 7), "check": (256, 256), "time": (4096, 4096)}


def _zncc_args(rng, size):
    batch, patch, window = ZNCC_SIZES[size]
    templates = rng.random((batch, patch, patch), dtype=np.float32)
    windows = rng.random((batch, window, window), dtype=np.float32)
    span = window - patch + 1
    return [templates, windows, np.zeros((batch, span, span), np.float32)]


def _remap_args(rng, size, order):
    side, out = REMAP_SIZES[size]
    image = rng.random((side, side), dtype=np.float32)
    yy, xx = np.mgrid[0:out, 0:out].astype(np.float32) * np.float32(side / out)
    coord_y = (yy + rng.uniform(-1.5, 1.5, yy.shape)).astype(np.float32)
    coord_x = (xx + rng.uniform(-1.5, 1.5, xx.shape)).astype(np.float32)
    return [image, coord_y, coord_x, order, 0.0, np.zeros((out, out), np.float32)]


def checks(Check):
    """The TNR entries of the GPU check table."""
    return [
        Check("tnr zncc_scores", "medhpc.tnr", "kernels", "zncc_scores", _zncc_args,
              outputs=(2,), tolerance=1e-4, work=lambda args: args[0].shape[0], unit="patches"),
        Check("tnr remap bilinear", "medhpc.tnr", "kernels", "remap",
              lambda rng, size: _remap_args(rng, size, 1), outputs=(5,), tolerance=1e-5,
              work=lambda args: args[5].size, unit="pixels"),
        Check("tnr remap bicubic", "medhpc.tnr", "kernels", "remap",
              lambda rng, size: _remap_args(rng, size, 3), outputs=(5,), tolerance=1e-5,
              work=lambda args: args[5].size, unit="pixels"),
    ]
