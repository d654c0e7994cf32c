"""Device arrays for the CUDA kernels: PyTorch CUDA tensors (bfloat16 included: PyTorch
exports no ``__cuda_array_interface__`` for it, so its bits are read as int16), CuPy
arrays, Numba device arrays and anything with ``__cuda_array_interface__``; NumPy arrays
are copied to the device and results copied back.

Here: describing an input (library, pointer, shape, strides, dtype), views of its memory
with the class axis in the middle, allocation in the input's own library, and the small
device buffers the kernels write (flags, partial sums).  No option or shape checks: those
are the front end's (``_inputs``).
"""

import math

import numpy as np

from .. import _inputs
from . import kernels as K
from .kernels import SIM, cuda

# ---------------------------------------------------------------------------- availability
_checked = False


def require_gpu():
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
        """``allow_int``: integers kept as they are (targets), else the dtype policy of
        ``_inputs.float_policy``: integers become float64, complex is an error."""
        self.name = name
        self.lib = lib if lib is not None else _lib(value)
        self.host = None
        self.bf16 = False
        if self.lib is None:  # a host array: copy it over once
            a = np.asarray(value)
            if not (allow_int and a.dtype.kind in "biu"):
                hk, kernel_dtype, _ = _inputs.float_policy(a.dtype, name)
                if hk == 2:
                    self.bf16 = True
                    self.host_dtype = a.dtype
                    a = a.view(np.uint16)
                elif a.dtype != kernel_dtype:
                    a = a.astype(kernel_dtype)
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
                elif t.is_complex():
                    _inputs.float_policy(np.dtype(np.complex64), name)  # raises
                elif not t.is_floating_point() and not allow_int:
                    t = t.to(torch.float64)
                self.tensor = t
                self.desc = _describe(t, "cai")
            else:
                self.desc = _describe(value, self.lib)
                kind = self.desc["dtype"].kind
                if not (allow_int and kind in "biu"):
                    _inputs.float_policy(self.desc["dtype"], name)  # raises for complex
                    if kind in "biu":  # integers become float64, as on the CPU
                        self._convert(np.float64)
        if self.bf16:
            self.desc["dtype"] = np.dtype(np.uint16)
        self.dtype = self.desc["dtype"]
        self.shape = self.desc["shape"]
        self.out_dtype = _inputs.compute_dtype(self.dtype)

    @property
    def grad_dtype(self):
        """The gradient's dtype as the front end names it (the input's own)."""
        return "bfloat16" if self.bf16 else self.dtype

    def companion(self, value, name):
        """Another float input read with this one (targets, target logits)."""
        return Dev(value, name)

    def _convert(self, dtype):
        """This input converted on the device (through the host for Numba arrays)."""
        if self.lib == "cupy":
            self.obj = self.obj.astype(dtype)
            self.desc = _describe(self.obj, "cupy")
            return
        h = self.view(self.desc["shape"], self.desc["strides"], self.desc["dtype"]).copy_to_host()
        self.obj = cuda.to_device(np.ascontiguousarray(h, dtype=dtype))
        self.lib = "numba"
        self.desc = _describe(self.obj, "numba")

    def view(self, shape, strides, dtype=None):
        """A Numba device array over this input's memory (no copy)."""
        return make_view(self.desc, shape, strides, dtype or self.dtype, self)

    def rows3(self, ax, copy_ok=True):
        """(outer, C, inner) view with the class axis ``ax`` in the middle; copies (on
        the device where the library can) only when the axes do not merge."""
        shape, strides = self.desc["shape"], self.desc["strides"]
        outer, c, inner = math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1:])
        so = merged_stride(shape[:ax], strides[:ax])
        si = merged_stride(shape[ax + 1:], strides[ax + 1:])
        if so is None or si is None:
            if not copy_ok:
                raise ValueError(f"{self.name}: this layout cannot be written in place on "
                                 "the GPU; pass a contiguous array")
            self.make_contiguous()
            return self.rows3(ax)
        return self.view((outer, c, inner), (so, strides[ax], si))

    def make_contiguous(self):
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
            return t, make_view(d, d["shape"], d["strides"], dtype, raw)
        if self.lib == "cupy":
            import cupy
            with cupy.cuda.Device(self.obj.device.id):
                a = cupy.empty(shape, dtype)
            d = _describe(a, "cupy")
            return a, make_view(d, d["shape"], d["strides"], dtype, a)
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


def merged_stride(shape, strides):
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


def make_view(desc, shape, strides, dtype, owner):
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


def dummy(dtype, ndim):
    key = (np.dtype(dtype), ndim)
    if key not in _DUMMY:
        _DUMMY[key] = cuda.device_array((1,) * (ndim - 1) + (0,) if ndim > 1 else (0,), dtype)
    return _DUMMY[key]


