# linear_cross_entropy's BLAS schedule: gradients in the forward, GEMMs by the vendor BLAS.
"""The schedule for densely labelled batches (tile knob ``blas``, impl/triton.py decides when).

Measured on an H200 (docs/PERF.md, run 6), liger-kernel's fused linear cross-entropy (cuBLAS
GEMMs on chunks of rows, the gradients computed in the forward) was 1.7x faster than our Triton
kernels when every token is labelled: cuBLAS reaches ~660-700 TFLOP/s on these shapes, our
Triton GEMMs 450-560. This path runs that algorithm on our compacted rows, so a batch pays only
for its labelled tokens as long as the host knows a bound on them (``max_valid_tokens``):

per chunk of compacted rows (a host loop over the row capacity; no host sync):
  1. h_c = hidden[order[chunk]] (rows past the device-side count zeroed: they are multiplied)
  2. logits = h_c @ W^T (+ bias)            BLAS GEMM, in the operands' dtype (as eager's)
  3. _lce_rows_grad_kernel (RAW_LOGITS)     softcap in fp32, lse, loss, argmax, and
                                            d loss / d logits of the "sum" in place; rows past
                                            the count set to 0
  4. grad_hidden[chunk] = dlogits @ W       BLAS GEMM into fp32
  5. grad_weight += dlogits^T @ h_c         BLAS GEMM accumulating in fp32 (trainable head)
     grad_bias += dlogits.sum(0)            fp32

Three GEMM passes over rows x V x H (two for a frozen head) instead of the Triton path's four
(three); the backward only scales the fp32 unit gradients by the upstream scalar and scatters
grad_hidden's compacted rows to their positions (impl/triton_fused_grad.py explains why
scaling is exact for "mean"/"sum", the only reductions that take this path).

Memory: one (chunk, V) logits buffer in the forward (DLOGITS_BUDGET_BYTES with a trainable
head; with a frozen one twice the fp32 grad_hidden rows, between a quarter of the budget --
liger-kernel's chunk -- and the budget: chunk_rows_blas), and from the forward to the
backward fp32 unit gradients: grad_weight (V, H) (2.1 GB for Llama-3's head: why a trainable
head takes this path only when most rows are labelled), grad_hidden for the compacted rows
only (rows x H), grad_bias (V,).

Alignment: the logits buffer's rows are padded to a multiple of LOGITS_ROW_ALIGN elements and
the GEMMs read and write the (chunk, V) view of it. A vocabulary that is not a multiple of 8
(Llama-3 with the seed's added pad token: 128,257) would otherwise give every GEMM an odd
leading dimension, for which cuBLAS falls back to legacy unaligned kernels: the H100 step
profile (run 7, docs/PERF.md) showed cutlass_75 ..._align1 kernels at ~80-110 TFLOP/s for the
LM head's two GEMMs, against ~750 for aligned ones.

Numerics: the logits are rounded to the operands' dtype by the GEMM, as eager's F.linear does,
then everything is fp32; grad_hidden and grad_weight come out of the GEMMs in fp32 where torch
offers a half-precision GEMM with fp32 output (CUDA: mm/addmm with out_dtype), so grad_weight
sums every chunk in fp32 and is rounded once. Without one (ROCm builds that lack it, older
torch), each chunk's product is rounded to the operands' dtype before the fp32 sum (a warning
says so); on the CPU the operands are upcast (exact; for tests).
"""
from __future__ import annotations

import torch
import triton

from ..._triton import interpreter_enabled
from . import triton as lce_triton
from .triton import _blocks, compact_labels, gemm_into_fp32, kernel_count, row_capacity
from .triton_fused_grad import (
    _scaled,
    fake_with_unit_grads,
    refuse_double_backward,
    save_unit_grads,
    with_unit_grads,
)
from .triton_kernels import _lce_rows_grad_kernel

# Elements per row of the logits buffer are rounded up to this (128 bytes in bf16): every GEMM
# operand and output then has a 16-byte-aligned leading dimension whatever V is.
LOGITS_ROW_ALIGN = 64


