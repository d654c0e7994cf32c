"""Device-side building blocks of the CUDA backend: numba-cuda import, vector loads,
bit casts, half-precision conversions and team reductions.

Imported only by ``kernels``, itself imported only when ``backend="cuda"`` is
used.  Under Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) every helper has a
pure-Python twin: the simulator runs kernels as Python threads and has neither LLVM
intrinsics nor warp shuffles.
"""

import importlib.util
import math

import numpy as np

from .. import _formulas as F

_EXTRA_HINT = "install the extra: pip install 'xent_fast[cuda]'"


def import_cuda():
    """``numba.cuda`` from numba-cuda, with NumPy 2.5's removal of ``row_stack`` bridged.

    numba-cuda 0.30 registers an overload of ``np.row_stack`` when its array module is
    imported; NumPy 2.5 no longer has that name, so the import (and with it every
    kernel compilation) fails.  The alias is put back only for that import.
    """
    if importlib.util.find_spec("numba_cuda") is None:
        raise ImportError("backend='cuda' needs the numba-cuda package; " + _EXTRA_HINT)
    added = not hasattr(np, "row_stack")
    if added:
        np.row_stack = np.vstack
    try:
        from numba import cuda
        if not cuda.config.ENABLE_CUDASIM:
            from numba.cuda.np import arrayobj  # noqa: F401  (registers its overloads now)
    finally:
        if added:
            del np.row_stack
    return cuda


cuda = import_cuda()
SIM = bool(cuda.config.ENABLE_CUDASIM)

if SIM:
    def f32_from_bits(u):
        return np.uint32(int(u) & 0xFFFFFFFF).view(np.float32)

    def bits_from_f32(f):
        return np.int64(np.float32(f).view(np.uint32))

    def _make_vec(v):
        def load_vec(row, k, buf, off):
            for i in range(v):
                buf[off + i] = row[k * v + i]

        def store_vec(row, k, buf, off):
            for i in range(v):
                row[k * v + i] = buf[off + i]

        return load_vec, store_vec

    def decode(v):
        if isinstance(v, np.uint16):
            return bf16_to_f32(v)
        return np.float64(v) if isinstance(v, np.float64) else np.float32(v)

    def encode(v, arr):
        if arr.dtype == np.uint16:
            return f32_to_bf16(v)
        return arr.dtype.type(v)
