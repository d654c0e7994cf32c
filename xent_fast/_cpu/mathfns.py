"""Scalar building blocks for the row kernels: bit casts, a vectorisable max, exp and log.

Numba has no SVML here, so ``math.exp``/``math.log`` inside a loop stay scalar.  The
functions below are written with branch-free selects so that LLVM vectorises the loops
that call them.  They are overloaded on float32 and float64 so one row kernel serves both.

Accuracy (the vector exp is checked in ``tests/test_fast_paths.py``): exp within 2 ulp, log within 2 ulp over
the normal range.  exp flushes results below the smallest normal number to 0, which only
affects probabilities that are already negligible against any row sum.
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .jit import ORDERED_FLAGS

# No "reassoc" here: re-association refolds the Cody-Waite range reduction and costs
# an order of magnitude in accuracy.  The callers' loops carry reassoc for their sums.
_JIT = dict(nogil=True, error_model="numpy", fastmath=ORDERED_FLAGS,
            no_cfunc_wrapper=True)  # see jit.KERNEL


# ---------------------------------------------------------------------------- intrinsics
def _make_bitcast(src, dst, lldst):
    @intrinsic
    def cast(typingctx, val):
        if val != src:
            return None

        def codegen(context, builder, sig, args):
            return builder.bitcast(args[0], lldst)

        return dst(src), codegen

    return cast


i32_as_f32 = _make_bitcast(types.int32, types.float32, ir.FloatType())
f32_as_i32 = _make_bitcast(types.float32, types.int32, ir.IntType(32))
i64_as_f64 = _make_bitcast(types.int64, types.float64, ir.DoubleType())
f64_as_i64 = _make_bitcast(types.float64, types.int64, ir.IntType(64))


@intrinsic
def fmax(typingctx, a, b):
    """llvm.maxnum: vectorises, unlike Python's max() on floats.

    It returns the non-NaN operand when one is NaN; callers that must propagate NaN do
    so through the sums that follow.
    """
    if not (isinstance(a, types.Float) and a == b):
        return None

    def codegen(context, builder, sig, args):
        lty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [lty],
                                              ir.FunctionType(lty, [lty, lty]))
        return builder.call(fn, args)

    return a(a, b), codegen


def _int_pick(pred, doc):
    @intrinsic
    def pick(typingctx, a, b):
        if not (isinstance(a, types.Integer) and isinstance(b, types.Integer)):
            return None
        ty = typingctx.unify_types(types.unliteral(a), types.unliteral(b))
        if not isinstance(ty, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            x, y = (context.cast(builder, v, t, ty) for v, t in zip(args, sig.args))
            cmp = builder.icmp_signed if ty.signed else builder.icmp_unsigned
            return builder.select(cmp(pred, x, y), x, y)

        return ty(a, b), codegen

    pick.__doc__ = doc
    return pick


# The builtins min and max compile a function of their own per type signature.
imin = _int_pick("<", "The smaller of two integers (emitted inline, as min() is not).")
imax = _int_pick(">", "The larger of two integers (emitted inline, as max() is not).")


# ---------------------------------------------------------------------------- ordered keys
# These and cast_like are intrinsics, not overloads: an overload is compiled as a
# function of its own (Numba's whole pipeline and an LLVM module, 40-90 ms for one
# line, per type), an intrinsic is a few instructions emitted where it is called.
_I64 = ir.IntType(64)


def _float_bits(x):
    return x.bitwidth if x in (types.float32, types.float64) else None


def _flip_negatives(builder, b, bits):
    """b ^ ((b >> (bits - 1)) & (2^(bits-1) - 1)) on an int64: an involution that maps a
    float's IEEE bits (sign-extended) to an integer of the same order."""
    sign = builder.ashr(b, ir.Constant(_I64, bits - 1))
    return builder.xor(b, builder.and_(sign, ir.Constant(_I64, (1 << (bits - 1)) - 1)))


