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
from numba.core.imputils import impl_ret_borrowed, impl_ret_new_ref
from numba.extending import intrinsic, overload

from .jit import JIT
from .mathfns import bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits, imin

HK_NONE, HK_F16, HK_BF16 = 0, 1, 2


# work_row, half_work_row and unit_row are intrinsics: as overloads each was compiled
# as a function of its own per type (Numba's whole pipeline and an LLVM module for a
# line), and np.empty three more (its overload, the array allocator and its
# trampoline), a quarter second of a cold first call.
def _new_row(context, builder, dtype, n):
    """A new 'C' row of ``n`` (an intp value) uninitialised ``dtype`` values, as np.empty
    allocates it, with a MemoryError where the allocation fails."""
    from numba.np.arrayobj import populate_array

    arrty = types.Array(dtype, 1, "C")
    ary = context.make_array(arrty)(context, builder)
    itemsize = context.get_constant(types.intp,
                                    context.get_abi_sizeof(context.get_data_type(dtype)))
    meminfo = context.nrt.meminfo_alloc_aligned(
        builder, builder.mul(n, itemsize), context.get_preferred_array_alignment(dtype))
    with cgutils.if_unlikely(builder, cgutils.is_null(builder, meminfo)):
        context.call_conv.return_user_exc(builder, MemoryError, ("cannot allocate a work row",))
    data = context.nrt.meminfo_data(builder, meminfo)
    populate_array(ary, data=builder.bitcast(data, ary.data.type), shape=[n],
                   strides=[itemsize], itemsize=itemsize, meminfo=meminfo)
    return impl_ret_new_ref(context, builder, arrty, ary._getvalue())


def _row_request(x, n):
    return isinstance(x, types.Array) and isinstance(n, types.Integer)


@intrinsic
def work_row(typingctx, x, n):
    """An uninitialised row of ``n`` values in the compute dtype of ``x``."""
    if not _row_request(x, n):
        return None
    dt = types.float32 if x.dtype in (types.uint16, types.float32) else types.float64

    def codegen(context, builder, sig, args):
        return _new_row(context, builder, dt,
                        context.cast(builder, args[1], sig.args[1], types.intp))

    return types.Array(dt, 1, "C")(x, n), codegen


@intrinsic
def half_work_row(typingctx, x, n):
    """A work row of ``n`` float32 values when ``x`` holds half floats, else an empty one
    of ``x``'s dtype."""
    if not _row_request(x, n):
        return None
    half = x.dtype == types.uint16
    dt = types.float32 if half else x.dtype

    def codegen(context, builder, sig, args):
        n = (context.cast(builder, args[1], sig.args[1], types.intp) if half
             else context.get_constant(types.intp, 0))
        return _new_row(context, builder, dt, n)

    return types.Array(dt, 1, "C")(x, n), codegen


@intrinsic
def unit_row(typingctx, row):
    """A 1-D row of a kernel array (unit element stride by the API's contract) typed as
    'C': the API passes rows of any row stride but unit element stride, and loops over
    an 'A'-layout row do not vectorise."""
    if not isinstance(row, types.Array) or row.ndim != 1:
        return None
    ret = row.copy(layout="C")

    def codegen(context, builder, sig, args):
        return _as_c(context, builder, sig.args[0], ret, args[0])

    return ret(row), codegen


def _as_c(context, builder, fromty, toty, row):
    src = context.make_array(fromty)(context, builder, row)
    dst = context.make_array(toty)(context, builder)
    for field in ("meminfo", "parent", "nitems", "itemsize", "data", "shape", "strides"):
        setattr(dst, field, getattr(src, field))
    return impl_ret_borrowed(context, builder, toty, dst._getvalue())


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


# load_row, grad_row and store_grad_row are intrinsics too: for float rows they are
# no code at all (a retyped or the same row, nothing to store); only half rows compile
# their widening and narrowing loops, as functions of their own.
def _widen(xrow, work, hk):
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


def _narrow(grow, gr, hk):
    if hk == HK_F16:
        for j in range(grow.shape[0]):
            grow[j] = f32_to_f16_bits(gr[j])
    else:
        for j in range(grow.shape[0]):
            grow[j] = f32_to_bf16_bits(gr[j])


def _row_args(row, work):
    return (isinstance(row, types.Array) and row.ndim == 1 and isinstance(work, types.Array)
            and work.ndim == 1 and work.layout == "C")


@intrinsic
def load_row(typingctx, xrow, work, hk):
    """The row as compute-dtype floats: itself (typed 'C'), or widened into ``work``."""
    if not (_row_args(xrow, work) and isinstance(hk, types.Integer)):
        return None
    half = xrow.dtype == types.uint16
    ret = work if half else xrow.copy(layout="C")

    def codegen(context, builder, sig, args):
        if half:
            return context.compile_internal(builder, _widen, sig, args)
        return _as_c(context, builder, sig.args[0], ret, args[0])

    return ret(xrow, work, hk), codegen


@intrinsic
def grad_row(typingctx, grow, work):
    """Where to compute a gradient row: in place, or in a float32 work row for halves."""
    if not _row_args(grow, work):
        return None
    half = grow.dtype == types.uint16
    ret = work if half else grow

    def codegen(context, builder, sig, args):
        if not half:
            return impl_ret_borrowed(context, builder, ret, args[0])
        from numba.np.arrayobj import populate_array  # as in row_at

        g = context.make_array(sig.args[0])(context, builder, args[0])
        w = context.make_array(sig.args[1])(context, builder, args[1])
        out = context.make_array(ret)(context, builder)
        n, room = (cgutils.unpack_tuple(builder, a.shape, 1)[0] for a in (g, w))
        n = builder.select(builder.icmp_signed("<", n, room), n, room)  # as work[:n]
        populate_array(out, data=w.data, shape=[n], strides=[w.itemsize], itemsize=w.itemsize,
                       meminfo=w.meminfo)
        return impl_ret_borrowed(context, builder, ret, out._getvalue())

    return ret(grow, work), codegen


@intrinsic
def store_grad_row(typingctx, grow, gr, hk):
    """Narrow a float32 gradient row into half storage (no-op for float storage)."""
    if not (_row_args(grow, gr) and isinstance(hk, types.Integer)):
        return None
    half = grow.dtype == types.uint16

    def codegen(context, builder, sig, args):
        if half:
            context.compile_internal(builder, _narrow, sig, args)
        return context.get_dummy_value()

    return types.none(grow, gr, hk), codegen


@njit(**JIT)
def block_bounds(b, nblocks, n):
    return (b * n) // nblocks, ((b + 1) * n) // nblocks


@njit(**JIT)
def task_bounds(task, ncb, colblock, c):
    """Row and column range of elementwise task ``task`` (``ncb`` column blocks a row)."""
    lo = (task % ncb) * colblock
    return task // ncb, lo, imin(lo + colblock, c)
