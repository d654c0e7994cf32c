"""One-pass evaluation metrics from logits: per-row metrics, a mergeable state, results.

Three steps, each usable alone so that files (``_stream``) and Dask (``xent_fast.dask``)
share them:

1. ``row_stats``: the compiled kernel reads each row once and keeps six numbers a row
   (max, sum of exps, sum of exp-weighted logits, target logit, count above the target,
   argmax; see ``_cpu/eval_rows.py``).  Slices of the class axis merge exactly
   (``merge_class_stats``).
2. ``rows_from_stats``: the per-row metrics, in float64.
3. ``EvalState``: sums, counts and calibration bins over rows; two states merge by
   addition, so row chunks can be evaluated anywhere and in any order.
"""

import math
import operator

import numpy as np

from . import _dispatch, _inputs
from ._inputs import check_bins, check_topk  # noqa: F401  (used by _stream and dask)

# Fields of a row's statistics (as in _cpu/eval_rows.py, which imports Numba and so is not
# imported here).
M, S, D, XT, GT, AM = range(6)
NFIELDS = 6
ROW_METRICS = ("loss", "target_prob", "entropy", "confidence", "prediction", "rank",
               "ignored")
# The rank of a row with a NaN logit: never < k, so the row is a miss for every top-k
# (a NaN logit is never a correct prediction); its prediction is -1, no class.
NAN_RANK = np.iinfo(np.int64).max


# ---------------------------------------------------------------------------- options
def check_backend(backend):
    _dispatch.check_backend(backend)


def check_targets(targets, batch, c, ignore_index, origin=None):
    """Integer host targets of shape ``batch`` as a flat int64 array; an ``IndexError``
    naming the first target that is neither a class in [0, c) nor ``ignore_index``.
    ``origin`` is added to the position in the message (a chunk's place in the whole
    array)."""
    t = np.asarray(targets)
    _inputs.check_index_targets(t.dtype, t.shape, batch)
    ignore = _inputs.ignore_index_option(ignore_index)
    return _dispatch.cpu().check_targets(t, c, ignore, origin)


# ---------------------------------------------------------------------------- statistics
def row_stats(rows, hk, tf, lo=0, whole=True, k=0, backend="auto"):
    """Statistics of (n, c) host kernel rows whose first class is ``lo``: (n, 6)
    float64 and, with ``k``, each row's ``k`` largest logits.  ``whole``: the rows are
    complete, so the count of logits above the target's is exact."""
    return _dispatch.cpu().row_stats(rows, hk, tf, lo=lo, whole=whole, k=k,
                                     threads=_dispatch.threads(backend, rows.size))


def merge_class_stats(parts, tops=None, k=0):
    """Merge statistics of consecutive class slices of the same rows: ``parts`` is
    (..., p, 6), slices along axis -2 in class order; ``tops`` (..., p, k) their
    largest logits.  Returns (..., 6) and (..., k).  Exact up to rounding: the
    log-sum-exp rule for the sums, the first slice holding the max for the argmax.
    A NaN in any slice (its max NaN, as ``eval_row`` writes it) makes the row's
    statistics NaN."""
    parts = np.asarray(parts, np.float64)
    m = parts[..., M]
    with np.errstate(invalid="ignore", over="ignore"):
        big = np.max(m, axis=-1)
        fin = np.isfinite(big)[..., None]
        delta = np.where(fin, m - np.where(fin[..., 0], big, 0.0)[..., None], 0.0)
        r = np.where(fin & (m != -np.inf), np.exp(delta), 0.0)
        s = np.sum(r * parts[..., S], axis=-1)
        term = parts[..., D] + np.where(r != 0, delta * parts[..., S], 0.0)
        d = np.sum(np.where(r != 0, r * term, 0.0), axis=-1)
    # np.max propagates a NaN slice max, but the sums above would drop that slice
    nan = np.isnan(big) | np.isnan(parts[..., S]).any(axis=-1)
    out = np.empty(parts.shape[:-2] + (NFIELDS,), np.float64)
    out[..., M] = np.where(nan, np.nan, big)
    out[..., S] = np.where(nan, np.nan, s)
    out[..., D] = np.where(nan, np.nan, d)
    out[..., XT] = np.sum(parts[..., XT], axis=-1)  # 0 in every slice but the target's
    out[..., GT] = np.sum(parts[..., GT], axis=-1)
    first = np.argmax(m, axis=-1)[..., None]  # the first slice with the max (or a NaN)
    out[..., AM] = np.where(nan, -1.0,
                            np.take_along_axis(parts[..., AM], first, axis=-1)[..., 0])
    if not k:
        return out, None
    flat = np.asarray(tops, np.float64).reshape(parts.shape[:-2] + (-1,))
    top = -np.sort(-flat, axis=-1)[..., :k]
    return out, top


