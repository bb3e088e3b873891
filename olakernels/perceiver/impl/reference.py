# The seed's eager Perceiver resampler math: the test oracle and the benchmark baseline.
"""Reference forward of the resampler modules (SPEC section 2.1), written as the seed runs it.

Per-sample copies of shared latents (``repeat(B, 1, 1)``) go through proj_in, LayerNorm and the
query projection; keys and values come from a concatenation of the normed inputs and latents;
the attention matrix is materialized and soft-maxed in fp32. Takes the modules of modules.py
and uses their parameters, so the reference and fast paths share one state_dict.
"""
from __future__ import annotations

import torch

from ..latents import adapt_latents


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, length, _ = t.shape
    return t.view(b, length, heads, -1).transpose(1, 2)


def attention_ref(attn, x, latents, attend_mask=None):
    x = attn.norm1(x)
    latents = attn.norm2(latents)
    b, m, _ = latents.shape
    q = attn.to_q(latents)
    kv_input = torch.cat((x, latents), dim=-2)  # keys: inputs, then latents
    k, v = attn.to_kv(kv_input).chunk(2, dim=-1)
    q, k, v = (_heads(t, attn.heads) for t in (q, k, v))
    scale = 1 / (attn.dim_head**0.25)  # split between q and k: (q s)(k s)^T = q k^T / sqrt(d)
    weight = (q * scale) @ (k * scale).transpose(-2, -1)
    if attend_mask is not None:
        keep = torch.cat([attend_mask, attend_mask.new_ones(b, m)], dim=1)
        weight = weight.masked_fill(~keep[:, None, None, :], float("-inf"))
    # The seed's fp32 softmax for half-precision scores; float64 ones stay float64 (the oracle).
    acc = torch.promote_types(weight.dtype, torch.float32)
    weight = torch.softmax(weight.to(acc), dim=-1).type(weight.dtype)
    out = (weight @ v).transpose(1, 2).reshape(b, m, -1)
    return attn.to_out(out)


def resampler_ref(module, x, latents=None, attend_mask=None):
    """PerceiverResampler (learned latents, ``latents=None``) or TaskTokenResampler forward."""
    batch = x.shape[0]
    if latents is None:
        latents = module.latents.repeat(batch, 1, 1)
    else:
        latents = adapt_latents(latents, module.num_queries)
        if latents.shape[0] == 1:
            latents = latents.repeat(batch, 1, 1)  # the seed repeats shared queries per sample
        latents = module.proj_in(latents)  # the same proj_in as the inputs
    x = module.proj_in(x)
    for attn, ff in module.layers:
        latents = attention_ref(attn, x, latents, attend_mask) + latents
        latents = ff(latents) + latents
    return module.norm_out(module.proj_out(latents))
