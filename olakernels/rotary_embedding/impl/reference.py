# The oracle for rotary_embedding: Hugging Face's apply_rotary_pos_emb, op for op.
"""``rotary_embedding_ref(q, k, cos, sin)``: the decoders' half-rotation RoPE in eager PyTorch
(Llama, Mistral, Qwen2/3, Phi-3 with full rotary), differentiable, any dtype. In float64 it is
the tests' oracle; in the input dtype it is the eager baseline (three roundings per element:
``q * cos``, ``rotate_half(q) * sin`` and their sum)."""
from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dimension's two halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding_ref(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, L, D), k (B, Hk, L, D), cos/sin (B or 1, L, D) -> rotated (q, k)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
