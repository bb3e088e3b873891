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
promises it: LeanSwiGLUMLP's gate_proj/up_proj outputs); their version counters are bumped, so
another autograd node that saved them fails loudly instead of reading gradients.
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
        for t in (gate, up):  # a node that saved them too must not read gradients silently
            torch.autograd.graph.increment_version(t)
        # gate/up themselves when _rows viewed them (their own strides), else its copies
        dg = gate if g2.data_ptr() == gate.data_ptr() else g2.view(gate.shape)
        du = up if u2.data_ptr() == up.data_ptr() else u2.view(up.shape)
        return dg, du
    return dg2.view(gate.shape), du2.view(up.shape)


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
