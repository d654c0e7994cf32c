"""The operations, one entry each: what ``warmup()``, ``xent-fast demo`` and
``xent-fast bench`` run, so that a new loss is one entry in ``OPS``.

An entry says how to make its inputs, how to call it, what it moves and how each peer
computes it.  Inputs are a dict of arrays under fixed keys:

    x   logits (rows, cols)               t   class-index targets (rows,) int64
    xt  target logits (rows, cols)        p   probabilities, rows summing to one
    q   a second set of probabilities     y   binary targets in [0, 1)

``call(m, d, **kw)`` runs the operation with ``m`` either ``xent_fast`` (``kw`` may hold
``backend=``, and for an entry with ``grad=True`` ``return_grad=`` or ``grad_out=``) or
``xent_fast.reference`` (the float64 oracle: same names and signatures, no ``backend``).
Gradients are with respect to ``d["x"]``.

Peers (``peers``) are builders ``build(d, grad)`` returning the call to time, or None
where the peer has no such case; they import their library when called, so that this
module imports NumPy only.  The NumPy reference peer (``"numpy-ref"``) is every entry's
``call`` on ``xent_fast.reference``.

Who reads what: ``warmup()`` runs every entry's ``call`` (with ``return_grad=True``
where it has a gradient) on ``make_inputs`` at a few rows of 64 classes; the demo
compares ``call`` on ``xent_fast`` and on the reference, with the keywords of ``check``,
on ``demo_inputs``; the bench times ``call`` (through ``bound``) and ``peer`` on
``make_inputs`` at each case's shape, against the floor ``nbytes``, and adds an entry
with a ``bench_shape`` to its full run.  A new loss is one ``Op`` in ``OPS`` (with its
peers' builders, if it has peers); cases at other shapes are ``_bench.HEADLINE``'s.
"""

import dataclasses
import functools
from typing import Callable, Optional

import numpy as np

# Peers, in report order, and the module each needs.  "torch.compile" is the "torch"
# peer's own code under torch.compile (its first call, the compile, is timed apart).
PEERS = {"numpy-ref": "numpy", "scipy": "scipy", "torch": "torch",
         "torch.compile": "torch", "jax": "jax"}


def dtype_of(name):
    """The NumPy dtype of a dtype name; "bfloat16" is ml_dtypes' (imported here)."""
    if str(name) == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _as_tensor(torch, a):
    """A NumPy array as a CPU tensor sharing its memory (bfloat16 through its bits)."""
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(a)


@dataclasses.dataclass(frozen=True)
class Op:
    name: str  # the demo's label
    kind: str  # the bench's case kind ("_grad" appended for the gradient)
    call: Callable  # call(m, d, **kw): m is xent_fast or xent_fast.reference
    inputs: Callable  # inputs(rng, x, shape, dtype) -> dict (x: the logits already drawn)
    grad: bool = False  # takes return_grad= / grad_out= (gradient w.r.t. d["x"])
    # bytes moved, the bench's floor: `reads` arrays of the input size and `row_bytes`
    # a row are read; `writes` arrays of the input size (and the gradient) are written
    reads: int = 1
    row_bytes: int = 0
    writes: int = 0
    elementwise: bool = False  # inputs are flat arrays of rows * cols elements
    peers: dict = dataclasses.field(default_factory=dict)  # "scipy"/"torch"/"jax"
    check: Optional[dict] = None  # the demo's check: keywords of call (None: no check);
    #                               with return_grad=True the gradient is compared
    bench_shape: Optional[tuple] = None  # (rows, cols) the full bench times it at once,
    #                                      for entries not among its headline cases

    def make_inputs(self, rows, cols, dtype="float32", seed=0):
        """The inputs at (rows, cols) of ``dtype``, the same for the same seed."""
        rng = np.random.default_rng(seed)
        shape = (rows, cols)
        dtype = dtype_of(dtype)
        x = (rng.standard_normal(shape, dtype=np.float32) * 3).astype(dtype)
        return self.inputs(rng, x, shape, dtype)

    def nbytes(self, rows, cols, dtype="float32", grad=False):
        """(bytes read, bytes written) that any implementation must move."""
        n = rows * cols * dtype_of(dtype).itemsize
        return self.reads * n + self.row_bytes * rows, (self.writes + bool(grad)) * n

    def peer(self, name, d, grad=False):
        """Peer ``name``'s call on ``d`` (the gradient too with ``grad``), or None."""
        if name == "numpy-ref":
            from . import reference as R

            kw = {"return_grad": grad} if self.grad else {}
            return self.call(bound(R), d, **kw)
        if name == "torch.compile":
            build = self.peers.get("torch")
            return None if build is None else build(d, grad, compiled=True)
        build = self.peers.get(name)
        return None if build is None else build(d, grad)


