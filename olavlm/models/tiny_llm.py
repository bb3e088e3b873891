# Tiny random-weight decoders of the real architectures, for tests and the CPU demo (no download).
"""``build_tiny_llm(kind, out_dir, vocab_size=...)`` writes a Llama / Phi-3 / Qwen2 model with a
few small layers and random weights via ``save_pretrained``; load it back with
``olavlm.models.llm.load_llm`` (the same code path as a real checkpoint)."""
from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["TINY_LLM_KINDS", "build_tiny_llm"]

TINY_LLM_KINDS = ("llama", "phi3", "qwen2")


def build_tiny_llm(kind: str, out_dir: str | Path, *, vocab_size: int = 512,
                   hidden_size: int = 64, num_layers: int = 4, num_heads: int = 4,
                   num_kv_heads: int = 2, intermediate_size: int | None = None,
                   pad_token_id: int | None = None, bos_token_id: int | None = None,
                   eos_token_id: int | list[int] | None = None, seed: int = 0) -> Path:
    """``bos_token_id`` / ``eos_token_id`` (an id or a list, as Llama-3's): the tokenizer's, so
    ``generate`` stops where the chat template ends a turn (None: the architecture's default
    ids, which may lie outside a small vocabulary)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  intermediate_size=intermediate_size or 2 * hidden_size,
                  max_position_embeddings=4096, pad_token_id=pad_token_id,
                  tie_word_embeddings=False)
    if bos_token_id is not None:
        common["bos_token_id"] = bos_token_id
    if eos_token_id is not None:
        common["eos_token_id"] = eos_token_id
    if kind == "llama":
        config, cls = tf.LlamaConfig(**common), tf.LlamaForCausalLM
    elif kind == "phi3":
        config, cls = tf.Phi3Config(**common), tf.Phi3ForCausalLM
    elif kind == "qwen2":
        config, cls = tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    else:
        raise ValueError(f"kind must be one of {TINY_LLM_KINDS}, got {kind!r}")
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left alone
        torch.manual_seed(seed)
        model = cls(config)
    out = Path(out_dir)
    model.save_pretrained(out)
    return out