def rows_from_stats(st, tf, ignore_index, top=None):
    """Per-row metrics (float64 and int64 arrays of length n) from statistics.

    With ``top`` (each row's largest logits, from slices that could not count) the rank
    is counted among them and so saturates at ``top.shape[-1]``.

    A row with a NaN logit (NaN statistics) gets NaN loss, target probability, entropy
    and confidence, prediction -1 and rank ``NAN_RANK``, whatever the other fields say
    (the kernels stop reading a row at its first NaN).
    """
    m, s, d, xt = st[:, M], st[:, S], st[:, D], st[:, XT]
    ignored = tf == operator.index(ignore_index)
    nan = np.isnan(m) | np.isnan(s) | np.isnan(xt)
    with np.errstate(all="ignore"):
        fin = np.isfinite(m)
        ls = np.log(s)
        # log s - (xt - m): exact where lse and xt are both huge
        loss = np.where(fin, ls - (xt - m), m - xt)
        loss = np.where(m == -np.inf, np.inf, loss)
        prob = np.exp(-loss)
        ent = np.where(fin, ls - d / s, np.nan)
        conf = np.where(fin, 1.0 / s, np.nan)
        if top is None:
            rank = st[:, GT].astype(np.int64)
        else:
            rank = np.sum(top > xt[:, None], axis=1).astype(np.int64)
        pred = np.where(nan, -1, st[:, AM]).astype(np.int64)
    for a in (loss, prob, ent, conf):
        a[nan] = np.nan
    rank[nan] = NAN_RANK
    loss[ignored] = np.nan
    prob[ignored] = np.nan
    rank[ignored] = -1
    return {"loss": loss, "target_prob": prob, "entropy": ent, "confidence": conf,
            "prediction": pred, "rank": rank, "ignored": ignored}


# ---------------------------------------------------------------------------- state
class EvalState:
    """Mergeable sums behind :class:`EvalResult`: ``a.merge(b)`` (or ``a + b``) is the
    state of the rows of both, in any order and grouping; sums are float64, counts and
    calibration-bin counts exact integers."""

    __slots__ = ("topk", "n_bins", "count", "sum_loss", "sum_entropy", "sum_target_prob",
                 "correct", "bin_count", "bin_confidence", "bin_correct", "nan_count")

    def __init__(self, topk=(1, 5), n_bins=15):
        self.topk = check_topk(topk)
        self.n_bins = check_bins(n_bins)
        self.count = 0
        self.sum_loss = 0.0
        self.sum_entropy = 0.0
        self.sum_target_prob = 0.0
        self.correct = np.zeros(len(self.topk), np.int64)
        self.bin_count = np.zeros(self.n_bins, np.int64)
        self.bin_confidence = np.zeros(self.n_bins, np.float64)
        self.bin_correct = np.zeros(self.n_bins, np.int64)
        self.nan_count = 0

    def add_rows(self, rows):
        """Add the kept rows of a ``rows_from_stats`` dict; returns ``self``."""
        kept = ~rows["ignored"]
        if not kept.all():
            rows = {k: v[kept] for k, v in rows.items()}
        self.count += int(rows["loss"].shape[0])
        self.sum_loss += float(np.sum(rows["loss"]))
        self.sum_entropy += float(np.sum(rows["entropy"]))
        self.sum_target_prob += float(np.sum(rows["target_prob"]))
        rank = rows["rank"]  # NAN_RANK for NaN rows: a miss for every k
        self.nan_count += int(np.count_nonzero(rank == NAN_RANK))
        for i, k in enumerate(self.topk):
            self.correct[i] += int(np.count_nonzero(rank < k))
        conf = rows["confidence"]
        ok = conf == conf
        conf = conf[ok]
        b = np.clip(np.ceil(conf * self.n_bins).astype(np.int64) - 1, 0, self.n_bins - 1)
        self.bin_count += np.bincount(b, minlength=self.n_bins)
        self.bin_confidence += np.bincount(b, weights=conf, minlength=self.n_bins)
        self.bin_correct += np.bincount(b[rank[ok] == 0], minlength=self.n_bins)
        return self

    def merge(self, other):
        if not isinstance(other, EvalState):
            return NotImplemented
        if other.topk != self.topk or other.n_bins != self.n_bins:
            raise ValueError("cannot merge evaluation states with different topk or n_bins")
        out = EvalState(self.topk, self.n_bins)
        out.count = self.count + other.count
        out.sum_loss = self.sum_loss + other.sum_loss
        out.sum_entropy = self.sum_entropy + other.sum_entropy
        out.sum_target_prob = self.sum_target_prob + other.sum_target_prob
        out.correct = self.correct + other.correct
        out.bin_count = self.bin_count + other.bin_count
        out.bin_confidence = self.bin_confidence + other.bin_confidence
        out.bin_correct = self.bin_correct + other.bin_correct
        out.nan_count = self.nan_count + other.nan_count
        return out

    __add__ = merge

    def result(self, rows=None):
        """The :class:`EvalResult` (means, perplexity, accuracies, ECE) of these sums."""
        return EvalResult(self, rows)

    def __repr__(self):
        correct = ", ".join(f"top{k}={int(c)}" for k, c in zip(self.topk, self.correct))
        return (f"EvalState(count={self.count}, nan_count={self.nan_count}, "
                f"sum_loss={self.sum_loss:.6g}, sum_entropy={self.sum_entropy:.6g}, "
                f"sum_target_prob={self.sum_target_prob:.6g}, correct=({correct}), "
                f"n_bins={self.n_bins}, binned={int(self.bin_count.sum())})")

    def __reduce__(self):  # plain pickling for Dask workers
        return (_rebuild_state, (self.topk, self.n_bins, tuple(getattr(self, a) for a in
                                                               EvalState.__slots__[2:])))


