"""The public functions on the GPU: device arrays in, device arrays of the same library out.

Accepted: PyTorch CUDA tensors (bfloat16 included: PyTorch exports no
``__cuda_array_interface__`` for it, so its bits are read as int16), CuPy arrays, Numba
device arrays, and NumPy arrays (copied to the device and the results copied back).
Nothing is copied to the host but what an error message or a Python number needs.
Options are validated by the same code as on the CPU (``_api``).
"""

import math
import operator

import numpy as np

from .. import _api as A
from .kernels import SIM, cuda, kernels, launch, team_size
from . import kernels as K

# ---------------------------------------------------------------------------- availability
_checked = False


def _require_gpu():
    global _checked
    if _checked:
        return
    if not SIM and not cuda.is_available():
        raise RuntimeError("backend='cuda' needs a usable NVIDIA GPU and driver, and "
                           "numba-cuda with its CUDA libraries: pip install 'xent_fast[cuda]'")
    _checked = True


# ---------------------------------------------------------------------------- device arrays
def _lib(obj):
    """'torch', 'cupy', 'numba' or None (a host array) for an input."""
    mod = type(obj).__module__ or ""
    if mod.startswith("torch"):
        return "torch" if getattr(obj, "is_cuda", False) else None
    if mod.startswith("cupy"):
        return "cupy"
    if "numba" in mod and (hasattr(obj, "__cuda_array_interface__")
                           or type(obj).__name__ == "FakeCUDAArray"):
        return "numba"
    if not isinstance(obj, np.ndarray) and hasattr(obj, "__cuda_array_interface__"):
        return "cai"
    return None


def is_device_array(obj):
    return _lib(obj) is not None


_TORCH_DT = {}


def _torch():
    import torch
    if not _TORCH_DT:
        _TORCH_DT.update({np.dtype(np.float16): torch.float16,
                          np.dtype(np.float32): torch.float32,
                          np.dtype(np.float64): torch.float64,
                          np.dtype(np.int64): torch.int64,
                          "bfloat16": torch.bfloat16})
    return torch


