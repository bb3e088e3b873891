# Fused embedding-predictor heads: Perceiver resampler blocks with the seed's state_dict layout.
from .latents import adapt_latents
from .modules import (
    EmbeddingPredictorHead,
    FeedForward,
    PerceiverAttention,
    PerceiverResampler,
    TaskTokenResampler,
)

__all__ = [
    "EmbeddingPredictorHead",
    "FeedForward",
    "PerceiverAttention",
    "PerceiverResampler",
    "TaskTokenResampler",
    "adapt_latents",
]
