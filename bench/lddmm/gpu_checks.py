"""GPU checks of the LDDMM kernels (``medhpc/lddmm/kernels_{cpu,cuda}.py``) for
bench/gpu_check.py."""

import numpy as np

# size -> (global grid z,y,x, owned planes, halo, first owned plane, sample points)
SIZES = {"smoke": ((6, 5, 7), 3, 2, 1, 50), "check": ((64, 64, 64), 32, 3, 16, 100_000),
         "time": ((256, 256, 256), 256, 3, 0, 4_000_000)}


def _grid(size):
    shape, owned, halo, z_first, _ = SIZES[size]
    return shape, owned, halo, z_first


def _field(rng, channels, planes, plane, scale):
    return (rng.standard_normal((channels, planes) + plane) * scale).astype(np.float32)


def _compose(rng, size):
    shape, owned, halo, z_first = _grid(size)
    u = _field(rng, 3, owned + 2 * halo, shape[1:], 1.0)
    return [u, _field(rng, 3, owned, shape[1:], 2.0), -0.5, halo, z_first, shape[0],
            np.zeros_like(u)]


def _warp(rng, size):
    shape, owned, halo, z_first = _grid(size)
    return [rng.random(shape).astype(np.float32), 0, shape[0],
            _field(rng, 3, owned + 2 * halo, shape[1:], 1.5), halo, z_first,
            np.zeros((owned + 2,) + shape[1:], np.float32), 1]


def _gradient(rng, size):
    shape, owned, _, z_first = _grid(size)
    return [rng.random((owned + 2,) + shape[1:]).astype(np.float32), 1, z_first, shape[0],
            np.zeros((3, owned) + shape[1:], np.float32)]


def _jacobian(rng, size):
    shape, owned, halo, z_first = _grid(size)
    return [_field(rng, 3, owned + 2 * halo, shape[1:], 0.3), halo, z_first, shape[0],
            np.zeros((owned,) + shape[1:], np.float32)]


def _force(rng, size):
    shape, owned, _, _ = _grid(size)
    plane = shape[1:]
    return [_field(rng, 3, owned, plane, 1.0), rng.random((owned + 2,) + plane).astype(np.float32),
            1, rng.random((owned,) + plane).astype(np.float32),
            (rng.random((owned,) + plane) + 0.5).astype(np.float32), 2.0, -2.0, 0.1,
            np.zeros((3, owned) + plane, np.float32)]


def _sample(rng, size):
    shape, *_, points = SIZES[size]
    where = (rng.random((3, points)) * np.array(shape)[:, None] * 1.1 - 0.5).astype(np.float32)
    return [rng.random(shape).astype(np.float32), where, 0, -1.0, np.zeros(points, np.float32)]


def _taps():
    taps = np.exp(-0.5 * (np.arange(-4, 5) / 1.5) ** 2)
    return taps / taps.sum()


def _filter_axis(rng, size):
    shape, owned, halo, _ = _grid(size)
    field = _field(rng, 3, owned + 2 * halo, shape[1:], 1.0)
    return [field, 3, _taps(), np.zeros_like(field)]


def _filter_z(rng, size):
    shape, owned, halo, z_first = _grid(size)
    halo = max(halo, 4)
    return [_field(rng, 3, owned + 2 * halo, shape[1:], 1.0), halo, z_first, shape[0], _taps(),
            np.zeros((3, owned) + shape[1:], np.float32)]


def _window_sums(rng, size):
    shape, owned, halo, z_first = _grid(size)
    planes = (owned + 2 * halo,) + shape[1:]
    return [rng.random(planes).astype(np.float32), rng.random(planes).astype(np.float32), halo,
            z_first, shape[0], halo, np.zeros((5,) + planes), np.zeros((5, owned) + shape[1:])]


def _correlation(rng, size):
    shape, owned, halo, z_first = _grid(size)
    plane = shape[1:]
    moving = rng.random((owned + 2,) + plane).astype(np.float32)
    fixed = (0.5 * moving + 0.5 * rng.random(moving.shape)).astype(np.float32)
    sums = rng.random((5, owned) + plane) * 20.0 + 1.0
    return [sums, moving, fixed, 1, z_first, shape[0], 27.0, 1e-5,
            np.zeros((3, owned) + plane, np.float32), np.zeros((owned,) + plane, np.float32)]


