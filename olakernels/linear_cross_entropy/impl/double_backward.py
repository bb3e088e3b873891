# The fused paths' one answer to create_graph=True: a clear error (the reference path has it).
from __future__ import annotations

import torch


def refuse_double_backward() -> None:
    """Called first in a fused backward. Under create_graph=True (grad mode on inside the
    backward) the fused gradients are constants to autograd: second-order gradients would be
    0, or an opaque error about a missing autograd formula or an in-place change. Refuse with
    the way out instead."""
    if torch.is_grad_enabled():
        raise RuntimeError("linear_cross_entropy: double backward (create_graph=True) is not "
                           "supported by the fused paths; use impl='reference' for it")
