"""PyTorch front end: xent_fast's losses as PyTorch operators, functions and modules.

    from xent_fast.torch import CrossEntropyLoss

    loss_fn = CrossEntropyLoss()            # as torch.nn.CrossEntropyLoss
    loss = loss_fn(model(x), y)             # (N, C) logits, (N,) class indices
    loss.backward()

The functions take PyTorch's names, argument order and defaults, with the class
dimension 1 as in ``torch.nn.functional`` (0 for an unbatched ``(C,)`` input), and the
modules subclass PyTorch's own, so they take the same constructor arguments and hold
the same buffers.  Extras are keyword-only: ``z_loss`` and ``softcap`` for
cross-entropy, and ``inplace_backward`` (see below).  Besides the cross-entropies:
``nll_loss``, pointwise ``kl_div`` (``NLLLoss``, ``KLDivLoss``), the binary losses,
torchvision's ``sigmoid_focal_loss`` and the distillation divergences.  From hidden states, without the
logits: ``linear_cross_entropy`` (``F.linear`` then ``F.cross_entropy``, with the
``LinearCrossEntropyLoss`` module) and ``linear_token_stats`` (per-token log-probability
and entropy, for policy-gradient losses).

How it runs.  Each loss is a PyTorch custom operator in the ``xent_fast`` namespace
(``torch.ops.xent_fast.cross_entropy`` and so on) with a fake (meta) implementation and
an autograd formula, so ``torch.compile(model, fullgraph=True)`` keeps a model that uses
them in one graph.  CPU tensors are read in place through NumPy views of their memory
(``requires_grad`` tensors, non-contiguous views, bfloat16 through its bits: nothing is
copied); CUDA tensors go to the CUDA backend.  Results follow PyTorch's dtype rules: the
loss has the input's dtype (half-precision losses are computed in float32 and rounded
once at the end), the gradient the input's dtype, on the input's device.

Memory.  When the input requires a gradient, the forward pass computes the loss and the
gradient in one pass over the logits; the backward pass only scales that gradient in
place by the incoming gradient (not at all when it is 1), so a forward+backward
allocates one logits-sized buffer, the gradient, which autograd then hands on without
another copy.  With ``inplace_backward=True`` the gradient is written into the logits'
own storage instead, as Liger-Kernel does, and no logits-sized buffer is allocated at
all.  The hazard: after the loss the logits tensor holds the gradient, so it must not
be used again (nor saved by another operation for its backward, which PyTorch then
reports as modified by an in-place operation).

Gradients with respect to probability targets, ``target_logits``, ``kl_div``'s target
and the binary losses' targets are computed (in the backward pass, with PyTorch
operations); ``weight`` and ``pos_weight`` are not differentiable, as in PyTorch.
Double backward (``create_graph=True``) is refused with an error.
``backward(retain_graph=True)`` works (the gradient is then scaled out of place, so
that a second backward sees it unchanged).

Needs PyTorch; bfloat16 CPU tensors also need ``ml_dtypes`` (both in the ``torch``
extra: ``pip install "xent_fast[torch]"``; for a CPU-only PyTorch, see the README).
"""

import importlib.util
import math
import warnings
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.nn import _reduction

from . import _api
from ._cpu.arrays import host

__all__ = [
    "cross_entropy", "binary_cross_entropy", "binary_cross_entropy_with_logits",
    "softmax_kl_divergence", "softmax_js_divergence", "softmax_kl_divergence_sparse",
    "sigmoid_focal_loss", "linear_cross_entropy",
    "linear_token_stats", "nll_loss", "kl_div", "CrossEntropyLoss", "BCELoss",
    "BCEWithLogitsLoss", "NLLLoss", "KLDivLoss", "SoftmaxKLDivergenceLoss", "JSDLoss",
    "LinearCrossEntropyLoss",
]

_NS = "xent_fast"


# ---------------------------------------------------------------------------- tensors
def _array(t, name):
    """What the front end reads: a CPU tensor as a NumPy array over the same memory
    (``_cpu.arrays.host``: no copy), a CUDA tensor as it is (the CUDA backend reads
    tensors in place)."""
    if t is None:
        return None
    if t.device.type == "cuda":
        return t.detach()
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on device {t.device}: xent_fast runs on CPU and CUDA "
                         "tensors")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype == torch.bfloat16 and importlib.util.find_spec("ml_dtypes") is None:
        # without it host() would widen a copy, which a gradient buffer cannot be
        raise ImportError("bfloat16 CPU tensors are read through ml_dtypes' bfloat16: "
                          "pip install ml_dtypes (or \"xent_fast[torch]\")")
    return host(t)


def _tensor(value, like):
    """A result of the front end as a tensor of ``like``'s dtype and device."""
    if isinstance(value, Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    a = np.asarray(value)
    if a.ndim == 0:
        return torch.tensor(a.item(), dtype=like.dtype, device=like.device)
    return torch.from_numpy(np.require(a, requirements="W")).to(device=like.device,
                                                               dtype=like.dtype)


def _owned(a):
    """A gradient the front end allocated, as a tensor over the same memory."""
    return a if isinstance(a, Tensor) else torch.from_numpy(a)


def _class_dim(input):
    return 1 if input.dim() >= 2 else 0


def _batch_shape(input):
    d = _class_dim(input)
    return input.shape[:d] + input.shape[d + 1:]


_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16,
              torch.bfloat16: np.int16}


def _grad_buffer(input):
    """A gradient-sized buffer.  On the CPU allocated by NumPy, which asks the kernel for
    huge pages: a fresh 500 MB buffer is then ready in a third of the time PyTorch's own
    allocator takes to fault it in page by page."""
    if input.device.type != "cpu" or input.dtype not in _NP_DTYPES:
        return torch.empty(input.shape, dtype=input.dtype, device=input.device)
    t = torch.from_numpy(np.empty(input.shape, _NP_DTYPES[input.dtype]))
    return t.view(torch.bfloat16) if input.dtype == torch.bfloat16 else t


def _no_grad_buffer(input):
    return input.new_empty((0,))


def _check_input(input, name="input", classes=True):
    """A floating-point tensor; with ``classes``, one with a class dimension."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {input.dtype}")
    if classes and input.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (the class dimension)")


def _check_on(input, **others):
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}: "
                             "move them to one device")


def _reduction_arg(size_average, reduce, reduction):
    if size_average is not None or reduce is not None:
        return _reduction.legacy_get_string(size_average, reduce)
    return reduction


def _wants_grad(t):
    return t is not None and t.requires_grad and torch.is_grad_enabled()


# ---------------------------------------------------------------------------- backward helpers
def _eager(*tensors):
    """Whether backward runs eagerly on real tensors (not traced by torch.compile,
    AOTAutograd or a fake/functional mode), so that it may scale in place."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(type(t) is Tensor for t in tensors)


def _no_double_backward(ctx_name):
    if torch.is_grad_enabled() and _eager():
        raise RuntimeError(f"xent_fast.torch: double backward through {ctx_name} is not "
                           "supported (backward was called with create_graph=True)")


def _scale(grad, g, cdim, reduction, eager):
    """The gradient scaled by the incoming gradient ``g`` (a scalar, or one value per
    row for ``reduction="none"``): in place when nothing can see ``grad`` again."""
    if reduction == "none" and g.dim() < grad.dim():
        g = g.unsqueeze(cdim)
    if not eager or torch._C._autograd._get_current_graph_task_keep_graph():
        return grad * g
    if g.dim() == 0 and grad.device.type == "cpu" and g.item() == 1.0:
        return grad  # loss.backward(): the gradient is already the answer
    return grad.mul_(g)