class bound:
    """Module ``m`` (xent_fast or its reference) whose functions return the call bound
    to its arguments (a ``functools.partial``) instead of its result: ``call(bound(m),
    d, **kw)`` is a call to time that costs no more than ``m``'s function itself."""

    def __init__(self, m):
        self._m = m

    def __getattr__(self, name):
        f = getattr(self._m, name)
        return lambda *args, **kw: functools.partial(f, *args, **kw)


# ---------------------------------------------------------------------------- inputs
def _logits(rng, x, shape, dtype):
    return {"x": x}


def _index_targets(rng, x, shape, dtype):
    return {"x": x, "t": rng.integers(0, shape[1], shape[0])}


def _logit_pair(rng, x, shape, dtype):
    return {"x": x, "xt": (rng.standard_normal(shape, dtype=np.float32) * 3).astype(dtype)}


def _probabilities(rng, shape):
    p = rng.random(shape, dtype=np.float32) + np.float32(0.01)
    p /= p.sum(-1, keepdims=True)
    return p


def _distributions(rng, x, shape, dtype):
    p = _probabilities(rng, shape)
    return {"p": p.astype(dtype), "q": p[::-1].copy().astype(dtype)}


def _prob_targets(rng, x, shape, dtype):
    return {"x": x, "p": _probabilities(rng, shape).astype(dtype)}


def _sparse_teacher(rng, x, shape, dtype):
    """The logits and a teacher on k = min(64, C) distinct classes a row (a run of classes
    from a random start) holding 0.9 of its mass, as log-probabilities."""
    rows, cols = shape
    k = min(64, cols)
    idx = (rng.integers(0, max(cols, 1), (rows, 1)) + np.arange(k)) % max(cols, 1)
    p = rng.random((rows, k)) + 0.01
    lp = np.log(0.9 * p / p.sum(-1, keepdims=True))
    return {"x": x, "ti": idx.astype(np.int64), "tv": lp.astype(dtype)}


def _binary_logits(rng, x, shape, dtype):
    return {"x": x.reshape(-1), "y": rng.random(x.size, dtype=np.float32).astype(dtype)}


def _log_probs(rng, x, shape, dtype):
    """Log-probabilities as inputs (a row of x log-softmaxed is not needed: any log of a
    probability will do), probabilities as targets, and class indices."""
    lp = np.log(rng.random(shape, dtype=np.float32) + np.float32(0.01)).astype(dtype)
    return {"x": lp, "p": _probabilities(rng, shape).astype(dtype),
            "t": rng.integers(0, shape[1], shape[0])}


def _binary_probs(rng, x, shape, dtype):
    return {"p": rng.random(x.size, dtype=np.float32).astype(dtype),
            "y": rng.random(x.size, dtype=np.float32).astype(dtype)}


def demo_inputs(rng):
    """The demo's inputs (float32, 257 x 1000), drawn from ``rng``; every check reads
    its arrays under the keys its ``call`` reads (``q`` is ``p`` with the rows
    reversed)."""
    from . import reference as R

    x = rng.standard_normal((257, 1000)).astype(np.float32) * 3
    xt = rng.standard_normal(x.shape).astype(np.float32) * 3
    t = rng.integers(0, 1000, 257)
    probs = R.softmax(xt).astype(np.float32)
    y = rng.random(x.shape).astype(np.float32)
    ti = (rng.integers(0, 1000, (257, 1)) + np.arange(64)) % 1000
    tv = np.take_along_axis(R.log_softmax(xt), ti, -1).astype(np.float32)
    return {"x": x, "xt": xt, "t": t, "p": probs, "q": probs[::-1], "y": y, "ti": ti, "tv": tv}


