# Input checks that read tensor values without stalling the GPU.
from __future__ import annotations

import torch


def fail_if_any(bad: torch.Tensor, values: torch.Tensor, message: str) -> None:
    """Reject inputs where ``bad`` (a bool mask over ``values``) holds anywhere.

    On CPU tensors: ValueError with ``message`` and the first offending value. On accelerators
    a host-side check would synchronize every training step, so a device-side assert fails the
    step instead (a CUDA error carrying ``message``). Skipped while torch.compile traces.
    """
    if torch.compiler.is_compiling():
        return
    if bad.device.type == "cpu":
        if bool(bad.any()):
            raise ValueError(f"{message}, got {values[bad][0].item()}")
    else:
        torch._assert_async(~bad.any(), message)