def _rebuild_state(topk, n_bins, values):
    st = EvalState(topk, n_bins)
    for name, v in zip(EvalState.__slots__[2:], values):
        setattr(st, name, v)
    return st


def merge_states(*states):
    """The merge of any number of :class:`EvalState` (a Dask tree-reduction step)."""
    out = states[0]
    for s in states[1:]:
        out = out.merge(s)
    return out


class EvalResult:
    """Aggregate evaluation metrics over the rows whose target is not ``ignore_index``.

    Attributes
    ----------
    count : int
        rows counted.
    cross_entropy : float
        mean softmax cross-entropy (nats).
    perplexity : float
        ``exp(cross_entropy)``.
    accuracy : dict
        ``{k: top-k accuracy}``.
    entropy : float
        mean entropy of the predicted distribution (nats).
    target_prob : float
        mean probability given to the target.
    ece : float
        expected calibration error of the top-1 prediction, ``n_bins`` equal-width
        confidence bins.
    nan_count : int
        counted rows with a NaN logit (their metrics are NaN; see :func:`evaluate`).
    rows : dict or None
        per-row arrays when asked for (``per_row=True``).
    state : EvalState
        the mergeable sums these were computed from.

    With no counted rows every mean is NaN (as a ``"mean"`` cross-entropy is).  A
    counted row with a NaN logit makes ``cross_entropy``, ``perplexity``, ``entropy``,
    ``target_prob`` and ``ece`` NaN and counts as wrong in ``accuracy``.
    """

    def __init__(self, state, rows=None):
        self.state = state
        n = state.count
        self.count = n
        self.nan_count = state.nan_count
        self.topk = state.topk
        self.n_bins = state.n_bins
        nan = math.nan
        self.cross_entropy = state.sum_loss / n if n else nan
        with np.errstate(over="ignore"):
            self.perplexity = float(np.exp(self.cross_entropy))
        self.accuracy = {k: (int(c) / n if n else nan) for k, c in zip(state.topk,
                                                                      state.correct)}
        self.entropy = state.sum_entropy / n if n else nan
        self.target_prob = state.sum_target_prob / n if n else nan
        binned = int(state.bin_count.sum())
        if n and binned == n:
            gap = np.abs(state.bin_correct - state.bin_confidence)
            self.ece = float(np.sum(gap)) / n
        else:
            self.ece = nan
        self.rows = rows

    def as_dict(self):
        """The aggregates as plain Python numbers (for JSON)."""
        return {"count": self.count, "cross_entropy": self.cross_entropy,
                "perplexity": self.perplexity,
                "accuracy": {f"top{k}": v for k, v in self.accuracy.items()},
                "entropy": self.entropy, "target_prob": self.target_prob,
                "ece": self.ece, "n_bins": self.n_bins}

    def table(self):
        """The aggregates as an aligned two-column text table."""
        lines = [("rows", f"{self.count}"),
                 ("cross-entropy (nats)", f"{self.cross_entropy:.6f}"),
                 ("perplexity", f"{self.perplexity:.6g}")]
        lines += [(f"top-{k} accuracy", f"{v:.6f}") for k, v in self.accuracy.items()]
        lines += [("mean entropy (nats)", f"{self.entropy:.6f}"),
                  ("mean target probability", f"{self.target_prob:.6f}"),
                  (f"ECE ({self.n_bins} bins)", f"{self.ece:.6f}")]
        w = max(len(a) for a, _ in lines)
        return "\n".join(f"{a:<{w}}  {b}" for a, b in lines)

    def __repr__(self):
        acc = ", ".join(f"top{k}={v:.4f}" for k, v in self.accuracy.items())
        return (f"EvalResult(count={self.count}, cross_entropy={self.cross_entropy:.6g}, "
                f"perplexity={self.perplexity:.6g}, accuracy=({acc}), "
                f"entropy={self.entropy:.6g}, target_prob={self.target_prob:.6g}, "
                f"ece={self.ece:.6g})")


