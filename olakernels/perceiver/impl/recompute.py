# LayerNorm -> Linear and GELU -> Linear that save their input only and recompute the middle.
"""Activation memory of the embedding-predictor heads: autograd saves, for
``F.linear(F.layer_norm(x))``, both ``x`` (the LayerNorm's input) and the normalized ``x_n``
(the Linear's input), and for ``F.linear(F.gelu(a))`` both ``a`` and ``gelu(a)``. Each pair
is two (B, N, dim) tensors where one would do: the middle is an elementwise function of the
saved input, recomputed in the backward in one memory-bound pass (~3% of a head's time; at
Llama-3-8B shape and B = 32 the depth heads keep ~0.5 GB less).

Equivalent PyTorch (same values; the gradients are computed by the same aten kernels)::

    layer_norm_linear(x, ln_w, ln_b, eps, w) == F.linear(F.layer_norm(x, (d,), ln_w, ln_b, eps), w)
    gelu_linear(a, w) == F.linear(F.gelu(a), w)

Under ``torch.autocast`` the eager composition's numbers depend on autocast's per-op casts
(on CUDA LayerNorm runs in fp32 and the Linear in the autocast dtype; on CPU LayerNorm runs
in its input's dtype), which a hand-written backward cannot know. The ``autocast_*`` variants
therefore run the middle op under the caller's autocast state in the forward and again,
under the same state and with autograd, in the backward; only the Linear is written out (its
operands cast as autocast casts ``F.linear``'s). The values and gradients are the eager
composition's under autocast, and autograd keeps ``x`` (or ``a``) and the weight, not the
middle output's cast copy nor LayerNorm's statistics (eager under CUDA autocast also keeps an
fp32 copy of a bf16 ``x``); the backward recasts the weight (one pass over it).

Used by the fast path's torch ops (modules._TorchOps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._amp import autocast_off, cast_as_autocast


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _LayerNormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ln_w, ln_b, eps, w):
        shape = (x.shape[-1],)
        x_n, mean, rstd = torch.native_layer_norm(x, shape, ln_w, ln_b, eps)
        ctx.save_for_backward(x, mean, rstd, ln_w, ln_b, w)
        ctx.eps = eps
        return F.linear(x_n, w)

    @staticmethod
    def backward(ctx, dy):
        x, mean, rstd, ln_w, ln_b, w = ctx.saved_tensors
        shape = (x.shape[-1],)
        need_x, need_lnw, need_lnb, _, need_w = ctx.needs_input_grad
        grad_w = None
        if need_w:
            x_n = torch.native_layer_norm(x, shape, ln_w, ln_b, ctx.eps)[0]  # recomputed
            grad_w = _flat(dy).t().mm(_flat(x_n))
        grad_x = grad_lnw = grad_lnb = None
        if need_x or need_lnw or need_lnb:
            grad_x_n = dy.matmul(w)
            grad_x, grad_lnw, grad_lnb = torch.ops.aten.native_layer_norm_backward(
                grad_x_n, x, shape, mean, rstd, ln_w, ln_b, [need_x, need_lnw, need_lnb])
        return grad_x, grad_lnw, grad_lnb, None, grad_w


class _GeluLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, w):
        ctx.save_for_backward(a, w)
        return F.linear(F.gelu(a), w)

    @staticmethod
    def backward(ctx, dy):
        a, w = ctx.saved_tensors
        need_a, need_w = ctx.needs_input_grad
        grad_w = _flat(dy).t().mm(_flat(F.gelu(a))) if need_w else None  # recomputed
        grad_a = torch.ops.aten.gelu_backward(dy.matmul(w), a) if need_a else None
        return grad_a, grad_w


def layer_norm_linear(x, ln_w, ln_b, eps: float, w):
    """``F.linear(F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps), w)``, saving ``x`` only."""
    return _LayerNormLinear.apply(x, ln_w, ln_b, eps, w)


def gelu_linear(a, w):
    """``F.linear(F.gelu(a), w)`` (exact erf GELU), saving ``a`` only."""
    return _GeluLinear.apply(a, w)


class _AutocastMiddleLinear(torch.autograd.Function):
    """``F.linear(middle(x, *params), w)`` under the caller's autocast, saving ``x``, ``w``
    and the middle's parameters; the backward recomputes ``middle`` with autograd under the
    forward's autocast state and recasts ``w`` (module docstring)."""

    @staticmethod
    def forward(ctx, middle, x, w, *params):
        kind = x.device.type
        ctx.middle, ctx.autocast = middle, (kind, torch.get_autocast_dtype(kind))
        ctx.save_for_backward(x, w, *params)
        # Both under the caller's autocast: eager's dtypes, values and weight-cast cache.
        return F.linear(middle(x, *params), w)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: the recompute below detaches
            raise RuntimeError("the perceiver heads' autocast recompute (impl='torch' under "
                               "torch.autocast) has no double backward; a gradient penalty "
                               "through the heads needs impl='reference'")
        x, w, *params = ctx.saved_tensors
        _, need_x, need_w, *need_params = ctx.needs_input_grad
        kind, dtype = ctx.autocast
        inputs = [None if t is None else t.detach().requires_grad_(need)
                  for t, need in zip((x, *params), (need_x, *need_params), strict=True)]
        wanted = [t for t in inputs if t is not None and t.requires_grad]
        with torch.enable_grad(), torch.autocast(kind, dtype=dtype):
            mid = ctx.middle(*inputs)  # recomputed as in the forward
            mid_c, w_c = cast_as_autocast(x.device, mid.detach(), w.detach())
        with autocast_off(x.device):
            grad_w = _flat(dy).t().mm(_flat(mid_c)).to(w.dtype) if need_w else None
            grads = iter(())
            if wanted:  # the Linear's input gradient back through eager's cast of ``mid``
                grads = iter(torch.autograd.grad(mid, wanted, dy.matmul(w_c).to(mid.dtype)))
        grad_x, *grad_params = [next(grads) if t is not None and t.requires_grad else None
                                for t in inputs]
        return None, grad_x, grad_w, *grad_params


def _layer_norm(eps: float):
    return lambda x, ln_w, ln_b: F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, eps)


def autocast_layer_norm_linear(x, ln_w, ln_b, eps: float, w):
    """``layer_norm_linear`` under ``torch.autocast``: the eager composition's numbers there,
    saving ``x`` only (module docstring)."""
    return _AutocastMiddleLinear.apply(_layer_norm(eps), x, w, ln_w, ln_b)


def autocast_gelu_linear(a, w):
    """``gelu_linear`` under ``torch.autocast`` (as ``autocast_layer_norm_linear``)."""
    return _AutocastMiddleLinear.apply(F.gelu, a, w)
