"""CUDA LDDMM kernels agree with their CPU twins (simulator pass)::

    NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/lddmm/test_kernels_cuda.py

PTX compilation of every kernel is covered by tests/test_ptx.py.
"""

import numpy as np
import pytest

from medhpc.lddmm import kernels_cpu

SHAPE = (5, 4, 6)
HALO, OWNED, Z_FIRST, NZ = 2, 3, 1, 5


def kernels_cuda():
    try:
        from medhpc.lddmm import kernels_cuda as module
    except ImportError as error:  # numba-cuda missing
        pytest.skip(f"numba.cuda is not importable: {error}")
    return module


def case(rng):
    plane = SHAPE[1:]
    return {
        "image": rng.random(SHAPE).astype(np.float32),
        "u": (rng.standard_normal((3, OWNED + 2 * HALO) + plane) * 0.8).astype(np.float32),
        "v": (rng.standard_normal((3, OWNED) + plane)).astype(np.float32),
        "j0": rng.random((OWNED + 2,) + plane).astype(np.float32),
        "j1": rng.random((OWNED,) + plane).astype(np.float32),
        "det": (rng.random((OWNED,) + plane) + 0.5).astype(np.float32),
        "gradient": rng.standard_normal((3, OWNED) + plane).astype(np.float32),
        "points": (rng.random((3, 40)) * np.array(SHAPE)[:, None] * 1.2 - 0.6).astype(np.float32),
        "sums": rng.random((5, OWNED) + plane) * 10.0,
        # intensities past both ends of [0, 1] reach the clamped bins too
        "m_mi": (rng.random((OWNED + 2,) + plane) * 1.2 - 0.1).astype(np.float32),
        "f_mi": (rng.random((OWNED + 2,) + plane) * 1.2 - 0.1).astype(np.float32),
        "weight": rng.random((OWNED,) + plane).astype(np.float32),
        "log_ratio": rng.standard_normal((12, 12)),
    }


CALLS = {
    "compose_displacement": (lambda c: [c["u"], c["v"], -0.7, HALO, Z_FIRST, NZ,
                                        np.zeros_like(c["u"])], 6),
    "warp_image": (lambda c: [c["image"], 0, NZ, c["u"], HALO, Z_FIRST,
                              np.zeros((OWNED + 2,) + SHAPE[1:], np.float32), 1], 6),
    "image_gradient": (lambda c: [c["j0"], 1, Z_FIRST, NZ,
                                  np.zeros((3, OWNED) + SHAPE[1:], np.float32)], 4),
    "jacobian_determinant": (lambda c: [c["u"], HALO, Z_FIRST, NZ,
                                        np.zeros((OWNED,) + SHAPE[1:], np.float32)], 4),
    "similarity_force": (lambda c: [c["gradient"], c["j0"], 1, c["j1"], c["det"], 2.0, -2.0,
                                    0.1, np.zeros((3, OWNED) + SHAPE[1:], np.float32)], 8),
    "sample_points": (lambda c: [c["image"], c["points"], 0, -1.0,
                                 np.zeros(40, np.float32)], 4),
    "sample_points_nearest": (lambda c: [c["image"], c["points"], 1, -1.0,
                                         np.zeros(40, np.float32)], 4),
    "filter_axis": (lambda c: [c["u"], 2, np.array([0.25, 0.5, 0.25]),
                               np.zeros_like(c["u"])], 3),
    "filter_axis_x": (lambda c: [c["u"], 3, np.array([0.1, 0.2, 0.4, 0.2, 0.1]),
                                 np.zeros_like(c["u"])], 3),
    "filter_planes": (lambda c: [c["u"], np.array([0.1, 0.2, 0.4, 0.2, 0.1]),
                                 np.zeros_like(c["u"])], 2),
    "filter_z": (lambda c: [c["u"], HALO, Z_FIRST, NZ, np.array([0.1, 0.2, 0.4, 0.2, 0.1]),
                            np.zeros((3, OWNED) + SHAPE[1:], np.float32)], 5),
    "window_sums": (lambda c: [c["u"][0], c["u"][1], HALO, Z_FIRST, NZ, 1,
                               np.zeros((5,) + c["u"].shape[1:]),
                               np.zeros((5, OWNED) + SHAPE[1:])], 7),
    "correlation_force": (lambda c: [np.abs(c["sums"]), c["j0"], c["j0"][::-1].copy(), 1,
                                     Z_FIRST, NZ, 27.0, 1e-3,
                                     np.zeros((3, OWNED) + SHAPE[1:], np.float32),
                                     np.zeros((OWNED,) + SHAPE[1:], np.float32)], 8),
    "joint_histogram": (lambda c: [c["m_mi"], c["f_mi"], 1, c["weight"],
                                   np.full((12, 12), np.nan)], 4),
    "mi_force": (lambda c: [c["m_mi"], c["f_mi"], 1, Z_FIRST, NZ, c["log_ratio"],
                            np.zeros((3, OWNED) + SHAPE[1:], np.float32)], 6),
}


@pytest.mark.cudasim
@pytest.mark.parametrize("name", sorted(CALLS))
def test_cuda_kernel_matches_cpu_twin(name):
    module = kernels_cuda()
    from numba import cuda

    make, out_index = CALLS[name]
    function = name.replace("_nearest", "").replace("filter_axis_x", "filter_axis")
    args = make(case(np.random.default_rng(7)))
    cpu_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    getattr(kernels_cpu, function)(*cpu_args)
    device_args = [cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in args]
    getattr(module, function)(*device_args)
    np.testing.assert_allclose(device_args[out_index].copy_to_host(), cpu_args[out_index],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.cudasim
@pytest.mark.parametrize("name", ["compose_displacement", "joint_histogram", "mi_force",
                                  "correlation_force"])
def test_host_staged_kernels_give_the_cpu_result(name):
    from medhpc.backend import HostStaged

    staged = HostStaged(kernels_cuda())
    make, out_index = CALLS[name]
    args = make(case(np.random.default_rng(8)))
    cpu_args = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
    getattr(kernels_cpu, name)(*cpu_args)
    getattr(staged, name)(*args)
    np.testing.assert_allclose(args[out_index], cpu_args[out_index], rtol=1e-5, atol=1e-5)
    if name == "correlation_force":  # its second output comes back too
        np.testing.assert_allclose(args[-1], cpu_args[-1], rtol=1e-5, atol=1e-5)
