"""medhpc: MPI-parallel medical image processing on GPU supercomputers."""

__version__ = "0.1.0"
