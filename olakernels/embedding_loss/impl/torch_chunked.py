# Pure-PyTorch fast path for embedding_distill_loss: chunked over D, fp32 accumulation.
"""impl="torch": the statistics of epilogue.py computed chunk by chunk over the feature dim.

Each chunk is upcast to fp32 on its own, so the temporaries stay below ``_CHUNK_ELEMENTS`` fp32
values however large D is (seg targets are 884,736 values per sample), instead of the whole
(B, D) fp32 copies the eager reference makes. Runs on any device; it is the CPU default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._amp import autocast_off

# fp32 values per temporary (16 MiB): bounded memory, and chunks large enough to keep BLAS busy.
_CHUNK_ELEMENTS = 1 << 22


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _chunk_columns(rows: int, numel: int) -> int:
    return max(1, min(numel, _CHUNK_ELEMENTS // max(rows, 1)))


def stats_fwd_torch(
    pred: torch.Tensor,
    target: torch.Tensor,
    gathered: torch.Tensor | None,
    beta: float,
    with_dot: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sl1, pp, dot, tt) of epilogue.py; pred/target (B, D), gathered (B_global, D) or None."""
    batch, numel = pred.shape
    acc = _acc_dtype(pred)
    others = target if gathered is None else gathered
    sl1 = pred.new_zeros(batch, dtype=acc)
    pp = pred.new_zeros(batch, dtype=acc)
    dot = pred.new_zeros((batch, others.shape[0] if with_dot else 0), dtype=acc)
    tt = pred.new_zeros(others.shape[0] if with_dot else 0, dtype=acc)
    step = _chunk_columns(max(batch, others.shape[0]), numel)
    for start in range(0, numel, step):
        p = pred[:, start : start + step].to(acc)
        t = target[:, start : start + step].to(acc)
        sl1 += F.smooth_l1_loss(p, t, reduction="none", beta=beta).sum(1)
        pp += p.square().sum(1)
        if with_dot:
            o = t if gathered is None else gathered[:, start : start + step].to(acc)
            dot += p @ o.T
            tt += o.square().sum(1)
    return sl1, pp, dot, tt


def stats_bwd_torch(
    pred: torch.Tensor,
    target: torch.Tensor,
    gathered: torch.Tensor | None,
    grad_sl1: torch.Tensor,
    grad_pp: torch.Tensor,
    grad_dot: torch.Tensor | None,
    beta: float,
) -> torch.Tensor:
    """grad_pred = grad_sl1 * smooth_l1'(pred - target) + 2 grad_pp * pred + grad_dot @ gathered."""
    batch, numel = pred.shape
    acc = _acc_dtype(pred)
    others = target if gathered is None else gathered
    grad = torch.empty_like(pred)
    step = _chunk_columns(max(batch, others.shape[0]), numel)
    for start in range(0, numel, step):
        p = pred[:, start : start + step].to(acc)
        diff = p - target[:, start : start + step].to(acc)
        # torch's smooth_l1 derivative: diff / beta inside |diff| < beta, sign(diff) outside.
        if beta == 0:
            slope = diff.sign()
        else:
            slope = torch.where(diff.abs() < beta, diff / beta, diff.sign())
        g = grad_sl1[:, None] * slope + (2 * grad_pp)[:, None] * p
        if grad_dot is not None:
            g = g + grad_dot @ others[:, start : start + step].to(acc)
        grad[:, start : start + step] = g
    return grad


class EmbeddingStatsTorchFunction(torch.autograd.Function):
    """Autograd for stats_fwd_torch: gradients reach pred only (targets are frozen teachers)."""

    @staticmethod
    def forward(ctx, pred, target, gathered, beta: float, with_dot: bool):
        ctx.save_for_backward(pred, target, gathered)
        ctx.beta, ctx.with_dot = beta, with_dot
        with autocast_off(pred.device):  # fp32 sums as intended (see olakernels._amp)
            sl1, pp, dot, tt = stats_fwd_torch(pred, target, gathered, beta, with_dot)
        ctx.mark_non_differentiable(tt)
        return sl1, pp, dot, tt

    @staticmethod
    def backward(ctx, grad_sl1, grad_pp, grad_dot, _grad_tt):
        pred, target, gathered = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            with autocast_off(pred.device):
                grad = stats_bwd_torch(
                    pred, target, gathered, grad_sl1, grad_pp,
                    grad_dot if ctx.with_dot else None, ctx.beta,
                )
        return grad, None, None, None, None