def _input_grad(ctx, grad, g, name, cdim):
    """The input's gradient from the one the forward pass filled (``cdim`` None: an
    elementwise loss, whose incoming gradient has the input's shape or none)."""
    if grad.numel() != ctx.numel:
        raise _missing_grad(name)
    return _scale(grad, g, cdim, ctx.reduction if cdim is not None else "elementwise",
                  _eager(grad, g))


def _row_scale(g, reduction, rows, cdim):
    """The incoming gradient per row, as a factor for a per-element term."""
    if reduction == "none":
        return g.unsqueeze(cdim) if cdim is not None and g.dim() else g
    if reduction == "mean":
        return g / rows
    return g


def _compute_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _class_view(weight, input, cdim):
    shape = [1] * input.dim()
    shape[cdim] = -1
    return weight.view(shape)


def _not_differentiable(ctx, names):
    for i, name in names.items():
        if ctx.needs_input_grad[i]:
            raise RuntimeError(f"xent_fast.torch: the derivative for {name!r} is not "
                               "implemented (as in PyTorch)")


def _missing_grad(name):
    return RuntimeError(f"xent_fast.torch: {name} was computed without its gradient "
                        "(want_grad=False) and cannot be differentiated; call the function "
                        "in xent_fast.torch rather than the operator")


def _loss_and_grad(fn, input, args, want_grad, **kw):
    """An operator's body: ``fn(*args, **kw)`` of the front end as a tensor like
    ``input``, and its gradient w.r.t. ``input`` written into a new buffer by the same
    pass (``want_grad``), else an empty tensor."""
    if not want_grad:
        return _tensor(fn(*args, **kw), input), _no_grad_buffer(input)
    grad = _grad_buffer(input)
    loss, _ = fn(*args, grad_out=_array(grad, "grad"), **kw)
    return _tensor(loss, input), grad


def _pair_fake(input, loss_shape, want_grad):
    """The fake (meta) result of an operator returning (loss, gradient or empty)."""
    return (input.new_empty(loss_shape),
            _grad_buffer(input) if want_grad else _no_grad_buffer(input))


