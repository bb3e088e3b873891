# Triton silu(gate) * up: one pass forward, one backward, saving gate and up only.
"""Forward reads gate and up once and writes the product (fp32 math, one rounding); backward
reads gate, up and the output gradient once and writes both input gradients, recomputing the
sigmoid (nothing but gate and up is saved). Rows may be strided (Phi-3's
``gate_up_proj(x).chunk(2, -1)`` halves); the last dimension must be contiguous.

    s = sigmoid(g);  y = g s u
    du = dy g s;     dg = dy u s (1 + g (1 - s))

With ``inplace`` (SiLUMulTritonFunction's third argument) the backward writes dg over the saved
gate and du over the saved up, as liger-kernel's SwiGLU does: no new (rows, N) tensors, a third
of the op's backward memory. Only for intermediates nobody else reads afterwards (the caller
promises it: LeanSwiGLUMLP's gate_proj/up_proj outputs; in_place_is_safe refuses leaves, views
of leaves and overlapping layouts); their version counters are bumped, so another autograd node
that saved them fails loudly instead of reading gradients (not under saved-tensor hooks, e.g.
activation checkpointing, which skip autograd's version check).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .torch import differentiable_backward

BLOCK = 1024  # columns per program: 4 KB of fp32 per operand


@triton.jit
def _silu_mul_fwd_kernel(G, U, Y, N, sg_row, su_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(G + row * sg_row + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + row * su_row + cols, mask=ok, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _silu_mul_bwd_kernel(DY, G, U, DG, DU, N, sg_row, su_row, sdg_row, sdu_row,
                         BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = cols < N
    g = tl.load(G + row * sg_row + cols, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(U + row * su_row + cols, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * N + cols, mask=ok, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    # (in place, DG/DU are G/U: every element is read above before this program writes it)
    tl.store(DU + row * sdu_row + cols, (dy * g * s).to(DU.dtype.element_ty), mask=ok)
    dg = dy * u * s * (1.0 + g * (1.0 - s))
    tl.store(DG + row * sdg_row + cols, dg.to(DG.dtype.element_ty), mask=ok)


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(rows, N) view of x and its row stride, copying only when rows cannot be strided."""
    n = x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        x2 = x.view(-1, n)  # works for contiguous tensors and row-strided views
    except RuntimeError:
        x2 = x.reshape(-1, n).contiguous()
    return x2, (x2.stride(0) if x2.shape[0] > 1 else n)


def silu_mul_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.numel() == 0:
        return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    n = gate.shape[-1]
    g2, sg = _rows(gate)
    u2, su = _rows(up)
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if y.numel():
        _silu_mul_fwd_kernel[(g2.shape[0], triton.cdiv(n, BLOCK))](
            g2, u2, y, n, sg, su, BLOCK=BLOCK, num_warps=4)
    return y


def silu_mul_bwd(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                 inplace: bool = False):
    """(grad_gate, grad_up); ``inplace``: written over gate and up (module docstring), which
    are then returned (or the contiguous copies _rows made of them)."""
    if gate.numel() == 0:
        return torch.zeros_like(gate), torch.zeros_like(up)
    n = gate.shape[-1]
    g2, sg = _rows(gate)
    u2, su = _rows(up)
    dy = grad.contiguous()
    if inplace:
        dg2, du2 = g2, u2
    else:
        dg2 = torch.empty((g2.shape[0], n), dtype=gate.dtype, device=gate.device)
        du2 = torch.empty((u2.shape[0], n), dtype=up.dtype, device=up.device)
    _silu_mul_bwd_kernel[(g2.shape[0], triton.cdiv(n, BLOCK))](
        dy, g2, u2, dg2, du2, n, sg, su, dg2.stride(0) if dg2.shape[0] > 1 else n,
        du2.stride(0) if du2.shape[0] > 1 else n, BLOCK=BLOCK, num_warps=4)
    if inplace:
        grads = []
        for t, t2 in ((gate, g2), (up, u2)):
            if t2.data_ptr() == t.data_ptr():  # written over t (not over a copy _rows made)
                # a node that saved t too must not read gradients silently
                torch.autograd.graph.increment_version(t)
                # detached: the same memory without t's place in the forward graph (autograd
                # may then take the gradient over as a leaf's .grad instead of cloning it)
                grads.append(t.detach())
            else:
                grads.append(t2.view(t.shape))
        return grads[0], grads[1]
    return dg2.view(gate.shape), du2.view(up.shape)


def _row_layout(t: torch.Tensor) -> tuple[int, int] | None:
    """(storage offset, row stride) of t as (rows, N) rows without a copy, or None when
    _rows would copy it (the backward then writes into the copy: nothing to check)."""
    n = t.shape[-1]
    if t.stride(-1) != 1:
        return None
    try:
        t2 = t.view(-1, n)
    except RuntimeError:
        return None
    return t.storage_offset(), (t2.stride(0) if t2.shape[0] > 1 else n)


def in_place_is_safe(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether the backward may write the gradients over gate and up: each is a non-leaf tensor
    or a view of one (never the caller's input or a parameter, also not through a view), no
    row overlaps another row of its tensor (expanded or self-overlapping views), and gate and
    up do not overlap each other (Phi-3's two halves of one projection are fine)."""
    if gate is up:
        return False
    layouts = []
    for t in (gate, up):
        base = t if t._base is None else t._base
        if base.grad_fn is None or torch._debug_has_internal_overlap(t) == 1:
            return False
        layout = _row_layout(t)
        if layout is not None and layout[1] < t.shape[-1] and t.numel() > t.shape[-1]:
            return False  # rows closer than their length: rows overlap
        layouts.append(layout)
    if gate.untyped_storage().data_ptr() != up.untyped_storage().data_ptr():
        return True
    (g_off, g_row), (u_off, u_row) = (layouts[0] or (None, None)), (layouts[1] or (None, None))
    if g_off is None or u_off is None or g_row != u_row:
        return False  # one storage, layouts not comparable: do not risk it
    n = gate.shape[-1]
    rows = gate.numel() // n
    if rows == 1:
        return abs(u_off - g_off) >= n
    shift = (u_off - g_off) % g_row  # where up's columns start within gate's row period
    return n <= shift <= g_row - n


class SiLUMulTritonFunction(torch.autograd.Function):
    """silu(gate) * up with the Triton kernels; saves gate and up only. ``inplace``: the
    backward overwrites them with the gradients (module docstring; the api decides)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, inplace: bool = False):
        ctx.save_for_backward(gate, up)
        ctx.inplace = inplace
        return silu_mul_fwd(gate, up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, *_):
        gate, up = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the eager formula
            dg, du = differentiable_backward(grad, gate, up)
        else:  # in place only when both gradients are wanted (else gate/up stay intact)
            dg, du = silu_mul_bwd(grad, gate, up,
                                  inplace=ctx.inplace and all(ctx.needs_input_grad[:2]))
        return (dg if ctx.needs_input_grad[0] else None), \
            (du if ctx.needs_input_grad[1] else None), None
