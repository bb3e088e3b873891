# rotary_embedding in eager PyTorch on the two halves (no rotate_half copy): the CPU path.
"""``rotary_embedding_torch(q, k, cos, sin)``: ``(x1 c1 - x2 s1, x2 c2 + x1 s2)`` per head.
Each output element is the same two rounded products and one rounded sum as the decoders'
``q * cos + rotate_half(q) * sin`` (a + (-b) == a - b), so the values equal theirs bit for bit,
without the negated copy and the concatenation's extra pass."""
from __future__ import annotations

import torch


def _rotate(x: torch.Tensor, c1, c2, s1, s2) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * c1 - x2 * s1, x2 * c2 + x1 * s2), dim=-1)


def _tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype):
    c1, c2 = cos.to(dtype).unsqueeze(1).chunk(2, dim=-1)
    s1, s2 = sin.to(dtype).unsqueeze(1).chunk(2, dim=-1)
    return c1, c2, s1, s2


def rotary_embedding_torch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs in q's and k's dtypes (the tables are cast to each), contiguous."""
    return _rotate(q, *_tables(cos, sin, q.dtype)), _rotate(k, *_tables(cos, sin, k.dtype))
