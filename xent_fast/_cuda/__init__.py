"""The CUDA backend: numba-cuda kernels on device arrays (imported only when used)."""