# ---------------------------------------------------------------------------- cross-entropy
def _ce_kwargs(input, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    """The front end's options of a cross-entropy operator's arguments (softcap 0: none)."""
    return dict(axis=_class_dim(input), weight=_array(weight, "weight"),
                ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                softcap=softcap if softcap > 0 else None, reduction=reduction)


def _ce_call(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
             softcap, grad):
    kw = _ce_kwargs(input, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    x, t = _array(input, "input"), _array(target, "target")
    if grad is None:
        return _tensor(_api.softmax_cross_entropy(x, t, **kw), input)
    loss, _ = _api.softmax_cross_entropy(x, t, grad_out=_array(grad, "grad"), **kw)
    return _tensor(loss, input)


def _row_loss_shape(input, reduction):
    """The shape of a row loss of ``input``: a loss a row for "none", else a scalar."""
    return _batch_shape(input) if reduction == "none" else ()


def _ce_fake_loss(input, reduction):
    return input.new_empty(_row_loss_shape(input, reduction))


@torch.library.custom_op(f"{_NS}::cross_entropy", mutates_args=())
def _ce_op(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
           reduction: str, label_smoothing: float, z_loss: float, softcap: float,
           want_grad: bool) -> Tuple[Tensor, Tensor]:
    """(loss, gradient of the loss w.r.t. input, or an empty tensor without want_grad);
    softcap 0 is none."""
    grad = _grad_buffer(input) if want_grad else None
    loss = _ce_call(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                    softcap, grad)
    return loss, (grad if want_grad else _no_grad_buffer(input))


@_ce_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      want_grad):
    return _pair_fake(input, _row_loss_shape(input, reduction), want_grad)


def _ce_setup(ctx, inputs, output):
    input, target, weight, _, reduction, eps, _, cap, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd fills a logits-sized zero tensor
    ctx.reduction, ctx.eps, ctx.cap, ctx.cdim = reduction, eps, cap, _class_dim(input)
    ctx.numel = input.numel()
    # the targets' gradient needs the logits: kept only when asked for
    soft = target.is_floating_point() and target.requires_grad
    ctx.save_for_backward(output[1], input if soft else None, weight if soft else None)


def _ce_target_grad(input, weight, eps, cap, g, cdim, reduction):
    """d loss / d p for probability targets: -(1 - eps) w_c log_softmax(y)_c per row."""
    y = input.detach().to(_compute_dtype(input))
    if cap > 0:
        y = cap * torch.tanh(y / cap)
    gt = torch.log_softmax(y, dim=cdim).mul_(-(1.0 - eps))
    if weight is not None:
        gt = gt * _class_view(weight.to(gt.dtype), input, cdim)
    rows = max(input.numel() // max(input.shape[cdim], 1), 1)
    return gt * _row_scale(g.to(gt.dtype), reduction, rows, cdim)


def _ce_backward(ctx, g, _g_grad):
    _no_double_backward("cross_entropy")
    if g is None:  # the loss was not used (grads are not materialised)
        return (None,) * 9
    grad, input, weight = ctx.saved_tensors
    _not_differentiable(ctx, {2: "weight"})
    gi = gt = None
    if ctx.needs_input_grad[0]:
        gi = _input_grad(ctx, grad, g, "cross_entropy", ctx.cdim)
    if ctx.needs_input_grad[1]:
        gt = _ce_target_grad(input, weight, ctx.eps, ctx.cap, g, ctx.cdim, ctx.reduction)
    return gi, gt, None, None, None, None, None, None, None


_ce_op.register_autograd(_ce_backward, setup_context=_ce_setup)


@torch.library.custom_op(f"{_NS}::cross_entropy_inplace_", mutates_args=("input",))
def _ce_inplace_op(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                   reduction: str, label_smoothing: float, z_loss: float,
                   softcap: float) -> Tensor:
    """The loss; the gradient of the loss w.r.t. input is written into input."""
    return _ce_call(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                    softcap, input)


@_ce_inplace_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    return _ce_fake_loss(input, reduction)


@torch.library.custom_op(f"{_NS}::cross_entropy_z_term", mutates_args=())
def _z_term_op(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
               reduction: str, label_smoothing: float, z_loss: float,
               softcap: float) -> Tensor:
    """The z-loss term of cross_entropy alone, reduced as it enters the loss."""
    kw = _ce_kwargs(input, weight, ignore_index, reduction, label_smoothing, z_loss, softcap)
    _, z = _api.softmax_cross_entropy(_array(input, "input"), _array(target, "target"),
                                      return_z_loss=True, **kw)
    return _tensor(z, input)


@_z_term_op.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap):
    return _ce_fake_loss(input, reduction)


class _CrossEntropyInplace(torch.autograd.Function):
    """Cross-entropy whose gradient is written over the logits (``inplace_backward``)."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, eps, z, cap):
        loss = torch.ops.xent_fast.cross_entropy_inplace_(input, target, weight, ignore_index,
                                                          reduction, eps, z, cap)
        # now the gradient; saved as a new tensor over the same memory, which autograd
        # can hand on (to a leaf's .grad) without the copy it makes of a leaf itself
        ctx.save_for_backward(input.detach())
        ctx.reduction, ctx.cdim = reduction, _class_dim(input)
        return loss

    @staticmethod
    def backward(ctx, g):
        _no_double_backward("cross_entropy")
        grad, = ctx.saved_tensors
        return (_scale(grad, g, ctx.cdim, ctx.reduction, _eager(grad, g)),
                None, None, None, None, None, None, None)


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100,
                  reduce=None, reduction="mean", label_smoothing=0.0, *, z_loss=0.0,
                  softcap=None, inplace_backward=False, return_z_loss=False):
    """``torch.nn.functional.cross_entropy``, computed by xent_fast (class dimension 1).

    ``input`` (N, C), (N, C, d1, ...) or (C,) logits; ``target`` class indices of the
    input's shape without dimension 1, or probabilities of the input's shape.  Options as
    PyTorch (``size_average``/``reduce`` are PyTorch's deprecated spellings of
    ``reduction``).  Extras: ``z_loss`` adds ``z_loss * logsumexp**2`` per non-ignored row;
    ``softcap`` replaces the logits by ``softcap * tanh(logits / softcap)`` first;
    ``inplace_backward=True`` writes the gradient over ``input`` (which must not be used
    after the call: see the module's docstring).  ``return_z_loss=True`` returns
    ``(loss, z_term)`` as Liger-Kernel's does: the z-loss term alone, reduced as it
    enters the loss, for logging (not differentiable; one more read of the logits).

    Differences from PyTorch: a row whose target carries zero weight gives 0 where PyTorch
    gives NaN for a ``-inf`` target logit; integer targets of any integer dtype are taken.
    """
    reduction = _reduction_arg(size_average, reduce, reduction)
    _check_input(input)
    _check_on(input, target=target, weight=weight)
    if isinstance(target, Tensor) and target.is_floating_point() and ignore_index != -100:
        # as PyTorch: a probability target has no class index to ignore
        raise RuntimeError("ignore_index is not supported for floating point target "
                           f"(ignore_index={ignore_index})")
    cap = 0.0 if softcap is None else softcap
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap!r}")
    need = _wants_grad(input)
    opts = (int(ignore_index), reduction, float(label_smoothing), float(z_loss), float(cap))
    # the z term first: an in-place gradient overwrites the logits
    z_term = None if not return_z_loss else _promoted(torch.ops.xent_fast.cross_entropy_z_term(
        input.detach(), target.detach(), weight, *opts), input, target)
    if inplace_backward and need:
        if _wants_grad(target):
            raise ValueError("inplace_backward=True overwrites the logits, which the targets' "
                             "gradient needs: use inplace_backward=False")
        loss = _promoted(_CrossEntropyInplace.apply(input, target, weight, *opts), input,
                         target)
    else:
        loss, _ = torch.ops.xent_fast.cross_entropy(input, target, weight, *opts, need)
        loss = _promoted(loss, input, target)
    return (loss, z_term) if return_z_loss else loss


def _promoted(loss, input, target):
    """The loss in the dtype PyTorch gives: probability targets of a wider dtype than the
    logits promote it (computed in the logits' precision either way)."""
    if isinstance(target, Tensor) and target.is_floating_point() and target.dtype != input.dtype:
        return loss.to(torch.promote_types(input.dtype, target.dtype))
    return loss


# ---------------------------------------------------------------------------- distillation KL
@torch.library.custom_op(f"{_NS}::softmax_kl_divergence", mutates_args=())
def _kl_op(input: Tensor, target_logits: Tensor, temperature: float, reduction: str,
           want_grad: bool) -> Tuple[Tensor, Tensor]:
    """(KL(softmax(target_logits/T) || softmax(input/T)), its gradient w.r.t. input)."""
    kw = dict(axis=_class_dim(input), temperature=temperature, reduction=reduction)
    x, t = _array(input, "input"), _array(target_logits, "target_logits")
    return _loss_and_grad(_api.softmax_kl_divergence, input, (x, t), want_grad, **kw)


@_kl_op.register_fake
def _(input, target_logits, temperature, reduction, want_grad):
    return _pair_fake(input, _row_loss_shape(input, reduction), want_grad)


def _kl_setup(ctx, inputs, output):
    input, target_logits, temperature, reduction, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd fills a logits-sized zero tensor
    ctx.temperature, ctx.reduction, ctx.cdim = temperature, reduction, _class_dim(input)
    ctx.numel = input.numel()
    soft = target_logits.requires_grad
    ctx.save_for_backward(output[1], input if soft else None,
                          target_logits if soft else None)


def _kl_target_grad(input, target_logits, temperature, g, cdim, reduction):
    """d KL / d z_j = p_j (log p_j - log q_j - KL) / T per row (p from z, q from x)."""
    dt = _compute_dtype(input)
    logq = torch.log_softmax(input.detach().to(dt) / temperature, dim=cdim)
    logp = torch.log_softmax(target_logits.detach().to(dt) / temperature, dim=cdim)
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros((), dtype=dt, device=p.device))
    kl = (p * diff).sum(dim=cdim, keepdim=True)
    gz = p * (diff - kl) / temperature
    c = max(input.shape[cdim], 1)
    rows = max(input.numel() // c, 1)
    if reduction == "mean":
        return gz * (g.to(dt) / (rows * c))
    if reduction == "batchmean":
        reduction = "mean"
    return gz * _row_scale(g.to(dt), reduction, rows, cdim)


def _kl_backward(ctx, g, _g_grad):
    _no_double_backward("softmax_kl_divergence")
    if g is None:  # the loss was not used (grads are not materialised)
        return (None,) * 5
    grad, input, target_logits = ctx.saved_tensors
    gi = gt = None
    if ctx.needs_input_grad[0]:
        gi = _input_grad(ctx, grad, g, "softmax_kl_divergence", ctx.cdim)
    if ctx.needs_input_grad[1]:
        gt = _kl_target_grad(input, target_logits, ctx.temperature, g, ctx.cdim,
                             ctx.reduction).to(target_logits.dtype)
    return gi, gt, None, None, None


_kl_op.register_autograd(_kl_backward, setup_context=_kl_setup)


def softmax_kl_divergence(input, target_logits, *, temperature=1.0, reduction="batchmean"):
    """KL(softmax(target_logits / T) || softmax(input / T)) over dimension 1, for
    knowledge distillation: ``input`` the student's logits, ``target_logits`` the
    teacher's, both (N, C) (or (N, C, d1, ...), or (C,)).

    Equals ``F.kl_div(F.log_softmax(input / T, 1), F.log_softmax(target_logits / T, 1),
    reduction=reduction, log_target=True)`` without forming either distribution.
    Reductions ``"batchmean"`` (sum / N), ``"sum"``, ``"mean"`` (sum / elements, as
    ``kl_div``) and ``"none"`` (one value per row).  No ``T**2`` factor.
    """
    _check_input(input)
    _check_input(target_logits, "target_logits")
    _check_on(input, target_logits=target_logits)
    loss, _ = torch.ops.xent_fast.softmax_kl_divergence(
        input, target_logits, float(temperature), reduction, _wants_grad(input))
    return loss



@torch.library.custom_op(f"{_NS}::softmax_js_divergence", mutates_args=())
def _jsd_op(input: Tensor, target_logits: Tensor, target: Optional[Tensor], beta: float,
            temperature: float, ignore_index: int, reduction: str,
            want_grad: bool) -> Tuple[Tensor, Tensor]:
    """(generalised JSD of softmax(target_logits/T) and softmax(input/T), its gradient
    w.r.t. input)."""
    kw = dict(axis=_class_dim(input), beta=beta, temperature=temperature,
              reduction=reduction, ignore_index=ignore_index,
              targets=None if target is None else _array(target, "target"))
    x, t = _array(input, "input"), _array(target_logits, "target_logits")
    return _loss_and_grad(_api.softmax_js_divergence, input, (x, t), want_grad, **kw)


@_jsd_op.register_fake
def _(input, target_logits, target, beta, temperature, ignore_index, reduction, want_grad):
    return _pair_fake(input, _row_loss_shape(input, reduction), want_grad)


def _jsd_setup(ctx, inputs, output):
    input, target_logits, target, beta, temperature, ignore_index, reduction, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.cdim, ctx.numel = reduction, _class_dim(input), input.numel()
    ctx.opts = (beta, temperature, ignore_index, reduction)
    soft = target_logits.requires_grad
    ctx.save_for_backward(output[1], input if soft else None,
                          target_logits if soft else None, target if soft else None)


def _jsd_dense(input, target_logits, target, beta, temperature, ignore_index, reduction,
               cdim):
    """The JSD by its formula in PyTorch ops, differentiable in both logits: the
    teacher's gradient (rarely wanted) comes from autograd through it."""
    dt = _compute_dtype(input)
    lq = torch.log_softmax(input.to(dt) / temperature, dim=cdim)
    lp = torch.log_softmax(target_logits.to(dt) / temperature, dim=cdim)
    zero = torch.zeros((), dtype=dt, device=lq.device)

    def plogr(lx, ly):
        return torch.where(lx.exp() > 0, lx.exp() * (lx - ly), zero).sum(dim=cdim)

    if beta == 0:
        rows = plogr(lp, lq)
    elif beta == 1:
        rows = plogr(lq, lp)
    else:
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
        rows = beta * plogr(lp, lm) + (1 - beta) * plogr(lq, lm)
    keep = torch.ones_like(rows, dtype=torch.bool) if target is None else target != ignore_index
    rows = torch.where(keep, rows, zero)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    c = input.shape[cdim] if reduction == "mean" else 1
    return rows.sum() / (keep.sum() * c)


def _jsd_backward(ctx, g, _g_grad):
    _no_double_backward("softmax_js_divergence")
    if g is None:
        return (None,) * 8
    grad, input, target_logits, target = ctx.saved_tensors
    gi = gt = None
    if ctx.needs_input_grad[0]:
        gi = _input_grad(ctx, grad, g, "softmax_js_divergence", ctx.cdim)
    if ctx.needs_input_grad[1]:
        with torch.enable_grad():
            z = target_logits.detach().requires_grad_(True)
            loss = _jsd_dense(input.detach(), z, target, *ctx.opts, ctx.cdim)
            gt, = torch.autograd.grad(loss, z, g)
    return gi, gt, None, None, None, None, None, None


_jsd_op.register_autograd(_jsd_backward, setup_context=_jsd_setup)


def softmax_js_divergence(input, target_logits, target=None, *, beta=0.5, temperature=1.0,
                          ignore_index=-100, reduction="batchmean"):
    """Generalised Jensen-Shannon divergence for distillation over dimension 1:
    ``beta KL(P||M) + (1-beta) KL(Q||M)``, ``M = beta P + (1-beta) Q``, with
    ``Q = softmax(input / T)`` (the student) and ``P = softmax(target_logits / T)`` (the
    teacher); ``beta = 0`` is KL(P||Q) and ``beta = 1`` KL(Q||P), as Liger-Kernel's
    ``LigerJSD`` (which takes log-probabilities; here logits).  ``target`` (optional,
    the labels, (N,) or (N, d1, ...)) masks rows equal to ``ignore_index``, as Liger's
    ``shift_labels``.  Reductions ``"batchmean"`` (over the kept rows, Liger's),
    ``"sum"``, ``"mean"`` and ``"none"``.  No ``T**2`` factor.
    """
    _check_input(input)
    _check_input(target_logits, "target_logits")
    _check_on(input, target_logits=target_logits)
    if target is not None:
        _check_on(input, target=target)
    loss, _ = torch.ops.xent_fast.softmax_js_divergence(
        input, target_logits, target, float(beta), float(temperature), int(ignore_index),
        reduction, _wants_grad(input))
    return loss



@torch.library.custom_op(f"{_NS}::softmax_kl_divergence_sparse", mutates_args=())
def _skd_op(input: Tensor, teacher_indices: Tensor, teacher_logprobs: Tensor,
            temperature: float, missing: str, reduction: str,
            want_grad: bool) -> Tuple[Tensor, Tensor]:
    """(KL to a teacher given on k classes a row, its gradient w.r.t. input)."""
    kw = dict(axis=_class_dim(input), temperature=temperature, missing=missing,
              reduction=reduction)
    x = _array(input, "input")
    i, v = _array(teacher_indices, "teacher_indices"), _array(teacher_logprobs,
                                                             "teacher_logprobs")
    return _loss_and_grad(_api.softmax_kl_divergence_sparse, input, (x, i, v), want_grad, **kw)


@_skd_op.register_fake
def _(input, teacher_indices, teacher_logprobs, temperature, missing, reduction, want_grad):
    return _pair_fake(input, _row_loss_shape(input, reduction), want_grad)


def _save_row_grad(ctx, input, reduction, grad):
    """setup_context of a row loss whose backward needs only the gradient of its input
    from the forward pass (the other inputs are not differentiable)."""
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.cdim, ctx.numel = reduction, _class_dim(input), input.numel()
    ctx.save_for_backward(grad)


def _skd_setup(ctx, inputs, output):
    _save_row_grad(ctx, inputs[0], inputs[5], output[1])


def _skd_backward(ctx, g, _g_grad):
    _no_double_backward("softmax_kl_divergence_sparse")
    _not_differentiable(ctx, {2: "teacher_logprobs"})
    if g is None:
        return (None,) * 7
    grad, = ctx.saved_tensors
    gi = None
    if ctx.needs_input_grad[0]:
        gi = _input_grad(ctx, grad, g, "softmax_kl_divergence_sparse", ctx.cdim)
    return gi, None, None, None, None, None, None


_skd_op.register_autograd(_skd_backward, setup_context=_skd_setup)


def softmax_kl_divergence_sparse(input, teacher_indices, teacher_logprobs, *, temperature=1.0,
                                 missing="renormalize", reduction="batchmean"):
    """KL(teacher || softmax(input / T)) over dimension 1 with the teacher stored sparsely:
    ``teacher_indices`` (integers) and ``teacher_logprobs`` shaped as ``input`` with k
    entries along dimension 1 (e.g. the top 64 of a 128k vocabulary).  ``missing``:
    ``"renormalize"`` (the teacher renormalised over its k classes at T) or
    ``"residual"`` (its remaining mass on the other classes); see
    :func:`xent_fast.softmax_kl_divergence_sparse`.  The teacher is not differentiated.
    """
    _check_input(input)
    _check_on(input, teacher_indices=teacher_indices, teacher_logprobs=teacher_logprobs)
    loss, _ = torch.ops.xent_fast.softmax_kl_divergence_sparse(
        input, teacher_indices, teacher_logprobs, float(temperature), missing, reduction,
        _wants_grad(input))
    return loss


# ---------------------------------------------------------------------------- binary CE
@torch.library.custom_op(f"{_NS}::binary_cross_entropy_with_logits", mutates_args=())
def _bcel_op(input: Tensor, target: Tensor, weight: Optional[Tensor],
             pos_weight: Optional[Tensor], reduction: str,
             want_grad: bool) -> Tuple[Tensor, Tensor]:
    """(loss, gradient w.r.t. input or an empty tensor)."""
    kw = dict(weight=_array(weight, "weight"), pos_weight=_array(pos_weight, "pos_weight"),
              reduction=reduction)
    x, t = _array(input, "input"), _array(target, "target")
    return _loss_and_grad(_api.binary_cross_entropy_with_logits, input, (x, t), want_grad,
                          **kw)


@_bcel_op.register_fake
def _(input, target, weight, pos_weight, reduction, want_grad):
    return _pair_fake(input, input.shape if reduction == "none" else (), want_grad)


def _bcel_setup(ctx, inputs, output):
    input, target, weight, pos_weight, reduction, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # else autograd fills a logits-sized zero tensor
    ctx.reduction, ctx.numel = reduction, input.numel()
    soft = target.requires_grad
    ctx.save_for_backward(output[1], *((input, weight, pos_weight) if soft else (None,) * 3))


def _bcel_target_grad(input, weight, pos_weight, g, reduction):
    """d loss / d y = w ((pos_weight - 1) softplus(-x) - x)."""
    dt = _compute_dtype(input)
    x = input.detach().to(dt)
    gt = -x
    if pos_weight is not None:
        gt = gt + (pos_weight.to(dt) - 1) * torch.nn.functional.softplus(-x)
    if weight is not None:
        gt = gt * weight.to(dt)
    return gt * _row_scale(g.to(dt), reduction, max(input.numel(), 1), None)


def _bcel_backward(ctx, g, _g_grad):
    _no_double_backward("binary_cross_entropy_with_logits")
    if g is None:  # the loss was not used (grads are not materialised)
        return (None,) * 6
    grad, input, weight, pos_weight = ctx.saved_tensors
    _not_differentiable(ctx, {2: "weight", 3: "pos_weight"})
    gi = gt = None
    if ctx.needs_input_grad[0]:
        gi = _input_grad(ctx, grad, g, "binary_cross_entropy_with_logits", None)
    if ctx.needs_input_grad[1]:
        gt = _bcel_target_grad(input, weight, pos_weight, g, ctx.reduction)
    return gi, gt, None, None, None, None


_bcel_op.register_autograd(_bcel_backward, setup_context=_bcel_setup)


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None,
                                     reduce=None, reduction="mean", pos_weight=None):
    """``torch.nn.functional.binary_cross_entropy_with_logits``, computed by xent_fast.

    ``weight`` broadcasts against the input, ``pos_weight`` along its last dimension.
    """
    reduction = _reduction_arg(size_average, reduce, reduction)
    _check_input(input, classes=False)
    _check_on(input, target=target, weight=weight, pos_weight=pos_weight)
    if target.shape != input.shape:
        raise ValueError(f"Target size ({tuple(target.shape)}) must be the same as input size "
                         f"({tuple(input.shape)})")
    loss, _ = torch.ops.xent_fast.binary_cross_entropy_with_logits(
        input, target, weight, pos_weight, reduction, _wants_grad(input))
    return loss


@torch.library.custom_op(f"{_NS}::sigmoid_focal_loss", mutates_args=())
def _focal_op(input: Tensor, target: Tensor, alpha: float, gamma: float, reduction: str,
              want_grad: bool) -> Tuple[Tensor, Tensor]:
    """(torchvision's sigmoid focal loss, its gradient w.r.t. input or an empty tensor)."""
    kw = dict(alpha=alpha, gamma=gamma, reduction=reduction)
    x, t = _array(input, "inputs"), _array(target, "targets")
    return _loss_and_grad(_api.sigmoid_focal_loss, input, (x, t), want_grad, **kw)


@_focal_op.register_fake
def _(input, target, alpha, gamma, reduction, want_grad):
    return _pair_fake(input, input.shape if reduction == "none" else (), want_grad)


def _focal_setup(ctx, inputs, output):
    input, target, alpha, gamma, reduction, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.numel = reduction, input.numel()
    ctx.opts = (alpha, gamma, reduction)
    soft = target.requires_grad
    ctx.save_for_backward(output[1], *((input, target) if soft else (None, None)))


def _focal_dense(input, target, alpha, gamma, reduction):
    """torchvision's formula in PyTorch ops (the targets' gradient, rarely wanted, comes
    from autograd through it)."""
    p = torch.sigmoid(input)
    ce = torch.nn.functional.binary_cross_entropy_with_logits(input, target, reduction="none")
    loss = ce * ((1 - (p * target + (1 - p) * (1 - target))) ** gamma)
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return {"none": loss, "mean": loss.mean(), "sum": loss.sum()}[reduction]


def _focal_backward(ctx, g, _g_grad):
    _no_double_backward("sigmoid_focal_loss")
    if g is None:
        return (None,) * 6
    grad, input, target = ctx.saved_tensors
    gi = gt = None
    if ctx.needs_input_grad[0]:
        gi = _input_grad(ctx, grad, g, "sigmoid_focal_loss", None)
    if ctx.needs_input_grad[1]:
        with torch.enable_grad():
            dt = _compute_dtype(input)
            y = target.detach().to(dt).requires_grad_(True)
            loss = _focal_dense(input.detach().to(dt), y, *ctx.opts)
            gt, = torch.autograd.grad(loss, y, g.to(dt))
        gt = gt.to(target.dtype)
    return gi, gt, None, None, None, None


_focal_op.register_autograd(_focal_backward, setup_context=_focal_setup)


def sigmoid_focal_loss(inputs, targets, alpha=0.25, gamma=2.0, reduction="none"):
    """``torchvision.ops.sigmoid_focal_loss`` (same arguments and defaults) in one pass,
    with the gradient computed in the forward: ``a_t (1 - p_t)**gamma`` times the
    binary cross-entropy of the logits ``inputs``."""
    _check_input(inputs, "inputs", classes=False)
    _check_on(inputs, targets=targets)
    if targets.shape != inputs.shape:
        raise ValueError(f"targets size ({tuple(targets.shape)}) must be the same as inputs "
                         f"size ({tuple(inputs.shape)})")
    loss, _ = torch.ops.xent_fast.sigmoid_focal_loss(inputs, targets, float(alpha),
                                                     float(gamma), reduction,
                                                     _wants_grad(inputs))
    return loss


@torch.library.custom_op(f"{_NS}::binary_cross_entropy", mutates_args=())
def _bce_op(input: Tensor, target: Tensor, weight: Optional[Tensor], reduction: str) -> Tensor:
    return _tensor(_api.binary_cross_entropy(_array(input, "input"), _array(target, "target"),
                                             weight=_array(weight, "weight"),
                                             reduction=reduction), input)


@_bce_op.register_fake
def _(input, target, weight, reduction):
    return input.new_empty(input.shape if reduction == "none" else ())


def _bce_setup(ctx, inputs, output):
    input, target, weight, reduction = inputs
    ctx.reduction = reduction
    ctx.save_for_backward(input, target, weight)


_BCE_EPS = float(np.float32(1e-12))  # PyTorch's epsilon, a float32 constant


def _bce_backward(ctx, g):
    """d/dp = w (p - y) / max(p (1 - p), eps) and d/dy = -w (log p - log(1 - p)), each
    log clamped at -100 as in the loss (PyTorch's formulas)."""
    _no_double_backward("binary_cross_entropy")
    input, target, weight = ctx.saved_tensors
    _not_differentiable(ctx, {2: "weight"})
    dt = _compute_dtype(input)
    p, y = input.detach().to(dt), target.detach().to(dt)
    scale = _row_scale(g.to(dt), ctx.reduction, max(input.numel(), 1), None)
    if weight is not None:
        scale = scale * weight.to(dt)
    gi = gt = None
    if ctx.needs_input_grad[0]:
        gi = ((p - y) / torch.clamp(p * (1 - p), min=_BCE_EPS) * scale).to(input.dtype)
    if ctx.needs_input_grad[1]:
        gt = (-(torch.clamp(torch.log(p), min=-100) - torch.clamp(torch.log1p(-p), min=-100))
              * scale).to(target.dtype)
    return gi, gt, None, None


_bce_op.register_autograd(_bce_backward, setup_context=_bce_setup)


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None,
                         reduction="mean"):
    """``torch.nn.functional.binary_cross_entropy`` (from probabilities), computed by
    xent_fast: each log clamped at -100; probabilities outside [0, 1] are an error.

    The gradient with respect to ``target`` is that of the loss as computed, with the
    clamped logs: finite at ``input`` 0 or 1, where PyTorch's is infinite."""
    reduction = _reduction_arg(size_average, reduce, reduction)
    _check_input(input, classes=False)
    _check_on(input, target=target, weight=weight)
    if target.shape != input.shape:
        raise ValueError(f"Using a target size ({tuple(target.shape)}) that is different to "
                         f"the input size ({tuple(input.shape)}) is deprecated. Please ensure "
                         "they have the same size.")
    return torch.ops.xent_fast.binary_cross_entropy(input, target, weight, reduction)


# ---------------------------------------------------------------------------- NLL and pointwise KL
@torch.library.custom_op(f"{_NS}::nll_loss", mutates_args=())
def _nll_op(input: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
            reduction: str, want_grad: bool) -> Tuple[Tensor, Tensor]:
    """(PyTorch's nll_loss, its gradient w.r.t. input or an empty tensor)."""
    kw = dict(axis=_class_dim(input), weight=_array(weight, "weight"),
              ignore_index=ignore_index, reduction=reduction)
    x, t = _array(input, "input"), _array(target, "target")
    return _loss_and_grad(_api.nll_loss, input, (x, t), want_grad, **kw)


@_nll_op.register_fake
def _(input, target, weight, ignore_index, reduction, want_grad):
    return _pair_fake(input, _row_loss_shape(input, reduction), want_grad)


def _nll_setup(ctx, inputs, output):
    _save_row_grad(ctx, inputs[0], inputs[4], output[1])


def _nll_backward(ctx, g, _g_grad):
    _no_double_backward("nll_loss")
    if g is None:
        return (None,) * 6
    grad, = ctx.saved_tensors
    _not_differentiable(ctx, {2: "weight"})
    gi = _input_grad(ctx, grad, g, "nll_loss", ctx.cdim) if ctx.needs_input_grad[0] else None
    return gi, None, None, None, None, None


_nll_op.register_autograd(_nll_backward, setup_context=_nll_setup)


def nll_loss(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
             reduction="mean"):
    """``torch.nn.functional.nll_loss``, computed by xent_fast (class dimension 1; 0 for
    a ``(C,)`` input): ``-weight[t] * input[t]`` per element of the batch, ``"mean"``
    over the summed weight of the targets that are not ``ignore_index`` (NaN when none
    is), the gradient with respect to ``input`` in the forward pass.  Integer targets of
    any integer dtype are taken; one out of range is a ``ValueError``."""
    reduction = _reduction_arg(size_average, reduce, reduction)
    _check_input(input)
    _check_on(input, target=target, weight=weight)
    loss, _ = torch.ops.xent_fast.nll_loss(input, target, weight, int(ignore_index),
                                           reduction, _wants_grad(input))
    return loss


@torch.library.custom_op(f"{_NS}::kl_div", mutates_args=())
def _kl_div_op(input: Tensor, target: Tensor, reduction: str, log_target: bool,
               want_grad: bool) -> Tuple[Tensor, Tensor]:
    """(PyTorch's pointwise kl_div, its gradient w.r.t. input or an empty tensor)."""
    kw = dict(reduction=reduction, log_target=log_target)
    x, t = _array(input, "input"), _array(target, "target")
    return _loss_and_grad(_api.kl_div, input, (x, t), want_grad, **kw)


@_kl_div_op.register_fake
def _(input, target, reduction, log_target, want_grad):
    return _pair_fake(input, input.shape if reduction == "none" else (), want_grad)


def _kl_div_setup(ctx, inputs, output):
    input, target, reduction, log_target, _ = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.numel, ctx.log_target = reduction, input.numel(), log_target
    soft = target.requires_grad
    ctx.save_for_backward(output[1], *((input, target) if soft else (None, None)))


def _kl_div_backward(ctx, g, _g_grad):
    _no_double_backward("kl_div")
    if g is None:
        return (None,) * 5
    grad, input, target = ctx.saved_tensors
    gi = gt = None
    if ctx.needs_input_grad[0]:
        gi = _input_grad(ctx, grad, g, "kl_div", None)
    if ctx.needs_input_grad[1]:  # PyTorch's own formula, and its derivative at target 0
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch's note on what "mean" divides by
            dt = _compute_dtype(input)
            y = target.detach().to(dt).requires_grad_(True)
            loss = torch.nn.functional.kl_div(input.detach().to(dt), y,
                                              reduction=ctx.reduction,
                                              log_target=ctx.log_target)
            gt, = torch.autograd.grad(loss, y, g.to(dt))
        gt = gt.to(target.dtype)
    return gi, gt, None, None, None


_kl_div_op.register_autograd(_kl_div_backward, setup_context=_kl_div_setup)


def kl_div(input, target, size_average=None, reduce=None, reduction="mean", log_target=False):
    """``torch.nn.functional.kl_div`` (pointwise), computed by xent_fast with the gradient
    with respect to ``input`` in the forward pass: ``input`` log-probabilities, ``target``
    probabilities (log-probabilities with ``log_target``), elementwise
    ``target * (log target - input)`` (0 where ``target`` is 0).  ``"mean"`` divides by
    the number of elements, ``"batchmean"`` by ``input.shape[0]``, as PyTorch.  Input and
    target broadcast against each other, as in PyTorch.  For the KL between two logit
    tensors, :func:`softmax_kl_divergence` forms neither distribution."""
    reduction = _reduction_arg(size_average, reduce, reduction)
    _check_input(input, classes=False)
    _check_on(input, target=target)
    if not target.is_floating_point():
        raise TypeError(f"target must be a floating-point tensor, got {target.dtype}")
    if reduction not in ("none", "batchmean", "sum", "mean"):
        raise ValueError(f"reduction must be 'none', 'batchmean', 'sum' or 'mean', got "
                         f"{reduction!r}")
    rows = input.shape[0] if input.dim() else 1  # "batchmean": the input's own first size
    if target.shape != input.shape:
        input, target = torch.broadcast_tensors(input, target)  # autograd sums them back
        if reduction == "batchmean":
            loss, _ = torch.ops.xent_fast.kl_div(input, target, "sum", bool(log_target),
                                                 _wants_grad(input))
            return _promoted(loss / rows, input, target)
    loss, _ = torch.ops.xent_fast.kl_div(input, target, reduction, bool(log_target),
                                         _wants_grad(input))
    return _promoted(loss, input, target)


# ---------------------------------------------------------------------------- fused linear CE
def _linear_call(input, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss,
                 softcap, chunk_rows, want_grad, row_scale=None, weight_grad=True):
    from . import _linear

    return _linear.linear_cross_entropy(
        input, weight, target, bias=bias, ignore_index=ignore_index,
        label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap if softcap > 0 else None,
        reduction=reduction, return_grad=want_grad, row_scale=row_scale,
        weight_grad=weight_grad, chunk_rows=chunk_rows if chunk_rows > 0 else None)


@torch.library.custom_op(f"{_NS}::linear_cross_entropy", mutates_args=())
def _lce_op(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
            ignore_index: int, reduction: str, label_smoothing: float, z_loss: float,
            softcap: float, chunk_rows: int, want_grad: bool,
            weight_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, grad input, grad weight, grad bias): the gradients of the reduced loss, or
    empty tensors without want_grad (grad weight without weight_grad, a frozen head;
    grad bias without a bias); chunk_rows 0 is automatic."""
    res = _linear_call(input, weight, target, bias, ignore_index, reduction, label_smoothing,
                       z_loss, softcap, chunk_rows, want_grad, weight_grad=weight_grad)
    if not want_grad:
        return (_tensor(res, input), _no_grad_buffer(input), _no_grad_buffer(weight),
                _no_grad_buffer(input))
    gb = _owned(res[3]) if bias is not None else _no_grad_buffer(input)
    gw = _owned(res[2]) if weight_grad else _no_grad_buffer(weight)
    return _tensor(res[0], input), _owned(res[1]), gw, gb


@_lce_op.register_fake
def _(input, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss, softcap,
      chunk_rows, want_grad, weight_grad):
    loss = input.new_empty(input.shape[:-1] if reduction == "none" else ())
    if not want_grad:
        return loss, input.new_empty((0,)), weight.new_empty((0,)), input.new_empty((0,))
    gb = torch.empty_like(bias) if bias is not None else input.new_empty((0,))
    gw = torch.empty_like(weight) if weight_grad else weight.new_empty((0,))
    return loss, torch.empty_like(input), gw, gb


@torch.library.custom_op(f"{_NS}::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                     row_grad: Tensor, ignore_index: int, label_smoothing: float,
                     z_loss: float, softcap: float,
                     chunk_rows: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients of sum(row_grad * loss_rows): the backward pass of reduction="none"."""
    rg = row_grad.detach().reshape(-1).to(input.dtype)
    res = _linear_call(input, weight, target, bias, ignore_index, "none", label_smoothing,
                       z_loss, softcap, chunk_rows, True, row_scale=rg)
    return _owned(res[1]), _owned(res[2]), (_owned(res[3]) if bias is not None
                                            else _no_grad_buffer(input))


@_lce_backward_op.register_fake
def _(input, weight, target, bias, row_grad, ignore_index, label_smoothing, z_loss, softcap,
      chunk_rows):
    gb = torch.empty_like(bias) if bias is not None else input.new_empty((0,))
    return torch.empty_like(input), torch.empty_like(weight), gb


def _lce_setup(ctx, inputs, output):
    input, weight, target, bias, ignore, reduction, eps, z, cap, chunk, want_grad, _ = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.options = reduction, (ignore, eps, z, cap, chunk)
    ctx.has_bias, ctx.want_grad = bias is not None, want_grad
    ctx.weight_numel = weight.numel()
    if reduction == "none":  # the gradient needs the incoming one a row: recomputed then
        ctx.save_for_backward(input, weight, target, bias)
    else:
        ctx.save_for_backward(*output[1:])


def _lce_backward(ctx, g, *_unused):
    _no_double_backward("linear_cross_entropy")
    if g is None:
        return (None,) * 12
    _not_differentiable(ctx, {2: "target"})
    if ctx.reduction == "none":
        input, weight, target, bias = ctx.saved_tensors
        grads = torch.ops.xent_fast.linear_cross_entropy_backward(
            input, weight, target, bias, g, *ctx.options)
    else:
        if not ctx.want_grad or (ctx.needs_input_grad[1]
                                 and ctx.saved_tensors[1].numel() != ctx.weight_numel):
            raise _missing_grad("linear_cross_entropy")
        eager = _eager(g, *ctx.saved_tensors)
        grads = [_scale(t, g, None, "sum", eager) for t in ctx.saved_tensors]
    gi, gw, gb = grads
    return (gi if ctx.needs_input_grad[0] else None, gw if ctx.needs_input_grad[1] else None,
            None, gb if ctx.has_bias and ctx.needs_input_grad[3] else None,
            None, None, None, None, None, None, None, None)


_lce_op.register_autograd(_lce_backward, setup_context=_lce_setup)


@torch.library.custom_op(f"{_NS}::linear_token_stats", mutates_args=())
def _lts_op(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
            temperature: float, ignore_index: int, chunk_rows: int) -> Tuple[Tensor, Tensor]:
    """(log-probability of the target, entropy) per row; chunk_rows 0 is automatic."""
    from . import _linear

    lp, ent = _linear.linear_token_stats(input, weight, target, bias=bias,
                                         temperature=temperature, ignore_index=ignore_index,
                                         chunk_rows=chunk_rows or None)
    return _tensor(lp, input), _tensor(ent, input)


@_lts_op.register_fake
def _(input, weight, target, bias, temperature, ignore_index, chunk_rows):
    return input.new_empty(input.shape[:-1]), input.new_empty(input.shape[:-1])


@torch.library.custom_op(f"{_NS}::linear_token_stats_backward", mutates_args=())
def _lts_backward_op(input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor],
                     grad_logprob: Tensor, grad_entropy: Tensor, temperature: float,
                     ignore_index: int, chunk_rows: int) -> Tuple[Tensor, Tensor, Tensor]:
    from . import _linear

    res = _linear.linear_token_stats(input, weight, target, bias=bias, temperature=temperature,
                                     ignore_index=ignore_index, chunk_rows=chunk_rows or None,
                                     grad_logprob=grad_logprob.detach().to(input.dtype),
                                     grad_entropy=grad_entropy.detach().to(input.dtype))
    return _owned(res[2]), _owned(res[3]), (_owned(res[4]) if bias is not None
                                            else _no_grad_buffer(input))


