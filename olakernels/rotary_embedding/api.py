# rotary_embedding: the decoders' RoPE on q and k in one fused pass (validation and dispatch).
"""Public functional API of the rotary embedding op."""
from __future__ import annotations

import torch

from .._triton import resolve_impl
from .impl.reference import rotary_embedding_ref
from .impl.torch import rotary_embedding_torch

IMPLS = ("auto", "triton", "torch", "reference")


def _check(q, k, cos, sin) -> None:
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"rotary_embedding: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"rotary_embedding: {name} must be a floating tensor, got {t.dtype}")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError("rotary_embedding: q and k must be (B, heads, L, head_dim), got "
                         f"q {tuple(q.shape)} and k {tuple(k.shape)}")
    b, _, length, dim = q.shape
    if (k.shape[0], k.shape[2], k.shape[3]) != (b, length, dim):
        raise ValueError(f"rotary_embedding: k {tuple(k.shape)} must share q's batch, length "
                         f"and head_dim {(b, length, dim)} (q {tuple(q.shape)})")
    if dim % 2:
        raise ValueError(f"rotary_embedding: head_dim must be even (two halves), got {dim}")
    if cos.shape != sin.shape:
        raise ValueError(f"rotary_embedding: cos {tuple(cos.shape)} and sin "
                         f"{tuple(sin.shape)} must have the same shape")
    if cos.dim() != 3 or cos.shape[0] not in (1, b) or cos.shape[1:] != (length, dim):
        batch = "B=1" if b == 1 else f"B={b} or 1"
        raise ValueError(f"rotary_embedding: cos and sin must be ({batch}, L={length}, "
                         f"head_dim={dim}) for q {tuple(q.shape)}, got {tuple(cos.shape)}"
                         + (" (a partial rotary factor, rotating part of each head, is not "
                            "supported)" if cos.dim() == 3 and cos.shape[-1] < dim else ""))
    if len({t.device for t in (q, k, cos, sin)}) != 1:
        raise ValueError("rotary_embedding: q, k, cos and sin must be on one device, got "
                         f"{q.device}, {k.device}, {cos.device}, {sin.device}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("rotary_embedding: gradients w.r.t. cos and sin are not supported "
                         "(decoders compute them without grad); pass cos.detach()")


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     *, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary position embedding of queries and keys (half rotation, as Llama-style decoders).

    q (B, Hq, L, D) and k (B, Hk, L, D), fp32/fp16/bf16, any strides with a contiguous last
    dimension (Hugging Face's transposed projections); cos and sin (B or 1, L, D), the
    decoder's ``position_embeddings``. Returns (q', k') in q's and k's dtypes (the Triton path
    keeps their layouts too; the torch path returns contiguous tensors).
    Equivalent PyTorch (``transformers``' ``apply_rotary_pos_emb``)::

        rotate_half = lambda x: torch.cat((-x[..., D // 2:], x[..., :D // 2]), -1)
        q' = q * cos[:, None] + rotate_half(q) * sin[:, None]   # k' likewise

    Numerics: the Triton path reads cos/sin and computes in fp32 and rounds once (eager rounds
    three times); the torch path casts the tables to q's (k's) dtype and equals the decoders'
    formula bit for bit when the tables already have that dtype. The Triton backward is
    itself differentiable (double backward, e.g. gradient penalties, is exact).
    Gradients flow to q and k, not to cos and sin. ``impl``: "auto" (Triton on CUDA/ROCm
    tensors, torch elsewhere; under torch.compile "auto" and "triton" trace the torch path,
    which Inductor fuses),
    "triton", "torch" (eager PyTorch on the two halves: the decoders' values bit for bit) or
    "reference" (the decoders' formula itself: the oracle when called in float64).
    """
    if impl not in IMPLS:
        raise ValueError(f"rotary_embedding: impl must be one of {IMPLS}, got {impl!r}")
    _check(q, k, cos, sin)
    if impl in ("auto", "triton") and torch.compiler.is_compiling():
        impl = "torch"  # traced: Inductor fuses the formula (no Triton launch inside a graph)
    if impl == "auto" and k.dtype != q.dtype:
        impl = "torch"  # the kernel takes one dtype; "auto" picks a path that runs
    impl = resolve_impl(impl, q, "rotary_embedding", "q")
    if impl == "triton":
        if k.dtype != q.dtype:
            raise ValueError(f"rotary_embedding: impl='triton' needs q and k of one dtype, got "
                             f"{q.dtype} and {k.dtype}")
        from .impl.triton import RotaryEmbeddingFunction

        return RotaryEmbeddingFunction.apply(q, k, cos, sin)
    if impl == "reference":
        if k.dtype == q.dtype:
            return rotary_embedding_ref(q, k, cos.to(q.dtype), sin.to(q.dtype))
        # Each tensor with tables in its own dtype (k's rounded to q's would be another op).
        return (rotary_embedding_ref(q, q, cos.to(q.dtype), sin.to(q.dtype))[0],
                rotary_embedding_ref(k, k, cos.to(k.dtype), sin.to(k.dtype))[0])
    return rotary_embedding_torch(q, k, cos, sin)
