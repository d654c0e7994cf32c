"""The CPU backend: Numba kernels, serial (``"cpu"``) or on threads (``"parallel"``)."""
