# Triton rotary embedding: q and k of one token per program, forward and backward in one kernel.
"""One program per token (b, l): it loads the token's cos/sin row once and rotates every query
and key head, reading each element once and writing it once (fp32 math, one rounding). The
backward is the same rotation transposed, so the same kernel with ``BACKWARD``: it needs only
cos and sin, so nothing of q or k is saved.

With x = (x1, x2) the halves of a head and c, s the halves of cos and sin:
forward  y1 = x1 c1 - x2 s1,  y2 = x2 c2 + x1 s2;
backward g1 = y1 c1 + y2 s2,  g2 = y2 c2 - y1 s1  (for the output gradient y).
Inputs and outputs may be strided (Hugging Face's q is a transposed view of the projection);
only the last dimension must be contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import next_power_of_2


@triton.jit
def _rotate_heads(X, Y, in_base, out_base, s_h, so_h, NUM_H, HALF, c1, c2, a, b, d, ok_d,
                  BLOCK_H: tl.constexpr):
    """y1 = x1 c1 + x2 a, y2 = x2 c2 + x1 b for every head of one token."""
    for h0 in range(0, NUM_H, BLOCK_H):
        h = h0 + tl.arange(0, BLOCK_H)
        ok = (h < NUM_H)[:, None] & ok_d[None, :]
        src = X + in_base + h.to(tl.int64)[:, None] * s_h + d[None, :]
        x1 = tl.load(src, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(src + HALF, mask=ok, other=0.0).to(tl.float32)
        dst = Y + out_base + h.to(tl.int64)[:, None] * so_h + d[None, :]
        tl.store(dst, (x1 * c1[None, :] + x2 * a[None, :]).to(Y.dtype.element_ty), mask=ok)
        tl.store(dst + HALF, (x2 * c2[None, :] + x1 * b[None, :]).to(Y.dtype.element_ty),
                 mask=ok)


@triton.jit
def _rotary_embedding_kernel(
    Q, K, COS, SIN, QO, KO,
    L, NUM_HQ, NUM_HK, HALF,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l,
    sqo_b, sqo_h, sqo_l, sko_b, sko_h, sko_l,
    sc_b, sc_l,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    tok = tl.program_id(0)
    b = (tok // L).to(tl.int64)
    pos = (tok % L).to(tl.int64)
    d = tl.arange(0, BLOCK_HALF)
    ok_d = d < HALF
    row = b * sc_b + pos * sc_l
    c1 = tl.load(COS + row + d, mask=ok_d, other=0.0).to(tl.float32)
    c2 = tl.load(COS + row + HALF + d, mask=ok_d, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + row + d, mask=ok_d, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + row + HALF + d, mask=ok_d, other=0.0).to(tl.float32)
    if BACKWARD:  # the transposed rotation
        a = s2
        bb = -s1
    else:
        a = -s1
        bb = s2
    _rotate_heads(Q, QO, b * sq_b + pos * sq_l, b * sqo_b + pos * sqo_l, sq_h, sqo_h, NUM_HQ,
                  HALF, c1, c2, a, bb, d, ok_d, BLOCK_H=BLOCK_HQ)
    _rotate_heads(K, KO, b * sk_b + pos * sk_l, b * sko_b + pos * sko_l, sk_h, sko_h, NUM_HK,
                  HALF, c1, c2, a, bb, d, ok_d, BLOCK_H=BLOCK_HK)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _heads_block(num_heads: int, block_half: int) -> int:
    """Heads per tile: up to ~4K elements per half in registers."""
    return max(1, min(next_power_of_2(num_heads), 4096 // block_half))


def rotary_embedding_launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor, backward: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, Hq, L, D) and k (B, Hk, L, D) by cos/sin (B or 1, L, D); outputs keep the
    inputs' layout (``empty_like``). ``backward``: apply the transposed rotation (gradients)."""
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos, sin = _last_dim_contiguous(cos), _last_dim_contiguous(sin)
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    batch, num_hq, length, dim = q.shape
    num_hk = k.shape[1]
    half = dim // 2
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if qo.stride(-1) != 1 or ko.stride(-1) != 1:  # empty_like of an overlapping view
        qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), \
            torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.numel() == 0 and k.numel() == 0:
        return qo, ko
    block_half = next_power_of_2(half)
    sc_b = 0 if cos.shape[0] == 1 else cos.stride(0)
    _rotary_embedding_kernel[(batch * length,)](
        q, k, cos, sin, qo, ko,
        length, num_hq, num_hk, half,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2),
        sc_b, cos.stride(1),
        BLOCK_HQ=_heads_block(num_hq, block_half), BLOCK_HK=_heads_block(num_hk, block_half),
        BLOCK_HALF=block_half, BACKWARD=backward,
        num_warps=4 if num_hq * half <= 2048 else 8,
    )
    return qo, ko


def _zeros_for_none(grad_q, grad_k, shapes, device):
    """An output nobody used sends None: rotate zeros in its place (one launch either way)."""
    (q_shape, q_dtype), (k_shape, k_dtype) = shapes
    if grad_q is None:
        grad_q = torch.zeros(q_shape, dtype=q_dtype, device=device)
    if grad_k is None:
        grad_k = torch.zeros(k_shape, dtype=k_dtype, device=device)
    return grad_q, grad_k


class RotaryEmbeddingFunction(torch.autograd.Function):
    """Differentiable in q and k (not in cos and sin, which decoders compute without grad);
    saves only cos and sin. Its backward is the transposed rotation, itself differentiable
    (its own backward is this rotation again), so double backward is exact."""

    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.shapes = (q.shape, q.dtype), (k.shape, k.dtype)
        qo, ko = rotary_embedding_launch(q, k, cos, sin)
        for out, needed in ((qo, ctx.needs_input_grad[0]), (ko, ctx.needs_input_grad[1])):
            if not needed:  # a frozen input's output carries no gradient
                ctx.mark_non_differentiable(out)
        return qo, ko

    @staticmethod
    def backward(ctx, grad_q, grad_k):
        cos, sin = ctx.saved_tensors
        grad_q, grad_k = _zeros_for_none(grad_q, grad_k, ctx.shapes, cos.device)
        dq, dk = RotaryTransposeFunction.apply(grad_q, grad_k, cos, sin)
        return ((dq if ctx.needs_input_grad[0] else None),
                (dk if ctx.needs_input_grad[1] else None), None, None)


class RotaryTransposeFunction(torch.autograd.Function):
    """The transposed rotation (the gradient of RotaryEmbeddingFunction); its gradient is the
    forward rotation."""

    @staticmethod
    def forward(ctx, grad_q, grad_k, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.shapes = (grad_q.shape, grad_q.dtype), (grad_k.shape, grad_k.dtype)
        return rotary_embedding_launch(grad_q, grad_k, cos, sin, backward=True)

    @staticmethod
    def backward(ctx, hq, hk):
        cos, sin = ctx.saved_tensors
        hq, hk = _zeros_for_none(hq, hk, ctx.shapes, cos.device)
        dq, dk = RotaryEmbeddingFunction.apply(hq, hk, cos, sin)
        return dq, dk, None, None
