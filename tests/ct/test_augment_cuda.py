"""CUDA twins of the patch kernels: PTX for cc 7.5/9.0, and agreement with the CPU twins in the
simulator (``NUMBA_ENABLE_CUDASIM=1 python -m pytest -m cudasim tests/ct``)."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from medhpc.backend import cuda_simulator_active
from medhpc.ct import augment_cpu

KERNELS = ["warp_image", "warp_labels", "normalise_hu", "scale_shift"]
_SPEC = importlib.util.spec_from_file_location(
    "ct_gpu_checks", Path(__file__).resolve().parents[2] / "bench" / "ct" / "gpu_checks.py")
gpu_checks = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gpu_checks)


def augment_cuda():
    try:
        from medhpc.ct import augment_cuda as module
    except ImportError as error:
        pytest.skip(f"numba.cuda is not importable: {error}")
    return module


def test_every_kernel_has_a_ptx_signature_and_a_cpu_twin():
    module = augment_cuda()
    assert set(module.PTX_SIGNATURES) == set(KERNELS)
    for name in KERNELS:
        assert callable(getattr(module, name)) and callable(getattr(augment_cpu, name))


@pytest.mark.cudasim
@pytest.mark.parametrize("name", KERNELS)
def test_cuda_twin_matches_the_cpu_kernel(name):
    assert cuda_simulator_active()
    module = augment_cuda()
    rng = np.random.default_rng(9)
    make = {"warp_image": gpu_checks._warp_image, "warp_labels": gpu_checks._warp_labels,
            "normalise_hu": lambda r, s: [gpu_checks._hu(r, s), np.float32(-200),
                                          np.float32(500), np.float32(100), np.float32(50),
                                          np.zeros(gpu_checks.SIZES[s][0], np.float32)],
            "scale_shift": lambda r, s: [gpu_checks._hu(r, s), np.float32(1.1),
                                         np.float32(-0.2)]}[name]
    for _ in range(2):
        arguments = make(rng, "smoke")
        cpu_arguments = [a.copy() if isinstance(a, np.ndarray) else a for a in arguments]
        getattr(augment_cpu, name)(*cpu_arguments)
        getattr(module, name)(*arguments)
        output = -1 if name != "scale_shift" else 0
        if name == "warp_labels":
            assert np.mean(arguments[output] == cpu_arguments[output]) > 0.97
        else:
            np.testing.assert_allclose(arguments[output], cpu_arguments[output], rtol=1e-5,
                                       atol=1e-5)


@pytest.mark.cudasim
def test_cuda_warp_is_an_exact_crop_and_flip():
    module = augment_cuda()
    source = np.random.default_rng(1).random((5, 6, 7), dtype=np.float32)
    out = np.zeros((3, 4, 5), np.float32)
    matrix = np.diag([1.0, 1.0, -1.0]).astype(np.float32)
    offset = np.array([1, 2, 5], np.float32)
    module.warp_image(source, matrix, offset, np.zeros((3, 1, 1, 1), np.float32),
                      np.float32(0), out)
    np.testing.assert_allclose(out, source[1:4, 2:6, 1:6][:, :, ::-1], atol=1e-6)
