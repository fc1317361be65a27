"""Run the CUDA kernels on host arrays: copy in, launch, copy the output back.

The registration keeps its fields in host memory (the distributed FFT and the halo
exchange work on NumPy arrays); with ``--device cuda`` each kernel call moves its
arrays to the GPU and the arrays it writes back: ``out``, and for kernels with more
than one output the parameters the module's ``WRITTEN`` table names. Correct on any
GPU, but bound by the host-device copies (see docs/lddmm.md, limitations).
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
        parameters = list(inspect.signature(launcher).parameters)
        written = getattr(self._module, "WRITTEN", {}).get(name, ("out",))
        positions = [parameters.index(parameter) for parameter in written]

        def staged(*args):
            from numba import cuda

            device_args = [cuda.to_device(a) if isinstance(a, np.ndarray) else a for a in args]
            launcher(*device_args)
            for position in positions:
                device_args[position].copy_to_host(args[position])

        return staged
