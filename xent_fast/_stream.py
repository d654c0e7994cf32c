"""Arrays larger than memory: row-chunk streaming of .npy, .npz and Zarr arrays.

A *source* opens a stored array without reading it and hands out slabs along one axis
(the first axis that is not the class axis).  ``.npy`` files are memory-mapped: the
kernels read the mapped pages directly, the kernel is told to read the next slab ahead
(``MADV_POPULATE_READ``, else ``MADV_WILLNEED``) and to drop the pages of the slab just done (``MADV_DONTNEED``), so
the resident memory stays at a few slabs whatever the file size.  ``.npz`` members are
read sequentially (decompressing as they go) and Zarr arrays slab by slab.  Every
source is read one slab ahead of the kernels on a background thread.

Every bad file (missing, not an array, truncated, wrong dtype or shape) is a
``ValueError`` (``FileNotFoundError`` when missing) with one line naming the file.  A
``.npy`` file truncated or rewritten while it is being read is one too: touching a
mapped page past the file's new end would kill the process with SIGBUS, so the file's
size and modification time are checked before each slab is touched (``check``).
"""

import ctypes
import errno
import math
import mmap
import os
import sys
import threading
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.lib import format as npformat
from numpy.lib.array_utils import normalize_axis_index

from . import _dispatch, _inputs
from ._evaluate import (EvalState, check_backend, check_bins, check_targets, check_topk,
                        evaluate_rows, rows_from_stats)
from ._cpu.arrays import HostFloat, class_rows

# Default slab: about this many bytes of logits (large enough that per-call overheads
# vanish, small enough that a few slabs in flight stay far below 1 GB).
DEFAULT_CHUNK_BYTES = 32 << 20
_PAGE = mmap.PAGESIZE


def _read_npy_header(fh, where):
    try:
        version = npformat.read_magic(fh)
    except ValueError:
        raise ValueError(f"{where} is not a .npy array (no NumPy magic string)") from None
    try:
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fh)
        else:
            shape, fortran, dtype = npformat.read_array_header_2_0(fh)
    except Exception as e:  # noqa: BLE001 - numpy raises several kinds here
        raise ValueError(f"{where} has a corrupt .npy header ({e})") from None
    if dtype.hasobject:
        raise ValueError(f"{where} holds Python objects (dtype {dtype}); only numeric "
                         "arrays can be streamed")
    return shape, fortran, dtype


class _Source:
    """A stored array read in slabs along axis 0 or 1."""

    name = ""
    shape = ()
    dtype = None

    def read(self, axis, lo, hi):  # pragma: no cover - interface
        raise NotImplementedError

    def will_need(self, axis, lo, hi):
        """A hint that slab [lo, hi) comes next."""

    def done(self, axis, lo, hi):
        """A hint that slab [lo, hi) will not be read again."""

    def check(self):
        """Raise ``ValueError`` if the stored array changed since it was opened (called
        before a slab read with ``read`` is touched)."""

    def close(self):
        pass

    def _as_dtype(self, a):
        """``a`` as ``self.dtype``: a 2-byte void array read as bfloat16 (see
        ``check_logits_dtype``) is viewed as such."""
        return a if a.dtype == self.dtype else a.view(self.dtype)

    def __getitem__(self, key):  # for dask.array.from_array
        return self._as_dtype(np.asarray(self._array()[key]))

    @property
    def ndim(self):
        return len(self.shape)


def _slab(axis, lo, hi):
    return (slice(lo, hi),) if axis == 0 else (slice(None), slice(lo, hi))


_MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14
_madvise = None


def _populate(base, start, length):
    """madvise(MADV_POPULATE_READ) on a mapped range; False where unsupported."""
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.madvise
                fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                fn.restype = ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                _madvise = False
    if not _madvise:
        return False
    if _madvise(base + start, length, _MADV_POPULATE_READ) != 0:
        if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS):
            _madvise = False  # an older kernel: fall back to MADV_WILLNEED
        return False
    return True


