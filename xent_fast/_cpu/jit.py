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
# No cache=True on helpers: only the batched drivers are cached (see backend.py), so
# that a change to any helper can never be served stale from an unchanged caller's cache.
JIT = dict(nogil=True, error_model="numpy", fastmath=LOOP_FLAGS, boundscheck=False)
# Per-row helpers are inlined at Numba's level: a call passes each array with an atomic
# reference-count round trip, which cost tens of ns a row at short rows.
INLINE = dict(JIT, inline="always")
ORDERED_JIT = dict(JIT, fastmath=ORDERED_FLAGS)
EXACT_JIT = dict(JIT, fastmath=EXACT_FLAGS)