@_lts_backward_op.register_fake
def _(input, weight, target, bias, grad_logprob, grad_entropy, temperature, ignore_index,
      chunk_rows):
    gb = torch.empty_like(bias) if bias is not None else input.new_empty((0,))
    return torch.empty_like(input), torch.empty_like(weight), gb


def _lts_setup(ctx, inputs, output):
    input, weight, target, bias, temperature, ignore, chunk = inputs
    ctx.options = (temperature, ignore, chunk)
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input, weight, target, bias)


def _lts_backward(ctx, g_lp, g_ent):
    _no_double_backward("linear_token_stats")
    input, weight, target, bias = ctx.saved_tensors
    _not_differentiable(ctx, {2: "target"})
    gi, gw, gb = torch.ops.xent_fast.linear_token_stats_backward(
        input, weight, target, bias, g_lp, g_ent, *ctx.options)
    return (gi if ctx.needs_input_grad[0] else None, gw if ctx.needs_input_grad[1] else None,
            None, gb if ctx.has_bias and ctx.needs_input_grad[3] else None, None, None, None)


_lts_op.register_autograd(_lts_backward, setup_context=_lts_setup)


def linear_token_stats(input, weight, target, bias=None, *, temperature=1.0, ignore_index=-100,
                       chunk_rows=None):
    """Per row ``(logprob, entropy)`` of ``softmax(F.linear(input, weight, bias) /
    temperature)``: the log-probability of ``target`` and the entropy, without the
    logits (the inputs of a PPO/GRPO loss with an entropy bonus).  Differentiable with
    respect to ``input``, ``weight`` and ``bias``; the backward pass recomputes each
    chunk's logits.  Rows whose target is ``ignore_index`` give 0 for both."""
    _check_input(input)
    _check_input(weight, "weight")
    _check_on(input, weight=weight, target=target, bias=bias)
    return torch.ops.xent_fast.linear_token_stats(
        input, weight, target, bias, float(temperature), int(ignore_index),
        0 if chunk_rows is None else int(chunk_rows))