class NpySource(_Source):
    """A .npy file, memory-mapped read-only (pickles as its path, for Dask workers)."""

    def __init__(self, path, role="array"):
        self.path = os.fspath(path)
        self.name = f"{role} file {self.path}"
        with open(self.path, "rb") as fh:
            self.shape, self.fortran, self.dtype = _read_npy_header(fh, self.name)
            self.offset = fh.tell()
        size = os.path.getsize(self.path)
        nbytes = math.prod(self.shape) * self.dtype.itemsize
        if size - self.offset < nbytes:
            raise ValueError(f"{self.name} is truncated: its header promises "
                             f"{self.shape} {self.dtype} ({nbytes} bytes of data) but it "
                             f"holds {size - self.offset}")
        self._end = self.offset + nbytes
        self._mm = None
        self._arr = None
        self._fh = None

    def _array(self):
        if self._arr is None:
            if math.prod(self.shape) == 0:
                self._arr = np.empty(self.shape, self.dtype)
                return self._arr
            # kept open: check() asks it (fstat) whether the mapped file has changed
            self._fh = open(self.path, "rb")
            st = os.fstat(self._fh.fileno())
            self._stamp = (st.st_size, st.st_mtime_ns)
            self._check_size(st.st_size)
            self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
            if hasattr(mmap, "MADV_SEQUENTIAL"):
                self._mm.madvise(mmap.MADV_SEQUENTIAL)
            self._base = np.frombuffer(self._mm, np.uint8).ctypes.data
            arr = np.ndarray(self.shape, self.dtype, buffer=self._mm, offset=self.offset,
                             order="F" if self.fortran else "C")
            arr.flags.writeable = False
            self._arr = arr
        return self._arr

    def read(self, axis, lo, hi):
        return self._array()[_slab(axis, lo, hi)]

    def _check_size(self, size):
        if size < self._end:
            raise ValueError(f"{self.name} was truncated while being read: it holds "
                             f"{max(size - self.offset, 0)} bytes of data, its header "
                             f"promises {self._end - self.offset}")

    def check(self):
        """Pages past the end of a truncated file raise SIGBUS when touched, which no
        Python code can catch; a rewritten file would mix two arrays silently.  Racy
        (the file may still change after the check) but catches the common cases."""
        if self._fh is None:
            return
        st = os.fstat(self._fh.fileno())
        self._check_size(st.st_size)
        if (st.st_size, st.st_mtime_ns) != self._stamp:
            raise ValueError(f"{self.name} was modified while being read (its size or "
                             "modification time changed); the result would mix old and "
                             "new data")

    def _bytes(self, axis, lo, hi):
        """The byte range of a slab, when it is one range (C order, axis 0)."""
        if self.fortran or axis != 0 or self._mm is None:
            return None
        row = math.prod(self.shape[1:]) * self.dtype.itemsize
        return self.offset + lo * row, self.offset + hi * row

    def will_need(self, axis, lo, hi):
        """Read slab [lo, hi) into the page cache and map it (called a slab ahead, on
        the read-ahead thread).  MADV_POPULATE_READ maps a whole range in one call,
        without it each 64 KB of the slab costs the kernels a page fault; it is called
        through ctypes, which lets go of the GIL while the disk works."""
        self._array()
        r = self._bytes(axis, lo, hi)
        if r is None:
            return
        start = r[0] - r[0] % _PAGE
        if r[1] <= start:
            return
        # (pages past a truncated end: populate fails with EFAULT, no SIGBUS; the main
        # thread's check() reports it before the kernels touch them)
        if _populate(self._base, start, r[1] - start):
            return
        if hasattr(mmap, "MADV_WILLNEED"):
            try:
                self._mm.madvise(mmap.MADV_WILLNEED, start, r[1] - start)
            except OSError:  # only a hint
                pass

    def done(self, axis, lo, hi):
        r = self._bytes(axis, lo, hi)
        if r is not None and hasattr(mmap, "MADV_DONTNEED"):
            # drops the mapping's pages (not the page cache): bounds the resident set
            start = r[0] - r[0] % _PAGE
            end = r[1] - r[1] % _PAGE
            if end > start:
                self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self):
        self._arr = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a view is still alive somewhere: let GC close it
                pass
            self._mm = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_mm"] = None
        d["_arr"] = None
        d["_fh"] = None
        return d