def zeros(n, dtype):
    a = cuda.device_array(n, dtype)
    if n:
        K.fill_kernel[max(1, -(-n // K.FLAT_THREADS)), K.FLAT_THREADS](a, 0)
    return a


NO_BAD = np.iinfo(np.int64).max


def bad_flag():
    """A device int64 that kernels lower (atomic min) to the first bad position."""
    a = cuda.device_array(1, np.int64)
    K.fill_kernel[1, 1](a, NO_BAD)
    return a


def scalar_out(dev, acc, den, use_den, den_host, mean, out_dtype):
    res, view = dev.empty((), out_dtype)
    flat = flat1(view, res)
    K.finish_kernel[1, 1](acc, den if den is not None else dummy(np.float64, 1), use_den,
                          float(den_host), mean, flat)
    return dev.finish(res)


def flat1(view, res):
    """A 1-element 1-D view of a 0-d device result."""
    d = describe_view(view)
    return make_view(d, (1,), (d["dtype"].itemsize,), d["dtype"], res)


def per_row_out(dev, batch, out_dtype):
    """A result of the batch shape, and a flat Numba view of it for the kernels."""
    res, view = dev.empty(batch, out_dtype)
    n = math.prod(batch)
    flat = make_view(describe_view(view), (n,), (np.dtype(out_dtype).itemsize,), out_dtype, res)
    return res, flat


def describe_view(view):
    """The description of a Numba device array (a simulator array in the simulator)."""
    return _describe(view, "numba" if SIM else "cai")


def vec_width(dev, rows3, c):
    """Elements per load: 16 bytes when every row starts 16-byte aligned, else 1."""
    item = dev.dtype.itemsize
    v = 16 // item
    if rows3.shape[2] != 1 or c == 0 or c % v or rows3.strides[1] != item:
        return 1
    if rows3.shape[0] > 1 and rows3.strides[0] % 16:
        return 1
    return v if dev.aligned(16) else 1


def to_host(obj, name="input"):
    """A small device array (a weight vector) as a NumPy array."""
    if obj is None:
        return None
    lib = _lib(obj)
    if lib == "torch":
        t = obj.detach()
        return (t.float() if t.dtype == _torch().bfloat16 else t).cpu().numpy()
    if lib == "cupy":
        return obj.get()
    if lib is not None:
        d = Dev(obj, "array", allow_int=True)
        return d.view(d.shape, d.desc["strides"]).copy_to_host()
    return _inputs.rectangular(obj, name)


def device_weights(weight, c, dtype):
    """(device weights, has weights, summed weight) for a checked host class weight."""
    if weight is None:
        return dummy(dtype, 1), False, float(c)
    wh = np.ascontiguousarray(weight, dtype=dtype)
    return cuda.to_device(wh), True, float(np.sum(wh, dtype=np.float64))


def rows3_from(view, ax):
    """The (outer, C, inner) view of a Numba device array."""
    d = Dev.__new__(Dev)
    d.desc = describe_view(view)
    d.lib, d.obj, d.host, d.bf16 = "numba", view, None, False
    d.dtype = d.desc["dtype"]
    d.shape = d.desc["shape"]
    return d.rows3(ax, copy_ok=False)


def expand(res, ax, dev):
    if dev.lib == "torch":
        return res.unsqueeze(ax)
    if dev.lib == "cupy":
        import cupy
        return cupy.expand_dims(res, ax)
    shape = list(res.shape)
    shape.insert(ax, 1)
    return res.reshape(tuple(shape))


def element(dev, pos):
    """One element, fetched to the host for an error message."""
    off = int(sum(int(i) * s for i, s in zip(pos, dev.desc["strides"])))
    v = make_view(dict(ptr=dev.desc["ptr"] + off), (1,), (dev.dtype.itemsize,), dev.dtype,
                   dev).copy_to_host()[0]
    if dev.bf16:
        return float(np.array([int(v) << 16], np.uint32).view(np.float32)[0])
    return v.item() if hasattr(v, "item") else v


def aligned_view(view, nbytes):
    if SIM:
        return True
    return view.__cuda_array_interface__["data"][0] % nbytes == 0


# ---------------------------------------------------------------------------- binary CE
def flat2(dev, copy_ok=True):
    """(rows, last) view of an elementwise input."""
    shape = dev.shape
    last = shape[-1] if shape else 1
    lead = shape[:-1] if shape else ()
    strides = dev.desc["strides"]
    so = merged_stride(lead, strides[:-1]) if shape else 0
    if so is None:
        if not copy_ok:
            raise ValueError(f"{dev.name}: this layout cannot be written in place on the GPU; "
                             "pass a contiguous array")
        dev.make_contiguous()
        return flat2(dev)
    return dev.view((math.prod(lead), last), (so, strides[-1] if shape else dev.dtype.itemsize))


def weight2(weight, shape, dtype, name):  # checked by the front end
    """A broadcast weight as a (rows, last) device view, zero strides where broadcast."""
    if weight is None:
        return dummy(dtype, 2), False
    if is_device_array(weight):
        d = Dev(weight, name)
        if d.shape == tuple(shape) and d.dtype == dtype:
            return flat2(d), True
    wh = np.ascontiguousarray(np.asarray(to_host(weight)).astype(dtype, copy=False))
    last = shape[-1] if shape else 1
    b2 = np.broadcast_to(wh, shape).reshape(math.prod(shape[:-1]) if shape else 1, last)
    if not np.shares_memory(b2, wh):
        b2 = np.ascontiguousarray(b2)
        return cuda.to_device(b2), True
    wd = cuda.to_device(wh)
    off = b2.__array_interface__["data"][0] - wh.__array_interface__["data"][0]
    desc = describe_view(wd)
    desc["ptr"] += off
    return make_view(desc, b2.shape, b2.strides, dtype, wd), True


def flat_out(view, res, shape, dtype):
    last = shape[-1] if shape else 1
    n = math.prod(shape[:-1]) if shape else 1
    it = np.dtype(dtype).itemsize
    return make_view(describe_view(view), (n, last), (last * it, it), dtype, res)


