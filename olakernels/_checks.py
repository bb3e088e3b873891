# Input checks that read tensor values without stalling the GPU.
from __future__ import annotations

import contextlib
import contextvars

import torch

_HOST_CHECKS = contextvars.ContextVar("olakernels_host_checks", default=False)


@contextlib.contextmanager
def host_checks():
    """Inside, ``fail_if_any`` reads its mask back to the host on every device (one sync per
    check) and raises ValueError: for inference and probing, where a device-side assert would
    leave the CUDA context unusable for the next request."""
    token = _HOST_CHECKS.set(True)
    try:
        yield
    finally:
        _HOST_CHECKS.reset(token)


def _check_on_host(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" or _HOST_CHECKS.get()


def fail_if_any(bad: torch.Tensor, values: torch.Tensor, message: str) -> None:
    """Reject inputs where ``bad`` (a bool mask over ``values``) holds anywhere.

    On CPU tensors (or inside ``host_checks()``): ValueError with ``message`` and the first
    offending value. On accelerators a host-side check would synchronize every training step,
    so a device-side assert fails the step instead (a CUDA error carrying ``message``).
    Under torch.compile an asynchronous assert is traced (Inductor lowers it to a device-side
    assert, no sync; a RuntimeError carrying ``message`` on CPU when nothing fails first): a
    bad input compiled never gives a quietly wrong result. On the CPU Inductor may fuse an
    indexing op that reads the bad value ahead of the assert, whose own bounds check then
    aborts the process (as compiled ``F.cross_entropy`` does with such labels).
    """
    if torch.compiler.is_compiling() or not _check_on_host(bad):
        torch._assert_async(~bad.any(), message)
        return
    if bool(bad.any()):
        raise ValueError(f"{message}, got {values[bad][0].item()}")


def refuse_func_transforms(op: str, impl: str) -> None:
    """Refuse a fused impl under torch.func transforms (vmap, grad, jacrev, ...): their
    autograd Functions and custom ops cannot run there, and PyTorch's own error ("must
    override the setup_context staticmethod", "data-dependent control flow") names neither
    the op nor a way out. Skipped under torch.compile, which traces the call instead."""
    if torch.compiler.is_compiling() or torch._C._functorch.peek_interpreter_stack() is None:
        return
    raise RuntimeError(f"{op}: impl={impl!r} cannot run under torch.func transforms (vmap, "
                       "grad, jacrev, ...): its hand-written backward and Triton kernels are "
                       "opaque to them; use impl='reference' (eager PyTorch) there")
