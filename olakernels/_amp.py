# Autocast and the ops' own torch math.
"""The fused ops choose their own precision (fp32 accumulation, outputs in the input dtype);
the Triton paths are custom ops, which autocast leaves alone. The "torch" paths are plain
torch code inside autograd Functions: under ``torch.autocast`` their matmuls would be recast
to half precision (an fp32 model's loss in bf16, or fp32 buffers filled from bf16 results:
an index_put dtype error), and the backward, which autograd runs outside the forward's
autocast region, would recompute different logits than the forward saved statistics for.
``autocast_off`` runs that math as the op intends, whatever the caller's autocast state.

A matmul op is the exception: under autocast the caller's eager code (``F.linear``) would run
in the autocast dtype, so ``cast_as_autocast`` gives the op the operands autocast would have
given ``F.linear`` (half-precision tensor cores instead of an fp32 GEMM, the eager model's
numbers); the gradients flow back through the casts to the original dtypes.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_off", "autocast_layer_norm_in_fp32", "cast_as_autocast"]


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast disabled for ``device``'s type (a no-op when it is off)."""
    kind = device.type
    return torch.autocast(kind, enabled=False) if _enabled(kind) else contextlib.nullcontext()


def _enabled(kind: str) -> bool:
    try:
        return torch.is_autocast_enabled(kind)
    except RuntimeError:  # a device type autocast does not know (meta)
        return False


def cast_as_autocast(device: torch.device, *tensors):
    """``tensors`` as autocast casts a lower-precision op's inputs on ``device``'s type (the
    floating ones other than float64 to the autocast dtype; None stays None), or unchanged
    when autocast is off there."""
    kind = device.type
    if not _enabled(kind):
        return tensors
    dtype = torch.get_autocast_dtype(kind)
    return tuple(t.to(dtype) if t is not None and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)


def autocast_layer_norm_in_fp32(device: torch.device) -> bool:
    """Whether eager ``F.layer_norm`` on ``device`` runs in fp32 and returns fp32 under the
    caller's autocast: CUDA autocast (ROCm included) lists LayerNorm among its fp32 ops; CPU
    autocast runs it in the input's dtype. A kernel standing in for it returns what it would."""
    return device.type == "cuda" and _enabled("cuda")
