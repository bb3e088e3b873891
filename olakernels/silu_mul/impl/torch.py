# silu_mul in eager PyTorch saving gate and up only (silu recomputed in the backward).
"""``SiLUMulFunction``: ``silu(gate) * up`` saving only ``gate`` and ``up``. The backward runs
the very kernels eager autograd runs for ``F.silu(gate) * up`` (the product's two gradients,
then ``aten.silu_backward``) on a recomputed ``silu(gate)``, which is bit-identical to the
forward's: values and gradients equal eager PyTorch's bit for bit, at one extra elementwise
pass (an fp32 formulation would move ~3x the bytes)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def differentiable_backward(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """(grad_gate, grad_up) with a graph (double backward), by autograd of the eager formula
    (aten.silu_backward itself has no derivative)."""
    inputs = [t for t in (gate, up) if t.requires_grad]
    grads = iter(torch.autograd.grad(F.silu(gate) * up, inputs, grad, create_graph=True))
    return (next(grads) if gate.requires_grad else None,
            next(grads) if up.requires_grad else None)


class SiLUMulFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiate the eager formula
            return differentiable_backward(grad, gate, up)
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        return grad_gate, grad_up
