# rotary_embedding: Llama-style RoPE on queries and keys, fused (Triton) forward and backward.
from .api import rotary_embedding
from .impl.reference import rotary_embedding_ref

__all__ = ["rotary_embedding", "rotary_embedding_ref"]
