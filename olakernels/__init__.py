# olakernels: fused GPU ops for training multimodal LLMs (functional API and modules only).
from .embedding_loss import EmbeddingDistillLoss, EmbeddingDistillLossOutput, embedding_distill_loss

__all__ = ["EmbeddingDistillLoss", "EmbeddingDistillLossOutput", "embedding_distill_loss"]
__version__ = "0.1.0"
