"""Reading and writing rows in their storage dtype, for the CPU backends.

float16 and bfloat16 arrays reach the kernels as uint16 bit patterns (Numba has no
half-precision type on the CPU).  A half row is widened into a float32 work row, the
float32 row kernel runs on it, and a gradient row is narrowed back with round to
nearest even: only one row at a time is ever held in float32.  ``hk`` says which
half format a uint16 array holds: 1 for float16, 2 for bfloat16 (0 for none).
"""

import numpy as np
from numba import njit, types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic, overload

from .jit import JIT
from .mathfns import bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits

HK_NONE, HK_F16, HK_BF16 = 0, 1, 2


def work_row(x, n):
    """An uninitialised row of ``n`` values in the compute dtype of ``x``."""


@overload(work_row, jit_options=JIT)
def _work_row(x, n):
    dt = types.float32 if x.dtype in (types.uint16, types.float32) else types.float64
    return lambda x, n: np.empty(n, dt)


def half_work_row(x, n):
    """A work row of ``n`` float32 values when ``x`` holds half floats, else an empty one."""


@overload(half_work_row, jit_options=JIT)
def _half_work_row(x, n):
    if x.dtype == types.uint16:
        return lambda x, n: np.empty(n, np.float32)
    dt = x.dtype
    return lambda x, n: np.empty(0, dt)


@intrinsic
def _as_unit_stride(typingctx, row):
    """The same 1-D row typed as contiguous: the API passes rows of any row stride but
    unit element stride, and loops over an 'A'-layout row do not vectorise."""
    if not isinstance(row, types.Array) or row.ndim != 1:
        return None
    ret = row.copy(layout="C")

    def codegen(context, builder, sig, args):
        src = context.make_array(sig.args[0])(context, builder, args[0])
        dst = context.make_array(ret)(context, builder)
        for field in ("meminfo", "parent", "nitems", "itemsize", "data", "shape", "strides"):
            setattr(dst, field, getattr(src, field))
        return impl_ret_borrowed(context, builder, ret, dst._getvalue())

    return ret(row), codegen


@intrinsic
def row_at(typingctx, x, i):
    """Row ``i`` of the 2-D kernel array ``x`` as a 'C' row (unit element stride by the
    API's contract), borrowed: it has no meminfo, so passing it on costs no atomic
    reference-count updates."""
    if not (isinstance(x, types.Array) and x.ndim == 2 and isinstance(i, types.Integer)):
        return None
    ret = types.Array(x.dtype, 1, "C", readonly=not x.mutable)

    def codegen(context, builder, sig, args):
        # Imported here: only a compile needs it, and it is 0.05 s of a warm start.
        from numba.np.arrayobj import populate_array

        src = context.make_array(sig.args[0])(context, builder, args[0])
        dst = context.make_array(ret)(context, builder)
        i = context.cast(builder, args[1], sig.args[1], types.intp)
        shape = cgutils.unpack_tuple(builder, src.shape, 2)
        strides = cgutils.unpack_tuple(builder, src.strides, 2)
        base = builder.ptrtoint(src.data, cgutils.intp_t)
        data = builder.inttoptr(builder.add(base, builder.mul(i, strides[0])), src.data.type)
        populate_array(dst, data=data, shape=[shape[1]], strides=[src.itemsize],
                       itemsize=src.itemsize, meminfo=None)
        return dst._getvalue()

    return ret(x, i), codegen


def unit_row(row):
    """A row of a kernel array (unit element stride by the API's contract) as 'C'."""


@overload(unit_row, jit_options=JIT)
def _unit_row(row):
    if row.layout == "C":
        return lambda row: row
    return lambda row: _as_unit_stride(row)


def unit_slice(a2, i, lo, hi, on):
    """``a2[i, lo:hi]`` as a unit-stride row (empty unless ``on``): itself where ``a2`` is
    C-contiguous, else a copy.  Weights broadcast over the input (a per-class weight
    or pos_weight: zero strides) gave a strided row, over which the loss loop stayed
    scalar: 10x slower than with the weights in full."""


@overload(unit_slice, jit_options=JIT)
def _unit_slice(a2, i, lo, hi, on):
    if a2.layout == "C":
        return lambda a2, i, lo, hi, on: a2[i, lo:hi] if on else a2[0, :0]

    def copy(a2, i, lo, hi, on):
        out = np.empty(hi - lo if on else 0, a2.dtype)
        if on:
            src = a2[i, lo:hi]
            for j in range(hi - lo):
                out[j] = src[j]
        return out
    return copy


def load_row(xrow, work, hk):
    """The row as compute-dtype floats: itself, or widened into ``work``."""


@overload(load_row, jit_options=JIT)
def _load_row(xrow, work, hk):
    if xrow.dtype == types.uint16:
        def impl(xrow, work, hk):
            xrow = unit_row(xrow)
            n = xrow.shape[0]
            out = work[:n]
            if hk == HK_F16:
                for j in range(n):
                    out[j] = f16_bits_to_f32(xrow[j])
            else:
                for j in range(n):
                    out[j] = bf16_bits_to_f32(xrow[j])
            return out
        return impl
    return lambda xrow, work, hk: unit_row(xrow)


def grad_row(grow, work):
    """Where to compute a gradient row: in place, or in a float32 work row for halves."""


@overload(grad_row, jit_options=JIT)
def _grad_row(grow, work):
    if grow.dtype == types.uint16:
        return lambda grow, work: work[:grow.shape[0]]
    return lambda grow, work: grow


def store_grad_row(grow, gr, hk):
    """Narrow a float32 gradient row into half storage (no-op for float storage)."""


@overload(store_grad_row, jit_options=JIT)
def _store_grad_row(grow, gr, hk):
    if grow.dtype == types.uint16:
        def impl(grow, gr, hk):
            if hk == HK_F16:
                for j in range(grow.shape[0]):
                    grow[j] = f32_to_f16_bits(gr[j])
            else:
                for j in range(grow.shape[0]):
                    grow[j] = f32_to_bf16_bits(gr[j])
        return impl
    return lambda grow, gr, hk: None


@njit(**JIT)
def block_bounds(b, nblocks, n):
    return (b * n) // nblocks, ((b + 1) * n) // nblocks


@njit(**JIT)
def task_bounds(task, ncb, colblock, c):
    """Row and column range of elementwise task ``task`` (``ncb`` column blocks a row)."""
    lo = (task % ncb) * colblock
    return task // ncb, lo, min(lo + colblock, c)
