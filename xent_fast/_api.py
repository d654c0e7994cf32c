"""The public functions: validate once, choose a backend, call its entry point.

Every check and error text lives in ``_inputs``; the choice of backend in ``_dispatch``.
A backend module (``_cpu.backend`` or ``_cuda.backend``) offers the same entry points
with the same keyword options, so a call means the same thing, and fails the same way,
on every backend.  Nothing here imports Numba: the backends are imported on first use.
"""

import numpy as np

from . import _dispatch, _inputs


def _prepare(backend, value, name, *others):
    """(backend module, the input described, whether a CPU call runs on threads)."""
    be = _dispatch.backend_for(backend, value, *others)
    x = be.operand(value, name)
    return be, x, _dispatch.threads(backend, _size(x.shape))


def _size(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _check_grad_out(be, grad_out, x):
    if grad_out is not None:
        _inputs.check_grad_out(x.shape, x.grad_dtype, *be.describe_grad(grad_out, x))


# ---------------------------------------------------------------------------- building blocks
def logsumexp(x, axis=-1, keepdims=False, *, backend="auto"):
    """Log of the sum of exponentials along ``axis``, shifted by the row max.

    ``log(sum(exp(x)))`` computed as ``m + log(sum(exp(x - m)))``, ``m = max(x)``.

    Conventions: a row of all ``-inf`` (or an empty class axis) gives ``-inf``; any
    ``+inf`` gives ``+inf``; NaN propagates.  Unlike ``scipy.special.logsumexp`` only one
    axis is reduced and there is no ``b`` scaling.

    Examples
    --------
    >>> float(logsumexp([0.0, 0.0]))  # log 2
    0.6931471805599453
    """
    be, f, threads = _prepare(backend, x, "x")
    ax = _inputs.class_axis(f.shape, axis, "x")
    return be.logsumexp(f, axis=ax, keepdims=bool(keepdims), threads=threads)


def _softmax_common(x, axis, log, backend):
    be, f, threads = _prepare(backend, x, "x")
    ax = _inputs.class_axis(f.shape, axis, "x")
    return be.softmax(f, axis=ax, log=log, threads=threads)


def softmax(x, axis=-1, *, backend="auto"):
    """``exp(x - logsumexp(x))`` along ``axis``.

    ``-inf`` entries give 0; a row of all ``-inf``, or with a ``+inf`` entry, gives NaN
    throughout (0/0 and inf/inf, as SciPy and PyTorch).
    """
    return _softmax_common(x, axis, False, backend)


def log_softmax(x, axis=-1, *, backend="auto"):
    """``x - logsumexp(x)`` along ``axis``.

    ``-inf`` entries give ``-inf``; a row of all ``-inf``, or with a ``+inf`` entry,
    gives NaN throughout (as SciPy and PyTorch).
    """
    return _softmax_common(x, axis, True, backend)


def _dist(p, q, axis, base, mode, backend):
    be, fp, threads = _prepare(backend, p, "p", q)
    fq = be.operand(q, "q") if q is not None else fp
    _inputs.check_pair(fp.shape, fq.shape)
    scale = _inputs.log_base(base)
    ax = _inputs.class_axis(fp.shape, axis, "p")
    return be.dist(fp, fq, axis=ax, mode=mode, scale=scale, threads=threads)


def entropy(p, axis=-1, base=None, *, backend="auto"):
    """Shannon entropy ``-sum(p log p)`` along ``axis``; ``0 log 0 = 0``.

    ``p`` is used as given: unlike ``scipy.stats.entropy`` it is not renormalised, and the
    reduction is along ``axis`` (default last), not axis 0.  ``base=2`` gives bits.
    A negative or NaN probability raises ``ValueError``.

    Examples
    --------
    >>> round(float(entropy([0.5, 0.5], base=2)), 3)  # a fair coin
    1.0
    >>> round(float(entropy([0.9, 0.1], base=2)), 3)  # a 90:10 coin
    0.469
    """
    return _dist(p, None, axis, base, 0, backend)


def cross_entropy(p, q, axis=-1, base=None, *, backend="auto"):
    """Cross-entropy ``H(p, q) = -sum(p log q)`` along ``axis``.

    Terms with ``p = 0`` are 0 even where ``q = 0``; ``p > 0`` with ``q = 0`` gives ``+inf``.

    Examples
    --------
    >>> round(float(cross_entropy([0.8, 0.1, 0.1], [0.2, 0.2, 0.6])), 3)
    1.5
    """
    return _dist(p, q, axis, base, 1, backend)


def kl_divergence(p, q, axis=-1, base=None, *, backend="auto"):
    """Kullback-Leibler divergence ``sum(p log(p/q)) = H(p, q) - H(p)`` along ``axis``.

    Not SciPy's ``kl_div`` (which is elementwise ``p log(p/q) - p + q``).  ``0 log 0 = 0``;
    ``p > 0`` with ``q = 0`` gives ``+inf``.

    Examples
    --------
    >>> round(float(kl_divergence([0.8, 0.1, 0.1], [0.2, 0.2, 0.6])), 3)
    0.861
    """
    return _dist(p, q, axis, base, 2, backend)


# ---------------------------------------------------------------------------- softmax CE
def softmax_cross_entropy(logits, targets, *, axis=-1, weight=None, ignore_index=-100,
                          label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                          return_grad=False, grad_out=None, return_z_loss=False,
                          backend="auto"):
    """Softmax cross-entropy from logits, as ``torch.nn.functional.cross_entropy``.

    Per row, with ``lse = logsumexp(y)``, ``y`` the (optionally soft-capped) logits and
    target weights ``a_c``::

        loss = sum_c a_c (lse - y_c) + z_loss * lse**2

    Integer ``targets`` (the logits' shape without the class axis) give
    ``a_c = (1 - eps) w_t [c = t] + eps/C w_c``; float targets of the logits' full shape
    are probabilities ``p`` and give ``a_c = ((1 - eps) p_c + eps/C) w_c``
    (``eps = label_smoothing``, ``w`` = ``weight`` or ones).

    Reductions follow PyTorch: ``"mean"`` divides by the summed weight of the
    non-ignored targets (by the number of rows for probability targets); an all-ignored
    batch gives NaN for ``"mean"`` and 0 for ``"sum"``; ``"none"`` gives 0 for ignored
    rows.  ``z_loss`` is added per row before the reduction.  ``softcap`` replaces the
    logits by ``softcap * tanh(logits / softcap)`` first.

    A target whose logit is ``-inf`` gives ``+inf``; other ``-inf`` logits contribute
    exactly 0 to the loss and gradient (with label smoothing every class is a partial
    target, so any ``-inf`` logit makes the loss ``+inf``).

    With ``return_grad=True`` (implied by ``grad_out``) returns ``(loss, grad)``, the
    gradient of the reduced loss (of the sum of the rows for ``"none"``) with respect to
    ``logits``, in the logits' dtype, computed in the same pass.  ``grad_out=logits``
    computes it in place, overwriting the logits.

    ``return_z_loss=True`` (as Liger-Kernel's) also returns the z-loss term alone,
    ``z_loss * lse**2`` reduced as it enters the loss (under ``"mean"`` averaged over the
    non-ignored rows, not class-weighted; 0 at ignored rows for ``"none"``), which the
    returned loss includes: ``(loss, z_term)`` or, with a gradient, ``(loss, z_term,
    grad)``.  It costs one more read of the logits (their log-sum-exp, taken before a
    ``grad_out=logits`` overwrites them); with ``softcap`` on a GPU the logits go
    through the host.

    Examples
    --------
    >>> import numpy as np
    >>> round(float(softmax_cross_entropy(np.array([[2.0, 1.0, 0.1]]), np.array([0]))), 4)
    0.417
    """
    o = _inputs.CEOptions(reduction, label_smoothing, z_loss, softcap, return_grad, grad_out)
    be, x, threads = _prepare(backend, logits, "logits", targets)
    if o.cap:
        _inputs.check_inverse(o.cap, "softcap", x.out_dtype)
    ax = _inputs.class_axis(x.shape, axis, "logits")
    c = x.shape[ax]
    tshape, tdtype = be.describe(targets, "targets")
    kind = _inputs.ce_target_kind(tdtype, tshape, _inputs.batch_shape(x.shape, ax), x.shape)
    ignore = _inputs.ignore_index_option(ignore_index) if kind == "index" else None
    w = _inputs.class_weight(be.to_host(weight, "weight"), c)
    _check_grad_out(be, grad_out, x)
    if return_z_loss:  # before a grad_out=logits overwrites them
        zt = _z_term(be, logits, x, targets, kind, ignore, ax, o, threads)
    res = be.softmax_cross_entropy(
        x, targets, axis=ax, kind=kind, weight=w, ignore_index=ignore,
        label_smoothing=o.eps, z_loss=o.z, softcap=o.cap, reduction=o.reduction,
        want_grad=o.want_grad, grad_out=grad_out, threads=threads)
    if not return_z_loss:
        return res
    return (res[0], zt, res[1]) if o.want_grad else (res, zt)


def _z_term(be, logits, x, targets, kind, ignore, ax, o, threads):
    """z_loss * lse**2 of the (soft-capped) rows, reduced as the loss reduces it (NumPy:
    the rows' log-sum-exps are a small host array)."""
    if o.cap:
        from ._dispatch import cpu

        h = np.asarray(be.to_host(logits)).astype(x.out_dtype)
        h = o.cap * np.tanh(h / o.cap)
        lse = cpu().logsumexp(cpu().operand(h, "logits"), axis=ax, keepdims=False,
                              threads=threads)
    else:
        lse = be.logsumexp(x, axis=ax, keepdims=False, threads=threads)
    lse = np.asarray(be.to_host(lse), np.float64).reshape(-1)
    kept = np.ones(lse.shape, bool)
    if kind == "index":
        kept = np.asarray(be.to_host(targets)).reshape(-1) != ignore
    with np.errstate(over="ignore", invalid="ignore"):
        rows = np.where(kept, o.z * lse * lse if o.z else 0.0, 0.0)
    out = x.out_dtype
    if o.reduction == "none":
        return rows.reshape(_inputs.batch_shape(x.shape, ax)).astype(out)
    total = float(rows.sum())
    if o.reduction == "sum":
        return out.type(total)
    return out.type(_inputs.mean_of(total, int(kept.sum())))


def softmax_kl_divergence(logits, target_logits, *, axis=-1, temperature=1.0,
                          reduction="batchmean", return_grad=False, grad_out=None,
                          backend="auto"):
    """KL(softmax(target_logits/T) || softmax(logits/T)) per row, for distillation.

    Computed from the two logit arrays in one pass, without forming either
    distribution::

        KL = sum_c p_c (t_c - s_c) + lse(s) - lse(t),  s = logits/T, t = target_logits/T

    Reductions: ``"batchmean"`` (sum over rows / number of rows, the mathematically
    right mean), ``"sum"``, ``"mean"`` (sum / number of elements, as PyTorch's
    ``kl_div``) and ``"none"``.  There is no ``T**2`` factor: multiply by it yourself if
    you follow Hinton et al.  The gradient is with respect to ``logits``.
    """
    reduction = _inputs.reduction(reduction, _inputs.KL_REDUCTIONS)
    temp = _inputs.real_option(temperature, "temperature", 0.0, None, lo_open=True)
    want_grad = bool(return_grad) or grad_out is not None
    be, x, threads = _prepare(backend, logits, "logits", target_logits)
    _inputs.check_inverse(temp, "temperature", x.out_dtype)
    t = x.companion(target_logits, "target_logits")
    _inputs.same_shape(x.shape, t.shape, "target_logits must have the logits' shape")
    ax = _inputs.class_axis(x.shape, axis, "logits")
    _check_grad_out(be, grad_out, x)
    return be.softmax_kl_divergence(x, t, axis=ax, temperature=temp, reduction=reduction,
                                    want_grad=want_grad, grad_out=grad_out, threads=threads)



def softmax_js_divergence(logits, target_logits, *, beta=0.5, temperature=1.0, axis=-1,
                          targets=None, ignore_index=-100, reduction="batchmean",
                          return_grad=False, grad_out=None, backend="auto"):
    """Generalised Jensen-Shannon divergence between a teacher's and a student's logits,
    per row, for distillation::

        JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M),   M = beta P + (1 - beta) Q

    with ``P = softmax(target_logits/T)`` (the teacher) and ``Q = softmax(logits/T)``
    (the student).  ``beta = 0.5`` is the symmetric JSD (at most log 2); at the ends, as
    Liger-Kernel's ``LigerJSD`` defines them, ``beta = 0`` is the forward KL(P || Q) and
    ``beta = 1`` the reverse KL(Q || P) (the formula itself would give 0 there).
    Computed from the two logit arrays in three reads of each row, no distribution
    stored; ``log M`` in logs, ``max(a, b) + log1p(exp(-|a - b|))`` with
    ``a = log beta + log p``, ``b = log(1 - beta) + log q``.

    ``targets`` (optional, integers of the batch shape, e.g. the labels of a causal LM)
    masks rows: a row whose target equals ``ignore_index`` gives 0 and no gradient and is
    not counted; other target values are not read.  Reductions as
    ``softmax_kl_divergence``: ``"batchmean"`` (default; over the counted rows, NaN if
    none), ``"sum"``, ``"mean"`` (over their elements) and ``"none"``.  No ``T**2``
    factor.  The gradient is with respect to ``logits``:
    ``(1 - beta)/T q (log q - log m - KL(Q || M))`` (at beta = 0: ``(q - p)/T``).
    A row with ``+inf`` or NaN, or all ``-inf``, in either input gives NaN.
    """
    reduction = _inputs.reduction(reduction, _inputs.KL_REDUCTIONS)
    b = _inputs.real_option(beta, "beta", 0.0, 1.0)
    temp = _inputs.real_option(temperature, "temperature", 0.0, None, lo_open=True)
    want_grad = bool(return_grad) or grad_out is not None
    be, x, threads = _prepare(backend, logits, "logits", target_logits, targets)
    _inputs.check_inverse(temp, "temperature", x.out_dtype)
    t = x.companion(target_logits, "target_logits")
    _inputs.same_shape(x.shape, t.shape, "target_logits must have the logits' shape")
    ax = _inputs.class_axis(x.shape, axis, "logits")
    ignore = None
    if targets is not None:
        tshape, tdtype = be.describe(targets, "targets")
        _inputs.check_index_targets(tdtype, tshape, _inputs.batch_shape(x.shape, ax))
        ignore = _inputs.ignore_index_option(ignore_index)
    _check_grad_out(be, grad_out, x)
    return be.softmax_js_divergence(x, t, axis=ax, beta=b, temperature=temp, targets=targets,
                                    ignore_index=ignore, reduction=reduction,
                                    want_grad=want_grad, grad_out=grad_out, threads=threads)


_MISSING = {"renormalize": 0, "residual": 1}


def _sparse(backend, logits, indices, values, axis, iname, vname):
    be, x, threads = _prepare(backend, logits, "logits", indices, values)
    ax = _inputs.class_axis(x.shape, axis, "logits")
    ishape, idt = be.describe(indices, iname)
    if np.dtype(idt).kind not in "iu":
        raise TypeError(f"{iname} must be integer class indices, got dtype {np.dtype(idt)}")
    v = x.companion(values, vname)
    _inputs.sparse_shape(x.shape, ax, ishape, v.shape, iname, vname)
    return be, x, v, ax, threads


def softmax_kl_divergence_sparse(logits, teacher_indices, teacher_logprobs, *,
                                 temperature=1.0, missing="renormalize", axis=-1,
                                 reduction="batchmean", return_grad=False, grad_out=None,
                                 backend="auto"):
    """KL(teacher || softmax(logits/T)) per row with the teacher given on k classes a row,
    as distillation pipelines store it (the top-k of a large vocabulary)::

        KL = sum_j p_j (log p_j - log q_{i_j})  [+ r log(r / (1 - sum_j q_{i_j}))]

    ``teacher_indices`` (integers) and ``teacher_logprobs`` have the logits' shape with k
    entries along the class axis; the indices of a row are distinct and in [0, C)
    (checked; pad a short row with unused classes at ``-inf``, which add nothing).
    ``missing`` says what the teacher's mass outside the k is:

    * ``"renormalize"`` (default): none; the teacher is ``softmax(teacher_logprobs/T)``
      over its k classes (so raw top-k logits work as well as log-probabilities), and
      equals the dense KL against a teacher whose other logits are ``-inf``;
    * ``"residual"``: ``p_j = exp(teacher_logprobs)`` as given (stored at the
      distillation temperature; T softens the student only) and the remaining mass
      ``r = 1 - sum p`` (0 if the sum exceeds 1 by rounding, or if k = C) sits on the
      other classes,
      compared with the student's mass there; equals the dense KL against a teacher that
      spreads ``r`` over them as the student does.

    Reductions as ``softmax_kl_divergence``.  The gradient, w.r.t. ``logits`` in the same
    pass, is ``(q - p)/T`` at the k classes and ``a q/T`` elsewhere (``a`` = 1, or
    ``1 - r/(1 - sum_j q_{i_j})`` for ``"residual"``).  A row of the logits with ``+inf``,
    NaN or all ``-inf`` gives NaN.
    """
    reduction = _inputs.reduction(reduction, _inputs.KL_REDUCTIONS)
    temp = _inputs.real_option(temperature, "temperature", 0.0, None, lo_open=True)
    if missing not in _MISSING:
        raise ValueError(f"missing must be 'renormalize' or 'residual', got {missing!r}")
    want_grad = bool(return_grad) or grad_out is not None
    be, x, v, ax, threads = _sparse(backend, logits, teacher_indices, teacher_logprobs, axis,
                                    "teacher_indices", "teacher_logprobs")
    _inputs.check_inverse(temp, "temperature", x.out_dtype)
    _check_grad_out(be, grad_out, x)
    return be.sparse_targets(x, teacher_indices, teacher_logprobs, axis=ax, temperature=temp,
                             mode=_MISSING[missing], reduction=reduction, want_grad=want_grad,
                             grad_out=grad_out, threads=threads)


def softmax_cross_entropy_sparse(logits, target_indices, target_probs, *, axis=-1,
                                 reduction="mean", return_grad=False, grad_out=None,
                                 backend="auto"):
    """Softmax cross-entropy with soft targets given on k classes a row:
    ``-sum_j p_j log softmax(logits)[i_j]`` (``p`` as given, not renormalised: the same
    as ``softmax_cross_entropy`` with the dense probability targets that are ``p`` at
    the ``i_j`` and 0 elsewhere).  Shapes and index rules as
    ``softmax_kl_divergence_sparse``; reductions ``"mean"`` (over rows, as PyTorch's
    probability targets), ``"sum"``, ``"none"``.  Gradient ``(sum p) q - p``.
    """
    reduction = _inputs.reduction(reduction)
    want_grad = bool(return_grad) or grad_out is not None
    be, x, v, ax, threads = _sparse(backend, logits, target_indices, target_probs, axis,
                                    "target_indices", "target_probs")
    _check_grad_out(be, grad_out, x)
    return be.sparse_targets(x, target_indices, target_probs, axis=ax, temperature=1.0, mode=2,
                             reduction=reduction, want_grad=want_grad, grad_out=grad_out,
                             threads=threads)

# ---------------------------------------------------------------------------- binary CE
def _binary_inputs(backend, x, targets, xname, weights):
    be, fx, threads = _prepare(backend, x, xname, targets)
    fy = fx.companion(targets, "targets")
    _inputs.same_shape(fx.shape, fy.shape, f"targets must have the {xname}' shape")
    for name, w in weights.items():
        if w is not None:
            _inputs.broadcast_weight(*be.describe(w, name), fx.shape, name)
    return be, fx, fy, threads


def binary_cross_entropy(probs, targets, *, weight=None, reduction="mean", backend="auto"):
    """Binary cross-entropy from probabilities, as ``torch.nn.functional.binary_cross_entropy``.

    ``-w (y log p + (1 - y) log(1 - p))`` elementwise with each log clamped at -100, so
    ``p`` in {0, 1} stays finite.  Probabilities outside [0, 1] raise ``ValueError``;
    soft targets in [0, 1] are allowed.  ``"mean"`` averages over all elements.
    """
    reduction = _inputs.reduction(reduction)
    be, fp, fy, threads = _binary_inputs(backend, probs, targets, "probs", {"weight": weight})
    return be.binary_cross_entropy(fp, fy, weight=weight, reduction=reduction, threads=threads)


def binary_cross_entropy_with_logits(logits, targets, *, weight=None, pos_weight=None,
                                     reduction="mean", return_grad=False, grad_out=None,
                                     backend="auto"):
    """Binary cross-entropy from logits, as PyTorch's ``binary_cross_entropy_with_logits``.

    Computed stably, elementwise::

        loss = w ((1 - y) x + l (log1p(exp(-|x|)) + max(-x, 0))),  l = 1 + (pos_weight - 1) y

    which without ``pos_weight`` is ``max(x, 0) - x y + log1p(exp(-|x|))``.  ``weight``
    broadcasts against the logits; ``pos_weight`` broadcasts along the last axis (one per
    class, as PyTorch).  Gradient ``w ((1 - y) - l sigmoid(-x))``, i.e. ``sigmoid(x) - y``
    without weights, scaled for the reduction.
    """
    reduction = _inputs.reduction(reduction)
    want_grad = bool(return_grad) or grad_out is not None
    be, fx, fy, threads = _binary_inputs(backend, logits, targets, "logits",
                                         {"weight": weight, "pos_weight": pos_weight})
    _check_grad_out(be, grad_out, fx)
    return be.binary_cross_entropy_with_logits(
        fx, fy, weight=weight, pos_weight=pos_weight, reduction=reduction,
        want_grad=want_grad, grad_out=grad_out, threads=threads)



# ---------------------------------------------------------------------------- PyTorch's others
def nll_loss(log_probs, targets, *, weight=None, ignore_index=-100, axis=-1, reduction="mean",
             return_grad=False, grad_out=None, backend="auto"):
    """Negative log-likelihood of given log-probabilities, as PyTorch's ``nll_loss``:
    ``-w_t x_t`` per row, ``"mean"`` over the summed weight of the non-ignored targets
    (NaN when there is none), ``"none"`` 0 at ignored rows.  Only the targets' entries
    are read.  The class axis is ``axis`` (-1, as everywhere in xent_fast; PyTorch's is
    1: ``xent_fast.torch.nll_loss`` uses 1).  Gradient ``-w_t/den`` at the targets, 0
    elsewhere.
    """
    reduction = _inputs.reduction(reduction)
    want_grad = bool(return_grad) or grad_out is not None
    be, x, threads = _prepare(backend, log_probs, "log_probs", targets)
    ax = _inputs.class_axis(x.shape, axis, "log_probs")
    tshape, tdtype = be.describe(targets, "targets")
    _inputs.check_index_targets(tdtype, tshape, _inputs.batch_shape(x.shape, ax))
    ignore = _inputs.ignore_index_option(ignore_index)
    w = _inputs.class_weight(be.to_host(weight, "weight"), x.shape[ax])
    _check_grad_out(be, grad_out, x)
    return be.nll_loss(x, targets, axis=ax, weight=w, ignore_index=ignore, reduction=reduction,
                       want_grad=want_grad, grad_out=grad_out, threads=threads)


def _pointwise_inputs(backend, x, y, xname, yname):
    be, fx, threads = _prepare(backend, x, xname, y)
    fy = fx.companion(y, yname)
    _inputs.same_shape(fx.shape, fy.shape, f"{yname} must have the shape of {xname},")
    return be, fx, fy, threads


def kl_div(input, target, *, reduction="mean", log_target=False, return_grad=False,
           grad_out=None, backend="auto"):
    """PyTorch's pointwise ``kl_div``: ``input`` log-probabilities, ``target``
    probabilities (log-probabilities with ``log_target``), elementwise::

        target (log target - input)      (0 where target is 0)
        exp(target) (target - input)     (log_target)

    Reductions as PyTorch: ``"mean"`` (default, over every element), ``"batchmean"``
    (over ``input.shape[0]``), ``"sum"``, ``"none"`` (elementwise).  Gradient w.r.t.
    ``input``: ``-target`` (``-exp(target)``), scaled.  For the KL between two logit
    arrays use ``softmax_kl_divergence``, which forms neither distribution.
    """
    reduction = _inputs.reduction(reduction, _inputs.KL_REDUCTIONS)
    want_grad = bool(return_grad) or grad_out is not None
    be, fx, fy, threads = _pointwise_inputs(backend, input, target, "input", "target")
    size = _size(fx.shape)
    den = {"mean": size, "batchmean": fx.shape[0] if fx.shape else 1}.get(reduction, 1)
    _check_grad_out(be, grad_out, fx)
    return be.pointwise(fx, fy, mode=2 if log_target else 1, alpha=0.0, gamma=0.0,
                        reduction=reduction, den=den, want_grad=want_grad,
                        grad_out=grad_out, threads=threads)


def sigmoid_focal_loss(logits, targets, *, alpha=0.25, gamma=2.0, reduction="none",
                       return_grad=False, grad_out=None, backend="auto"):
    """torchvision's ``sigmoid_focal_loss`` (Lin et al., RetinaNet), elementwise::

        a_t (1 - p_t)**gamma BCE(logits, targets),   p = sigmoid(logits),
        p_t = p y + (1 - p)(1 - y),   a_t = alpha y + (1 - alpha)(1 - y)

    (no ``a_t`` when ``alpha < 0``, as torchvision), with ``1 - p_t`` formed from
    ``sigmoid(x)`` and ``sigmoid(-x)`` (no cancellation) and the stable BCE.  Reductions
    ``"none"`` (default, as torchvision), ``"mean"``, ``"sum"``; the gradient w.r.t. the
    logits in the same pass.
    """
    reduction = _inputs.reduction(reduction)
    a = _inputs.real_option(alpha, "alpha")
    gm = _inputs.real_option(gamma, "gamma", 0.0)
    want_grad = bool(return_grad) or grad_out is not None
    be, fx, fy, threads = _pointwise_inputs(backend, logits, targets, "logits", "targets")
    _check_grad_out(be, grad_out, fx)
    return be.pointwise(fx, fy, mode=0, alpha=a, gamma=gm, reduction=reduction,
                        den=_size(fx.shape), want_grad=want_grad, grad_out=grad_out,
                        threads=threads)

# ---------------------------------------------------------------------------- fused linear CE
def linear_cross_entropy(hidden, weight, targets, *, bias=None, axis=-1, ignore_index=-100,
                         label_smoothing=0.0, z_loss=0.0, softcap=None, reduction="mean",
                         return_grad=False, chunk_rows=None, backend="auto"):
    """Softmax cross-entropy of the logits ``hidden @ weight.T (+ bias)``, without forming
    them: computed over chunks of rows, so only one chunk of logits ever exists.

    ``hidden`` (..., H) with its feature axis ``axis``; ``weight`` (V, H), a linear
    layer's weight (``torch.nn.Linear(H, V).weight``); ``bias`` (V,); ``targets``
    integer class indices of ``hidden``'s shape without the feature axis.  Options as
    :func:`softmax_cross_entropy` (no class weights): ``ignore_index``,
    ``label_smoothing``, ``z_loss``, ``softcap``, ``reduction``.

    With ``return_grad=True`` returns ``(loss, grad_hidden, grad_weight[, grad_bias])``:
    each chunk's logits are turned into their gradient in place by the fused kernel, then
    ``grad_hidden[chunk] = g @ weight`` and ``grad_weight += g.T @ hidden[chunk]``, by
    the array library's BLAS (NumPy's for arrays, PyTorch's for tensors: CPU or CUDA).
    Gradients have their inputs' dtypes.

    ``chunk_rows`` defaults to as many rows as fill 32 MiB of logits (at least 64): at a
    32 000 vocabulary, 256 rows of float32.  Extra memory is then one chunk of logits
    plus the gradients themselves.  NumPy half-precision inputs are computed in float32
    (the weight converted once); PyTorch bfloat16 tensors in bfloat16 products with
    float32 accumulation, as ``F.linear``.
    """
    from . import _linear

    _dispatch.check_backend(backend)
    return _linear.linear_cross_entropy(
        hidden, weight, targets, bias=bias, axis=axis, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction,
        return_grad=return_grad, chunk_rows=chunk_rows, backend=backend)


def linear_token_stats(hidden, weight, targets, *, bias=None, axis=-1, temperature=1.0,
                       ignore_index=-100, chunk_rows=None, grad_logprob=None,
                       grad_entropy=None, backend="auto"):
    """Per row, the log-probability of the target token and the entropy of the
    predictive distribution ``softmax((hidden @ weight.T + bias) / temperature)``,
    without forming the logits (chunks of rows, as :func:`linear_cross_entropy`): the
    inputs of a PPO/GRPO policy loss with an entropy bonus.

    Returns ``(logprob, entropy)``, each of the targets' shape (natural logs; rows whose
    target is ``ignore_index`` give 0 for both).  Given upstream gradients
    ``grad_logprob`` and/or ``grad_entropy`` (the targets' shape), also returns the
    gradients of ``sum(grad_logprob * logprob + grad_entropy * entropy)`` with respect to
    ``hidden``, ``weight`` (and ``bias``): ``(logprob, entropy, grad_hidden, grad_weight
    [, grad_bias])``.  Per row, with ``y = z / T`` and ``p = softmax(y)``::

        d logprob / dz = (onehot(t) - p) / T
        d entropy / dz = -p (y - sum(p y)) / T
    """
    from . import _linear

    _dispatch.check_backend(backend)
    return _linear.linear_token_stats(
        hidden, weight, targets, bias=bias, axis=axis, temperature=temperature,
        ignore_index=ignore_index, chunk_rows=chunk_rows, grad_logprob=grad_logprob,
        grad_entropy=grad_entropy, backend=backend)