# ---------------------------------------------------------------------------- peers
def _scipy(make):
    """A SciPy peer, forward only: ``make(sp, d)`` -> the call (sp: scipy.special)."""
    def build(d, grad):
        import scipy.special as sp

        return None if grad else make(sp, d)
    return build


def _torch(keys, make):
    """A PyTorch peer, forward only: ``make(torch, F, *tensors)`` -> the call, the
    tensors being ``d``'s arrays under ``keys`` (wrapped once, outside the timing)."""
    def build(d, grad, compiled=False):
        import torch
        import torch.nn.functional as F

        if grad:
            return None
        fn = make(torch, F, *(_as_tensor(torch, d[k]) for k in keys))
        return torch.compile(fn) if compiled else fn
    return build


def _torch_loss(keys, make):
    """A PyTorch peer of a loss of the logits: ``make(torch, F, *tensors)`` ->
    ``loss(z)``, the tensors as for ``_torch``; forward under no_grad, or forward and
    backward with ``grad``."""
    def build(d, grad, compiled=False):
        import torch
        import torch.nn.functional as F

        x = _as_tensor(torch, d["x"])
        loss = make(torch, F, *(_as_tensor(torch, d[k]) for k in keys))
        if compiled:
            loss = torch.compile(loss)
        if not grad:
            def fwd():
                with torch.no_grad():
                    return loss(x)
            return fwd

        def fwd_bwd():
            z = x.detach().requires_grad_(True)
            out = loss(z)
            out.backward()
            return z.grad

        return fwd_bwd
    return build


def _jax(make):
    """A JAX peer, forward only: ``make(jax)`` -> a function of the logits, jitted."""
    def build(d, grad):
        import jax
        import jax.numpy as jnp

        if grad:
            return None
        x = jnp.asarray(d["x"])
        f = jax.jit(make(jax))
        return lambda: f(x).block_until_ready()
    return build


def _jax_loss(other, make):
    """A JAX peer of a loss: ``make(jax, jnp)`` -> ``loss(z, o)`` of the logits and
    ``d[other]``, jitted (with its gradient under ``grad``).  Every array is an
    argument: arrays closed over become XLA constants, and constant-folding a 512 MB
    one took 36 s of compilation."""
    def build(d, grad):
        import jax
        import jax.numpy as jnp

        x, o = jnp.asarray(d["x"]), jnp.asarray(d[other])
        loss = make(jax, jnp)
        f = jax.jit(jax.value_and_grad(loss) if grad else loss)
        return lambda: jax.block_until_ready(f(x, o))
    return build


def _jax_ce(jax, jnp):
    def loss(z, t):
        lp = jax.nn.log_softmax(z, axis=-1)
        return -jnp.mean(jnp.take_along_axis(lp, t[:, None], axis=-1))
    return loss


def _jax_kl(jax, jnp):
    def loss(z, zt):
        lt = jax.nn.log_softmax(zt, axis=-1)
        lp = jax.nn.log_softmax(z, axis=-1)
        return jnp.sum(jnp.exp(lt) * (lt - lp)) / z.shape[0]
    return loss


def _jax_bce_logits(jax, jnp):
    def loss(z, y):
        return jnp.mean(jnp.logaddexp(0.0, z) - z * y)
    return loss


def _scipy_ce(sp, d):
    x, t = d["x"], d["t"]
    rows = np.arange(x.shape[0])
    return lambda: np.mean(sp.logsumexp(x, axis=-1) - x[rows, t])


def _scipy_kl(sp, d):
    x, xt = d["x"], d["xt"]
    return lambda: np.sum(sp.rel_entr(sp.softmax(xt, axis=-1),
                                      sp.softmax(x, axis=-1))) / x.shape[0]


def _torch_kl(torch, F, xt):
    lt = F.log_softmax(xt, dim=-1)
    return lambda z: F.kl_div(F.log_softmax(z, dim=-1), lt, reduction="batchmean",
                              log_target=True)


def _torch_jsd(beta):
    """Liger-Kernel's generalised JSD as its own tests compute it in PyTorch (student z,
    teacher xt, batchmean)."""
    def make(torch, F, xt):
        lp = F.log_softmax(xt, dim=-1)

        def loss(z):
            lq = F.log_softmax(z, dim=-1)
            m = beta * lp.exp() + (1 - beta) * lq.exp()
            lm = m.log()
            return (beta * (lp.exp() * (lp - lm)).sum(-1)
                    + (1 - beta) * (lq.exp() * (lq - lm)).sum(-1)).sum() / z.shape[0]
        return loss
    return make


