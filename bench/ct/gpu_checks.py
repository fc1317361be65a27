"""GPU checks of the CT patch kernels (``medhpc/ct/augment_{cpu,cuda}.py``) for bench/gpu_check.py."""

import numpy as np

# size -> (case shape z,y,x, patch shape z,y,x)
SIZES = {"smoke": ((6, 7, 8), (4, 5, 6)), "check": ((48, 64, 64), (32, 32, 32)),
         "time": ((256, 256, 256), (128, 128, 128))}


def _transform(rng, case, patch):
    """A rotated, scaled and flipped patch around a voxel inside the case, plus a displacement."""
    angles = rng.uniform(-0.3, 0.3, 3)
    cz, sz = np.cos(angles[0]), np.sin(angles[0])
    cx, sx = np.cos(angles[2]), np.sin(angles[2])
    rotation = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]]) @ \
        np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])
    matrix = (rotation * rng.uniform(0.85, 1.2) @ np.diag([1.0, -1.0, 1.0])).astype(np.float32)
    centre = np.array(case) / 2 + rng.uniform(-2, 2, 3)
    offset = (centre - matrix @ ((np.array(patch) - 1) / 2)).astype(np.float32)
    displacement = rng.normal(0, 1.5, (3, 4, 4, 4)).astype(np.float32)
    return np.ascontiguousarray(matrix), offset, displacement


def _warp_image(rng, size):
    case, patch = SIZES[size]
    matrix, offset, displacement = _transform(rng, case, patch)
    return [rng.normal(size=case).astype(np.float32), matrix, offset, displacement,
            np.float32(-2.0), np.zeros(patch, np.float32)]


def _warp_labels(rng, size):
    case, patch = SIZES[size]
    matrix, offset, displacement = _transform(rng, case, patch)
    return [rng.integers(0, 4, case, dtype=np.uint8), matrix, offset, displacement,
            np.zeros(patch, np.uint8)]


def _hu(rng, size):
    case = SIZES[size][0]
    return (rng.normal(0, 400, case)).astype(np.float32)


def checks(Check):
    """The CT kernel checks (``Check`` is bench/gpu_check.py's class)."""
    voxels = lambda args: args[-1].size  # noqa: E731
    return [
        Check("ct warp_image", "medhpc.ct", "augment", "warp_image", _warp_image,
              outputs=(5,), tolerance=1e-4, work=voxels, unit="voxels"),
        # nearest-voxel labels may differ where a point falls within rounding of a voxel border
        Check("ct warp_labels", "medhpc.ct", "augment", "warp_labels", _warp_labels,
              outputs=(4,), tolerance=1.0, work=voxels, unit="voxels"),
        Check("ct normalise_hu", "medhpc.ct", "augment", "normalise_hu",
              lambda rng, size: [_hu(rng, size), np.float32(-200), np.float32(500),
                                 np.float32(100), np.float32(50),
                                 np.zeros(SIZES[size][0], np.float32)],
              outputs=(5,), work=voxels, unit="voxels"),
        Check("ct scale_shift", "medhpc.ct", "augment", "scale_shift",
              lambda rng, size: [_hu(rng, size), np.float32(1.1), np.float32(-0.2)],
              outputs=(0,), work=lambda args: args[0].size, unit="voxels"),
    ]