def linear_cross_entropy(input, weight, target, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, *, z_loss=0.0, softcap=None, chunk_rows=None):
    """``F.cross_entropy(F.linear(input, weight, bias), target, ...)`` without the logits.

    ``input`` (..., H) hidden states, ``weight`` (V, H) and ``bias`` (V,) as
    ``torch.nn.Linear(H, V)``'s, ``target`` class indices of shape ``input.shape[:-1]``.
    The logits exist one chunk of rows at a time (``chunk_rows``, by default as many as
    fill 32 MiB); when a gradient is needed the forward pass computes those of ``input``,
    ``weight`` and ``bias`` with the loss, and the backward pass only scales them.
    Products by PyTorch (MKL on the CPU, cuBLAS on the GPU) in the inputs' dtype.
    """
    _check_input(input)
    _check_input(weight, "weight")
    _check_on(input, weight=weight, target=target, bias=bias)
    need = any(_wants_grad(t) for t in (input, weight, bias))
    loss, *_ = torch.ops.xent_fast.linear_cross_entropy(
        input, weight, target, bias, int(ignore_index), reduction, float(label_smoothing),
        float(z_loss), 0.0 if softcap is None else float(softcap),
        0 if chunk_rows is None else int(chunk_rows), need and reduction != "none",
        _wants_grad(weight))
    return loss


