# Functional entry point of the fused linear cross-entropy: validation and dispatch.
from __future__ import annotations

import math
import numbers
import warnings
from typing import NamedTuple

import torch

from .._amp import cast_as_autocast
from .._checks import fail_if_any, refuse_func_transforms
from .._triton import resolve_impl
from .impl.reference import shift_for_next_token

IMPLS = ("auto", "triton", "torch", "reference")
REDUCTIONS = ("mean", "sum", "none")
# max_valid_tokens is rounded up to a multiple of this: buffers and grids change size in steps
# (the caching allocator reuses blocks). Under torch.compile the raw bound is an input (the
# NaN check compares with it), so a bound that varies per step marks it dynamic there.
ROW_QUANTUM = 256


class LinearCrossEntropyOutput(NamedTuple):
    """loss; num_valid: labelled tokens (int64 scalar); correct: argmax == label per token."""

    loss: torch.Tensor
    num_valid: torch.Tensor
    correct: torch.Tensor


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    logit_softcap: float | None = None,
    shift_labels: bool = False,
    return_stats: bool = False,
    max_valid_tokens: int | str | None = None,
    labelled_fraction_hint: float | None = None,
    impl: str = "auto",
) -> torch.Tensor | LinearCrossEntropyOutput:
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``labels``, without the logits.

    Shapes and dtypes:
        hidden: (..., H) bf16/fp16/fp32, the final hidden states (after the last norm)
        weight: (V, H), the LM head; bias: (V,) or None
        labels: (...) integer, in [0, V) or ``ignore_index``
    Returns the loss (fp32; float64 for fp64 inputs): a scalar for "mean" and "sum", per token
    with labels' shape for "none" (0 at ignored positions). ``return_stats=True`` returns
    ``(loss, num_valid, correct)`` instead; both statistics come from the same pass over V.

    Equivalent PyTorch::

        if shift_labels:  # predict token t+1 from position t; the last position is ignored
            labels = torch.cat([labels[..., 1:], full_like(labels[..., :1], ignore_index)], -1)
        logits = F.linear(hidden, weight, bias).float()
        if logit_softcap is not None:
            logits = logit_softcap * torch.tanh(logits / logit_softcap)
        loss = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none",
                               ignore_index=ignore_index, label_smoothing=label_smoothing)
        loss += z_loss_weight * logits.logsumexp(-1).flatten().square() * (labels != ignore)
        loss = loss.sum() / max(num_valid, 1)  # "mean"; "sum" and "none" as torch

    With every label ignored the loss is 0 (also for "mean") and every gradient is 0.

    ``max_valid_tokens``: an upper bound, known on the host, on the labelled tokens (the
    count of labels != ignore_index, before or after the shift: shifting only drops labels),
    e.g. counted on the CPU copy of the batch before it went to the GPU. The Triton path then
    sizes its buffers and grids for that many rows (rounded up to a multiple of 256) instead
    of all N: in pre-training, where ~90% of positions are unlabelled, less memory for the
    backward's buffers and a forward grid that fills the GPU. With half-precision operands, a
    gradient needed and reduction "mean"/"sum", a bound also lets the op pick the BLAS
    schedule (cuBLAS/hipBLAS GEMMs, gradients computed in the forward: a frozen head, or a
    trainable one with at least half the rows labelled; a trainable head then holds an fp32
    (V, H) gradient from the forward to the backward, 2.1 GB for Llama-3; tile knob "blas",
    docs/ops/linear_cross_entropy.md). No host sync either way. A bound below the true count
    is caught on the device: the loss is NaN (whatever the impl), and so are grad_weight,
    grad_bias and grad_hidden (which of its rows depends on the schedule: treat the whole
    gradient as NaN), never a silently partial loss (a trainer that skips non-finite steps
    skips it). A bound that
    changes every step changes launch sizes, which a captured CUDA graph cannot follow: pass a
    fixed bound there, or none.
    ``max_valid_tokens="count"``: the op counts the labels itself, on the host: one device
    sync per call, by request (for drop-in use where the loop has no CPU copy of the labels;
    refused under torch.compile(fullgraph=True), which cannot trace the read; without
    fullgraph, Dynamo runs the call eagerly).
    ``labelled_fraction_hint``: without a bound, a host-side guess of the fraction of labelled
    tokens (``LinearCrossEntropy`` passes the previous call's), used only to pick the schedule:
    at least ``blas_min_fraction`` (0.5) runs the BLAS schedule over all N rows (what a dense
    batch needs; liger-kernel's algorithm), below it the Triton kernels that skip unlabelled
    rows. The result is the same either way (up to rounding); a wrong guess costs speed (and,
    with a trainable head taking the BLAS schedule, its fp32 (V, H) gradient), nothing else.
    Ignored when ``max_valid_tokens`` is given.
    Numerics: log-sum-exp and the loss in fp32; grad_weight accumulates in fp32. The Triton
    kernels keep the logits in fp32 (half-precision operands multiply exactly into fp32
    accumulators); the gradients-in-forward schedules (BLAS, and the grad_in_forward knob)
    round them to the operands' dtype first, as eager's F.linear does.
    Under ``torch.autocast`` the op casts hidden, weight and bias as autocast casts
    ``F.linear``'s (fp32 to the autocast dtype), so an AMP model with fp32 weights gets the
    eager model's numbers and half-precision tensor cores; the gradients come back in the
    inputs' own dtypes. The loss math stays fp32 (autocast runs cross-entropy in fp32 too).
    Mixed operands (hidden and weight of different dtypes, e.g. bf16 activations and an fp32
    master weight outside autocast, which eager's F.linear refuses): both are read in the
    wider dtype (fp32: IEEE products, no tensor cores; a warning says so) and each gradient
    comes back in its own input's dtype. Cast them to one dtype for the fast kernels.
    A forward under grad mode that takes a gradients-in-forward schedule pays for the
    gradients even if no backward follows (module.eval() does not change that): evaluate
    under torch.no_grad(). Double backward (create_graph=True) and torch.func transforms
    (vmap, grad, ...) need impl="reference" (the others refuse them by name).

    impl: "triton" (fused kernels: no (N, V) tensor, no host sync, frozen weight skips the
    grad_weight GEMM; unlabelled rows are never multiplied by the Triton kernels, while the
    BLAS schedule multiplies every row up to the bound), "torch" (chunked PyTorch, labelled
    rows only; syncs the host to find them), "reference" (eager logits + F.cross_entropy, the
    test oracle), "auto" (triton on CUDA/ROCm tensors, torch elsewhere).
    """
    _validate(hidden, weight, labels, bias, reduction, impl)
    # Under torch.autocast the operands F.linear would get (eager's dtype and tensor cores).
    hidden, weight, bias = cast_as_autocast(hidden.device, hidden, weight, bias)
    if hidden.dtype != weight.dtype:
        warnings.warn(f"linear_cross_entropy: hidden ({hidden.dtype}) and weight "
                      f"({weight.dtype}) differ: the op computes in "
                      f"{torch.promote_types(hidden.dtype, weight.dtype)} without "
                      "half-precision tensor cores; cast both to one dtype for speed",
                      UserWarning, stacklevel=2)
    check_loss_options("linear_cross_entropy", ignore_index, label_smoothing, z_loss_weight,
                       logit_softcap)
    if shift_labels and labels.dim() == 0:
        raise ValueError("linear_cross_entropy: shift_labels=True needs labels with a sequence "
                         "dimension (..., T), got a single label (shape ())")
    max_valid_tokens = check_max_valid_tokens("linear_cross_entropy", max_valid_tokens)
    count_on_host = max_valid_tokens == "count"
    if labelled_fraction_hint is not None and (
            isinstance(labelled_fraction_hint, bool)
            or not isinstance(labelled_fraction_hint, (int, float))
            or not 0.0 <= labelled_fraction_hint <= 1.0):
        raise ValueError("linear_cross_entropy: labelled_fraction_hint must be None or a number "
                         f"in [0, 1] (a guess of the labelled fraction), got "
                         f"{labelled_fraction_hint!r}")
    if count_on_host and torch.compiler.is_compiling():
        raise ValueError("linear_cross_entropy: max_valid_tokens='count' reads the labels on "
                         "the host, which torch.compile cannot trace; pass an int bound "
                         "counted outside the compiled region, or None")
    # int64 before any comparison: in uint8, ignore_index=-100 and V would wrap around.
    labels = labels.long()
    if not torch.compiler.is_compiling() and labels.is_inference() and \
            torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        # (made by a pipeline under inference_mode: autograd cannot save it for the backward;
        # a normal copy can. Dynamo cannot trace is_inference; compiled callers pass others.)
        labels = labels.clone()
    check_label_range(labels, weight.shape[0], ignore_index)
    if shift_labels:
        labels = shift_for_next_token(labels, ignore_index)
    if count_on_host:  # exact after the shift (the sync the caller asked for)
        max_valid_tokens = int((labels != ignore_index).sum())
    impl = resolve_impl(impl, hidden, "linear_cross_entropy", "hidden")
    if impl == "reference":
        from .impl.reference import linear_cross_entropy_ref

        loss, num_valid, correct = linear_cross_entropy_ref(
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss_weight=z_loss_weight,
            logit_softcap=logit_softcap,
        )
        loss = _poison_if_over(loss, num_valid, max_valid_tokens)
        return LinearCrossEntropyOutput(loss, num_valid, correct) if return_stats else loss

    n = labels.numel()
    max_rows = bounded_rows(max_valid_tokens)
    hidden2d = hidden.reshape(n, hidden.shape[-1]).contiguous()
    labels1d = labels.reshape(n).to(torch.int64).contiguous()
    softcap = float(logit_softcap) if logit_softcap is not None else 0.0
    args = (hidden2d, weight.contiguous(), None if bias is None else bias.contiguous(), labels1d,
            int(ignore_index), float(label_smoothing), float(z_loss_weight), softcap)
    if impl == "triton":
        from .impl.triton import forward_schedule, linear_cross_entropy_fwd

        need = (hidden.requires_grad, weight.requires_grad,
                bias is not None and bias.requires_grad)
        # Gradients in the forward (the BLAS schedule, or the opt-in tile knob): only when they
        # will be needed, and only for "mean"/"sum", where per_token feeds nothing but the sum
        # below, so the backward gets one scalar for every token (impl/triton_fused_grad.py
        # says why that is needed).
        exact = reduction != "none" and torch.is_grad_enabled() and any(need)
        schedule = forward_schedule(hidden2d, weight, max_valid_tokens, need[1], exact,
                                    labelled_fraction_hint)
        if schedule == "blas":
            from .impl.blas_fused_grad import linear_cross_entropy_fwd_grad_blas

            per_token, correct, _lse, _order, count, *_unit_grads = \
                linear_cross_entropy_fwd_grad_blas(*args, *need, max_rows)
        elif schedule == "grad_in_forward":
            from .impl.triton_fused_grad import linear_cross_entropy_fwd_grad

            per_token, correct, _lse, _order, count, *_unit_grads = \
                linear_cross_entropy_fwd_grad(*args, *need, max_rows)
        else:
            per_token, correct, _lse, _order, count = linear_cross_entropy_fwd(*args, max_rows)
        num_valid = count.reshape(()).to(torch.int64)
    else:
        from .impl.torch_chunked import LinearCrossEntropyTorchFunction

        per_token, correct = LinearCrossEntropyTorchFunction.apply(*args)
        num_valid = (labels1d != ignore_index).sum()
    if reduction == "none":
        loss = per_token.reshape(labels.shape)
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        loss = per_token.sum() / num_valid.clamp_min(1)
    loss = _poison_if_over(loss, num_valid, max_valid_tokens)
    if return_stats:
        return LinearCrossEntropyOutput(loss, num_valid, correct.reshape(labels.shape))
    return loss


def bounded_rows(max_valid_tokens: int | None) -> int:
    """The row bound the Triton kernels get for ``max_valid_tokens``: rounded up to
    ROW_QUANTUM (at least one quantum), 0 for none (impl/triton.row_capacity: then all N)."""
    if max_valid_tokens is None:
        return 0
    return -(-max(max_valid_tokens, 1) // ROW_QUANTUM) * ROW_QUANTUM


def _poison_if_over(loss: torch.Tensor, num_valid: torch.Tensor, bound: int | None):
    """loss, or NaN (and NaN gradients through it) where more tokens are labelled than the
    caller's bound said: a device-side select, no sync."""
    if bound is None:
        return loss
    over = num_valid.reshape(()) > bound
    return loss * torch.where(over, float("nan"), 1.0).to(loss.dtype)


def _validate(hidden, weight, labels, bias, reduction, impl) -> None:
    name = "linear_cross_entropy"
    if impl not in IMPLS:
        raise ValueError(f"{name}: impl must be one of {IMPLS}, got {impl!r}")
    if impl != "reference":  # (before the label check, which vmap cannot run either)
        refuse_func_transforms(name, impl)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    for arg, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
    for arg, t in (("hidden", hidden), ("weight", weight)):
        if not t.is_floating_point():
            raise ValueError(f"{name}: {arg} must be a floating tensor, got dtype {t.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"{name}: hidden must have shape (..., H) with H > 0, got "
                         f"{tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"{name}: weight must have shape (V, H) = (V > 0, {hidden.shape[-1]}), "
                         f"got {tuple(weight.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be an integer tensor, got dtype {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{name}: labels must have hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}, got {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError(f"{name}: hidden must hold at least one token, got shape "
                         f"{tuple(hidden.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or
                             tuple(bias.shape) != (weight.shape[0],)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{name}: bias must have shape (V,) = ({weight.shape[0]},), got {got}")
    if bias is not None and not bias.is_floating_point():
        raise ValueError(f"{name}: bias must be a floating tensor, got dtype {bias.dtype}")
    for arg, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name}: {arg} must be on hidden's device {hidden.device}, got "
                             f"{t.device}")


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_loss_options(name: str, ignore_index, label_smoothing, z_loss_weight,
                       logit_softcap) -> None:
    """The loss's scalar options (the function's and the module's constructor's)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"{name}: ignore_index must be an int, got {ignore_index!r}")
    if not _real(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{name}: label_smoothing must be a number in [0, 1], got "
                         f"{label_smoothing!r}")
    if not _real(z_loss_weight) or not 0 <= z_loss_weight < math.inf:
        raise ValueError(f"{name}: z_loss_weight must be a finite number >= 0, got "
                         f"{z_loss_weight!r}")
    if logit_softcap is not None and (not _real(logit_softcap)
                                      or not 0 < logit_softcap < math.inf):
        raise ValueError(f"{name}: logit_softcap must be a finite number > 0, or None (no cap), "
                         f"got {logit_softcap!r}")


def check_max_valid_tokens(name: str, max_valid_tokens):
    """``max_valid_tokens`` as the op uses it: None, "count", or a Python int >= 0 (numpy
    integers converted); anything else is an error (the function's and the module's)."""
    if isinstance(max_valid_tokens, str) and max_valid_tokens == "count":
        return max_valid_tokens
    if isinstance(max_valid_tokens, numbers.Integral) and not isinstance(max_valid_tokens, bool):
        max_valid_tokens = int(max_valid_tokens)  # numpy integers too
        if max_valid_tokens >= 0:
            return max_valid_tokens
    elif max_valid_tokens is None:
        return None
    raise ValueError(f"{name}: max_valid_tokens must be None, an int >= 0 (a host-side bound "
                     "on the labelled tokens) or 'count' (count them on the host, a device "
                     f"sync), got {max_valid_tokens!r}")


def check_label_range(labels: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Labels outside [0, V) other than ignore_index are an error (see fail_if_any)."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    fail_if_any(bad, labels, f"linear_cross_entropy: labels must be in [0, {vocab}) or "
                f"ignore_index={ignore_index}")
