# A SwiGLU MLP that saves 2 of the 3 activations eager PyTorch keeps (SPEC 9 item 19).
"""Memory-lean SwiGLU for decoders (Llama, Qwen2, Mistral: gate_proj/up_proj/down_proj;
Phi-3: one gate_up_proj).

``down_proj(silu(gate) * up)`` in eager PyTorch saves three ``(B, L, intermediate)`` tensors for
the backward: ``gate`` (for silu's gradient), ``silu(gate)`` and ``up`` (for the product's).
``olakernels.silu_mul`` saves only ``gate`` and ``up`` and recomputes ``silu(gate)`` in the
backward: at Llama-3-8B shape (intermediate 14,336) that is ~155 MB less per block per 5.4k
tokens, ~5 GB over 32 blocks -- a fifth of the frozen decoder's saved activations in
pre-training, for one extra elementwise pass in the backward. On GPUs it runs one Triton
kernel each way (fp32 math, one rounding); on the CPU eager autograd's own kernels (gradients
equal eager PyTorch's bit for bit). The module keeps the HF state_dict keys (the Linear
submodules are the original ones); liger-kernel's ``LigerSwiGLUMLP`` (``parallel.liger``) is
the library alternative.

Equivalent PyTorch: ``down_proj(F.silu(gate_proj(x)) * up_proj(x))`` (Phi-3:
``gate, up = gate_up_proj(x).chunk(2, -1)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from olakernels.silu_mul import silu_mul
from olakernels.silu_mul.impl.torch import SiLUMulFunction

__all__ = ["LeanSwiGLUMLP", "SiLUMul", "make_mlps_lean"]


SiLUMul = SiLUMulFunction  # the torch path's autograd Function (olakernels.silu_mul)


class LeanSwiGLUMLP(nn.Module):
    """Wraps a decoder's SwiGLU MLP, reusing its Linear layers (same parameters and keys).
    ``lean=False`` computes exactly as the original (the seed-faithful reference path)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        for name in ("gate_proj", "up_proj", "gate_up_proj", "down_proj"):
            if hasattr(mlp, name):
                setattr(self, name, getattr(mlp, name))
        if hasattr(mlp, "config"):
            self.config = mlp.config  # liger's SwiGLU module is built from it
        self.fused = hasattr(mlp, "gate_up_proj")
        self.lean = True
        self.impl = "auto"  # silu_mul's impl (set by OlaVLM.set_impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        # Only training saves anything: inference (generation) keeps the decoder's own ops.
        if self.lean and torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            # gate and up are this forward's own intermediates, read by nothing after silu_mul:
            # its Triton backward may write the gradients over them (no new tensors).
            return self.down_proj(silu_mul(gate, up, impl=self.impl, inplace_backward=True))
        return self.down_proj(F.silu(gate) * up)


def _is_silu_glu(mlp: nn.Module) -> bool:
    config = getattr(mlp, "config", None)
    act = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None)
    has_linears = hasattr(mlp, "down_proj") and (
        hasattr(mlp, "gate_up_proj") or (hasattr(mlp, "gate_proj") and hasattr(mlp, "up_proj")))
    return has_linears and act in ("silu", "swish")


def make_mlps_lean(layers: nn.ModuleList) -> int:
    """Replace each block's SwiGLU ``mlp`` submodule by a LeanSwiGLUMLP; returns the count.
    MLPs with another activation or layout are left alone."""
    count = 0
    for block in layers:
        mlp = getattr(block, "mlp", None)
        if mlp is not None and not isinstance(mlp, LeanSwiGLUMLP) and _is_silu_glu(mlp):
            block.mlp = LeanSwiGLUMLP(mlp)
            count += 1
    return count
