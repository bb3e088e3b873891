# Autocast and the ops' own torch math.
"""The fused ops choose their own precision (fp32 accumulation, outputs in the input dtype);
the Triton paths are custom ops, which autocast leaves alone. The "torch" paths are plain
torch code inside autograd Functions: under ``torch.autocast`` their matmuls would be recast
to half precision (an fp32 model's loss in bf16, or fp32 buffers filled from bf16 results:
an index_put dtype error), and the backward, which autograd runs outside the forward's
autocast region, would recompute different logits than the forward saved statistics for.
``autocast_off`` runs that math as the op intends, whatever the caller's autocast state.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["autocast_off"]


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A context with autocast disabled for ``device``'s type (a no-op when it is off)."""
    kind = device.type
    try:
        enabled = torch.is_autocast_enabled(kind)
    except RuntimeError:  # a device type autocast does not know (meta)
        return contextlib.nullcontext()
    return torch.autocast(kind, enabled=False) if enabled else contextlib.nullcontext()
