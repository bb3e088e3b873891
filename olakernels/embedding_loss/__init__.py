# Fused embedding-distillation loss (smooth-L1 + InfoNCE) of OLA-VLM.
from .api import EmbeddingDistillLossOutput, embedding_distill_loss
from .modules import EmbeddingDistillLoss

__all__ = ["EmbeddingDistillLoss", "EmbeddingDistillLossOutput", "embedding_distill_loss"]
