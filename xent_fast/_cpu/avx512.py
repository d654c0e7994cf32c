"""Explicit 512-bit vectors for the exp-bound row loops (AVX-512 hosts).

LLVM vectorises the scalar loops of ``_rows`` well, but the exponential it builds from
``fexp`` needs a degree-7 polynomial and 11 multiply-adds per vector, and the
multiply-add pipes are what bounds a row's sum of exps.  With a vector in hand, a
16-entry table of 2^(j/16) read by one in-register permute (``vpermd``/``vpermi2q``)
leaves a reduced argument |r| <= ln2/32, where exp(r) - 1 = r + r^2 P(r) needs P of
degree 1 (float32) or 4 (float64): 7 multiply-adds per float32 vector instead of 11,
and 10 instead of 17 for float64, at about the same accuracy (within 1.2 ulp, checked
in ``tests/test_fast_paths.py``).  Measured on one core with rows in cache: 9.6 -> 13.0 G
exps/s in float32, 3.1 -> 4.8 in float64.

The vector values are Numba values of type ``F32x16``/``F64x8`` (one zmm register), so
the loops that use them stay ordinary jitted Python.  ``ENABLED`` is False where the
host has no AVX-512F or Numba targets another CPU, or with ``XENT_FAST_SIMD=0``; the
callers then keep their scalar loops.

exp(d) here, as ``fexp``: d <= 0 in practice (a logit minus its row max); -inf gives
exactly 0, NaN stays NaN, results under the smallest normal number are 0.
"""

import math
import os

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, models, register_model


def _host_has_avx512():
    if os.environ.get("XENT_FAST_SIMD", "1") == "0":
        return False
    from numba.core import config
    if config.CPU_NAME not in (None, "", "host"):
        return "+avx512f" in (config.CPU_FEATURES or "")
    try:
        from llvmlite import binding as llvm
        return bool(llvm.get_host_cpu_features().get("avx512f", False))
    except Exception:  # pragma: no cover - feature query unavailable
        return False


ENABLED = _host_has_avx512()


# ---------------------------------------------------------------------------- types
class FloatVec(types.Type):
    """A vector of float32 (16 lanes) or float64 (8 lanes, or 16 for wide sums of a
    float32 vector)."""

    def __init__(self, dtype, lanes=None):
        self.dtype = dtype
        self.lanes = lanes or 64 // (dtype.bitwidth // 8)
        super().__init__(name=f"F{dtype.bitwidth}x{self.lanes}")


F32X16 = FloatVec(types.float32)
F64X8 = FloatVec(types.float64)
F64X16 = FloatVec(types.float64, 16)
_VEC = {types.float32: F32X16, types.float64: F64X8}
_WIDE = {F32X16: F64X16, F64X8: F64X8}


@register_model(FloatVec)
class _FloatVecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_llfloat(fe_type.dtype), fe_type.lanes))


def _llfloat(dtype):
    return ir.FloatType() if dtype == types.float32 else ir.DoubleType()


def _llint(dtype):
    return ir.IntType(dtype.bitwidth)


