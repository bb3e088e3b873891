# Shared Triton helpers: interpreter detection, launch heuristics, device checks.
from __future__ import annotations

import functools
import importlib.util
import os

import torch


def interpreter_enabled() -> bool:
    """True when Triton kernels run under the CPU interpreter (TRITON_INTERPRET=1).

    The variable must be set before triton is imported; tests/conftest.py does that on machines
    without a GPU.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


# Looked up once without importing triton (importing it here would fix TRITON_INTERPRET's value
# too early); a plain constant also keeps torch.compile from tracing a cache wrapper.
_TRITON_FOUND = importlib.util.find_spec("triton") is not None


def triton_importable() -> bool:
    return _TRITON_FOUND


def check_triton_device(tensor: torch.Tensor, op: str) -> None:
    """Raise a clear error when impl='triton' cannot run on `tensor`'s device."""
    if not triton_importable():
        raise RuntimeError(f"{op}: impl='triton' needs the triton package; use impl='torch'")
    if tensor.device.type == "cpu" and not interpreter_enabled():
        raise RuntimeError(
            f"{op}: impl='triton' got CPU tensors but TRITON_INTERPRET=1 is not set (it must be "
            "set before triton is imported); use impl='torch' on CPU, or move the tensors to the "
            "GPU"
        )
    if tensor.device.type not in ("cpu", "cuda"):
        raise NotImplementedError(
            f"{op}: impl='triton' supports CUDA/ROCm tensors (and CPU under the interpreter), "
            f"got device {tensor.device}; use impl='torch'"
        )


TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_impl(impl: str, tensor: torch.Tensor, op: str, arg: str) -> str:
    """Turn impl="auto" into "triton" (CUDA/ROCm tensors of a Triton dtype) or "torch", and
    check that an explicit impl="triton" can run on ``tensor`` (the op's main input ``arg``)."""
    if impl == "auto":
        use = tensor.is_cuda and triton_importable() and tensor.dtype in TRITON_DTYPES
        return "triton" if use else "torch"
    if impl == "triton":
        check_triton_device(tensor, op)
        if tensor.dtype not in TRITON_DTYPES:
            raise NotImplementedError(
                f"{op}: impl='triton' supports fp32/fp16/bf16 {arg}, got {tensor.dtype}; "
                "use impl='torch'"
            )
    return impl


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=16)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on `device`; a small constant under the interpreter.

    Under the interpreter programs run one after another, so fewer, larger programs keep the
    CPU test suite fast.
    """
    if device.type != "cuda":
        return 2
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
