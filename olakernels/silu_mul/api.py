# silu_mul: SwiGLU's silu(gate) * up, fused, saving gate and up only (validation and dispatch).
"""Public functional API of the silu_mul op."""
from __future__ import annotations

import torch

from .._triton import resolve_impl
from .impl.reference import silu_mul_ref
from .impl.torch import SiLUMulFunction

IMPLS = ("auto", "triton", "torch", "reference")


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """SwiGLU's gating ``F.silu(gate) * up`` keeping only ``gate`` and ``up`` for the backward.

    gate and up: the same shape (..., N) and dtype (fp32/fp16/bf16), any row strides with a
    contiguous last dimension (Phi-3's ``gate_up_proj(x).chunk(2, -1)`` halves work without a
    copy). Returns a contiguous tensor of gate's shape and dtype. Equivalent PyTorch::

        F.silu(gate) * up     # eager autograd keeps gate, silu(gate) and up

    ``impl``: "auto" (Triton on CUDA/ROCm tensors, torch elsewhere and under torch.compile),
    "triton" (one kernel each way, fp32 math, one rounding), "torch" (eager autograd's own
    kernels on a recomputed silu: values and gradients equal eager bit for bit) or "reference"
    (the eager formula itself). Double backward works on every path.
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
    if impl == "auto" and torch.compiler.is_compiling():
        impl = "torch"
    impl = resolve_impl(impl, gate, "silu_mul", "gate")
    if impl == "triton":
        from .impl.triton import SiLUMulTritonFunction

        return SiLUMulTritonFunction.apply(gate, up)
    if impl == "torch":
        return SiLUMulFunction.apply(gate, up)
    return silu_mul_ref(gate, up)