class Dev:
    """An input on the device: its library, a raw description, and its dtype.

    ``dtype`` is the element dtype as NumPy sees it (``uint16`` holds bfloat16 bits,
    with ``bf16`` set); ``out_dtype`` the compute and result dtype.
    """

    def __init__(self, value, name, lib=None, allow_int=False):
        self.name = name
        self.lib = lib if lib is not None else _lib(value)
        self.host = None
        self.bf16 = False
        if self.lib is None:  # a host array: copy it over once
            a = np.asarray(value)
            if a.dtype.kind in "biu" and not allow_int:
                a = a.astype(np.float64)
            if a.dtype.kind == "c":
                raise TypeError(f"{name} must be real, got complex dtype {a.dtype}")
            if A._is_bfloat16(a.dtype):
                self.bf16 = True
                self.host_dtype = a.dtype
                a = a.view(np.uint16)
            elif a.dtype.kind == "f" and a.dtype.itemsize > 8:
                a = a.astype(np.float64)
            elif a.dtype.kind not in "fbiu":
                raise TypeError(f"{name} must be a real numeric array, got dtype {a.dtype}")
            if not a.dtype.isnative:
                a = a.astype(a.dtype.newbyteorder("="))
            self.host = value
            self.obj = cuda.to_device(np.ascontiguousarray(a))
            self.lib = "numba"
            self.desc = _describe(self.obj, "numba")
        else:
            self.obj = value
            if self.lib == "torch":
                t = value.detach()
                torch = _torch()
                if t.dtype == torch.bfloat16:
                    self.bf16 = True
                    t = t.view(torch.int16)
                elif t.dtype in (torch.bool, torch.uint8, torch.int8, torch.int16,
                                 torch.int32) and not allow_int:
                    t = t.to(torch.float64)
                elif t.is_complex():
                    raise TypeError(f"{name} must be real, got complex dtype {t.dtype}")
                self.tensor = t
                self.desc = _describe(t, "cai")
            else:
                self.desc = _describe(value, self.lib)
                if self.desc["dtype"].kind in "biu" and not allow_int:
                    raise TypeError(f"{name}: integer device arrays are not converted on the "
                                    "GPU; pass floating-point values")
            if self.desc["dtype"].kind == "c":
                raise TypeError(f"{name} must be real, got complex dtype {self.desc['dtype']}")
        if self.bf16:
            self.desc["dtype"] = np.dtype(np.uint16)
        self.dtype = self.desc["dtype"]
        self.shape = self.desc["shape"]
        self.out_dtype = np.dtype(np.float64 if self.dtype == np.float64 else np.float32)

    def view(self, shape, strides, dtype=None):
        """A Numba device array over this input's memory (no copy)."""
        return _make_view(self.desc, shape, strides, dtype or self.dtype, self)

    def rows3(self, ax, copy_ok=True):
        """(outer, C, inner) view with the class axis ``ax`` in the middle; copies (on
        the device where the library can) only when the axes do not merge."""
        shape, strides = self.desc["shape"], self.desc["strides"]
        outer, c, inner = math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1:])
        so = _merged_stride(shape[:ax], strides[:ax])
        si = _merged_stride(shape[ax + 1:], strides[ax + 1:])
        if so is None or si is None:
            if not copy_ok:
                raise ValueError(f"{self.name}: this layout cannot be written in place on "
                                 "the GPU; pass a contiguous array")
            self._make_contiguous()
            return self.rows3(ax)
        return self.view((outer, c, inner), (so, strides[ax], si))

    def _make_contiguous(self):
        if self.lib == "torch":
            self.tensor = self.tensor.contiguous()
            self.desc = dict(_describe(self.tensor, "cai"), dtype=self.dtype)
        elif self.lib == "cupy":
            import cupy
            self.obj = cupy.ascontiguousarray(self.obj)
            self.desc = _describe(self.obj, "cupy")
        else:  # a Numba device array: no strided device copy in Numba, go through the host
            h = self.obj.copy_to_host() if not SIM else np.asarray(self.obj._ary)
            self.obj = cuda.to_device(np.ascontiguousarray(h))
            self.desc = _describe(self.obj, "numba")
            self.desc["dtype"] = self.dtype

    def aligned(self, nbytes):
        return self.desc["ptr"] % nbytes == 0

    def empty(self, shape, dtype):
        """A new array of this input's library on its device, and a Numba view of it."""
        dtype = np.dtype(dtype)
        if self.lib == "torch":
            torch = _torch()
            tdt = _TORCH_DT["bfloat16"] if (self.bf16 and dtype == np.uint16) else _TORCH_DT[dtype]
            t = torch.empty(shape, dtype=tdt, device=self.tensor.device)
            raw = t.view(torch.int16) if tdt == torch.bfloat16 else t
            d = _describe(raw, "cai")
            return t, _make_view(d, d["shape"], d["strides"], dtype, raw)
        if self.lib == "cupy":
            import cupy
            with cupy.cuda.Device(self.obj.device.id):
                a = cupy.empty(shape, dtype)
            d = _describe(a, "cupy")
            return a, _make_view(d, d["shape"], d["strides"], dtype, a)
        a = cuda.device_array(shape, dtype)
        return a, a

    def finish(self, result):
        """A result as the caller should see it: copied back for host inputs."""
        if self.host is None:
            return result
        h = result.copy_to_host()
        if self.bf16 and h.dtype == np.uint16:
            h = h.view(self.host_dtype)
        return h[()] if h.ndim == 0 else h  # a NumPy scalar, as the CPU backends give


def _describe(obj, lib):
    if SIM and lib == "numba":
        ai = obj._ary.__array_interface__
        dt = obj._ary.dtype
        shape = tuple(obj._ary.shape)
        strides = tuple(obj._ary.strides)
        return dict(ptr=int(ai["data"][0]), shape=shape, strides=strides, dtype=dt, owner=obj)
    cai = obj.__cuda_array_interface__
    dt = np.dtype(cai["typestr"])
    shape = tuple(cai["shape"])
    strides = cai.get("strides")
    if strides is None:
        strides = _c_strides(shape, dt.itemsize)
    return dict(ptr=int(cai["data"][0]), shape=shape, strides=tuple(strides), dtype=dt, owner=obj)