# ---------------------------------------------------------------------------- modules
class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss`` computed by xent_fast; same arguments, plus the
    keyword-only ``z_loss``, ``softcap``, ``inplace_backward`` and ``return_z_loss`` of
    :func:`cross_entropy`."""

    def __init__(self, weight=None, size_average=None, ignore_index=-100, reduce=None,
                 reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None,
                 inplace_backward=False, return_z_loss=False):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss, self.softcap, self.inplace_backward = z_loss, softcap, inplace_backward
        self.return_z_loss = return_z_loss

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, ignore_index=self.ignore_index,
                             reduction=self.reduction, label_smoothing=self.label_smoothing,
                             z_loss=self.z_loss, softcap=self.softcap,
                             inplace_backward=self.inplace_backward,
                             return_z_loss=self.return_z_loss)


class BCEWithLogitsLoss(torch.nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss`` computed by xent_fast; same arguments."""

    def forward(self, input, target):
        return binary_cross_entropy_with_logits(input, target, self.weight,
                                                reduction=self.reduction,
                                                pos_weight=self.pos_weight)


class BCELoss(torch.nn.BCELoss):
    """``torch.nn.BCELoss`` computed by xent_fast; same arguments."""

    def forward(self, input, target):
        return binary_cross_entropy(input, target, self.weight, reduction=self.reduction)


