# olakernels: fused GPU ops for training multimodal LLMs (functional API and modules only).
from .embedding_loss import EmbeddingDistillLoss, EmbeddingDistillLossOutput, embedding_distill_loss
from .linear_cross_entropy import (
    LinearCrossEntropy,
    LinearCrossEntropyOutput,
    linear_cross_entropy,
)
from .rotary_embedding import rotary_embedding
from .silu_mul import silu_mul

__all__ = [
    "EmbeddingDistillLoss",
    "EmbeddingDistillLossOutput",
    "LinearCrossEntropy",
    "LinearCrossEntropyOutput",
    "embedding_distill_loss",
    "linear_cross_entropy",
    "rotary_embedding",
    "silu_mul",
]
__version__ = "0.1.0"