def _c_strides(shape, itemsize):
    out = []
    acc = itemsize
    for d in reversed(shape):
        out.append(acc)
        acc *= max(d, 1)
    return tuple(reversed(out))


def _merged_stride(shape, strides):
    """The stride of axes merged into one, or None when they do not merge."""
    dims = [(d, s) for d, s in zip(shape, strides) if d != 1]
    if not dims:
        return 0
    if any(d == 0 for d, _ in dims):
        return 0
    for (d0, s0), (d1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * d1:
            return None
    return dims[-1][1]


class _HostView:
    """Simulator memory seen through a new shape; keeps its owner alive (NumPy keeps
    this object as the view's base)."""

    def __init__(self, ptr, shape, strides, dtype, owner):
        self.owner = owner
        self.__array_interface__ = dict(data=(ptr, False), shape=shape, strides=strides,
                                        typestr=dtype.str, version=3)


def _make_view(desc, shape, strides, dtype, owner):
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)
    strides = tuple(int(s) for s in strides)
    if SIM:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
        if math.prod(shape) == 0:
            return FakeCUDAArray(np.empty(shape, dtype))
        return FakeCUDAArray(np.asarray(_HostView(desc["ptr"], shape, strides, dtype, owner)))
    cai = dict(shape=shape, strides=strides, data=(desc["ptr"], False), typestr=dtype.str,
               version=3)
    return cuda.from_cuda_array_interface(cai, owner=owner, sync=False)


# ---------------------------------------------------------------------------- small buffers
_DUMMY = {}


def _dummy(dtype, ndim):
    key = (np.dtype(dtype), ndim)
    if key not in _DUMMY:
        _DUMMY[key] = cuda.device_array((1,) * (ndim - 1) + (0,) if ndim > 1 else (0,), dtype)
    return _DUMMY[key]