def _llvec(dtype):
    return ir.VectorType(_llfloat(dtype), 64 // (dtype.bitwidth // 8))


def _llivec(dtype):
    return ir.VectorType(_llint(dtype), 64 // (dtype.bitwidth // 8))


def _splat(vty, value):
    return ir.Constant(vty, [ir.Constant(vty.element, value)] * vty.count)


def _mask(idx):
    """A constant shufflevector mask."""
    idx = list(idx)
    i32 = ir.IntType(32)
    return ir.Constant(ir.VectorType(i32, len(idx)), [ir.Constant(i32, i) for i in idx])


def _vname(vty):
    t = "f32" if isinstance(vty.element, ir.FloatType) else "f64"
    return f"v{vty.count}{t}"


def _call_intrinsic(builder, name, retty, args):
    mod = builder.module
    fn = mod.globals.get(name)
    if fn is None:
        fn = ir.Function(mod, ir.FunctionType(retty, [a.type for a in args]), name)
    return builder.call(fn, args)


def _fma(builder, a, b, c):
    return _call_intrinsic(builder, f"llvm.fma.{_vname(a.type)}", a.type, [a, b, c])


# ---------------------------------------------------------------------------- exp
def _exp_constants(dtype):
    """Range reduction d = (n/16) ln2 + r, n = round(16 d / ln2), Cody-Waite split."""
    f32 = dtype == types.float32
    c = math.log(2.0) / 16
    if f32:
        # 12 significant bits in the high part: n * hi is exact for |n| <= 2^12.
        hi = float(np.array([np.float32(c).view(np.int32) & ~0xFFF],
                            np.int32).view(np.float32)[0])
        lo = float(np.float32(c - hi))
        k = float(np.float32(16.0 / math.log(2.0)))
        magic = 1.5 * 2.0 ** 23 + 16 * 127  # low mantissa bits: 16 (N + bias) + j
        lo_limit = float(np.float32(-87.33654))  # keeps N >= -126 (normal results)
        tab = [int(np.float32(2.0 ** (j / 16)).view(np.int32)) - (127 << 23) - (j << 19)
               for j in range(16)]
        # exp(r) - 1 - r = r^2 (p0 + p1 r) on |r| <= ln2/32, relative error 1.6e-9.
        poly = (0.5000162931598461, 0.1666684589757518)
    else:
        # 38 significant bits in the high part: n * hi is exact for |n| <= 2^15.
        hi, lo = _LN2_16_HI64, _LN2_16_LO64
        k = 16.0 / math.log(2.0)
        magic = 1.5 * 2.0 ** 52 + 16 * 1023
        lo_limit = -708.3964185322641
        tab = [int(np.float64(float.fromhex(h)).view(np.int64)) - (1023 << 52) - (j << 48)
               for j, h in enumerate(_EXP2_16_64)]
        poly = _P64
    shift = 19 if f32 else 48
    return hi, lo, k, magic, lo_limit, tab, poly, shift


# ln2/16 split for float64 (hi with its 15 low bits clear) and 2^(j/16) rounded to
# double, from 50-digit arithmetic.
_LN2_16_HI64 = float.fromhex("0x1.62e42fefa0000p-5")
_LN2_16_LO64 = float.fromhex("0x1.cf79abc9e3b3ap-44")
_EXP2_16_64 = (
    "0x1.0000000000000p+0", "0x1.0b5586cf9890fp+0", "0x1.172b83c7d517bp+0",
    "0x1.2387a6e756238p+0", "0x1.306fe0a31b715p+0", "0x1.3dea64c123422p+0",
    "0x1.4bfdad5362a27p+0", "0x1.5ab07dd485429p+0", "0x1.6a09e667f3bcdp+0",
    "0x1.7a11473eb0187p+0", "0x1.8ace5422aa0dbp+0", "0x1.9c49182a3f090p+0",
    "0x1.ae89f995ad3adp+0", "0x1.c199bdd85529cp+0", "0x1.d5818dcfba487p+0",
    "0x1.ea4afa2a490dap+0")
# exp(r) - 1 - r = r^2 P(r) on |r| <= ln2/32: least squares on Chebyshev nodes,
# relative error 1.2e-17.
_P64 = (0.4999999999999928, 0.16666666664373656, 0.041666666712928374,
        0.008333472971256717, 0.0013888315517679398)


def _exp_vector(builder, d, dtype):
    """exp(d) on a vector, d <= 88 (float32) / 709 (float64); see the module notes."""
    vty = d.type
    ivty = _llivec(dtype)
    hi, lo, k, magic, lo_limit, tab, poly, shift = _exp_constants(dtype)
    v = _fma(builder, d, _splat(vty, k), _splat(vty, magic))
    n = builder.fsub(v, _splat(vty, magic))
    r = _fma(builder, n, _splat(vty, -hi), d)
    r = _fma(builder, n, _splat(vty, -lo), r)
    p = _splat(vty, poly[-1])
    for c in reversed(poly[:-1]):
        p = _fma(builder, p, r, _splat(vty, c))
    q = _fma(builder, builder.fmul(r, r), p, r)  # exp(r) - 1
    vb = builder.bitcast(v, ivty)
    if dtype == types.float32:
        itab = ir.Constant(ivty, [ir.Constant(ivty.element, t) for t in tab])
        tm = _call_intrinsic(builder, "llvm.x86.avx512.permvar.si.512", ivty, [itab, vb])
    else:
        lo_t = ir.Constant(ivty, [ir.Constant(ivty.element, t) for t in tab[:8]])
        hi_t = ir.Constant(ivty, [ir.Constant(ivty.element, t) for t in tab[8:]])
        tm = _call_intrinsic(builder, "llvm.x86.avx512.vpermi2var.q.512", ivty,
                             [lo_t, vb, hi_t])
    # 2^(n/16) = table mantissa + exponent bits; the table entries already subtract
    # the j bits that the shift carries into the mantissa.
    t = builder.bitcast(builder.add(tm, builder.shl(vb, _splat(ivty, shift))), vty)
    y = _fma(builder, t, q, t)
    keep = builder.fcmp_unordered(">=", d, _splat(vty, lo_limit))  # NaN kept
    return y, keep


# ---------------------------------------------------------------------------- intrinsics
def _float_arr(arr):
    return (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"
            and arr.dtype in _VEC)


def _data_ptr(context, builder, arrty, arr, j):
    a = context.make_array(arrty)(context, builder, arr)
    p = builder.gep(a.data, [j])
    return builder.bitcast(p, _llvec(arrty.dtype).as_pointer())


@intrinsic
def vload(typingctx, arr, j):
    """The 64 bytes of the contiguous row ``arr`` from element ``j``."""
    if not (_float_arr(arr) and isinstance(j, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        j = context.cast(builder, args[1], sig.args[1], types.intp)
        return builder.load(_data_ptr(context, builder, sig.args[0], args[0], j), align=4)

    return _VEC[arr.dtype](arr, j), codegen


@intrinsic
def vstore(typingctx, arr, j, v):
    """arr[j:j + lanes] = v."""
    if not (_float_arr(arr) and isinstance(v, FloatVec) and v.dtype == arr.dtype
            and arr.mutable):
        return None

    def codegen(context, builder, sig, args):
        j = context.cast(builder, args[1], sig.args[1], types.intp)
        builder.store(args[2], _data_ptr(context, builder, sig.args[0], args[0], j),
                      align=4)
        return context.get_dummy_value()

    return types.void(arr, j, v), codegen


@intrinsic
def vsplat(typingctx, x):
    """A vector with every lane ``x`` (float32 or float64)."""
    if x not in _VEC:
        return None

    def codegen(context, builder, sig, args):
        vty = _llvec(sig.args[0])
        v = builder.insert_element(ir.Constant(vty, ir.Undefined), args[0],
                                   ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), vty.count), [0] * vty.count)
        return builder.shuffle_vector(v, ir.Constant(vty, ir.Undefined), mask)

    return _VEC[x](x), codegen




def _lanewise(op, doc):
    @intrinsic
    def binop(typingctx, a, b):
        if not (isinstance(a, FloatVec) and a == b):
            return None

        def codegen(context, builder, sig, args):
            return getattr(builder, op)(args[0], args[1])

        return a(a, b), codegen

    binop.__doc__ = doc
    return binop


vadd = _lanewise("fadd", "a + b, lane by lane.")
vsub = _lanewise("fsub", "a - b, lane by lane.")
vmul = _lanewise("fmul", "a * b, lane by lane.")


@intrinsic
def vexp(typingctx, x, m):
    """exp(x - m) lane by lane; ``m`` a vector too."""
    if not (isinstance(x, FloatVec) and x == m):
        return None

    def codegen(context, builder, sig, args):
        d = builder.fsub(args[0], args[1])
        y, keep = _exp_vector(builder, d, sig.args[0].dtype)
        return builder.select(keep, y, _splat(d.type, 0.0))

    return x(x, m), codegen


def _make_vexp_acc(below_max_only, doc):
    @intrinsic
    def acc_exp(typingctx, acc, x, m, skip):
        if not (isinstance(x, FloatVec) and x == m == acc
                and isinstance(skip, types.Integer)):
            return None

        def codegen(context, builder, sig, args):
            acc, x, m, skip = args
            dtype = sig.args[0].dtype
            d = builder.fsub(x, m)
            y, keep = _exp_vector(builder, d, dtype)
            keep = builder.and_(keep, _lanes_from(builder, skip, sig.args[3], d.type.count))
            if below_max_only:
                keep = builder.and_(keep, builder.fcmp_ordered("!=", x, m))
            # the select before the add: the chain through ``acc`` is one add a vector
            return builder.fadd(acc, builder.select(keep, y, _splat(d.type, 0.0)))

        return acc(acc, x, m, skip), codegen

    acc_exp.__doc__ = doc
    return acc_exp


vexp_acc = _make_vexp_acc(
    False, "acc + exp(x - m), leaving out the first ``skip`` lanes (0 for none).")
vexp_acc_rest = _make_vexp_acc(
    True, "acc + exp(x - m) over the lanes where x != m (the max terms left out), "
          "leaving out the first ``skip`` lanes too.")


@intrinsic
def vmask_head(typingctx, v, skip):
    """``v`` with its first ``skip`` lanes set to 0."""
    if not (isinstance(v, FloatVec) and isinstance(skip, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        keep = _lanes_from(builder, args[1], sig.args[1], args[0].type.count)
        return builder.select(keep, args[0], _splat(args[0].type, 0.0))

    return v(v, skip), codegen


def _lanes_from(builder, skip, skipty, count):
    """A lane mask true for lanes >= skip."""
    i32 = ir.IntType(32)
    s = builder.trunc(skip, i32) if skipty.bitwidth > 32 else skip
    sv = builder.insert_element(ir.Constant(ir.VectorType(i32, count), ir.Undefined), s,
                                ir.Constant(i32, 0))
    sv = builder.shuffle_vector(sv, ir.Constant(ir.VectorType(i32, count), ir.Undefined),
                                ir.Constant(ir.VectorType(i32, count), [0] * count))
    lanes = ir.Constant(ir.VectorType(i32, count), list(range(count)))
    return builder.icmp_signed(">=", lanes, sv)


@intrinsic
def vsum(typingctx, v):
    """The sum of the lanes, in the lanes' precision (any order)."""
    if not isinstance(v, FloatVec):
        return None

    def codegen(context, builder, sig, args):
        vty = args[0].type
        call = _call_intrinsic(builder, f"llvm.vector.reduce.fadd.{_vname(vty)}",
                               vty.element, [ir.Constant(vty.element, -0.0), args[0]])
        call.fastmath.add("reassoc")
        return call

    return v.dtype(v), codegen


def usable(arr):
    """At typing time: can the vector loops run over this Numba array type?"""
    return ENABLED and _float_arr(arr)


@intrinsic
def lanes_of(typingctx, arr):
    """The lanes of a vector of ``arr``'s dtype (16 for float32, 8 for float64)."""
    if not (isinstance(arr, types.Array) and isinstance(arr.dtype, types.Number)):
        return None
    lanes = 64 // (arr.dtype.bitwidth // 8)

    def codegen(context, builder, sig, args):
        return context.get_constant(types.intp, lanes)

    return types.intp(arr), codegen


@intrinsic
def vmax(typingctx, a, b):
    """Lane-wise max (a NaN lane may or may not win; callers let NaN through sums)."""
    if not (isinstance(a, FloatVec) and a == b):
        return None

    def codegen(context, builder, sig, args):
        a, b = args
        return builder.select(builder.fcmp_ordered(">", a, b), a, b)

    return a(a, b), codegen


@intrinsic
def vany_gt(typingctx, a, b):
    """True if some lane of ``a`` is greater than that of ``b``."""
    if not (isinstance(a, FloatVec) and a == b):
        return None

    def codegen(context, builder, sig, args):
        gt = builder.fcmp_ordered(">", args[0], args[1])
        bits = builder.bitcast(gt, ir.IntType(sig.args[0].lanes))
        return builder.icmp_unsigned("!=", bits, ir.Constant(bits.type, 0))

    return types.boolean(a, b), codegen


@intrinsic
def vhmax(typingctx, v):
    """The largest lane (NaN lanes ignored)."""
    if not isinstance(v, FloatVec):
        return None

    def codegen(context, builder, sig, args):
        # A tree of half-vector maxnums: llvm.vector.reduce.fmax without "nnan"
        # became a serial chain of 3 scalar instructions a lane, 60 cycles a row.
        v = args[0]
        n = v.type.count
        while n > 1:
            h = n // 2
            lo = builder.shuffle_vector(v, v, _mask(range(h)))
            hi = builder.shuffle_vector(v, v, _mask(range(h, n)))
            hty = lo.type
            t = "f32" if isinstance(hty.element, ir.FloatType) else "f64"
            v = _call_intrinsic(builder, f"llvm.maxnum.v{h}{t}", hty, [lo, hi])
            n = h
        return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))

    return v.dtype(v), codegen


@intrinsic
def vwiden(typingctx, v):
    """A float32 vector as float64 (16 lanes); a float64 vector as it is."""
    if v not in _WIDE:
        return None
    wide = _WIDE[v]

    def codegen(context, builder, sig, args):
        if sig.args[0] == wide:
            return args[0]
        return builder.fpext(args[0], ir.VectorType(ir.DoubleType(), wide.lanes))

    return wide(v), codegen


@intrinsic
def vzero_wide(typingctx, like):
    """Zeros in the wide sum type of ``like``'s vectors (``like`` a float scalar)."""
    if like not in _VEC:
        return None
    wide = _WIDE[_VEC[like]]

    def codegen(context, builder, sig, args):
        return _splat(ir.VectorType(ir.DoubleType(), wide.lanes), 0.0)

    return wide(like), codegen


@intrinsic
def vlowest(typingctx, like):
    """Every lane the most negative finite value of ``like``'s float type."""
    if like not in _VEC:
        return None

    def codegen(context, builder, sig, args):
        dt = np.float32 if sig.args[0] == types.float32 else np.float64
        return _splat(_llvec(sig.args[0]), float(-np.finfo(dt).max))

    return _VEC[like](like), codegen


@intrinsic
def vkl_acc(typingctx, c, et, vt, vs):
    """c + et (vt - vs), lanes with et == 0 adding 0 (not 0 * inf)."""
    if not (isinstance(c, FloatVec) and c == et == vt == vs):
        return None

    def codegen(context, builder, sig, args):
        c, et, vt, vs = args
        term = builder.fmul(et, builder.fsub(vt, vs))
        nz = builder.fcmp_unordered("!=", et, _splat(et.type, 0.0))
        return builder.fadd(c, builder.select(nz, term, _splat(et.type, 0.0)))

    return c(c, et, vt, vs), codegen


# ---------------------------------------------------------------------------- BCE
# log1p(u) for u = exp(-|x|) in [0, 1]: s = u / (2 + u) <= 1/3, z = s^2, and
# log1p(u) = 2 atanh(s) = 2 s (1 + z Q(z)); Q of degree 3 fitted on z <= 1/9 (least
# squares on Chebyshev nodes, relative error 5e-9).
_Q32 = (0.3333320682420434, 0.20010809076551767, 0.1400042390456299, 0.14007562378544341)


def _f32_ok(*tys):
    return all(t == F32X16 for t in tys)


def _exp_neg_abs(builder, v):
    vty = v.type
    fabs = _call_intrinsic(builder, f"llvm.fabs.{_vname(vty)}", vty, [v])
    d = builder.fsub(_splat(vty, -0.0), fabs)
    y, keep = _exp_vector(builder, d, types.float32)
    return builder.select(keep, y, _splat(vty, 0.0))


@intrinsic
def vbce_logits(typingctx, v, t):
    """(loss, exp(-|v|)): loss = (1 - t) v + log1p(exp(-|v|)) + max(-v, 0)."""
    if not _f32_ok(v, t):
        return None
    ret = types.UniTuple(F32X16, 2)

    def codegen(context, builder, sig, args):
        v, t = args
        vty = v.type
        e = _exp_neg_abs(builder, v)
        s = builder.fdiv(e, builder.fadd(e, _splat(vty, 2.0)))
        z = builder.fmul(s, s)
        q = _splat(vty, _Q32[-1])
        for c in reversed(_Q32[:-1]):
            q = _fma(builder, q, z, _splat(vty, c))
        lp = _fma(builder, builder.fmul(s, z), q, s)
        lp = builder.fadd(lp, lp)
        # (1 - t) v + max(-v, 0) as max(v, 0) - t v: for v < 0 it is -t v, without the
        # cancellation of (1 - t) v against -v.  Infinite v keeps PyTorch's form (NaN
        # for 0 < t < 1 at -inf, as there).
        zero = _splat(vty, 0.0)
        neg = builder.fcmp_ordered("<", v, zero)
        lin = _fma(builder, builder.fsub(_splat(vty, -0.0), t), v,
                   builder.select(neg, zero, v))
        loss = builder.fadd(lin, lp)
        fabs = _call_intrinsic(builder, f"llvm.fabs.{_vname(vty)}", vty, [v])
        inf = builder.fcmp_ordered("==", fabs, _splat(vty, math.inf))
        sp = builder.fadd(lp, builder.select(neg, builder.fsub(_splat(vty, -0.0), v), zero))
        old = _fma(builder, builder.fsub(_splat(vty, 1.0), t), v, sp)
        return context.make_tuple(builder, ret, [builder.select(inf, old, loss), e])

    return ret(v, t), codegen


@intrinsic
def vbce_logits_grad(typingctx, v, t, e, g):
    """g ((1 - t) - sigmoid(-v)), with e = exp(-|v|), as ``bce_logits_grad`` (pw = 1):

        g ((1 - t) - t e) / (1 + e) for v >= 0,  g ((1 - t) e - t) / (1 + e) for v < 0,

    without the cancellation of (1 - t) - 1/(1 + e) for v << 0 (both selected lanes
    computed, no branch)."""
    if not _f32_ok(v, t, e, g):
        return None

    def codegen(context, builder, sig, args):
        v, t, e, g = args
        vty = v.type
        u = builder.fsub(_splat(vty, 1.0), t)
        pos = builder.fcmp_ordered(">=", v, _splat(vty, 0.0))
        num = builder.select(pos, builder.fsub(u, builder.fmul(t, e)),
                             builder.fsub(builder.fmul(u, e), t))
        return builder.fmul(g, builder.fdiv(num, builder.fadd(_splat(vty, 1.0), e)))

    return v(v, t, e, g), codegen



@intrinsic
def vstore_stream(typingctx, arr, j, v):
    """arr[j:j + lanes] = v with a non-temporal store (64-byte aligned address only):
    the line goes to memory without being read first."""
    if not (_float_arr(arr) and isinstance(v, FloatVec) and v.dtype == arr.dtype
            and arr.mutable):
        return None

    def codegen(context, builder, sig, args):
        j = context.cast(builder, args[1], sig.args[1], types.intp)
        st = builder.store(args[2], _data_ptr(context, builder, sig.args[0], args[0], j),
                           align=64)
        st.set_metadata("nontemporal",
                        builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.void(arr, j, v), codegen


@intrinsic
def store_fence(typingctx):
    """sfence: orders the non-temporal stores before any later store."""

    def codegen(context, builder, sig, args):
        _call_intrinsic(builder, "llvm.x86.sse.sfence", ir.VoidType(), [])
        return context.get_dummy_value()

    return types.void(), codegen


# ---------------------------------------------------------------------------- few classes
# A block of ``lanes`` rows of C classes (C <= 16) is C contiguous vectors; the
# few-classes kernels want it as C column vectors (lane r of column c = row r's logit
# c).  Strided scalar loads (or gathers) for that transposition cost 5.7 ns a row at
# 10 classes from memory; whole-vector loads and in-register shuffles cost 1.
def _pick(builder, srcs, picks):
    """A vector whose lane i is lane ``picks[i][1]`` of ``srcs[picks[i][0]]``.

    The sources are taken in pairs, each pair's lanes put in place by one two-source
    permute (``vpermt2ps``), and the partial vectors merged by a tree of blends: half
    the permutes of a chain through every source, and a dependency depth of log2."""
    lanes = len(picks)
    order = list(dict.fromkeys(s for s, _ in picks))
    parts = []
    for k in range(0, len(order), 2):
        a, b = order[k], order[min(k + 1, len(order) - 1)]
        parts.append((
            builder.shuffle_vector(srcs[a], srcs[b], _mask(
                [lane if s == a else (lanes + lane if s == b else 0) for s, lane in picks])),
            {a, b}))
    while len(parts) > 1:
        merged = []
        for k in range(0, len(parts) - 1, 2):
            (u, su), (v, sv) = parts[k], parts[k + 1]
            merged.append((builder.shuffle_vector(u, v, _mask(
                [lanes + i if s in sv else i for i, (s, _) in enumerate(picks)])), su | sv))
        if len(parts) % 2:
            merged.append(parts[-1])
        parts = merged
    return parts[0][0]


def _columns(builder, rows, C):
    """The C column vectors of a block held as C row-major vectors."""
    lanes = rows[0].type.count
    return [_pick(builder, rows, [divmod(r * C + c, lanes) for r in range(lanes)])
            for c in range(C)]


def _rows_of(builder, cols, C):
    """The inverse of _columns."""
    lanes = cols[0].type.count
    return [_pick(builder, cols, [divmod(i * lanes + lane, C)[::-1] for lane in range(lanes)])
            for i in range(C)]


def _class_count(C):
    return C.literal_value if isinstance(C, types.IntegerLiteral) else None


def _index(context, builder, val, ty, extra=0):
    v = context.cast(builder, val, ty, types.intp)
    return builder.add(v, ir.Constant(v.type, extra)) if extra else v


def _transpose_typed(C, src, dst, *ints):
    """C's literal value if vcols_in/out can take these argument types, else None."""
    nc = _class_count(C)
    ok = (nc and _float_arr(src) and _float_arr(dst) and src.dtype == dst.dtype
          and dst.mutable and all(isinstance(i, types.Integer) for i in ints))
    return nc if ok else None


def _column_ptrs(context, builder, arrty, arr, k, kty, stride, sty, nc):
    """Vector pointers to element k + c * stride of ``arr``, for c < nc."""
    k0 = _index(context, builder, k, kty)
    step = _index(context, builder, stride, sty)
    return [_data_ptr(context, builder, arrty, arr,
                      builder.add(k0, builder.mul(step, ir.Constant(step.type, c))))
            for c in range(nc)]


def _row_ptrs(context, builder, arrty, arr, j, jty, nc):
    """Vector pointers to the nc vectors from element j of ``arr``."""
    lanes = _VEC[arrty.dtype].lanes
    return [_data_ptr(context, builder, arrty, arr, _index(context, builder, j, jty, i * lanes))
            for i in range(nc)]


@intrinsic
def vcols_in(typingctx, src, j, C, dst, k, stride):
    """dst[k + c * stride + r] = src[j + r * C + c] for r < lanes, c < C (a literal)."""
    nc = _transpose_typed(C, src, dst, j, k, stride)
    if nc is None:
        return None

    def codegen(context, builder, sig, args):
        src, j, _, dst, k, stride = args
        sa, ja, _, da, ka, st = sig.args
        rows = [builder.load(p, align=4) for p in _row_ptrs(context, builder, sa, src, j, ja, nc)]
        for p, col in zip(_column_ptrs(context, builder, da, dst, k, ka, stride, st, nc),
                          _columns(builder, rows, nc)):
            builder.store(col, p, align=4)
        return context.get_dummy_value()

    return types.void(src, j, C, dst, k, stride), codegen


@intrinsic
def vcols_out(typingctx, src, k, stride, C, dst, j):
    """dst[j + r * C + c] = src[k + c * stride + r]: the inverse of vcols_in."""
    nc = _transpose_typed(C, src, dst, j, k, stride)
    if nc is None:
        return None

    def codegen(context, builder, sig, args):
        src, k, stride, _, dst, j = args
        sa, ka, st, _, da, ja = sig.args
        cols = [builder.load(p, align=4)
                for p in _column_ptrs(context, builder, sa, src, k, ka, stride, st, nc)]
        for p, row in zip(_row_ptrs(context, builder, da, dst, j, ja, nc),
                          _rows_of(builder, cols, nc)):
            builder.store(row, p, align=4)
        return context.get_dummy_value()

    return types.void(src, k, stride, C, dst, j), codegen


@intrinsic
def vsmall_stats(typingctx, T, q, stride, C, tv, mv, sv, xtv):
    """For the rows q .. q + lanes of the column layout T (column c at c * stride):
    mv = row max, sv = sum of exp(x - max) less 1, in the row's precision, summed as
    (k - 1) + the terms below the max (k max terms, exactly 1 each), so that a row whose
    max carries nearly all the mass keeps the digits of the rest, xtv = the logit of
    class tv[r] (0 where tv[r] is no class).  A NaN logit makes sv NaN; an all -inf row
    gives max -inf: callers redo such rows."""
    nc = _class_count(C)
    if not (nc and _float_arr(T) and isinstance(tv, types.Array) and tv.dtype == types.int64
            and tv.layout == "C" and all(_float_arr(a) and a.dtype == T.dtype and a.mutable
                                         for a in (mv, sv, xtv))):
        return None
    dtype = T.dtype
    lanes = _VEC[dtype].lanes

    def codegen(context, builder, sig, args):
        T, q, stride, _, tv, mv, sv, xtv = args
        Ta, qa, st, _, ta = sig.args[:5]
        q0 = _index(context, builder, q, qa)
        cols = [builder.load(p, align=4)
                for p in _column_ptrs(context, builder, Ta, T, q, qa, stride, st, nc)]
        vty = cols[0].type
        m = cols[0]
        for col in cols[1:]:
            m = builder.select(builder.fcmp_ordered(">", col, m), col, m)
        tarr = context.make_array(ta)(context, builder, tv)
        ivty = ir.VectorType(ir.IntType(64), lanes)
        t = builder.load(builder.bitcast(builder.gep(tarr.data, [q0]), ivty.as_pointer()),
                         align=8)
        s = _splat(vty, 0.0)
        k = _splat(vty, 0.0)
        xt = _splat(vty, 0.0)
        for c, col in enumerate(cols):
            d = builder.fsub(col, m)
            y, keep = _exp_vector(builder, d, dtype)
            # the max terms (exactly 1 each) are counted apart from the rest
            top = builder.fcmp_ordered("==", col, m)
            keep = builder.and_(keep, builder.not_(top))
            s = builder.fadd(s, builder.select(keep, y, _splat(vty, 0.0)))
            k = builder.fadd(k, builder.select(top, _splat(vty, 1.0), _splat(vty, 0.0)))
            hit = builder.icmp_signed("==", t, _splat(ivty, c))
            xt = builder.select(hit, col, xt)
        s = builder.fadd(builder.fsub(k, _splat(vty, 1.0)), s)  # sum - 1, its digits kept
        for arr, ty, val in ((mv, sig.args[5], m), (sv, sig.args[6], s), (xtv, sig.args[7], xt)):
            builder.store(val, _data_ptr(context, builder, ty, arr, q0), align=4)
        return context.get_dummy_value()

    return types.void(T, q, stride, C, tv, mv, sv, xtv), codegen


@intrinsic
def prefetch(typingctx, arr, j):
    """Hint the cache line holding element ``j`` of the contiguous row ``arr`` (any
    ``j``: a prefetch past the end does not fault)."""
    if not (_float_arr(arr) and isinstance(j, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        j = context.cast(builder, args[1], sig.args[1], types.intp)
        p = builder.bitcast(builder.gep(a.data, [j]), ir.IntType(8).as_pointer())
        i32 = ir.IntType(32)
        _call_intrinsic(builder, "llvm.prefetch.p0i8", ir.VoidType(),
                        [p, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.void(arr, j), codegen
