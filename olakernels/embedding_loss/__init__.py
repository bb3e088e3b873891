# Fused embedding-distillation loss (smooth-L1 + InfoNCE) of OLA-VLM.
from .api import EmbeddingDistillLossOutput, embedding_distill_loss
from .distributed import GatheredTargets, gather_targets
from .modules import EmbeddingDistillLoss

__all__ = ["EmbeddingDistillLoss", "EmbeddingDistillLossOutput", "GatheredTargets",
           "embedding_distill_loss", "gather_targets"]
