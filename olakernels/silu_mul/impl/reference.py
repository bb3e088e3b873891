# The oracle for silu_mul: SwiGLU's gating, silu(gate) * up, in eager PyTorch.
"""``silu_mul_ref(gate, up)``: ``F.silu(gate) * up``, differentiable, any dtype; in float64
the tests' oracle, in the input dtype the eager baseline (it keeps ``gate``, ``silu(gate)`` and
``up`` for the backward)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
