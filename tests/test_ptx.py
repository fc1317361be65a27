"""Every CUDA kernel in medhpc compiles to PTX for the compute capabilities we ship for.

Runs without a GPU: numba-cuda's NVVM wheel does the compilation. Each
``*_cuda.py`` kernel module lists its kernels in ``PTX_SIGNATURES``.
"""

import importlib
import pkgutil

import pytest

import medhpc
from tests.helpers import requires_numba_cuda

CAPABILITIES = [(7, 5), (9, 0)]


def cuda_kernel_modules():
    names = [info.name for info in pkgutil.walk_packages(medhpc.__path__, "medhpc.")
             if info.name.endswith("_cuda")]
    return sorted(names)


def kernel_cases():
    cases = []
    for module_name in cuda_kernel_modules():
        cases.append(module_name)
    return cases


def test_kernel_modules_found():
    modules = cuda_kernel_modules()
    assert "medhpc.filters.kernels_cuda" in modules
    assert "medhpc.pet.em_cuda" in modules


@requires_numba_cuda
@pytest.mark.parametrize("capability", CAPABILITIES, ids=lambda cc: f"cc{cc[0]}{cc[1]}")
@pytest.mark.parametrize("module_name", kernel_cases())
def test_every_kernel_compiles_to_ptx(module_name, capability):
    from numba import cuda

    module = importlib.import_module(module_name)
    assert module.PTX_SIGNATURES, f"{module_name} lists no kernels"
    for name, (function, signature) in module.PTX_SIGNATURES.items():
        ptx, _ = cuda.compile_ptx(function, signature, cc=capability)
        assert f".target sm_{capability[0]}{capability[1]}" in ptx, name
        assert ".entry" in ptx or ".visible .entry" in ptx, name
