# linear_cross_entropy's Triton path with the gradients computed during the forward (opt-in).
"""Tile knob grad_in_forward (impl/triton.py; the idea is liger-kernel's fused linear
cross-entropy): for reduction "mean"/"sum" with a gradient needed, the forward does, per chunk
of CHUNK compacted rows (the backward's chunking and DLOGITS_BUDGET_BYTES):

1. _lce_dlogits_kernel with WRITE_LOGITS: the logits of the chunk (CHUNK x V, dlogits dtype);
2. _lce_rows_grad_kernel: per row, lse, loss, argmax == label, and d loss / d logits written over
   the logits in place with a per-token weight of 1 (the gradient of the "sum");
3. _lce_dhidden_kernel and _lce_dweight_kernel (or the dw_backend="torch" GEMM), as the backward.

So a step multiplies n x V x H three times (logits, dX, dW) instead of four (the default path
computes the logits in the forward and again in the backward). The forward returns the usual
outputs plus these unit gradients (fp32); the backward only scales them by the upstream gradient.

Why scaling is exact for "mean"/"sum", and only for them. The op's output is the per-token loss
l_t; the api reduces it as L = c * sum_t l_t (c = 1 for "sum", 1 / num_valid for "mean") and
uses l_t for nothing else, so the gradient reaching the op is d out / d l_t = g * c for every
token t: one scalar, G. The true gradient sum_t G_t d l_t / d theta is then G * d(sum_t l_t) /
d theta = G * (the unit gradient); ignored tokens contribute 0 whatever G_t is. G is read on the
device at one labelled position, grad_loss[order[0]] (no host sync; with nothing labelled the
unit gradients are 0 and G does not matter). With reduction "none" the caller may weight each
token differently (any G_t), and a per-token loss that also fed another term would add a
non-uniform part to G_t: both would make "G_t is one scalar" false, so the api takes this path
only for "mean"/"sum", where l_t never leaves it. Rounding differs slightly from the default path
(dlogits rounded before the multiply by G there, after here), the math does not.

Memory: the forward holds one (CHUNK, V) buffer, as the backward does by default; the unit
grad_hidden (N, H) and grad_weight (V, H) are kept in fp32 from the forward to the backward (one
rounding to the parameters' dtype, after the scaling), and grad_bias (V,) in fp32.
"""
from __future__ import annotations

import torch
import triton

from .double_backward import refuse_double_backward
from .triton import (
    chunk_grads,
    chunk_layout,
    compact_labels,
    grad_buffers,
    kernel_count,
    launch_dlogits,
    row_capacity,
    uses_torch_dw,
)
from .triton_kernels import _lce_rows_grad_kernel


def lce_forward_with_grads(hidden, weight, bias, labels, ignore_index, label_smoothing,
                           z_loss_weight, softcap, need_hidden, need_weight, need_bias,
                           max_rows: int = 0):
    """(loss (N,) fp32, correct (N,) bool, lse (rows,) compact, order, count, grad_hidden fp32
    | None, grad_weight fp32 | None, grad_bias fp32 | None); the gradients are those of
    loss.sum() (per-token weight 1). rows: impl/triton.row_capacity(N, max_rows)."""
    n = hidden.shape[0]
    v = weight.shape[0]
    rows = row_capacity(n, max_rows)
    order, true_count = compact_labels(labels, ignore_index)
    count = kernel_count(true_count, rows, n)
    blk, native, dl_dtype, chunk = chunk_layout(hidden, weight, need_weight, rows)
    f32 = dict(device=hidden.device, dtype=torch.float32)
    lse = torch.zeros((rows,), **f32)  # entries past the labelled count stay 0 (deterministic)
    loss = torch.zeros((n,), **f32)  # ignored positions keep 0
    correct = torch.zeros((n,), device=hidden.device, dtype=torch.int8)
    # fp32 unit gradients: the backward's scaling then rounds once, as the default path does.
    grad_hidden, grad_w32, grad_b32 = grad_buffers(hidden, weight, bias, need_hidden,
                                                   need_weight, need_bias, torch.float32)
    logits = torch.empty((chunk, v), device=hidden.device, dtype=dl_dtype)
    torch_dw = uses_torch_dw(blk, grad_w32, grad_b32)
    has_softcap = softcap > 0
    for start in range(0, rows, chunk):
        # torch_dw: cuBLAS multiplies every row of the buffer, so rows past the count get 0
        # logits here and the row kernel (which skips them) leaves them 0 as dlogits.
        launch_dlogits(blk, native, chunk, hidden, weight, bias, order, labels, count, lse,
                       lse, logits, start, softcap, 0.0, 0.0, zero_past_count=torch_dw,
                       write_logits=True)
        _lce_rows_grad_kernel[(chunk,)](
            logits, order, labels, count, lse, loss, correct, logits,  # (no BIAS read)
            start, v, v, float(softcap) if has_softcap else 1.0, float(label_smoothing),
            float(z_loss_weight),
            HAS_SOFTCAP=has_softcap, HAS_SMOOTHING=label_smoothing > 0,
            BLOCK_V=min(blk["row_v"], triton.next_power_of_2(v)),
            num_warps=blk["row_warps"],
        )
        chunk_grads(blk, native, chunk, logits, hidden, weight, order, count, grad_hidden,
                    grad_w32, grad_b32, start, rows=rows)
    return loss, correct.bool(), lse, order, true_count, grad_hidden, grad_w32, grad_b32