def _zeros(n, dtype):
    a = cuda.device_array(n, dtype)
    if n:
        K.fill_kernel[max(1, -(-n // 256)), 256](a, 0)
    return a


_NO_BAD = np.iinfo(np.int64).max


def _bad_flag():
    """A device int64 that kernels lower (atomic min) to the first bad position."""
    a = cuda.device_array(1, np.int64)
    K.fill_kernel[1, 1](a, _NO_BAD)
    return a


def _scalar_out(dev, acc, den, use_den, den_host, mean, out_dtype):
    res, view = dev.empty((), out_dtype)
    flat = _flat1(view, res)
    K.finish_kernel[1, 1](acc, den if den is not None else _dummy(np.float64, 1), use_den,
                          float(den_host), mean, flat)
    return dev.finish(res)


def _flat1(view, res):
    """A 1-element 1-D view of a 0-d device result."""
    d = _describe_view(view)
    return _make_view(d, (1,), (d["dtype"].itemsize,), d["dtype"], res)


def _per_row_out(dev, batch, out_dtype):
    """A result of the batch shape, and a flat Numba view of it for the kernels."""
    res, view = dev.empty(batch, out_dtype)
    n = math.prod(batch)
    flat = _make_view(_describe_view(view), (n,), (np.dtype(out_dtype).itemsize,), out_dtype, res)
    return res, flat


def _describe_view(view):
    """The description of a Numba device array (a simulator array in the simulator)."""
    return _describe(view, "numba" if SIM else "cai")


# ---------------------------------------------------------------------------- helpers
def _ax(dev, axis, name):
    if len(dev.shape) == 0:
        raise ValueError(f"{name} must have at least one dimension (the class axis)")
    from numpy.lib.array_utils import normalize_axis_index
    return normalize_axis_index(operator.index(axis), len(dev.shape), msg_prefix="axis")


def _vec_width(dev, rows3, c):
    """Elements per load: 16 bytes when every row starts 16-byte aligned, else 1."""
    item = dev.dtype.itemsize
    v = 16 // item
    if rows3.shape[2] != 1 or c == 0 or c % v or rows3.strides[1] != item:
        return 1
    if rows3.shape[0] > 1 and rows3.strides[0] % 16:
        return 1
    return v if dev.aligned(16) else 1


def _to_host(obj):
    """A small device array (a weight vector) as a NumPy array."""
    lib = _lib(obj)
    if lib == "torch":
        t = obj.detach()
        return (t.float() if t.dtype == _torch().bfloat16 else t).cpu().numpy()
    if lib == "cupy":
        return obj.get()
    if lib is not None:
        d = Dev(obj, "array", allow_int=True)
        return d.view(d.shape, d.desc["strides"]).copy_to_host()
    return np.asarray(obj)


def _class_weight_dev(weight, c, dtype, name="weight"):
    """(device weights, has_w, host sum): one small copy of the weights each way."""
    if weight is None:
        return _dummy(dtype, 1), False, float(c)
    wh = _to_host(weight)
    if wh.dtype.kind not in "biuf":
        raise TypeError(f"{name} must be a real array, got dtype {wh.dtype}")
    if wh.shape != (c,):
        raise ValueError(f"{name} must have shape ({c},) (one weight per class), got {wh.shape}")
    wh = np.ascontiguousarray(wh, dtype=dtype)
    return cuda.to_device(wh), True, float(np.sum(wh, dtype=np.float64))


def _grad_out(want_grad, grad_out, dev, ax):
    """(gradient result or None, 3-D Numba view the kernels write, finisher or None)."""
    if not want_grad:
        return None, _dummy(dev.dtype, 3), None
    if grad_out is None:
        res, view = dev.empty(dev.shape, dev.dtype)
        return res, _rows3_from(view, ax), None
    if dev.host is not None and isinstance(grad_out, np.ndarray):
        # host arrays on the GPU backend: compute into a device buffer, copy back after
        if grad_out.shape != dev.shape or grad_out.dtype != np.asarray(dev.host).dtype:
            raise ValueError(f"grad_out must have the logits' shape {dev.shape} and dtype")
        if not grad_out.flags.writeable:
            raise ValueError("grad_out is read-only")
        res, view = dev.empty(dev.shape, dev.dtype)

        def finish():
            h = view.copy_to_host()
            grad_out[...] = h.view(grad_out.dtype) if dev.bf16 else h

        return grad_out, _rows3_from(view, ax), finish
    g = _grad_dev(grad_out, dev)
    return grad_out, g.rows3(ax, copy_ok=False), None


def _grad_dev(grad_out, dev):
    if not is_device_array(grad_out):
        raise TypeError("grad_out must be a device array (of the logits' library) when "
                        "computing on the GPU")
    g = Dev(grad_out, "grad_out")
    if g.shape != dev.shape or g.dtype != dev.dtype or g.bf16 != dev.bf16:
        raise ValueError(f"grad_out must have the logits' shape {dev.shape} and dtype; got "
                         f"{g.shape} and {g.dtype}")
    return g


def _rows3_from(view, ax):
    """The (outer, C, inner) view of a Numba device array."""
    d = Dev.__new__(Dev)
    d.desc = _describe_view(view)
    d.lib, d.obj, d.host, d.bf16 = "numba", view, None, False
    d.dtype = d.desc["dtype"]
    d.shape = d.desc["shape"]
    return d.rows3(ax, copy_ok=False)


# ---------------------------------------------------------------------------- building blocks
def logsumexp(x, axis=-1, keepdims=False):
    _require_gpu()
    dx = Dev(x, "x")
    ax = _ax(dx, axis, "x")
    x3 = dx.rows3(ax)
    c = x3.shape[1]
    batch = dx.shape[:ax] + dx.shape[ax + 1:]
    res, flat = _per_row_out(dx, batch, dx.out_dtype)
    n = x3.shape[0] * x3.shape[2]
    if n:
        v = _vec_width(dx, x3, c)
        ts = team_size(c)
        blocks, threads = launch(n, ts)
        kernels(v, dx.out_dtype == np.float64)["lse"][blocks, threads](x3, flat, ts)
    if keepdims:
        res = _expand(res, ax, dx)
    return dx.finish(res)


def _expand(res, ax, dev):
    if dev.lib == "torch":
        return res.unsqueeze(ax)
    if dev.lib == "cupy":
        import cupy
        return cupy.expand_dims(res, ax)
    shape = list(res.shape)
    shape.insert(ax, 1)
    return res.reshape(tuple(shape))


def softmax_common(x, axis, log):
    _require_gpu()
    dx = Dev(x, "x")
    ax = _ax(dx, axis, "x")
    x3 = dx.rows3(ax)
    res, view = dx.empty(dx.shape, dx.out_dtype)
    o3 = _rows3_from(view, ax)
    n = x3.shape[0] * x3.shape[2]
    c = x3.shape[1]
    if n:
        v = _vec_width(dx, x3, c)
        if v > 1 and (dx.out_dtype.itemsize != dx.dtype.itemsize):
            v = 1
        ts = team_size(c)
        blocks, threads = launch(n, ts)
        kernels(v, dx.out_dtype == np.float64)["softmax"][blocks, threads](x3, bool(log), o3, ts)
    return dx.finish(res)


def dist(p, q, axis, base, mode):
    _require_gpu()
    dp = Dev(p, "p")
    dq = Dev(q, "q") if q is not None else dp
    if dq.shape != dp.shape:
        raise ValueError(f"p and q must have the same shape, got {dp.shape} and {dq.shape}")
    scale = A._log_base(base)
    ax = _ax(dp, axis, "p")
    p3 = dp.rows3(ax)
    q3 = dq.rows3(ax) if q is not None else p3
    batch = dp.shape[:ax] + dp.shape[ax + 1:]
    n = p3.shape[0] * p3.shape[2]
    c = p3.shape[1]
    out = cuda.device_array(n, np.float64)
    bad = _bad_flag()
    if n:
        ts = team_size(c)
        blocks, threads = launch(n, ts)
        f64 = dp.out_dtype == np.float64 or dq.out_dtype == np.float64
        kernels(1, f64)["dist"][blocks, threads](p3, q3, mode, out, bad, ts)
    b = int(bad.copy_to_host()[0])
    if b != _NO_BAD:
        i, j = divmod(b, 2 * c)
        name, src = ("p", dp) if j < c else ("q", dq)
        j = j % c
        pos = A._position(batch, ax, i, j)
        raise ValueError(f"{name} must hold probabilities (>= 0, not NaN); "
                         f"{name}[{pos}] = {_element(src, pos)!r}")
    res, flat = _per_row_out(dp, batch, dp.out_dtype)
    if n:
        K.scale_kernel[max(1, -(-n // 256)), 256](out, 1.0 / scale, flat)
    return dp.finish(res)


def _element(dev, pos):
    """One element, fetched to the host for an error message."""
    off = int(sum(int(i) * s for i, s in zip(pos, dev.desc["strides"])))
    v = _make_view(dict(ptr=dev.desc["ptr"] + off), (1,), (dev.dtype.itemsize,), dev.dtype,
                   dev).copy_to_host()[0]
    if dev.bf16:
        return float(np.array([int(v) << 16], np.uint32).view(np.float32)[0])
    return v.item() if hasattr(v, "item") else v


# ---------------------------------------------------------------------------- softmax CE
def softmax_cross_entropy(logits, targets, *, axis, weight, ignore_index, label_smoothing,
                          z_loss, softcap, reduction, return_grad, grad_out):
    _require_gpu()
    A._check_reduction(reduction)
    eps = A._scalar_option(label_smoothing, "label_smoothing", 0.0, 1.0)
    z = A._scalar_option(z_loss, "z_loss", 0.0, None)
    cap = 0.0 if softcap is None else A._scalar_option(softcap, "softcap", 0.0, None, True)
    want_grad = bool(return_grad) or grad_out is not None
    dx = Dev(logits, "logits")
    if cap:
        A._check_inverse(cap, "softcap", dx.out_dtype)
    ax = _ax(dx, axis, "logits")
    x3 = dx.rows3(ax)
    c = x3.shape[1]
    n = x3.shape[0] * x3.shape[2]
    batch = dx.shape[:ax] + dx.shape[ax + 1:]
    f64 = dx.out_dtype == np.float64
    w, has_w, wsum = _class_weight_dev(weight, c, dx.out_dtype)
    dt = Dev(targets, "targets", allow_int=True) if is_device_array(targets) else None
    if dt is None:
        th = np.asarray(targets)
        tkind = th.dtype.kind
        tshape = th.shape
    else:
        tkind = "f" if (dt.dtype.kind == "f" or dt.bf16) else dt.dtype.kind
        tshape = dt.shape
    keep = reduction == "none"
    acc = _zeros(1, np.float64)
    res, loss_flat = (_per_row_out(dx, batch, dx.out_dtype) if keep
                      else (None, _dummy(dx.out_dtype, 1)))
    ts = team_size(c)
    blocks, threads = launch(n, ts)
    if tkind in "iu":
        if tshape != batch:
            raise ValueError(f"integer targets must have the logits' shape without the "
                             f"class axis, {batch}; got {tshape}")
        ignore = A.ignore_index_option(ignore_index)
        if dt is None:
            tdev = cuda.to_device(A.index_targets(th, c, ignore))
        else:
            if _merged_stride(dt.shape, dt.desc["strides"]) is None:
                dt._make_contiguous()
            tdev = dt.view((n,), (_merged_stride(dt.shape, dt.desc["strides"]) or dt.dtype.itemsize,))
        den = _zeros(2, np.float64)  # summed weight, number of kept targets
        bad = _bad_flag()
        if n:
            K.targets_kernel[min(1024, max(1, -(-n // K.FLAT_THREADS))), K.FLAT_THREADS](tdev, c, ignore, w, has_w,
                                                                  den, bad)
        grad, g3, gfin = _grad_out(want_grad, grad_out, dx, ax)
        v = _vec_width(dx, x3, c)
        if want_grad and v > 1:
            if g3.strides != x3.strides or not _aligned_view(g3, 16):
                v = 1
        if n:
            kernels(v, f64)["ce_index"][blocks, threads](
                x3, tdev, w, has_w, wsum, eps, z, cap, ignore, den, reduction == "mean",
                want_grad, g3, keep, loss_flat, acc, ts)
        b = int(bad.copy_to_host()[0])  # the only host round trip: the error flag
        if b != _NO_BAD:
            pos = tuple(int(q) for q in np.unravel_index(b, batch)) if batch else ()
            val = int(th.reshape(-1)[b]) if dt is None else _element(dt, np.unravel_index(b, dt.shape))
            raise IndexError(f"targets{list(pos)} = {val} is not a class index in "
                             f"[0, {c}) nor ignore_index={ignore}")
        if keep:
            out = dx.finish(res)
        else:
            out = _scalar_out(dx, acc, den, True, 0.0, reduction == "mean", dx.out_dtype)
    elif tkind == "f":
        if tshape != dx.shape:
            raise ValueError(f"probability targets must have the logits' shape "
                             f"{dx.shape}; got {tshape} (class-index targets must be integers)")
        dp = dt if dt is not None else Dev(targets, "targets")
        p3 = dp.rows3(ax)
        gscale = (1.0 / n if n else math.nan) if reduction == "mean" else 1.0
        grad, g3, gfin = _grad_out(want_grad, grad_out, dx, ax)
        if n:
            kernels(1, f64)["ce_prob"][blocks, threads](
                x3, p3, w, has_w, eps, z, cap, gscale, want_grad, g3, keep, loss_flat, acc, ts)
        out = dx.finish(res) if keep else _scalar_out(dx, acc, None, False, float(n),
                                                      reduction == "mean", dx.out_dtype)
    else:
        raise TypeError("targets must be integer class indices or float probabilities")
    if want_grad:
        if gfin is not None:
            gfin()
            return out, grad
        return out, dx.finish(grad)
    return out


def _aligned_view(view, nbytes):
    if SIM:
        return True
    return view.__cuda_array_interface__["data"][0] % nbytes == 0


def softmax_kl_divergence(logits, target_logits, *, axis, temperature, reduction, return_grad,
                          grad_out):
    _require_gpu()
    A._check_reduction(reduction, ("none", "sum", "mean", "batchmean"))
    temp = A._scalar_option(temperature, "temperature", 0.0, None, lo_open=True)
    want_grad = bool(return_grad) or grad_out is not None
    dx = Dev(logits, "logits")
    A._check_inverse(temp, "temperature", dx.out_dtype)
    dt = Dev(target_logits, "target_logits")
    if dt.shape != dx.shape:
        raise ValueError(f"target_logits must have the logits' shape {dx.shape}; got {dt.shape}")
    ax = _ax(dx, axis, "logits")
    x3 = dx.rows3(ax)
    t3 = dt.rows3(ax)
    n = x3.shape[0] * x3.shape[2]
    c = x3.shape[1]
    batch = dx.shape[:ax] + dx.shape[ax + 1:]
    den = {"batchmean": n, "mean": n * c, "sum": 1, "none": 1}[reduction]
    gscale = 1.0 / den if den else math.nan
    keep = reduction == "none"
    acc = _zeros(1, np.float64)
    res, flat = (_per_row_out(dx, batch, dx.out_dtype) if keep
                 else (None, _dummy(dx.out_dtype, 1)))
    grad, g3, gfin = _grad_out(want_grad, grad_out, dx, ax)
    if n:
        ts = team_size(c)
        blocks, threads = launch(n, ts)
        kernels(1, dx.out_dtype == np.float64)["kl_logits"][blocks, threads](
            x3, t3, 1.0 / temp, gscale, want_grad, g3, keep, flat, acc, ts)
    if keep:
        out = dx.finish(res)
    else:
        out = _scalar_out(dx, acc, None, False, float(den), reduction in ("mean", "batchmean"),
                          dx.out_dtype)
    if want_grad and gfin is not None:
        gfin()
        return out, grad
    return (out, dx.finish(grad)) if want_grad else out


# ---------------------------------------------------------------------------- binary CE
def _flat2(dev, copy_ok=True):
    """(rows, last) view of an elementwise input."""
    shape = dev.shape
    last = shape[-1] if shape else 1
    lead = shape[:-1] if shape else ()
    strides = dev.desc["strides"]
    so = _merged_stride(lead, strides[:-1]) if shape else 0
    if so is None:
        if not copy_ok:
            raise ValueError(f"{dev.name}: this layout cannot be written in place on the GPU; "
                             "pass a contiguous array")
        dev._make_contiguous()
        return _flat2(dev)
    return dev.view((math.prod(lead), last), (so, strides[-1] if shape else dev.dtype.itemsize))


def _weight2(weight, shape, dtype, name):
    """A broadcast weight as a (rows, last) device view, zero strides where broadcast."""
    if weight is None:
        return _dummy(dtype, 2), False
    if is_device_array(weight):
        d = Dev(weight, name)
        if d.shape == tuple(shape) and d.dtype == dtype:
            return _flat2(d), True
    wh = np.ascontiguousarray(A._broadcast_weight(_to_host(weight), shape, dtype, name))
    last = shape[-1] if shape else 1
    b2 = np.broadcast_to(wh, shape).reshape(-1, last)
    if not np.shares_memory(b2, wh):
        b2 = np.ascontiguousarray(b2)
        return cuda.to_device(b2), True
    wd = cuda.to_device(wh)
    off = b2.__array_interface__["data"][0] - wh.__array_interface__["data"][0]
    desc = _describe_view(wd)
    desc["ptr"] += off
    return _make_view(desc, b2.shape, b2.strides, dtype, wd), True


def binary_cross_entropy(probs, targets, *, weight, reduction):
    _require_gpu()
    A._check_reduction(reduction)
    dp = Dev(probs, "probs")
    dy = Dev(targets, "targets")
    if dy.shape != dp.shape:
        raise ValueError(f"targets must have the probs' shape {dp.shape}; got {dy.shape}")
    shape = dp.shape
    p2, y2 = _flat2(dp), _flat2(dy)
    w2, has_w = _weight2(weight, shape, dp.out_dtype, "weight")
    keep = reduction == "none"
    size = math.prod(shape)
    res, view = dp.empty(shape, dp.out_dtype) if keep else (None, None)
    o2 = _flat_out(view, res, shape, dp.out_dtype) if keep else _dummy(dp.out_dtype, 2)
    acc = _zeros(1, np.float64)
    bad = _bad_flag()
    if size:
        K.bce_kernel[min(4096, -(-size // K.FLAT_THREADS)), K.FLAT_THREADS](p2, y2, w2, has_w, keep, o2, acc, bad)
    b = int(bad.copy_to_host()[0])
    if b != _NO_BAD:
        pos = tuple(int(q) for q in np.unravel_index(b, shape)) if shape else ()
        raise ValueError(f"probs must lie in [0, 1]; probs[{list(pos)}] = "
                         f"{_element(dp, pos)!r}")
    if keep:
        return dp.finish(res)
    return _scalar_out(dp, acc, None, False, float(size), reduction == "mean", dp.out_dtype)


def _flat_out(view, res, shape, dtype):
    last = shape[-1] if shape else 1
    n = math.prod(shape[:-1]) if shape else 1
    it = np.dtype(dtype).itemsize
    return _make_view(_describe_view(view), (n, last), (last * it, it), dtype, res)


def binary_cross_entropy_with_logits(logits, targets, *, weight, pos_weight, reduction,
                                     return_grad, grad_out):
    _require_gpu()
    A._check_reduction(reduction)
    want_grad = bool(return_grad) or grad_out is not None
    dx = Dev(logits, "logits")
    dy = Dev(targets, "targets")
    if dy.shape != dx.shape:
        raise ValueError(f"targets must have the logits' shape {dx.shape}; got {dy.shape}")
    shape = dx.shape
    size = math.prod(shape)
    x2, y2 = _flat2(dx), _flat2(dy)
    w2, has_w = _weight2(weight, shape, dx.out_dtype, "weight")
    pw2, has_pw = _weight2(pos_weight, shape, dx.out_dtype, "pos_weight")
    gscale = (1.0 / size if size else math.nan) if reduction == "mean" else 1.0
    keep = reduction == "none"
    res, view = dx.empty(shape, dx.out_dtype) if keep else (None, None)
    o2 = _flat_out(view, res, shape, dx.out_dtype) if keep else _dummy(dx.out_dtype, 2)
    if want_grad:
        if grad_out is None:
            grad, gview = dx.empty(shape, dx.dtype)
            g2 = _flat_out(gview, grad, shape, dx.dtype)
        else:
            grad = grad_out
            g2 = _flat2(_grad_dev(grad_out, dx), copy_ok=False)
    else:
        grad, g2 = None, _dummy(dx.dtype, 2)
    acc = _zeros(1, np.float64)
    if size:
        K.bce_logits_kernel[min(4096, -(-size // K.FLAT_THREADS)), K.FLAT_THREADS](
            x2, y2, w2, has_w, pw2, has_pw, gscale, want_grad, g2, keep, o2, acc)
    out = dx.finish(res) if keep else _scalar_out(dx, acc, None, False, float(size),
                                                  reduction == "mean", dx.out_dtype)
    return (out, dx.finish(grad)) if want_grad else out


# ---------------------------------------------------------------------------- evaluate
def eval_stats(logits, targets, axis):
    """(statistics (n, 6) float64 on the host, targets as a flat int64 host array, batch
    shape): the logits are read once on the device; only n x 6 numbers come back."""
    _require_gpu()
    dx = Dev(logits, "logits")
    ax = _ax(dx, axis, "logits")
    x3 = dx.rows3(ax)
    n = x3.shape[0] * x3.shape[2]
    c = x3.shape[1]
    batch = dx.shape[:ax] + dx.shape[ax + 1:]
    th = _to_host(targets) if is_device_array(targets) else np.asarray(targets)
    if th.dtype.kind not in "iu":
        raise TypeError(f"targets must be integer class indices, got dtype {th.dtype}")
    if th.shape != batch:
        raise ValueError(f"targets must have the logits' shape without the class axis, "
                         f"{batch}; got {th.shape}")
    tdev = cuda.to_device(np.ascontiguousarray(th.reshape(-1), dtype=np.int64))
    st = cuda.device_array((n, 6), np.float64)
    if n:
        ts = team_size(c)
        blocks, threads = launch(n, ts)
        kernels(1, dx.out_dtype == np.float64)["eval"][blocks, threads](x3, tdev, st, ts)
    return st.copy_to_host(), th, batch, c
