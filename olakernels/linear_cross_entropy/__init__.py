# Fused LM head + cross-entropy that never materializes logits and skips unlabelled rows.
from .api import LinearCrossEntropyOutput, linear_cross_entropy
from .modules import LinearCrossEntropy

__all__ = ["LinearCrossEntropy", "LinearCrossEntropyOutput", "linear_cross_entropy"]