@intrinsic
def float_key(typingctx, x):
    """An integer (int64) that orders like the float ``x`` (IEEE bits, negatives flipped).

    Integer max reductions vectorise without any fast-math flag and cost one compare a
    lane; llvm.maxnum's NaN handling made short-row maxima 5-10x slower.  A positive
    NaN orders above +inf, so a row max still comes out NaN for such rows.
    """
    bits = _float_bits(x)
    if bits is None:
        return None

    def codegen(context, builder, sig, args):
        b = builder.bitcast(args[0], ir.IntType(bits))
        if bits < 64:
            b = builder.sext(b, _I64)
        return _flip_negatives(builder, b, bits)

    return types.int64(x), codegen


@intrinsic
def key_float(typingctx, k, like):
    """The float (of ``like``'s type) whose :func:`float_key` is ``k``."""
    bits = _float_bits(like)
    if bits is None or not isinstance(k, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        b = _flip_negatives(builder, context.cast(builder, args[0], sig.args[0], types.int64),
                            bits)
        if bits < 64:
            b = builder.trunc(b, ir.IntType(bits))
        return builder.bitcast(b, context.get_value_type(sig.return_type))

    return like(k, like), codegen


# ---------------------------------------------------------------------------- exp
def fexp(x):
    """exp(x) for x <= 88 (float32) or x <= 709 (float64), vectorisable.

    Every caller passes a difference ``v - max`` (so x <= 0 up to rounding) or ``-|v|``;
    leaving out the overflow branch saves two operations per element.  -inf gives
    exactly 0, NaN stays NaN.
    """
    return math.exp(x)


# Round-to-integer by the magic-number trick: adding 1.5 * 2^23 (2^52) pushes the
# fraction out of the mantissa, whose low bits are then round(x log2 e) plus the
# exponent bias folded into the constant; shifted into the exponent field they are
# 2^n.  This replaces floor, convert, add and clamp (4 operations) by one subtract.
_LOG2E_32 = np.float32(1.4426950408889634)
_MAGIC_32 = np.float32(1.5 * 2 ** 23 + 127)
_LN2HI_32 = np.float32(0.693359375)
_LN2LO_32 = np.float32(-2.12194440e-4)
_EXPLO_32 = np.float32(-87.33654)  # below: the result is under the smallest normal
_P32 = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                     4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
_ONE_32 = np.float32(1.0)
_HALF_32 = np.float32(0.5)
_F32_0 = np.float32(0.0)
_F32_INF = np.float32(np.inf)


@njit(**_JIT)
def _exp32(x):
    v = x * _LOG2E_32 + _MAGIC_32
    n = v - _MAGIC_32
    r = x - n * _LN2HI_32
    r = r - n * _LN2LO_32
    p = _P32[0]
    p = p * r + _P32[1]
    p = p * r + _P32[2]
    p = p * r + _P32[3]
    p = p * r + _P32[4]
    p = p * r + _P32[5]
    p = p * r + _ONE_32
    y = p * r + _ONE_32
    # Lanes below _EXPLO_32 (-inf included) get a meaningless scale; the select drops them.
    scale = i32_as_f32(np.int32(f32_as_i32(v) << 23))
    return _F32_0 if x < _EXPLO_32 else y * scale


_LOG2E_64 = 1.4426950408889634
_MAGIC_64 = 1.5 * 2.0 ** 52 + 1023
_LN2HI_64 = 6.93147180369123816490e-01
_LN2LO_64 = 1.90821492927058770002e-10
_EXPLO_64 = -708.3964185322641
# Taylor coefficients 1/k! for k = 13 .. 2; |r| <= ln2/2 keeps the error under 1e-17.
_P64 = tuple(1.0 / math.factorial(k) for k in range(13, 1, -1))


@njit(**_JIT)
def _exp64(x):
    v = x * _LOG2E_64 + _MAGIC_64
    n = v - _MAGIC_64
    r = x - n * _LN2HI_64
    r = r - n * _LN2LO_64
    p = _P64[0]
    p = p * r + _P64[1]
    p = p * r + _P64[2]
    p = p * r + _P64[3]
    p = p * r + _P64[4]
    p = p * r + _P64[5]
    p = p * r + _P64[6]
    p = p * r + _P64[7]
    p = p * r + _P64[8]
    p = p * r + _P64[9]
    p = p * r + _P64[10]
    p = p * r + _P64[11]
    p = p * r + 1.0
    y = p * r + 1.0
    scale = i64_as_f64(f64_as_i64(v) << 52)
    return 0.0 if x < _EXPLO_64 else y * scale


def _by_float_type(name, f32, f64, doc):
    """An intrinsic that calls ``f32`` or ``f64`` (jitted) by its argument's type: a
    call of the one picked, where an overload forwarding to it was a function of its
    own to compile (the pipeline, an LLVM module and machine code for one line)."""
    impls = {types.float32: f32, types.float64: f64}

    @intrinsic
    def call(typingctx, x):
        disp = impls.get(x)
        if disp is None:
            return None
        fnty = typingctx.resolve_value_type(disp)
        sig = typingctx.resolve_function_type(fnty, (x,), {})
        if sig is None:
            return None

        def codegen(context, builder, _sig, args):
            impl = context.get_function(fnty, sig)
            context.add_linking_libs(getattr(impl, "libs", ()))
            return impl(builder, args)

        return sig.return_type(x), codegen

    call.__name__ = call.__qualname__ = name
    call.__doc__ = doc
    return call


fexp = _by_float_type("fexp", _exp32, _exp64, fexp.__doc__)


# ---------------------------------------------------------------------------- log
def flog(x):
    """log(x), vectorisable; log(0) = -inf, log(<0) = NaN, log(inf) = inf."""
    return math.log(x)


# log(m) = 2 atanh(s), s = (m - 1)/(m + 1), m in [sqrt(1/2), sqrt(2)): |s| <= 0.1716.
_ATANH64 = tuple(2.0 / (2 * k + 1) for k in range(11, -1, -1))
_ATANH32 = tuple(np.float32(2.0 / (2 * k + 1)) for k in range(5, -1, -1))
_SQRT2_64 = math.sqrt(2.0)
_SQRT2_32 = np.float32(math.sqrt(2.0))
_LN2HI_L64 = 6.93147180369123816490e-01
_LN2LO_L64 = 1.90821492927058770002e-10
_LN2_32 = np.float32(math.log(2.0))
_TWO23_32 = np.float32(2.0 ** 23)
_TWO52_64 = 2.0 ** 52
_TINY_32 = np.float32(1.1754944e-38)
_TINY_64 = 2.2250738585072014e-308


@njit(**_JIT)
def _log32(x):
    sub = x < _TINY_32
    xs = x * _TWO23_32 if sub else x
    bits = np.int64(f32_as_i32(xs))
    e = ((bits >> 23) & 0xFF) - 127 - (23 if sub else 0)
    m = i32_as_f32(np.int32((bits & 0x7FFFFF) | 0x3F800000))
    big = m > _SQRT2_32
    m = m * _HALF_32 if big else m
    e = e + (1 if big else 0)
    s = (m - _ONE_32) / (m + _ONE_32)
    z = s * s
    p = _ATANH32[0]
    p = p * z + _ATANH32[1]
    p = p * z + _ATANH32[2]
    p = p * z + _ATANH32[3]
    p = p * z + _ATANH32[4]
    p = p * z + _ATANH32[5]
    y = np.float32(e) * _LN2_32 + s * p
    y = -_F32_INF if x == _F32_0 else y
    y = _F32_INF if x == _F32_INF else y
    y = np.float32(np.nan) if not (x >= _F32_0) else y
    return y


@njit(**_JIT)
def _log64(x):
    sub = x < _TINY_64
    xs = x * _TWO52_64 if sub else x
    bits = f64_as_i64(xs)
    e = ((bits >> 52) & 0x7FF) - 1023 - (52 if sub else 0)
    m = i64_as_f64((bits & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000)
    big = m > _SQRT2_64
    m = m * 0.5 if big else m
    e = e + (1 if big else 0)
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    p = _ATANH64[0]
    p = p * z + _ATANH64[1]
    p = p * z + _ATANH64[2]
    p = p * z + _ATANH64[3]
    p = p * z + _ATANH64[4]
    p = p * z + _ATANH64[5]
    p = p * z + _ATANH64[6]
    p = p * z + _ATANH64[7]
    p = p * z + _ATANH64[8]
    p = p * z + _ATANH64[9]
    p = p * z + _ATANH64[10]
    p = p * z + _ATANH64[11]
    fe = np.float64(e)
    y = fe * _LN2HI_L64 + (fe * _LN2LO_L64 + s * p)
    y = -np.inf if x == 0.0 else y
    y = np.inf if x == np.inf else y
    y = np.nan if not (x >= 0.0) else y
    return y


flog = _by_float_type("flog", _log32, _log64, flog.__doc__)


@intrinsic
def cast_like(typingctx, v, arr):
    """v converted to the element type of the array (or scalar) ``arr``.

    Numba widens float32 op int-or-float literal to float64; constants go through this
    to stay in the row's precision.
    """
    dt = types.unliteral(getattr(arr, "dtype", arr))
    if not (isinstance(v, (types.Number, types.Boolean)) and isinstance(dt, types.Number)):
        return None

    def codegen(context, builder, sig, args):
        return context.cast(builder, args[0], sig.args[0], sig.return_type)

    return dt(types.unliteral(v), arr), codegen


@njit(**_JIT)
def flog1p(u):
    """log(1 + u), accurate for small u (Goldberg's correction); for finite u > -1."""
    one = cast_like(1.0, u)
    w = one + u
    d = w - one
    y = flog(w)
    return u if d == 0 else y * (u / d)


# ---------------------------------------------------------------------------- half floats
@njit(**_JIT)
def f16_bits_to_f32(h):
    """IEEE binary16 bits (uint16) to float32, exact."""
    v = np.int64(h)
    sign = (v & 0x8000) << 16
    o = (v & 0x7FFF) << 13
    ex = o & 0x0F800000
    o = o + ((127 - 15) << 23)
    o_inf = o + ((128 - 16) << 23)
    den = i32_as_f32(np.int32(o + (1 << 23))) - i32_as_f32(np.int32(113 << 23))
    o_den = np.int64(f32_as_i32(den))
    o = o_inf if ex == 0x0F800000 else o
    o = o_den if ex == 0 else o
    return i32_as_f32(np.int32(o | sign))


@njit(**_JIT)
def f32_to_f16_bits(f):
    """float32 to binary16 bits, round to nearest even; NaN stays NaN, overflow to inf."""
    u = np.int64(f32_as_i32(f)) & 0xFFFFFFFF
    sign = u & 0x80000000
    u = u ^ sign
    magic = ((127 - 15) + (23 - 10) + 1) << 23
    fl = i32_as_f32(np.int32(u)) + i32_as_f32(np.int32(magic))
    o_den = np.int64(f32_as_i32(fl)) - magic
    odd = (u >> 13) & 1
    o_norm = (u + ((15 - 127) << 23) + 0xFFF + odd) >> 13
    o_big = 0x7E00 if u > (255 << 23) else 0x7C00
    o = o_norm
    o = o_den if u < (113 << 23) else o
    o = o_big if u >= ((127 + 16) << 23) else o
    return np.uint16((o | (sign >> 16)) & 0xFFFF)


@njit(**_JIT)
def bf16_bits_to_f32(h):
    return i32_as_f32(np.int32(np.int64(h) << 16))


@njit(**_JIT)
def f32_to_bf16_bits(f):
    """float32 to bfloat16 bits, round to nearest even; NaN stays a quiet NaN."""
    u = np.int64(f32_as_i32(f)) & 0xFFFFFFFF
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = ((u >> 16) | 0x40) if f != f else r
    return np.uint16(r & 0xFFFF)