def _torch_kl_sparse(torch, F, ti, tv):
    """The sparse-teacher KL as it is written in PyTorch: log_softmax, gather, the
    teacher renormalised over its k classes."""
    lp = tv - torch.logsumexp(tv, dim=-1, keepdim=True)
    p = lp.exp()
    return lambda z: (p * (lp - F.log_softmax(z, dim=-1).gather(-1, ti))).sum() / z.shape[0]


def _torch_focal(torch, F, y):
    """torchvision.ops.sigmoid_focal_loss's formula (alpha 0.25, gamma 2, mean)."""
    def loss(z):
        p = torch.sigmoid(z)
        ce = F.binary_cross_entropy_with_logits(z, y, reduction="none")
        p_t = p * y + (1 - p) * (1 - y)
        return ((0.25 * y + 0.75 * (1 - y)) * ce * (1 - p_t) ** 2).mean()
    return loss


# ---------------------------------------------------------------------------- the table
OPS = [
    Op("logsumexp", "logsumexp", inputs=_logits,
       call=lambda m, d, **kw: m.logsumexp(d["x"], **kw),
       peers={"scipy": _scipy(lambda sp, d: lambda: sp.logsumexp(d["x"], axis=-1)),
              "torch": _torch(("x",), lambda torch, F, x: lambda: torch.logsumexp(x,
                                                                                   dim=-1)),
              "jax": _jax(lambda jax: lambda z: jax.scipy.special.logsumexp(z, axis=-1))},
       check={}),
    Op("softmax", "softmax", inputs=_logits, writes=1,
       call=lambda m, d, **kw: m.softmax(d["x"], **kw),
       peers={"scipy": _scipy(lambda sp, d: lambda: sp.softmax(d["x"], axis=-1)),
              "torch": _torch(("x",), lambda torch, F, x: lambda: F.softmax(x, dim=-1)),
              "jax": _jax(lambda jax: jax.nn.softmax)},
       check={}, bench_shape=(4096, 32000)),
    Op("log_softmax", "log_softmax", inputs=_logits, writes=1,
       call=lambda m, d, **kw: m.log_softmax(d["x"], **kw),
       peers={"scipy": _scipy(lambda sp, d: lambda: sp.log_softmax(d["x"], axis=-1)),
              "torch": _torch(("x",), lambda torch, F, x: lambda: F.log_softmax(x, dim=-1)),
              "jax": _jax(lambda jax: jax.nn.log_softmax)},
       check={}, bench_shape=(4096, 32000)),
    Op("entropy", "entropy", inputs=_distributions,
       call=lambda m, d, **kw: m.entropy(d["p"], **kw),
       peers={"scipy": _scipy(lambda sp, d: lambda: sp.entr(d["p"]).sum(-1)),
              "torch": _torch(("p",), lambda torch, F, p: lambda: torch.special.entr(p)
                              .sum(-1))},
       check={}, bench_shape=(4096, 32000)),
    Op("cross_entropy", "cross_entropy", inputs=_distributions, reads=2,
       call=lambda m, d, **kw: m.cross_entropy(d["p"], d["q"], **kw),
       check={}),
    Op("kl_divergence", "kl_divergence", inputs=_distributions, reads=2,
       call=lambda m, d, **kw: m.kl_divergence(d["p"], d["q"], **kw),
       peers={"scipy": _scipy(lambda sp, d: lambda: sp.rel_entr(d["p"], d["q"]).sum(-1)),
              "torch": _torch(("p", "q"), lambda torch, F, p, q: lambda: F.kl_div(
                  q.log(), p, reduction="none").sum(-1))},
       check={}, bench_shape=(4096, 32000)),
    Op("softmax_cross_entropy", "ce", inputs=_index_targets, grad=True, row_bytes=8,
       call=lambda m, d, **kw: m.softmax_cross_entropy(d["x"], d["t"], **kw),
       peers={"scipy": _scipy(_scipy_ce),
              "torch": _torch_loss(("t",), lambda torch, F, t: lambda z:
                                   F.cross_entropy(z, t)),
              "jax": _jax_loss("t", _jax_ce)},
       check={"return_grad": True}),
    Op("softmax_cross_entropy (probs)", "ce_probs", inputs=_prob_targets, grad=True,
       reads=2,
       call=lambda m, d, **kw: m.softmax_cross_entropy(d["x"], d["p"], **kw),
       check={"label_smoothing": 0.1}),
    Op("softmax_kl_divergence", "kl", inputs=_logit_pair, grad=True, reads=2,
       call=lambda m, d, **kw: m.softmax_kl_divergence(d["x"], d["xt"], **kw),
       peers={"scipy": _scipy(_scipy_kl), "torch": _torch_loss(("xt",), _torch_kl),
              "jax": _jax_loss("xt", _jax_kl)},
       check={"temperature": 2.0}),
    Op("softmax_js_divergence", "jsd", inputs=_logit_pair, grad=True, reads=2,
       call=lambda m, d, **kw: m.softmax_js_divergence(d["x"], d["xt"], **kw),
       peers={"torch": _torch_loss(("xt",), _torch_jsd(0.5))},
       check={"beta": 0.3, "temperature": 2.0, "return_grad": True}),
    Op("softmax_kl_divergence_sparse", "kl_sparse", inputs=_sparse_teacher, grad=True,
       row_bytes=64 * 16,
       call=lambda m, d, **kw: m.softmax_kl_divergence_sparse(d["x"], d["ti"], d["tv"], **kw),
       peers={"torch": _torch_loss(("ti", "tv"), _torch_kl_sparse)},
       check={"return_grad": True}),
    Op("binary_cross_entropy", "bce", inputs=_binary_probs, reads=2, elementwise=True,
       call=lambda m, d, **kw: m.binary_cross_entropy(d["p"], d["y"], **kw),
       peers={"torch": _torch(("p", "y"), lambda torch, F, p, y: lambda:
                              F.binary_cross_entropy(p, y))},
       check={}, bench_shape=(1, 10_000_000)),
    Op("binary_cross_entropy_with_logits", "bce_logits", inputs=_binary_logits, grad=True,
       reads=2, elementwise=True,
       call=lambda m, d, **kw: m.binary_cross_entropy_with_logits(d["x"], d["y"], **kw),
       peers={"scipy": _scipy(lambda sp, d: lambda: np.mean(
                  np.logaddexp(0, d["x"]) - d["x"] * d["y"])),
              "torch": _torch_loss(("y",), lambda torch, F, y: lambda z:
                                   F.binary_cross_entropy_with_logits(z, y)),
              "jax": _jax_loss("y", _jax_bce_logits)},
       check={"return_grad": True}),
    Op("nll_loss", "nll", inputs=_log_probs, grad=True, reads=0, row_bytes=16,
       call=lambda m, d, **kw: m.nll_loss(d["x"], d["t"], **kw),
       peers={"torch": _torch_loss(("t",), lambda torch, F, t: lambda z: F.nll_loss(z, t))},
       check={"return_grad": True}, bench_shape=(4096, 32000)),
    Op("kl_div", "kl_div", inputs=_log_probs, grad=True, reads=2,
       call=lambda m, d, **kw: m.kl_div(d["x"], d["p"], reduction="batchmean", **kw),
       peers={"torch": _torch_loss(("p",), lambda torch, F, p: lambda z: F.kl_div(
           z, p, reduction="batchmean"))},
       check={"return_grad": True}, bench_shape=(4096, 32000)),
    Op("sigmoid_focal_loss", "focal", inputs=_binary_logits, grad=True, reads=2,
       elementwise=True,
       call=lambda m, d, **kw: m.sigmoid_focal_loss(d["x"], d["y"], reduction="mean", **kw),
       peers={"torch": _torch_loss(("y",), _torch_focal)},
       check={"return_grad": True}, bench_shape=(1, 10_000_000)),
    Op("evaluate", "evaluate", inputs=_index_targets, row_bytes=8,
       call=lambda m, d, **kw: m.evaluate(d["x"], d["t"], **kw)),
]

BY_KIND = {op.kind: op for op in OPS}
assert len(BY_KIND) == len(OPS) == len({op.name for op in OPS}), "duplicate entries"