class NpzSource(_Source):
    """One array inside a .npz file, read sequentially from its (compressed) member."""

    def __init__(self, path, key=None, role="array"):
        self.path = os.fspath(path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                self.key = self._pick(names, key, role)
                where = f"{role} file {self.path} (array {self.key!r})"
                self.name = where
                info = zf.getinfo(self.key + ".npy")
                with zf.open(info) as fh:
                    self.shape, self.fortran, self.dtype = _read_npy_header(fh, where)
                    self.offset = fh.tell()
        except zipfile.BadZipFile as e:
            raise ValueError(f"{role} file {self.path} is not a readable .npz "
                             f"(zip) file: {e}") from None
        nbytes = math.prod(self.shape) * self.dtype.itemsize
        if info.file_size - self.offset < nbytes:
            raise ValueError(f"{self.name} is truncated: its header promises {self.shape} "
                             f"{self.dtype} ({nbytes} bytes) but the member holds "
                             f"{info.file_size - self.offset}")
        if self.fortran and len(self.shape) > 1:
            raise ValueError(f"{self.name} is stored in Fortran order, which cannot be "
                             "read by rows; save it in C order (np.ascontiguousarray)")
        self._zf = self._fh = None
        self._pos = 0

    def _pick(self, names, key, role):
        if key is not None:
            if key not in names:
                raise ValueError(f"{role} file {self.path} has no array {key!r} "
                                 f"(it holds {names})")
            return key
        if len(names) == 1:
            return names[0]
        if role in names:
            return role
        raise ValueError(f"{role} file {self.path} holds several arrays {names}; name one "
                         f"as {self.path}:KEY")

    def _seek(self, row):
        if self._fh is None or row != self._pos:
            self.close()
            self._zf = zipfile.ZipFile(self.path)
            self._fh = self._zf.open(self.key + ".npy")
            self._fh.seek(self.offset + row * self._row_bytes())
            self._pos = row

    def _row_bytes(self):
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    def read(self, axis, lo, hi):
        if axis != 0:
            raise ValueError(f"{self.name}: a .npz array is read by leading-axis rows; "
                             "its class axis cannot be the first axis")
        n = (hi - lo) * self._row_bytes()
        try:
            self._seek(lo)
            buf = self._fh.read(n)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            self.close()
            raise ValueError(f"{self.name} is corrupt or truncated: {e}") from None
        if len(buf) != n:
            self.close()
            raise ValueError(f"{self.name} is truncated: rows {lo}..{hi} are missing")
        self._pos = hi
        return np.frombuffer(buf, self.dtype).reshape((hi - lo,) + tuple(self.shape[1:]))

    def _array(self):
        return _LazyRows(self)

    def close(self):
        for f in (self._fh, self._zf):
            if f is not None:
                f.close()
        self._zf = self._fh = None

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_zf"] = d["_fh"] = None
        d["_pos"] = 0
        return d


class _LazyRows:
    """``source[key]`` for sources read by row ranges (Dask's from_array slices these)."""

    def __init__(self, src):
        self.src = src

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        first = key[0] if key else slice(None)
        lo, hi, step = first.indices(self.src.shape[0])
        with _NPZ_LOCK:
            rows = self.src.read(0, lo, hi)
        return rows[(slice(None, None, step),) + tuple(key[1:])]


_NPZ_LOCK = threading.Lock()


class ZarrSource(_Source):
    """A Zarr array (needs the ``zarr`` package)."""

    def __init__(self, path, role="array", array=None):
        self.path = os.fspath(path) if array is None else str(getattr(array, "path", ""))
        self.name = f"{role} Zarr array {self.path}"
        if array is None:
            try:
                import zarr
            except ImportError:
                raise ValueError(f"{self.name}: reading Zarr needs the zarr package "
                                 "(pip install zarr)") from None
            if not os.path.exists(self.path):
                raise FileNotFoundError(f"{role} file {self.path} does not exist")
            try:
                array = zarr.open_array(self.path, mode="r")
            except Exception as e:  # noqa: BLE001 - zarr raises many kinds
                raise ValueError(f"{self.name} cannot be opened as a Zarr array: "
                                 f"{type(e).__name__}: {e}") from None
        self.zarray = array
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)

    def read(self, axis, lo, hi):
        try:
            return self._as_dtype(np.asarray(self.zarray[_slab(axis, lo, hi)]))
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{self.name}: cannot read rows {lo}..{hi} "
                             f"({type(e).__name__}: {e})") from None

    def _array(self):
        return self.zarray


class ArraySource(_Source):
    """Any array-like with ``shape``, ``dtype`` and slicing (NumPy, memmap, h5py)."""

    def __init__(self, array, role="array"):
        self.array = array
        self.name = role
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)

    def read(self, axis, lo, hi):
        return self._as_dtype(np.asarray(self.array[_slab(axis, lo, hi)]))

    def _array(self):
        return self.array