@torch.library.custom_op("olakernels::linear_cross_entropy_fwd_grad", mutates_args=())
def linear_cross_entropy_fwd_grad(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss_weight: float,
    softcap: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    max_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """linear_cross_entropy_fwd's five outputs, then the unit gradients (of loss.sum()) fp32:
    grad_hidden (N, H), grad_weight (V, H), grad_bias (V,); an unneeded one is empty (0,).
    Only for callers that reduce the per-token loss by "mean"/"sum" (module docstring)."""
    return with_unit_grads(hidden, *lce_forward_with_grads(
        hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss_weight, softcap,
        need_hidden, need_weight, need_bias, max_rows))


@linear_cross_entropy_fwd_grad.register_fake
def _(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss_weight, softcap,
      need_hidden, need_weight, need_bias, max_rows=0):
    return fake_with_unit_grads(hidden, weight, bias, need_hidden, need_weight, need_bias,
                                max_rows, hidden_rows=hidden.shape[0])


# ---- shared with impl/blas_fused_grad.py (the same eight outputs and autograd context) ----


def with_unit_grads(hidden, loss, correct, lse, order, count, gh, gw, gb) -> tuple:
    """The forward's five outputs and the three unit gradients, an unneeded one as an empty
    (0,) fp32 tensor (a custom op returns tensors, not None)."""
    empty = hidden.new_empty((0,), dtype=torch.float32)
    return (loss, correct, lse, order, count, empty if gh is None else gh,
            empty.clone() if gw is None else gw, empty.clone() if gb is None else gb)


def fake_with_unit_grads(hidden, weight, bias, need_hidden, need_weight, need_bias, max_rows,
                         hidden_rows: int) -> tuple:
    """Fake outputs of a gradients-in-forward op; grad_hidden has ``hidden_rows`` rows (all N,
    or the compacted row capacity)."""
    n, h = hidden.shape
    f32 = dict(dtype=torch.float32)
    none = hidden.new_empty((0,), **f32)
    return (hidden.new_empty((n,), **f32), hidden.new_empty((n,), dtype=torch.bool),
            hidden.new_empty((row_capacity(n, max_rows),), **f32),
            hidden.new_empty((n,), dtype=torch.int32),
            hidden.new_empty((1,), dtype=torch.int32),
            hidden.new_empty((hidden_rows, h), **f32) if need_hidden else none,
            weight.new_empty(weight.shape, **f32) if need_weight else none.clone(),
            weight.new_empty((weight.shape[0],), **f32) if (need_bias and bias is not None)
            else none.clone())


def save_unit_grads(ctx, inputs, output):
    """setup_context of a gradients-in-forward op: the unit gradients, what is needed, the
    gradients' dtypes and hidden's shape."""
    hidden, weight, bias = inputs[:3]
    need = inputs[8:11]
    order, gh, gw, gb = output[3], *output[5:]
    ctx.save_for_backward(order, gh, gw, gb)
    ctx.need = (need[0], need[1], need[2] and bias is not None)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    ctx.hidden_shape = tuple(hidden.shape)
    ctx.mark_non_differentiable(*output[1:])
    # No zero gradients for the outputs nobody differentiates: autograd would otherwise
    # allocate zeros shaped like each unit gradient for the backward (an fp32 (V, H), 2.1 GB
    # for Llama-3's head; docs/PERF.md, run 7's unexplained peak). _backward takes None.
    ctx.set_materialize_grads(False)


def _scaled(unit: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """unit * scale in fp32, rounded once into a new tensor of `dtype` (one pass, no fp32 copy:
    2 GB less than (unit * scale).to(dtype) for Llama-3's grad_weight)."""
    out = torch.empty(unit.shape, device=unit.device, dtype=dtype)
    return torch.mul(unit, scale, out=out)


def _backward(ctx, grad_loss, *_unused):
    refuse_double_backward()
    order, gh, gw, gb = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 12
    # One scalar for every token in "mean"/"sum" (module docstring): read it at the first
    # compacted position, on the device.
    scale = grad_loss.index_select(0, order[:1]).float()
    grads = [_scaled(unit, scale, dtype) if need else None
             for unit, need, dtype in zip((gh, gw, gb), ctx.need, ctx.dtypes, strict=True)]
    return (*grads, *(None,) * 9)


linear_cross_entropy_fwd_grad.register_autograd(_backward, setup_context=save_unit_grads)
