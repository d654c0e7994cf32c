"""Numba options for every CPU kernel, and the fastmath policy, in one place.

Loops may re-associate (that is what lets the sums vectorise) but must keep the meaning
of inf and NaN: never "nnan"/"ninf" (``-inf`` logits are how users mask classes).
"""

LOOP_FLAGS = {"nsz", "arcp", "contract", "afn", "reassoc"}
# Helpers whose operation order is part of their accuracy (Cody-Waite range reduction,
# (v - m) * it, (k - 1) + rest): no "reassoc", which refolds them.
ORDERED_FLAGS = {"nsz", "arcp", "contract", "afn"}
# ... nor "contract" where a fused multiply-add changes the result (x * it - m * it).
EXACT_FLAGS = {"nsz", "arcp", "afn"}
# The batched drivers (drivers.py, few_classes.py), which backend.py compiles and caches.
KERNEL = dict(nogil=True, error_model="numpy", fastmath=LOOP_FLAGS, boundscheck=False)
# Row helpers are inlined at Numba's level into the driver that calls them, so that a
# driver is one function: one pass of typing over the variant it is (branches on its
# constants are dropped first: a forward driver never types gradient code), one LLVM
# module to optimise, one machine code.  Compiled as functions of their own, the
# helpers each paid Numba's whole pipeline, an LLVM optimisation and a machine code
# that only the driver's link used (a cold forward cross-entropy: 5.1 s -> 3.8 s).
# Inlining also spares a call that passes arrays an atomic reference-count round trip
# each, which cost tens of ns a row at short rows.  No cache=True on helpers: only the
# drivers are cached (see backend.py), so that a change to any helper can never be
# served stale from an unchanged caller's cache.
JIT = dict(KERNEL, inline="always")
INLINE = JIT
# Not inlined: an inlined function takes its caller's flags (the row loops'
# "reassoc"); as a call, its own flags stay on its instructions where LLVM inlines it.
ORDERED_JIT = dict(KERNEL, fastmath=ORDERED_FLAGS)
EXACT_JIT = dict(KERNEL, fastmath=EXACT_FLAGS)


def load_numba_math():
    """Import Numba's NumPy math registry without importing SciPy.

    ``numba.np.arraymath``, which Numba imports when it first compiles or loads a
    kernel, asks whether a BLAS is there by importing ``scipy.linalg`` (0.1 s, a fifth
    of a first call from a warm cache); these kernels call no BLAS.  Here the module is
    imported with that probe answered by whether SciPy is installed, which is what the
    probe decides (``np.dot`` in other jitted code still imports SciPy and checks its
    BLAS when it is compiled).  Nothing changes where Numba already loaded it.
    """
    import importlib
    import importlib.util
    import sys

    if "numba.np.arraymath" in sys.modules:
        return
    from numba.np import linalg

    probe = linalg.ensure_blas

    def installed():
        if importlib.util.find_spec("scipy") is None:
            raise ImportError("scipy 0.16+ is required for linear algebra")

    linalg.ensure_blas = installed
    try:
        importlib.import_module("numba.np.arraymath")
    finally:
        linalg.ensure_blas = probe