class NLLLoss(torch.nn.NLLLoss):
    """``torch.nn.NLLLoss`` computed by xent_fast; same arguments."""

    def forward(self, input, target):
        return nll_loss(input, target, self.weight, ignore_index=self.ignore_index,
                        reduction=self.reduction)


class KLDivLoss(torch.nn.KLDivLoss):
    """``torch.nn.KLDivLoss`` (pointwise) computed by xent_fast; same arguments."""

    def forward(self, input, target):
        return kl_div(input, target, reduction=self.reduction, log_target=self.log_target)


class LinearCrossEntropyLoss(torch.nn.Module):
    """A linear head and the cross-entropy of its logits, fused
    (:func:`linear_cross_entropy`): ``loss = LinearCrossEntropyLoss(H, V)(hidden, target)``.
    Holds ``weight`` (V, H) and ``bias`` as ``torch.nn.Linear(H, V)`` does (tie ``weight``
    to an embedding by assigning it)."""

    def __init__(self, in_features, num_classes, bias=False, ignore_index=-100,
                 reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None,
                 chunk_rows=None, device=None, dtype=None):
        super().__init__()
        lin = torch.nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.weight = lin.weight
        self.bias = lin.bias
        self.ignore_index, self.reduction, self.label_smoothing = (ignore_index, reduction,
                                                                  label_smoothing)
        self.z_loss, self.softcap, self.chunk_rows = z_loss, softcap, chunk_rows

    def forward(self, input, target):
        return linear_cross_entropy(input, self.weight, target, self.bias,
                                    self.ignore_index, self.reduction, self.label_smoothing,
                                    z_loss=self.z_loss, softcap=self.softcap,
                                    chunk_rows=self.chunk_rows)