def padded_row(v: int) -> int:
    """Elements per row of the logits buffer: V rounded up to LOGITS_ROW_ALIGN."""
    return triton.cdiv(v, LOGITS_ROW_ALIGN) * LOGITS_ROW_ALIGN


def gemm_fp32_out(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out (+)= a @ b; out fp32, a and b half precision of one dtype (impl/triton.py's
    gemm_into_fp32, rounding each product where no fp32-output GEMM exists, module docstring)."""
    gemm_into_fp32(out, a, b, accumulate, upcast_fallback=False, who="BLAS schedule")


def chunk_rows_blas(rows: int, v: int, h: int, itemsize: int, need_weight: bool) -> int:
    """Rows per chunk of the (chunk, V) logits buffer (V padded to LOGITS_ROW_ALIGN).

    Trainable head: DLOGITS_BUDGET_BYTES (each chunk re-reads and re-writes the fp32
    grad_weight: fewer, larger chunks). Frozen head: twice the fp32 grad_hidden rows' bytes
    (2 * rows * H * 4, which the op holds anyway), within [a quarter of the budget, the
    budget]: a mostly-ignored batch keeps liger-kernel's 512-row chunk of Llama-3 (its memory:
    the issue's goal at 90% ignored); a dense one gets larger chunks (2,048 rows of Llama-3
    from 16,384 rows on, 1,024 at 8,192), on which cuBLAS ran ~770 TFLOP/s against ~610
    inferred for 512-row chunks (H100, run 7; docs/PERF.md)."""
    step = 16 if interpreter_enabled() else 128
    budget = lce_triton.DLOGITS_BUDGET_BYTES
    if not need_weight:
        budget = min(budget, max(budget // 4, 2 * rows * h * 4))
    row_bytes = padded_row(v) * itemsize
    chunk = max(step, budget // max(1, row_bytes) // step * step)
    return min(chunk, triton.cdiv(rows, step) * step)


def lce_forward_with_grads_blas(hidden, weight, bias, labels, ignore_index, label_smoothing,
                                z_loss_weight, softcap, need_hidden, need_weight, need_bias,
                                max_rows: int = 0):
    """(loss (N,) fp32, correct (N,) bool, lse (rows,), order, count, grad_hidden of the
    compacted rows (rows, H) fp32 | None, grad_weight fp32 | None, grad_bias fp32 | None): the
    gradients of loss.sum(). rows: impl/triton.row_capacity(N, max_rows)."""
    n, h = hidden.shape
    v = weight.shape[0]
    rows = row_capacity(n, max_rows)
    order, true_count = compact_labels(labels, ignore_index)
    count = kernel_count(true_count, rows, n)
    blk = _blocks()
    dev = hidden.device
    f32 = dict(device=dev, dtype=torch.float32)
    lse = torch.zeros((rows,), **f32)
    loss = torch.zeros((n,), **f32)
    correct = torch.zeros((n,), device=dev, dtype=torch.int8)
    grad_h = torch.empty((rows, h), **f32) if need_hidden else None
    grad_w = torch.empty((v, h), **f32) if need_weight else None
    grad_b = torch.empty((v,), **f32) if (need_bias and bias is not None) else None
    chunk = chunk_rows_blas(rows, v, h, weight.element_size(), need_weight)
    row_stride = padded_row(v)  # (module docstring: aligned GEMM operands)
    logits = torch.empty((chunk, row_stride), device=dev, dtype=weight.dtype)[:, :v]
    position = torch.arange(rows, device=dev, dtype=torch.int32)
    has_softcap = softcap > 0
    # A bias in the weight's dtype goes into the GEMM (addmm); another dtype (eager's F.linear
    # would refuse it) is added in fp32 by the row kernel.
    gemm_bias = bias is not None and bias.dtype == weight.dtype
    for start in range(0, rows, chunk):
        c = min(chunk, rows - start)
        z = logits[:c]
        h_c = hidden.index_select(0, order[start:start + c])
        # The GEMMs multiply every row of the chunk: an unlabelled row's hidden state must not
        # bring inf/NaN into grad_weight (0 x inf), so it is zeroed (c x H, cheap).
        h_c.masked_fill_((position[start:start + c] >= count)[:, None], 0)
        # (With an odd V the output is a strided view: torch then copies the expanded bias in
        # and multiplies with beta = 1 instead of cuBLASLt's fused bias epilogue, one more
        # pass over the chunk's logits; LM heads rarely have a bias.)
        if gemm_bias:  # the bias added before the rounding, as eager's F.linear does
            torch.addmm(bias, h_c, weight.t(), out=z)
        else:
            torch.mm(h_c, weight.t(), out=z)
        _lce_rows_grad_kernel[(c,)](
            z, order, labels, count, lse, loss, correct, bias if bias is not None else z,
            start, v, row_stride, float(softcap) if has_softcap else 1.0,
            float(label_smoothing),
            float(z_loss_weight),
            HAS_SOFTCAP=has_softcap, HAS_SMOOTHING=label_smoothing > 0,
            BLOCK_V=min(blk["row_v"], triton.next_power_of_2(v)),
            RAW_LOGITS=True, HAS_BIAS=bias is not None and not gemm_bias,
            ZERO_PAST_COUNT=True,
            num_warps=blk["row_warps"],
        )
        if grad_h is not None:
            gemm_fp32_out(grad_h[start:start + c], z, weight, accumulate=False)
        if grad_w is not None:
            gemm_fp32_out(grad_w, z.t(), h_c, accumulate=start > 0)
        if grad_b is not None:
            if start > 0:
                grad_b += z.sum(0, dtype=torch.float32)
            else:
                torch.sum(z, 0, dtype=torch.float32, out=grad_b)
    return loss, correct.bool(), lse, order, true_count, grad_h, grad_w, grad_b


@torch.library.custom_op("olakernels::linear_cross_entropy_fwd_grad_blas", mutates_args=())
def linear_cross_entropy_fwd_grad_blas(
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
    grad_hidden of the compacted rows (rows, H), grad_weight (V, H), grad_bias (V,); an
    unneeded one is empty (0,). Only for callers that reduce by "mean"/"sum"."""
    return with_unit_grads(hidden, *lce_forward_with_grads_blas(
        hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss_weight, softcap,
        need_hidden, need_weight, need_bias, max_rows))