def _mi_images(rng, size):
    """A middle-space pair with one ghost plane, related by a non-monotone map plus noise."""
    shape, owned, _, _ = _grid(size)
    moving = rng.random((owned + 2,) + shape[1:]).astype(np.float32)
    fixed = np.clip(np.sin(3.0 * moving) ** 2 + 0.1 * rng.standard_normal(moving.shape), 0, 1)
    return moving, fixed.astype(np.float32)


def _joint_histogram(rng, size):
    shape, owned, _, _ = _grid(size)
    moving, fixed = _mi_images(rng, size)
    return [moving, fixed, 1, rng.random((owned,) + shape[1:]).astype(np.float32),
            np.zeros((32, 32))]


def _mi_force(rng, size):
    from medhpc.lddmm import kernels_cpu
    from medhpc.lddmm.parzen import mutual_information

    shape, owned, _, z_first = _grid(size)
    moving, fixed = _mi_images(rng, size)
    joint = np.zeros((32, 32))
    kernels_cpu.joint_histogram(moving, fixed, 1, np.ones((owned,) + shape[1:], np.float32),
                                joint)
    return [moving, fixed, 1, z_first, shape[0], mutual_information(joint)[1],
            np.zeros((3, owned) + shape[1:], np.float32)]


def checks(Check):
    """The LDDMM kernel checks (``Check`` is bench/gpu_check.py's class)."""
    voxels = lambda args: args[-1].size  # noqa: E731
    owned_voxels = lambda args: args[1].size // 3  # noqa: E731
    return [
        Check("lddmm compose_displacement", "medhpc.lddmm", "kernels", "compose_displacement",
              _compose, outputs=(6,), tolerance=1e-4, work=owned_voxels, unit="voxels"),
        Check("lddmm warp_image", "medhpc.lddmm", "kernels", "warp_image", _warp,
              outputs=(6,), tolerance=1e-5, work=lambda args: args[6].size, unit="voxels"),
        Check("lddmm image_gradient", "medhpc.lddmm", "kernels", "image_gradient", _gradient,
              outputs=(4,), work=lambda args: args[4].size // 3, unit="voxels"),
        Check("lddmm jacobian_determinant", "medhpc.lddmm", "kernels", "jacobian_determinant",
              _jacobian, outputs=(4,), tolerance=1e-4, work=voxels, unit="voxels"),
        Check("lddmm similarity_force", "medhpc.lddmm", "kernels", "similarity_force", _force,
              outputs=(8,), tolerance=1e-5, work=lambda args: args[3].size, unit="voxels"),
        Check("lddmm sample_points", "medhpc.lddmm", "kernels", "sample_points", _sample,
              outputs=(4,), tolerance=1e-5, work=lambda args: args[1].shape[1], unit="points"),
        Check("lddmm filter_axis", "medhpc.lddmm", "kernels", "filter_axis", _filter_axis,
              outputs=(3,), tolerance=1e-5, work=voxels, unit="voxels"),
        Check("lddmm filter_z", "medhpc.lddmm", "kernels", "filter_z", _filter_z,
              outputs=(5,), tolerance=1e-5, work=voxels, unit="voxels"),
        Check("lddmm window_sums", "medhpc.lddmm", "kernels", "window_sums", _window_sums,
              outputs=(7,), tolerance=1e-6, work=lambda args: args[7].size // 5, unit="voxels"),
        Check("lddmm correlation_force", "medhpc.lddmm", "kernels", "correlation_force",
              _correlation, outputs=(8, 9), tolerance=1e-4, work=voxels, unit="voxels"),
        # float64 atomics in any order: the sums agree to round-off, relative to the total
        Check("lddmm joint_histogram", "medhpc.lddmm", "kernels", "joint_histogram",
              _joint_histogram, outputs=(4,), tolerance=1e-6,
              work=lambda args: args[3].size, unit="voxels"),
        Check("lddmm mi_force", "medhpc.lddmm", "kernels", "mi_force", _mi_force,
              outputs=(6,), tolerance=1e-4, work=lambda args: args[6].size // 3,
              unit="voxels"),
    ]
