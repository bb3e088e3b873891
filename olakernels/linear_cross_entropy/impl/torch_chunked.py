# Pure-PyTorch linear cross-entropy: labelled rows only, in chunks, logits never whole.
"""impl="torch": the same algorithm as the Triton path with torch ops.

Rows are compacted with ``nonzero`` (a host sync: fine on CPU, where this path is the default;
under torch.compile every row is processed and masked instead, so the graph stays static). Each
chunk of rows materializes at most ``chunk x V`` fp32 logits; the backward recomputes them.
"""
from __future__ import annotations

import torch

from ..._amp import autocast_off
from .double_backward import refuse_double_backward

# fp32 logits per chunk (64 MiB): bounded memory whatever N is.
_CHUNK_ELEMENTS = 1 << 24


def _acc_dtype(x: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    """fp32, or float64 when either operand is (the api's rule: the wider dtype's math)."""
    return torch.promote_types(torch.promote_types(x.dtype, w.dtype), torch.float32)


def _rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.arange(labels.shape[0], device=labels.device)
    return (labels != ignore_index).nonzero().squeeze(1)


def _rows_hidden(hidden, rows, keep, acc):
    """The chunk's hidden rows in the accumulation dtype; an ignored row (only under compile,
    which takes every row) as zeros, so that inf/NaN padding never reaches a gradient
    (0 x inf)."""
    return torch.where(keep[:, None], hidden[rows].to(acc), 0.0)


def _logits(hidden, weight_acc, bias, rows, keep, softcap, acc):
    z = _rows_hidden(hidden, rows, keep, acc) @ weight_acc.T
    if bias is not None:
        z = z + bias.to(acc)
    if softcap > 0:
        z = softcap * torch.tanh(z / softcap)
    return z


class LinearCrossEntropyTorchFunction(torch.autograd.Function):
    """Per-token loss (N,) and correctness (N,) of the labelled rows; 0 / False elsewhere."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss_weight,
                softcap):
        with autocast_off(hidden.device):  # fp32 logits as intended (see olakernels._amp)
            loss, correct, rows, lse_all = _forward(hidden, weight, bias, labels, ignore_index,
                                                    label_smoothing, z_loss_weight, softcap)
        ctx.save_for_backward(hidden, weight, bias, labels, rows, lse_all)
        ctx.options = (ignore_index, label_smoothing, z_loss_weight, softcap)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        refuse_double_backward()  # (its in-place accumulation would fail opaquely)
        hidden, weight, bias, labels, rows, lse_all = ctx.saved_tensors
        with autocast_off(hidden.device):
            return _backward(ctx, grad_loss, hidden, weight, bias, labels, rows, lse_all)


def _forward(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss_weight, softcap):
    acc = _acc_dtype(hidden, weight)
    n, v = hidden.shape[0], weight.shape[0]
    rows = _rows(labels, ignore_index)
    loss = hidden.new_zeros(n, dtype=acc)
    correct = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    lse_all = hidden.new_zeros(n, dtype=acc)
    weight_acc = weight.to(acc)  # one fp32 copy per call for half-precision heads
    step = max(1, _CHUNK_ELEMENTS // v)
    for i in range(0, rows.shape[0], step):
        r = rows[i : i + step]
        keep = labels[r] != ignore_index
        z = _logits(hidden, weight_acc, bias, r, keep, softcap, acc)
        y = torch.where(keep, labels[r], 0)  # ignored rows (compile) carry ignore_index
        lse = torch.logsumexp(z, dim=1)
        tok = lse - (1 - label_smoothing) * z.gather(1, y[:, None]).squeeze(1) \
            - label_smoothing * z.mean(dim=1) + z_loss_weight * lse.square()
        loss[r] = torch.where(keep, tok, 0.0)
        correct[r] = (z.argmax(dim=1) == labels[r]) & keep
        lse_all[r] = lse
    return loss, correct, rows, lse_all


def _backward(ctx, grad_loss, hidden, weight, bias, labels, rows, lse_all):
    ignore_index, label_smoothing, z_loss_weight, softcap = ctx.options
    need_h, need_w, need_b = ctx.needs_input_grad[:3]
    acc = _acc_dtype(hidden, weight)
    v = weight.shape[0]
    gh = torch.zeros_like(hidden) if need_h else None
    gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
    gb = torch.zeros(v, dtype=acc, device=weight.device) if need_b else None
    weight_acc = weight.to(acc)
    step = max(1, _CHUNK_ELEMENTS // v)
    for i in range(0, rows.shape[0], step):
        r = rows[i : i + step]
        keep = labels[r] != ignore_index
        z = _logits(hidden, weight_acc, bias, r, keep, softcap, acc)
        lse = lse_all[r]
        g = torch.where(keep, grad_loss[r].to(acc), 0.0)
        cap_slope = 1 - (z / softcap).square() if softcap > 0 else None
        # In place on the chunk's logits: one (chunk, V) temporary (two with softcap).
        dz = z.sub_(lse[:, None]).exp_()
        dz.mul_((1 + 2 * z_loss_weight * lse)[:, None]).sub_(label_smoothing / v)
        dz[torch.arange(r.shape[0]), torch.where(keep, labels[r], 0)] -= 1 - label_smoothing
        if cap_slope is not None:
            dz.mul_(cap_slope)
        dz.mul_(g[:, None])
        if need_h:
            gh[r] = (dz @ weight_acc).to(hidden.dtype)
        if need_w:
            gw.addmm_(dz.T, _rows_hidden(hidden, r, keep, acc))
        if need_b:
            gb += dz.sum(0)
    return (gh, None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype), None, None, None, None, None)
