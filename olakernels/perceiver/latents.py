# The seed's rule for task-token latents whose count differs from the resampler's num_queries.
from __future__ import annotations

import torch


def adapt_latents(latents: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Latents (B, n, E) -> (B, num_queries, E), as the seed's TaskTokenResampler does.

    n == num_queries: unchanged. num_queries > 1 and n divides it: the n rows tiled
    num_queries // n times (``repeat``, so [l0..ln-1, l0..ln-1, ...]). Otherwise: the mean of the
    n rows, repeated (the gen head's 8 task tokens -> 1 query).
    """
    n = latents.shape[1]
    if n == num_queries:
        return latents
    if num_queries > 1 and num_queries % n == 0:
        return latents.repeat(1, num_queries // n, 1)
    return latents.mean(1, keepdim=True).repeat(1, num_queries, 1)
