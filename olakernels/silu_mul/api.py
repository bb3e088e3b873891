# silu_mul: SwiGLU's silu(gate) * up, fused, saving gate and up only (validation and dispatch).
"""Public functional API of the silu_mul op."""
from __future__ import annotations

import torch

from .._triton import resolve_impl
from .impl.reference import silu_mul_ref
from .impl.torch import SiLUMulFunction

IMPLS = ("auto", "triton", "torch", "reference")


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, impl: str = "auto",
             inplace_backward: bool = False) -> torch.Tensor:
    """SwiGLU's gating ``F.silu(gate) * up`` keeping only ``gate`` and ``up`` for the backward.

    gate and up: the same shape (..., N) and dtype (fp32/fp16/bf16), any row strides with a
    contiguous last dimension (row-strided views such as Phi-3's ``gate_up_proj(x).chunk(2, -1)``
    halves are read in place; other layouts are copied first). Returns a tensor of gate's shape
    and dtype (contiguous on the Triton path; the torch paths follow eager's layout rules).
    Equivalent PyTorch::

        F.silu(gate) * up     # eager autograd keeps gate, silu(gate) and up

    ``impl``: "auto" (Triton on CUDA/ROCm tensors, torch elsewhere; under torch.compile
    "auto" and "triton" trace the torch path, which Inductor fuses),
    "triton" (one kernel each way, fp32 math, one rounding), "torch" (eager autograd's own
    kernels on a recomputed silu: values and gradients equal eager bit for bit) or "reference"
    (the eager formula itself). Double backward works on every path.

    ``inplace_backward=True``: on the Triton path the backward writes the gradients over
    ``gate`` and ``up`` instead of allocating them (liger-kernel's SwiGLU does the same): for
    intermediates that nothing reads after this op, such as a SwiGLU MLP's ``gate_proj(x)`` and
    ``up_proj(x)``. Taken only when both gradients are needed and both tensors are non-leaf
    tensors or views of one (a parameter or a caller's input is never overwritten, also not
    through a view), neither overlaps itself (expanded views) and they do not overlap each
    other (the same tensor twice); otherwise the backward allocates as usual. Autograd nodes
    that saved them too raise "modified by an inplace operation" if they run after it -- but
    not under saved-tensor hooks (activation checkpointing), which skip that check: the
    caller must know that nothing else reads them. Ignored on the torch paths.
    """
    if impl not in IMPLS:
        raise ValueError(f"silu_mul: impl must be one of {IMPLS}, got {impl!r}")
    for name, t in (("gate", gate), ("up", up)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"silu_mul: {name} must be a floating tensor, got {got}")
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        raise ValueError(f"silu_mul: gate and up must match in shape, dtype and device, got "
                         f"{tuple(gate.shape)} {gate.dtype} {gate.device} and "
                         f"{tuple(up.shape)} {up.dtype} {up.device}")
    if gate.dim() == 0:
        raise ValueError("silu_mul: gate and up must have at least one dimension (..., N), "
                         "got 0-d tensors")
    if impl in ("auto", "triton") and torch.compiler.is_compiling():
        impl = "torch"  # traced: Inductor fuses the formula (no Triton launch inside a graph)
    impl = resolve_impl(impl, gate, "silu_mul", "gate")
    if not isinstance(inplace_backward, bool):
        raise ValueError(f"silu_mul: inplace_backward must be True or False, got "
                         f"{inplace_backward!r}")
    if impl == "triton":
        from .impl.triton import SiLUMulTritonFunction, in_place_is_safe

        inplace = inplace_backward and in_place_is_safe(gate, up)
        return SiLUMulTritonFunction.apply(gate, up, inplace)
    if impl == "torch":
        return SiLUMulFunction.apply(gate, up)
    return silu_mul_ref(gate, up)