class JSDLoss(torch.nn.Module):
    """Distillation loss: :func:`softmax_js_divergence` of (student, teacher) logits,
    with the labels as an optional mask; the arguments of Liger-Kernel's ``LigerJSD``
    (``beta``, ``ignore_index``) and a temperature."""

    def __init__(self, beta=0.5, ignore_index=-100, temperature=1.0, reduction="batchmean"):
        super().__init__()
        self.beta, self.ignore_index = beta, ignore_index
        self.temperature, self.reduction = temperature, reduction

    def forward(self, input, target_logits, target=None):
        return softmax_js_divergence(input, target_logits, target, beta=self.beta,
                                     temperature=self.temperature,
                                     ignore_index=self.ignore_index, reduction=self.reduction)

    def extra_repr(self):
        return (f"beta={self.beta}, ignore_index={self.ignore_index}, "
                f"temperature={self.temperature}, reduction={self.reduction!r}")


class SoftmaxKLDivergenceLoss(torch.nn.Module):
    """Distillation loss: :func:`softmax_kl_divergence` of (student, teacher) logits."""

    def __init__(self, temperature=1.0, reduction="batchmean"):
        super().__init__()
        self.temperature, self.reduction = temperature, reduction

    def forward(self, input, target_logits):
        return softmax_kl_divergence(input, target_logits, temperature=self.temperature,
                                     reduction=self.reduction)

    def extra_repr(self):
        return f"temperature={self.temperature}, reduction={self.reduction!r}"