def open_source(spec, role="array"):
    """A source for a path (``.npy``, ``.npz`` or ``FILE.npz:KEY``, a Zarr directory)
    or an array-like object."""
    if not isinstance(spec, (str, os.PathLike)):
        if type(spec).__module__.startswith("zarr"):
            return ZarrSource("", role, array=spec)
        if not (hasattr(spec, "shape") and hasattr(spec, "dtype")):
            spec = np.asarray(spec)
        return ArraySource(spec, role)
    path = os.fspath(spec)
    key = None
    if not os.path.exists(path) and ":" in path:
        base, _, k = path.rpartition(":")
        if os.path.isfile(base):
            path, key = base, k
    if not os.path.exists(path):
        raise FileNotFoundError(f"{role} file {path} does not exist")
    if os.path.isdir(path):
        return ZarrSource(path, role)
    if key is not None or zipfile.is_zipfile(path):
        return NpzSource(path, key, role)
    if path.endswith(".npz"):
        raise ValueError(f"{role} file {path} is not a readable .npz (zip) file; "
                         "is it truncated?")
    return NpySource(path, role)


# ---------------------------------------------------------------------------- streaming
def check_logits_dtype(src):
    """Refuse what cannot be logits; as the API, integers and bools are read as float64.

    A plain 2-byte void dtype (``|V2``, no fields) is taken as bfloat16 and ``src`` is
    read as such from then on: that is how ``np.save`` stores an ``ml_dtypes.bfloat16``
    array (NumPy knows no bfloat16, so ``np.load`` gives ``|V2``), and bfloat16 is
    ml_dtypes' only 2-byte type.
    """
    dt = src.dtype
    if dt.kind == "V" and dt.itemsize == 2 and dt.fields is None and dt.subdtype is None \
            and dt.name != "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise ValueError(f"{src.name} holds 2-byte raw values (dtype {dt}), as np.save "
                             "stores bfloat16; reading them as bfloat16 needs the "
                             "ml_dtypes package (pip install ml_dtypes)") from None
        src.dtype = np.dtype(ml_dtypes.bfloat16)
        return
    if not (dt.kind in "fiub" or (dt.kind == "V" and dt.name == "bfloat16")):
        raise ValueError(f"{src.name} must hold real numbers (logits), got dtype {dt}")


def check_targets_dtype(src):
    if src.dtype.kind not in "iu":
        raise ValueError(f"{src.name} must hold integer class indices, got dtype "
                         f"{src.dtype}")


