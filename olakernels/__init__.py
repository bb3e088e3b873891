# olakernels: fused GPU ops for training multimodal LLMs (functional API and modules only).
from .embedding_loss import EmbeddingDistillLoss, EmbeddingDistillLossOutput, embedding_distill_loss
from .linear_cross_entropy import (
    LinearCrossEntropy,
    LinearCrossEntropyOutput,
    linear_cross_entropy,
)
from .rotary_embedding import rotary_embedding

__all__ = [
    "EmbeddingDistillLoss",
    "EmbeddingDistillLossOutput",
    "LinearCrossEntropy",
    "LinearCrossEntropyOutput",
    "embedding_distill_loss",
    "linear_cross_entropy",
    "rotary_embedding",
]
__version__ = "0.1.0"
