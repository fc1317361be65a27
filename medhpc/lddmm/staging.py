"""Run the CUDA kernels on host arrays: copy in, launch, copy the output back.

The registration keeps its fields in host memory (the distributed FFT and the halo
exchange work on NumPy arrays); with ``--device cuda`` each kernel call moves its
arrays to the GPU and its ``out`` array back. Correct on any GPU, but bound by the
host-device copies (see docs/lddmm.md, limitations).
"""

from __future__ import annotations

import inspect

import numpy as np


class HostStaged:
    """The launchers of a CUDA kernel module, callable with NumPy arrays."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        launcher = getattr(self._module, name)
        out_position = list(inspect.signature(launcher).parameters).index("out")

        def staged(*args):
            from numba import cuda

            device_args = [cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in args]
            launcher(*device_args)
            device_args[out_position].copy_to_host(args[out_position])

        return staged
