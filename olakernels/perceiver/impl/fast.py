# Fast Perceiver resampler forward: shared queries computed once, SDPA, fused LayerNorm/GELU.
"""Fast forward of the resampler modules; the same parameters and math as the reference.

- Latents shared by every sample (a learned ``latents`` parameter, or task-token queries given
  once as (1, M, E) or (M, E), as for the depth and seg heads) go through proj_in, LayerNorm and
  the query/key/value projections once, then broadcast: for the depth head proj_in is a
  4096 x 4096 GEMM that the seed repeats B times. Autograd sums the broadcast gradients, so
  they stay exact.
- Keys/values: the inputs and the latents are projected separately and only the projected
  (N + M, 2 * heads * dim_head) rows are joined -- never a (B, N + M, dim) copy of hidden
  states.
- Attention through F.scaled_dot_product_attention with scale 1/sqrt(dim_head) (equal to the
  seed's dim_head^-1/4 on both q and k), fp32 accumulation, no materialized score matrix on GPU.
- LayerNorm and GELU come from ``ops`` (Triton kernels or torch's), see modules.py; with
  torch's, LayerNorm -> Linear and GELU -> Linear keep only their inputs for the backward
  (impl/recompute.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..latents import adapt_latents


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, length, _ = t.shape
    return t.view(b, length, heads, -1).transpose(1, 2)


def attention_fast(attn, x, latents, batch, attend_mask, ops):
    """x (B, N, dim); latents (B or 1, M, dim). Returns the attention output (B|1 -> B, M, dim)."""
    # The inputs' LayerNorm output is not kept for the backward (recomputed there: one
    # (B, N, dim) tensor less per head, ops.layer_norm_linear); the latents' is small.
    kv_x = ops.layer_norm_linear(x, attn.norm1, attn.to_kv.weight)
    l_n = ops.layer_norm(latents, attn.norm2)
    m = latents.shape[1]
    q = _heads(F.linear(l_n, attn.to_q.weight), attn.heads)
    kv_l = F.linear(l_n, attn.to_kv.weight)
    kv = torch.cat([kv_x, kv_l.expand(batch, -1, -1)], dim=1)  # inputs, then latents
    k, v = (_heads(t, attn.heads) for t in kv.chunk(2, dim=-1))
    q = q.expand(batch, -1, -1, -1)
    mask = None
    if attend_mask is not None:
        keep = torch.cat([attend_mask, attend_mask.new_ones(batch, m)], dim=1)
        mask = keep[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.dim_head**-0.5)
    out = out.transpose(1, 2).reshape(batch, m, -1)
    return F.linear(out, attn.to_out.weight)


def feed_forward_fast(ff, latents, ops):
    """nn.Sequential(LayerNorm, Linear, GELU, Linear); autograd keeps the latents and the
    GELU's input only (the LayerNorm and GELU outputs are recomputed in the backward)."""
    return ops.gelu_linear(ops.layer_norm_linear(latents, ff[0], ff[1].weight), ff[3].weight)


def resampler_fast(module, x, latents, attend_mask, ops):
    batch = x.shape[0]
    if latents is None:
        latents = module.latents  # (1, M, dim), shared
    else:
        latents = module.proj_in(adapt_latents(latents, module.num_queries))  # (1|B, M, dim)
    x = module.proj_in(x)
    for attn, ff in module.layers:
        latents = attention_fast(attn, x, latents, batch, attend_mask, ops) + latents
        latents = feed_forward_fast(ff, latents, ops) + latents
    latents = F.linear(latents, module.proj_out.weight, module.proj_out.bias)
    return ops.layer_norm(latents, module.norm_out)