@linear_cross_entropy_fwd_grad_blas.register_fake
def _(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss_weight, softcap,
      need_hidden, need_weight, need_bias, max_rows=0):
    return fake_with_unit_grads(hidden, weight, bias, need_hidden, need_weight, need_bias,
                                max_rows, hidden_rows=row_capacity(hidden.shape[0], max_rows))


def _backward(ctx, grad_loss, *_unused):
    refuse_double_backward()
    order, gh, gw, gb = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 12
    # One scalar for every token in "mean"/"sum": read at the first compacted position.
    scale = grad_loss.index_select(0, order[:1]).float()
    need_h, need_w, need_b = ctx.need
    dtype_h, dtype_w, dtype_b = ctx.dtypes
    grad_hidden = None
    if need_h:
        n, rows = ctx.hidden_shape[0], gh.shape[0]
        # Unlabelled positions get 0: those inside the row capacity from the forward's zeroed
        # dlogits rows, those past it (a bound below N) from the zero fill.
        grad_hidden = (torch.zeros if rows < n else torch.empty)(
            ctx.hidden_shape, device=gh.device, dtype=dtype_h)
        grad_hidden.index_put_((order[:rows].long(),), _scaled(gh, scale, dtype_h))
    grad_weight = _scaled(gw, scale, dtype_w) if need_w else None
    grad_bias = _scaled(gb, scale, dtype_b) if need_b else None
    return (grad_hidden, grad_weight, grad_bias, *(None,) * 9)


linear_cross_entropy_fwd_grad_blas.register_autograd(_backward,
                                                   setup_context=save_unit_grads)
