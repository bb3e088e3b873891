# What one frozen decoder block keeps for the backward, per token: eager vs the lean modules.
"""Saved-activation bytes per token of one Llama-style decoder block with frozen weights (the
pre-training case: gradients flow to the inputs only), counted with
``torch.autograd.graph.saved_tensors_hooks`` (each storage once; weights excluded).
Runs on the CPU at the real widths: the count depends on shapes and dtypes, not on the device
(except the attention backend's own saves: a padding mask sends GPU SDPA to the
memory-efficient kernel, which saves the same q, k, v, out as the CPU path, plus its lse).

Variants: the decoder as Hugging Face builds it with a padding mask (the seed, and our fused
path before the lean modules), + lean SwiGLU, + lean RMSNorm, + no padding mask (right-padded
batches). Multiply by tokens per step x blocks for a step's activation memory.

    python benchmarks/decoder_saved_bytes.py                 # Llama-3-8B widths
    python benchmarks/decoder_saved_bytes.py --hidden 3072 --intermediate 8192 --heads 32 \\
        --kv-heads 32                                         # Phi-3-mini
"""
from __future__ import annotations

import argparse
import copy

import torch

from olavlm.models.lean_mlp import make_mlps_lean
from olavlm.models.lean_norm import make_norms_lean


def build_block(hidden: int, intermediate: int, heads: int, kv_heads: int) -> torch.nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaModel

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate,
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         num_hidden_layers=1, vocab_size=16, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaModel(config).to(torch.bfloat16).requires_grad_(False)


def saved_bytes_per_token(model: torch.nn.Module, tokens: int, padding_mask: bool) -> float:
    """Bytes the block (and the final norm) keeps for the backward, per token."""
    hidden = model.config.hidden_size
    sizes: dict[int, int] = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(1, tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.ones(1, tokens, dtype=torch.long)
    mask[0, -max(1, tokens // 16):] = 0  # some right padding
    # The block's input counts when saved: in a decoder it is the previous block's output,
    # which nothing else keeps (the lean norm keeps it; eager keeps an fp32 copy instead).
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(inputs_embeds=x, attention_mask=mask if padding_mask else None, use_cache=False)
    return sum(n for ptr, n in sizes.items() if ptr not in skip) / tokens


def variants(block: torch.nn.Module):
    """(name, model, padding mask) from the eager decoder to today's fused path."""
    lean_mlp = copy.deepcopy(block)
    make_mlps_lean(lean_mlp.layers)
    lean_both = copy.deepcopy(lean_mlp)
    make_norms_lean(lean_both)
    return [("eager decoder, padding mask (seed; fused before lean)", block, True),
            ("+ lean SwiGLU", lean_mlp, True),
            ("+ lean RMSNorm", lean_both, True),
            ("+ no padding mask (right padding)", lean_both, False)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Saved-activation bytes per token of one frozen Llama-style decoder block: "
                    "eager vs the lean modules (CPU count).")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=14336)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128, help="tokens in the counted batch")
    parser.add_argument("--step-tokens", type=int, default=8 * 676,
                        help="tokens per step for the GB column (llama3_8b B=8: 8 x 676)")
    parser.add_argument("--blocks", type=int, default=32)
    args = parser.parse_args(argv)
    block = build_block(args.hidden, args.intermediate, args.heads, args.kv_heads)
    print(f"saved bytes per token, one block + final norm (H={args.hidden}, "
          f"I={args.intermediate}, heads {args.heads}/{args.kv_heads}); GB for "
          f"{args.step_tokens} tokens x {args.blocks} blocks")
    first = None
    for name, model, mask in variants(block):
        per_token = saved_bytes_per_token(model, args.tokens, mask)
        first = first or per_token
        total = per_token * args.step_tokens * args.blocks / 1e9
        print(f"  {name:56s} {per_token / 1024:8.1f} KiB  {total:6.1f} GB  "
              f"{per_token / first:5.2f}x")


if __name__ == "__main__":
    main()