# ---------------------------------------------------------------------------- in memory
def evaluate_rows(rows, hk, tf, ignore_index, backend="auto"):
    """Per-row metrics of complete (n, C) kernel rows."""
    st, _ = row_stats(rows, hk, tf, 0, True, 0, backend)
    return rows_from_stats(st, tf, ignore_index)


def evaluate(logits, targets, *, axis=-1, ignore_index=-100, topk=(1, 5), n_bins=15,
             per_row=False, backend="auto"):
    """Evaluation metrics of class-index targets under logits, in one read of the logits.

    Per row, with ``lse = logsumexp(x)``, ``t`` the target and ``x_t`` its logit:

    - ``loss = lse - x_t`` (the softmax cross-entropy), ``target_prob = exp(x_t - lse)``;
    - ``entropy = lse - sum_c softmax(x)_c x_c``, the entropy of the predicted
      distribution (``-inf`` logits add exactly 0);
    - ``confidence = exp(max x - lse)``, the probability of the prediction;
    - ``prediction = argmax x`` (the first index on ties, as ``np.argmax``);
    - ``rank`` = the number of logits strictly greater than ``x_t``.  The target is in
      the top k when ``rank < k``: ties count in the target's favour, so top-1 accuracy
      can exceed ``mean(prediction == t)`` only on exactly tied logits.

    Rows whose target is ``ignore_index`` are left out of every aggregate.  Aggregates
    (an :class:`EvalResult`): the means of loss, entropy and target probability (sums in
    float64), ``perplexity = exp(mean loss)``, top-k accuracy for each ``k`` in
    ``topk``, and the expected calibration error ``ECE = sum_b |sum_{i in b} (correct_i
    - confidence_i)| / N`` over ``n_bins`` equal-width bins ``((b-1)/B, b/B]`` of the
    confidence, where correct means rank 0 (Guo et al. 2017, 15 bins by default).

    Conventions: a target whose logit is ``-inf`` has loss ``+inf`` and probability 0;
    a row of all ``-inf`` has loss ``+inf`` and NaN entropy and confidence.  With no
    counted rows every mean is NaN.  Out-of-range targets raise ``IndexError`` naming
    the first one, as in ``softmax_cross_entropy``.

    NaN: a NaN anywhere in a row's logits (the target's or any other) makes the row's
    loss, target probability, entropy and confidence NaN, its prediction -1 and its
    rank ``np.iinfo(np.int64).max`` (so ``rank < k`` is false: a NaN row is never a
    correct prediction, for any k).  A counted NaN row makes ``cross_entropy``,
    ``perplexity``, ``entropy``, ``target_prob`` and ``ece`` NaN, and counts as wrong
    in ``accuracy`` (which stays a number: the fraction of rows known to be right).
    Ignored rows stay out of every aggregate whatever their logits hold.

    ``per_row=True`` also returns the per-row arrays (batch shape) in ``result.rows``:
    ``loss``, ``target_prob``, ``rank`` (NaN, NaN and -1 for ignored rows),
    ``entropy``, ``confidence``, ``prediction`` and ``ignored``.

    ``backend``: ``"auto"``, ``"cpu"``, ``"parallel"`` or ``"cuda"`` (GPU arrays go to
    CUDA under ``"auto"``: the logits are read once on the device and only six numbers a
    row come back to the host).  For arrays larger than memory see
    :func:`evaluate_file`, for Dask arrays ``xent_fast.dask.evaluate``.

    Examples
    --------
    >>> import numpy as np
    >>> r = evaluate(np.log([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]]), np.array([0, 2]), topk=(1, 2))
    >>> round(r.cross_entropy, 4), r.accuracy
    (0.7803, {1: 0.5, 2: 1.0})
    """
    check_backend(backend)
    topk = check_topk(topk)
    n_bins = check_bins(n_bins)
    be = _dispatch.backend_for(backend, logits)
    x = be.operand(logits, "logits")
    ax = _inputs.class_axis(x.shape, axis, "logits")
    batch = _inputs.batch_shape(x.shape, ax)
    tshape, tdtype = be.describe(targets, "targets")
    _inputs.check_index_targets(tdtype, tshape, batch)
    ignore = _inputs.ignore_index_option(ignore_index)
    st, tf = be.eval_stats(x, targets, axis=ax, ignore_index=ignore,
                           threads=_dispatch.threads(backend, math.prod(x.shape)))
    r = rows_from_stats(st, tf, ignore_index)
    state = EvalState(topk, n_bins).add_rows(r)
    return state.result({k: v.reshape(batch) for k, v in r.items()} if per_row else None)
