# An RMSNorm that saves its bf16 input instead of an fp32 copy, with torch's fused kernels on GPUs.
"""Memory-lean, fused RMSNorm for Llama-style decoders (Llama, Mistral, Qwen2/3, Phi-3).

Hugging Face's ``LlamaRMSNorm`` is eager PyTorch: ``x32 = x.float(); x32 * rsqrt(mean(x32^2) +
eps)``, cast back, times the weight. Autograd keeps the fp32 copy ``x32`` for the backward (twice
the bytes of a bf16 input), and the ~7 forward and ~12 backward kernels each move the whole
tensor. At Llama-3-8B shape in pre-training (5.4k tokens, H = 4096) that is ~89 MB saved per
norm, ~5.8 GB over the 65 norms, and ~0.9 ms of memory traffic per norm per step.

``RMSNormFunction`` saves the input (in its own dtype) and the fp32 reciprocal RMS, one value
per row, and recomputes the rest in the backward. On CUDA/ROCm devices, when x and the weight
share a dtype and torch has the kernels, it runs torch's fused ``aten._fused_rms_norm`` forward
and backward (one kernel each way: read x, write y; read x and the gradient, write the
gradient); elsewhere the forward is the decoder's own formula, bit for bit (except float64
inputs, kept in float64 where the decoder computes in float32), and the backward is the
analytic gradient in fp32 (float64); a double backward (``create_graph=True``, gradient
penalties) differentiates the formula, exactly. Under torch.compile the module runs the
decoder's formula and Inductor fuses it. ``LeanRMSNorm`` wraps the decoder's module with the
same ``weight`` parameter (the same state_dict key).

Equivalent PyTorch (the decoder's): ``weight * (x.float() * torch.rsqrt(x.float().pow(2)
.mean(-1, keepdim=True) + eps)).to(x.dtype)``. The fused kernel multiplies by the weight
before rounding (one rounding instead of two): outputs may differ from the decoder's by one
unit in the last place of bf16.
"""
from __future__ import annotations

import functools
import inspect
import logging
import textwrap

import torch
from torch import nn

__all__ = ["LeanRMSNorm", "RMSNormFunction", "is_llama_rms_norm", "make_norms_lean",
           "rms_norm_eager"]

logger = logging.getLogger(__name__)


def rms_norm_eager(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The decoders' formula (LlamaRMSNorm.forward), op for op."""
    x32 = x.to(torch.float32)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


@functools.cache
def _fused_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch has the fused RMSNorm kernels, forward AND backward, on this device
    (CPU builds have a forward only; older torch has neither). Probed once per device."""
    if device.type != "cuda" or not hasattr(torch.ops.aten, "_fused_rms_norm_backward"):
        return False
    try:
        x = torch.ones(2, 8, device=device, dtype=dtype)
        w = torch.ones(8, device=device, dtype=dtype)
        y, rstd = torch.ops.aten._fused_rms_norm(x, [8], w, 1e-6)
        torch.ops.aten._fused_rms_norm_backward(y, x, [8], rstd, w, [True, True])
        return True
    except (RuntimeError, NotImplementedError) as err:
        logger.info("torch's fused RMSNorm is unavailable on %s (%s); using the eager formula "
                    "with the lean saving", device, err)
        return False


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _use_fused(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.dtype == weight.dtype and x.is_cuda and _fused_works(x.device, x.dtype)


def _formula(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """(y, rstd) by the decoder's formula (float64 inputs stay in float64)."""
    x32 = x.to(_compute_dtype(x))
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (x32 * rstd).to(x.dtype), rstd


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm over the last dimension saving x and the fp32 reciprocal RMS (module doc)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        fused = _use_fused(x, weight)
        if fused:  # (contiguous: a no-op in the decoders; x itself is saved, see backward)
            y, rstd = torch.ops.aten._fused_rms_norm(x.contiguous(), [x.shape[-1]], weight, eps)
        else:  # the decoder's formula (float64 inputs stay in float64)
            y, rstd = _formula(x, weight, eps)
        ctx.fused, ctx.eps = fused, eps
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            # create_graph=True (gradient penalties): rstd was saved as a constant, so autograd
            # of the analytic backward below would drop d rstd / dx and give wrong second
            # derivatives silently; differentiate the formula instead (as silu_mul does).
            inputs = [t for t, need in ((x, need_x), (weight, need_w)) if need]
            grads = iter(torch.autograd.grad(_formula(x, weight, ctx.eps)[0], inputs, grad,
                                             create_graph=True))
            return (next(grads) if need_x else None), (next(grads) if need_w else None), None
        if ctx.fused:
            grad_x, grad_w = torch.ops.aten._fused_rms_norm_backward(
                grad.contiguous(), x.contiguous(), [x.shape[-1]], rstd, weight, [need_x, need_w])
            return (grad_x if need_x else None), (grad_w if need_w else None), None
        grad_x = grad_w = None
        x32 = x.to(_compute_dtype(x))
        if need_w:  # y = weight * normed.to(dtype): the product's gradient, summed over rows
            normed = (x32 * rstd).to(x.dtype)
            grad_w = (grad * normed).reshape(-1, x.shape[-1]).sum(0).to(weight.dtype)
        if need_x:  # d/dx of x * rstd(x): rstd * (g - x * rstd^2 * mean(g * x))
            g = (grad * weight).to(x32.dtype)
            mean_gx = (g * x32).mean(-1, keepdim=True)
            grad_x = (rstd * (g - x32 * (rstd * rstd * mean_gx))).to(x.dtype)
        return grad_x, grad_w, None


class LeanRMSNorm(nn.Module):
    """Wraps a decoder's RMSNorm, reusing its ``weight`` (same parameter and key).
    ``lean=False`` computes exactly as the decoder's own module (the reference path)."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = float(norm.variance_epsilon)
        self.original_class = type(norm).__name__
        self.lean = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under torch.compile, Inductor fuses the formula and picks what to save itself.
        if not self.lean or torch.compiler.is_compiling():
            return rms_norm_eager(x, self.weight, self.variance_epsilon)
        return RMSNormFunction.apply(x, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, lean={self.lean}, " \
               f"was {self.original_class}"


def _body(fn) -> str | None:
    try:
        source = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return None
    return source.split(":", 1)[1] if ":" in source else None  # after the signature


@functools.cache
def _is_llama_formula(cls: type) -> bool:
    """The class's forward is LlamaRMSNorm's line for line (the decoders copy it); Gemma's
    ``(1 + weight)`` variant and anything unknown are left alone."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    body = _body(cls.forward)
    return body is not None and body == _body(LlamaRMSNorm.forward)


def is_llama_rms_norm(module: nn.Module) -> bool:
    """A decoder RMSNorm computing LlamaRMSNorm's formula (weight, variance_epsilon)."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and isinstance(weight, nn.Parameter)
            and weight.dim() == 1 and hasattr(module, "variance_epsilon")
            and _is_llama_formula(type(module)))


def make_norms_lean(model: nn.Module) -> int:
    """Replace every Llama-formula RMSNorm inside ``model`` (the blocks' norms, the final norm,
    Qwen3's q/k norms) by a LeanRMSNorm; returns the count. Idempotent."""
    swaps = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if is_llama_rms_norm(child)]
    for parent, name, child in swaps:
        setattr(parent, name, LeanRMSNorm(child))
    return len(swaps)
