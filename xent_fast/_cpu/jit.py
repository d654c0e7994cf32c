"""Numba options for every CPU kernel, and the fastmath policy, in one place; and how
Numba's compiler is readied for them (:func:`load_numba_math`).

Loops may re-associate (that is what lets the sums vectorise) but must keep the meaning
of inf and NaN: never "nnan"/"ninf" (``-inf`` logits are how users mask classes).
"""

import contextlib
import copy
import gc
import sys
import weakref

LOOP_FLAGS = {"nsz", "arcp", "contract", "afn", "reassoc"}
# Helpers whose operation order is part of their accuracy (Cody-Waite range reduction,
# (v - m) * it, (k - 1) + rest): no "reassoc", which refolds them.
ORDERED_FLAGS = {"nsz", "arcp", "contract", "afn"}
# ... nor "contract" where a fused multiply-add changes the result (x * it - m * it).
EXACT_FLAGS = {"nsz", "arcp", "afn"}
# The batched drivers (drivers.py, few_classes.py), which backend.py compiles and caches.
# No C-callable (cfunc) wrapper: Python calls a driver through its CPython wrapper, the
# threaded loop by its native address (see drivers.call_block); building, optimising and
# emitting a cfunc wrapper for each driver and helper was work for nothing.
KERNEL = dict(nogil=True, error_model="numpy", fastmath=LOOP_FLAGS, boundscheck=False,
              no_cfunc_wrapper=True)
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
    BLAS when it is compiled).  Nothing changes where Numba already loaded it.  Numba's
    inliner is made to copy less first (:class:`_SharedScopeCopy`).
    """
    import importlib
    import importlib.util
    import sys

    _share_scope_copies()
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


class _SharedScopeCopy:
    """Stands in for the ``copy`` module in Numba's inliner, copying a function's
    variable scope once per copy of its IR instead of once per block.

    To inline a function, Numba copies its IR block by block, each block with a
    ``copy.deepcopy`` of its own; every block refers to the function's one scope (all
    its variables), so every block copied the whole scope again: blocks x variables
    (a cold forward cross-entropy: 786 block copies, 338 000 variable copies, 1.1 s of
    its 4.5 s).  Here the blocks of one IR copy (they are copied in a row, by one call
    of Numba's ``copy_ir``, recognised by its new IR object) share one copy of the
    scope, as the blocks of the original share the original: the same variables, in
    the same structure, each copied once.  Anything else goes to ``copy`` unchanged,
    as does everything if Numba's inliner is not shaped as expected.
    """

    def __init__(self, ir):
        self._block = ir.Block
        # weak references to (the IR copy being filled, the scope, its copy): nothing
        # is kept alive once the inliner has done with them
        self._last = (_dead, _dead, _dead)

    def __getattr__(self, name):
        return getattr(copy, name)

    def deepcopy(self, x, memo=None):
        if memo is None and type(x) is self._block:
            owner = sys._getframe(1).f_locals.get("kernel_copy")
            if owner is not None:
                last_owner, scope, scope_copy = (ref() for ref in self._last)
                if last_owner is not owner or scope is not x.scope or scope_copy is None:
                    scope, scope_copy = x.scope, copy.deepcopy(x.scope)
                    self._last = tuple(weakref.ref(o) for o in (owner, scope, scope_copy))
                return copy.deepcopy(x, {id(scope): scope_copy})
        return copy.deepcopy(x, memo)


def _dead():
    return None


def _share_scope_copies():
    from numba.core import inline_closurecall, ir

    if getattr(inline_closurecall, "copy", None) is copy:
        inline_closurecall.copy = _SharedScopeCopy(ir)


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector off for the duration (as it was after).

    A compile allocates millions of small objects, and every few thousand the collector
    walks the young ones, and now and then everything, Numba's type registries included:
    a sixth of a cold first call (cross-entropy: 3.5 -> 3.0 s).  The cycles a compile
    leaves are collected after it, at the cost of 20 MB more at its peak.
    """
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
