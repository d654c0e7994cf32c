"""The closing formulas of ``xent_fast/_formulas.py``, compiled for the CPU.

Compiled with ORDERED_JIT (no "reassoc", which would refold e.g. ``ls - (xt - m)`` into
``lse - x_t``), not inlined at Numba's level: an ``inline="always"`` function is
compiled with its caller's flags (the row loops' "reassoc"), whereas a call keeps these
flags on its instructions where LLVM inlines it, as it does these small functions.
"""

from numba import njit

from .. import _formulas as F
from .jit import ORDERED_JIT

nll_from = njit(**ORDERED_JIT)(F.nll_from)
ce_index_loss = njit(**ORDERED_JIT)(F.ce_index_loss)
ce_index_mass = njit(**ORDERED_JIT)(F.ce_index_mass)
ce_grad_scale = njit(**ORDERED_JIT)(F.ce_grad_scale)
ce_index_grad_terms = njit(**ORDERED_JIT)(F.ce_index_grad_terms)
ce_prob_loss = njit(**ORDERED_JIT)(F.ce_prob_loss)
kl_finish = njit(**ORDERED_JIT)(F.kl_finish)
kl_grad_scales = njit(**ORDERED_JIT)(F.kl_grad_scales)
bce_logits_loss = njit(**ORDERED_JIT)(F.bce_logits_loss)
bce_logits_grad = njit(**ORDERED_JIT)(F.bce_logits_grad)
log_split = njit(**ORDERED_JIT)(F.log_split)
kl_finish_logs = njit(**ORDERED_JIT)(F.kl_finish_logs)
