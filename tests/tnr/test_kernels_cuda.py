"""CUDA TNR kernels against their CPU twins in the simulator (NUMBA_ENABLE_CUDASIM=1)."""

import numpy as np
import pytest

from medhpc.tnr import kernels_cpu
from tests.tnr.reference import random_case


def kernels_cuda():
    try:
        from medhpc.tnr import kernels_cuda as module
    except ImportError as error:
        pytest.skip(f"numba.cuda is not importable: {error}")
    return module


def test_every_cuda_kernel_has_a_ptx_signature():
    module = kernels_cuda()
    assert set(module.PTX_SIGNATURES) == {"zncc_scores", "remap"}


@pytest.mark.cudasim
@pytest.mark.parametrize("patch, window", [(5, 9), (36, 41)])
def test_zncc_matches_cpu_twin(patch, window):
    from numba import cuda

    module = kernels_cuda()
    rng = np.random.default_rng(patch)
    templates, windows = random_case(rng, 2, patch, window, flat=patch == 5)
    span = window - patch + 1
    expected = np.zeros((2, span, span), np.float32)
    kernels_cpu.zncc_scores(templates, windows, expected)
    out = cuda.to_device(np.zeros((2, span, span), np.float32))
    module.zncc_scores(cuda.to_device(templates), cuda.to_device(windows), out)
    np.testing.assert_allclose(out.copy_to_host(), expected, atol=1e-4)


@pytest.mark.cudasim
@pytest.mark.parametrize("order", [1, 3])
def test_remap_matches_cpu_twin(order):
    from numba import cuda

    module = kernels_cuda()
    rng = np.random.default_rng(order)
    image = rng.random((9, 11), dtype=np.float32)
    coord_y = rng.uniform(-1, 9.5, (6, 7)).astype(np.float32)
    coord_x = rng.uniform(-1, 11.5, (6, 7)).astype(np.float32)
    expected = np.zeros((6, 7), np.float32)
    kernels_cpu.remap(image, coord_y, coord_x, order, -2.0, expected)
    out = cuda.to_device(np.zeros((6, 7), np.float32))
    module.remap(cuda.to_device(image), cuda.to_device(coord_y), cuda.to_device(coord_x), order,
                 -2.0, out)
    np.testing.assert_allclose(out.copy_to_host(), expected, atol=1e-5)


@pytest.mark.cudasim
def test_host_staged_kernels_take_host_arrays_of_any_layout_and_give_the_cpu_result():
    from medhpc.backend import HostStaged

    staged = HostStaged(kernels_cuda())
    rng = np.random.default_rng(5)
    image = rng.random((9, 11))  # float64, cast to the kernels' float32
    coord_y = np.asfortranarray(rng.uniform(-1, 9.5, (6, 7)))
    coord_x = rng.uniform(-1, 11.5, (7, 6)).T  # not contiguous
    expected = np.zeros((6, 7), np.float32)
    kernels_cpu.remap(image.astype(np.float32), np.ascontiguousarray(coord_y, np.float32),
                      np.ascontiguousarray(coord_x, np.float32), 3, -2.0, expected)
    out = np.zeros((7, 6), np.float32).T  # a strided output is written through
    staged.remap(image, coord_y, coord_x, 3, -2.0, out)
    np.testing.assert_allclose(out, expected, atol=1e-5)
    templates, windows = random_case(rng, 2, 5, 9, flat=False)
    scores, staged_scores = (np.zeros((2, 5, 5), np.float32) for _ in range(2))
    kernels_cpu.zncc_scores(templates, windows, scores)
    staged.zncc_scores(templates, windows, staged_scores)
    np.testing.assert_allclose(staged_scores, scores, atol=1e-4)