else:
    from llvmlite import ir
    from numba.cuda import cgutils, types
    from numba.cuda.extending import intrinsic, overload

    _I32 = ir.IntType(32)

    @intrinsic
    def f32_from_bits(typingctx, u):
        """The float32 whose bits are the low 32 bits of the integer ``u``."""
        if not isinstance(u, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            v = args[0]
            width = v.type.width
            if width > 32:
                v = builder.trunc(v, _I32)
            elif width < 32:
                v = builder.zext(v, _I32)
            return builder.bitcast(v, ir.FloatType())

        return types.float32(u), codegen

    @intrinsic
    def bits_from_f32(typingctx, f):
        """The bits of the float32 ``f`` as a non-negative int64."""
        if f != types.float32:
            return None

        def codegen(context, builder, sig, args):
            return builder.zext(builder.bitcast(args[0], _I32), ir.IntType(64))

        return types.int64(f), codegen

    def _make_vec(v):
        """Aligned loads and stores of ``v`` consecutive elements as one 8- or 16-byte
        memory instruction: elements ``k*v .. k*v + v - 1`` of a unit-stride row whose
        start is aligned to ``v`` elements, to or from ``buf[off:off + v]``."""

        def _ptr(context, builder, aryty, ary, idx, scale):
            idx = context.cast(builder, idx[0], idx[1], types.intp)
            if scale != 1:
                idx = builder.mul(idx, ir.Constant(idx.type, scale))
            return cgutils.get_item_pointer(context, builder, aryty, ary, [idx],
                                            wraparound=False)

        def _buf_ptr(context, builder, bty, b, o, i):
            """Pointer to ``buf[off + i]``."""
            return cgutils.get_item_pointer(context, builder, bty, b,
                                            [builder.add(o, ir.Constant(o.type, i))],
                                            wraparound=False)

        def _global(builder, ptr, rty, v):
            """The element pointer as a global-memory pointer to the whole vector: 16
            bytes of 8- or 16-bit elements as four 32-bit words (PTX has no v8 loads)."""
            bits = v * rty.dtype.bitwidth
            if bits == 128 and rty.dtype.bitwidth < 32:
                vty = ir.VectorType(_I32, 4)
            else:
                vty = ir.VectorType(ptr.type.pointee, v)
            return builder.addrspacecast(builder.bitcast(ptr, vty.as_pointer()),
                                         vty.as_pointer(1))

        @intrinsic
        def load_vec(typingctx, row, k, buf, off):
            if not (isinstance(row, types.Array) and isinstance(buf, types.Array)
                    and row.dtype == buf.dtype):
                return None

            def codegen(context, builder, sig, args):
                rty, kty, bty, oty = sig.args
                ary = context.make_array(rty)(context, builder, args[0])
                b = context.make_array(bty)(context, builder, args[2])
                ptr = _ptr(context, builder, rty, ary, (args[1], kty), v)
                ety = context.get_data_type(rty.dtype)
                width = rty.dtype.bitwidth
                gptr = _global(builder, ptr, rty, v)
                vec = builder.load(gptr, align=v * width // 8)
                if gptr.type.pointee.element == _I32 and width < 32:
                    # split the words by hand: a bitcast back to 16-bit lanes lets the
                    # backend narrow the load again
                    parts = []
                    for i in range(4):
                        word = builder.extract_element(vec, ir.Constant(_I32, i))
                        for sh in range(0, 32, width):
                            part = builder.lshr(word, ir.Constant(_I32, sh)) if sh else word
                            parts.append(builder.bitcast(
                                builder.trunc(part, ir.IntType(width)), ety))
                else:
                    parts = [builder.extract_element(vec, ir.Constant(_I32, i))
                             for i in range(v)]
                o = context.cast(builder, args[3], oty, types.intp)
                for i in range(v):
                    builder.store(parts[i], _buf_ptr(context, builder, bty, b, o, i))
                return context.get_dummy_value()

            return types.void(row, k, buf, off), codegen

        @intrinsic
        def store_vec(typingctx, row, k, buf, off):
            if not (isinstance(row, types.Array) and isinstance(buf, types.Array)
                    and row.dtype == buf.dtype):
                return None

            def codegen(context, builder, sig, args):
                rty, kty, bty, oty = sig.args
                ary = context.make_array(rty)(context, builder, args[0])
                b = context.make_array(bty)(context, builder, args[2])
                ptr = _ptr(context, builder, rty, ary, (args[1], kty), v)
                width = rty.dtype.bitwidth
                gptr = _global(builder, ptr, rty, v)
                o = context.cast(builder, args[3], oty, types.intp)
                vals = []
                for i in range(v):
                    vals.append(builder.load(_buf_ptr(context, builder, bty, b, o, i)))
                if gptr.type.pointee.element == _I32 and width < 32:
                    per = 32 // width
                    words = []
                    for i in range(4):
                        word = ir.Constant(_I32, 0)
                        for j in range(per):
                            bits = builder.zext(builder.bitcast(vals[i * per + j],
                                                                ir.IntType(width)), _I32)
                            if j:
                                bits = builder.shl(bits, ir.Constant(_I32, j * width))
                            word = builder.or_(word, bits)
                        words.append(word)
                    vals = words
                vec = ir.Constant(gptr.type.pointee, ir.Undefined)
                for i, val in enumerate(vals):
                    vec = builder.insert_element(vec, val, ir.Constant(_I32, i))
                builder.store(vec, gptr, align=v * width // 8)
                return context.get_dummy_value()

            return types.void(row, k, buf, off), codegen

        return load_vec, store_vec

    def decode(v):
        """An element as the compute type: float64 stays, bfloat16 bits (uint16) and
        float16 widen to float32."""

    def encode(v, arr):
        """A computed value as an element of ``arr`` (bfloat16 bits for uint16)."""

    @overload(decode, target="cuda")
    def _decode(v):
        if v == types.uint16:
            return lambda v: bf16_to_f32(v)
        if v == types.float64:
            return lambda v: v
        return lambda v: np.float32(v)

    @overload(encode, target="cuda")
    def _encode(v, arr):
        if arr.dtype == types.uint16:
            return lambda v, arr: f32_to_bf16(v)
        dt = arr.dtype
        return lambda v, arr: dt(v)

VEC = {v: _make_vec(v) for v in (1, 2, 4, 8)}

device = cuda.jit(device=True, inline=True) if not SIM else cuda.jit(device=True)

if SIM:
    def cast_like(c, v):
        return type(v)(c)
else:
    def cast_like(c, v):
        """``c`` as the type of the scalar ``v``: typed constants, where ``v - v + 1``
        is NaN for infinite ``v`` and a float literal widens float32 math."""

    @overload(cast_like, target="cuda")
    def _cast_like(c, v):
        dt = v
        return lambda c, v: dt(c)


# ---------------------------------------------------------------------------- formulas
# The closing formulas shared with the CPU kernels (xent_fast/_formulas.py), as device
# functions; under the simulator they run as the Python functions they are.
nll_from = device(F.nll_from)
ce_index_loss = device(F.ce_index_loss)
ce_index_mass = device(F.ce_index_mass)
ce_grad_scale = device(F.ce_grad_scale)
ce_index_grad_terms = device(F.ce_index_grad_terms)
ce_prob_loss = device(F.ce_prob_loss)
kl_finish = device(F.kl_finish)
kl_grad_scales = device(F.kl_grad_scales)
bce_logits_loss = device(F.bce_logits_loss)
bce_logits_grad = device(F.bce_logits_grad)
log_split = device(F.log_split)
kl_finish_logs = device(F.kl_finish_logs)

# Where the max carries nearly all of a row's mass (s = sum exp(x - max) below this),
# s = 1 + rest has lost the low digits of rest and log s with them: the kernels then
# take log s again through log_split, from a second pass over the row, as the CPU does
# (``CONCENTRATED`` in xent_fast/_cpu/reduce.py).
CONCENTRATED = 1.0625


# ---------------------------------------------------------------------------- halves
@device
def bf16_to_f32(b):
    return f32_from_bits(np.int64(b) << 16)


@device
def f32_to_bf16(f):
    """Round to nearest even, NaN kept quiet (as ml_dtypes and PyTorch)."""
    if f != f:
        return np.uint16(0x7FC0)
    u = bits_from_f32(np.float32(f))
    return np.uint16(((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF)


# ---------------------------------------------------------------------------- reductions
# A "team" of TS threads (a power of two) owns one row.  TS <= 32: teams live inside a
# warp and reduce with xor shuffles (no barrier).  TS > 32: the team is the whole block;
# warps reduce by shuffles, then through shared memory ``sm`` (>= 32 float64 slots).
# Every thread of the block must call a reduction, rows past the end included.
if SIM:  # device functions, so that the simulator gives them its fake ``cuda`` module
    @cuda.jit(device=True)
    def _tree(v, ts, sm, op):
        tid = cuda.threadIdx.x
        lane = tid % ts
        cuda.syncthreads()
        sm[tid] = v
        cuda.syncthreads()
        off = ts // 2
        while off > 0:
            if lane < off:
                sm[tid] = op(sm[tid], sm[tid + off])
            cuda.syncthreads()
            off //= 2
        r = sm[tid - lane]
        cuda.syncthreads()
        return type(v)(r)

    @cuda.jit(device=True)
    def team_sum(v, ts, sm):
        return _tree(v, ts, sm, lambda a, b: a + b)

    @cuda.jit(device=True)
    def team_max(v, ts, sm):
        return _tree(v, ts, sm, lambda a, b: a if a >= b or b != b else b)
else:
    _FULL = 0xFFFFFFFF

    @device
    def team_sum(v, ts, sm):
        off = min(ts, 32) // 2
        while off > 0:
            v += cuda.shfl_xor_sync(_FULL, v, off)
            off //= 2
        if ts <= 32:
            return v
        tid = cuda.threadIdx.x
        cuda.syncthreads()
        if tid % 32 == 0:
            sm[tid // 32] = v
        cuda.syncthreads()
        r = v - v
        for j in range(cuda.blockDim.x // 32):
            r += sm[j]
        return r

    @device
    def team_max(v, ts, sm):
        # comparisons that are false for NaN: a NaN never wins (NaNs are flagged apart)
        off = min(ts, 32) // 2
        while off > 0:
            o = cuda.shfl_xor_sync(_FULL, v, off)
            v = o if o > v else v
            off //= 2
        if ts <= 32:
            return v
        tid = cuda.threadIdx.x
        cuda.syncthreads()
        if tid % 32 == 0:
            sm[tid // 32] = v
        cuda.syncthreads()
        r = v
        for j in range(cuda.blockDim.x // 32):
            o = sm[j]
            r = o if o > r else r
        return r


# A pass taken only for some rows must still be taken by every thread that shares its
# reductions: on the device the warp (teams of up to 32 threads reduce by shuffles over
# the full warp) or the block (one team); under the simulator the block, whose barriers
# every reduction there uses.  ``pred`` must be the same on all threads of a team.
if SIM:
    @cuda.jit(device=True)
    def lockstep_any(pred, ts):
        """Whether ``pred`` holds on any thread that reduces in lockstep with this one."""
        return cuda.syncthreads_or(1 if pred else 0) != 0
else:
    @device
    def lockstep_any(pred, ts):
        """Whether ``pred`` holds on any thread that reduces in lockstep with this one."""
        b = 1 if pred else 0
        if ts > 32:  # the team is the block, and pred is the same on all of it
            return b != 0
        return cuda.any_sync(_FULL, b)


@device
def merge_max_sum(m, s, ts, sm):
    """Team-wide (max M, sum of s exp(m - M)) from each thread's running (m, s)."""
    mm = team_max(m, ts, sm)
    if mm == -math.inf or m == -math.inf:
        s = s - s
    elif m != mm:
        s = s * math.exp(m - mm)
    return mm, team_sum(s, ts, sm)


@device
def lse_finish(m, s, nan):
    """log-sum-exp from the row max and sum, with SEMANTICS.md's conventions."""
    if nan:
        return math.nan
    if m == -math.inf:
        return -math.inf
    if m == math.inf:
        return math.inf
    return np.float64(m) + math.log(np.float64(s))