def plan(logits_src, targets_src, axis, chunk_rows):
    """(class axis, slab axis of the logits, slab length, slabs of rows) for streaming."""
    shape = logits_src.shape
    if len(shape) == 0:
        raise ValueError(f"{logits_src.name} is a scalar; logits need a class axis")
    try:
        ax = normalize_axis_index(int(axis), len(shape))
    except Exception:
        raise ValueError(f"axis {axis} is out of range for {logits_src.name} of shape "
                         f"{shape}") from None
    batch = shape[:ax] + shape[ax + 1:]
    if tuple(targets_src.shape) != tuple(batch):
        raise ValueError(f"{targets_src.name} has shape {tuple(targets_src.shape)}; the "
                         f"logits {shape} with class axis {ax} need targets of shape "
                         f"{tuple(batch)}")
    if not batch:
        return ax, None, 1, [(0, 1)]
    ca = 0 if ax != 0 else 1
    length = shape[ca]
    inner = math.prod(batch) // length if length else 1
    if chunk_rows is None:
        row_bytes = max(1, shape[ax] * logits_src.dtype.itemsize)
        chunk_rows = max(1, DEFAULT_CHUNK_BYTES // row_bytes)
    chunk_rows = int(chunk_rows)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    step = max(1, chunk_rows // max(inner, 1))
    return ax, ca, length, [(lo, min(lo + step, length)) for lo in range(0, length, step)]


def _gpu_backend():
    """The CUDA backend, checked before any file is opened: without numba-cuda or a
    usable GPU, the API's error naming the extra to install."""
    gpu = _dispatch.cuda()
    gpu.require_gpu()
    return gpu


def evaluate_file(logits, targets, *, axis=-1, ignore_index=-100, topk=(1, 5), n_bins=15,
                  chunk_rows=None, per_row=False, progress=None, backend="auto"):
    """:func:`evaluate` over arrays larger than memory, streamed in row chunks.

    ``logits`` and ``targets`` are paths (``.npy``, memory-mapped; ``.npz``, as
    ``FILE.npz`` when it holds one array or arrays named ``logits``/``targets``, else
    ``FILE.npz:KEY``; a Zarr array directory) or array-likes (``np.memmap``,
    ``zarr.Array``, h5py datasets).  The rows are read once, ``chunk_rows`` rows at a
    time (by default about 32 MB of logits) along the first axis that is not the class
    axis, so resident memory stays bounded by a few chunks.  Each chunk's sums merge
    into one :class:`EvalState`: the result equals ``evaluate`` on the whole array up
    to the order of the float64 additions.

    Logits may be float16, bfloat16, float32 or float64; integers and bools are read
    as float64 (as in :func:`evaluate`), and a 2-byte void dtype (``|V2``: what
    ``np.load`` gives for a bfloat16 array saved with ``np.save``) as bfloat16.
    NaN logits follow :func:`evaluate`'s rule.

    ``progress``, if given, is called as ``progress(rows_done, rows_total)`` after each
    chunk.  Bad files raise one-line ``ValueError``s (``FileNotFoundError`` when
    missing) naming the file, also when a ``.npy`` file is truncated or rewritten while
    it is being read (checked before each chunk is touched); an out-of-range target
    raises ``IndexError`` with its position in the whole array.

    ``backend``: ``"auto"`` (threads for large slabs), ``"cpu"``, ``"parallel"``, or
    ``"cuda"``: each slab is copied to the GPU and read there once, and six numbers a
    row come back (without numba-cuda or a usable GPU, the error names the extra to
    install, before any file is opened).
    """
    check_backend(backend)
    topk = check_topk(topk)
    n_bins = check_bins(n_bins)
    gpu = _gpu_backend() if backend == "cuda" else None
    lsrc = open_source(logits, "logits")
    tsrc = open_source(targets, "targets")
    try:
        check_logits_dtype(lsrc)
        check_targets_dtype(tsrc)
        ax, ca, length, slabs = plan(lsrc, tsrc, axis, chunk_rows)
        state = EvalState(topk, n_bins)
        keep = [] if per_row else None
        # one slab ahead on a thread: the next slab is read (or mapped) from disk while
        # the kernels work on this one
        ahead = ThreadPoolExecutor(1)

        def load(i):
            lo, hi = slabs[i]
            if ca is None:
                return lsrc.read(0, 0, lsrc.shape[0]), tsrc._array()[()]
            lsrc.will_need(ca, lo, hi)
            return lsrc.read(ca, lo, hi), tsrc.read(0, lo, hi)

        try:
            pending = ahead.submit(load, 0)
            for i, (lo, hi) in enumerate(slabs):
                x, t = pending.result()
                if i + 1 < len(slabs):
                    pending = ahead.submit(load, i + 1)
                # nothing above touched the slab's pages (the read-ahead only maps and
                # hints): a file that shrank is caught here, before a SIGBUS could be
                lsrc.check()
                tsrc.check()
                batch = x.shape[:ax] + x.shape[ax + 1:]
                origin = None if ca is None else (lo,) + (0,) * (len(batch) - 1)
                tf = check_targets(np.asarray(t), batch, x.shape[ax], ignore_index, origin)
                if gpu is None:
                    f = HostFloat(x, "logits")
                    rows, _ = class_rows(f.arr, ax)
                    r = evaluate_rows(rows, f.hk, tf, ignore_index, backend)
                    del f, rows
                else:  # the slab is copied over; six numbers a row come back
                    st, tf = gpu.eval_stats(gpu.operand(x, "logits"), tf, axis=ax,
                                            ignore_index=_inputs.ignore_index_option(
                                                ignore_index))
                    r = rows_from_stats(st, tf, ignore_index)
                state.add_rows(r)
                if keep is not None:
                    keep.append({k: v.reshape(batch) for k, v in r.items()})
                del x
                if ca is not None:
                    lsrc.done(ca, lo, hi)
                if progress is not None:
                    progress(hi, length)
        finally:
            ahead.shutdown(wait=True, cancel_futures=True)
    finally:
        lsrc.close()
        tsrc.close()
    rows_out = None
    if keep is not None:
        rows_out = {k: (np.concatenate([c[k] for c in keep], axis=0) if ca is not None
                        else keep[0][k]) for k in keep[0]} if keep else None
    return state.result(rows_out)
