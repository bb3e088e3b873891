# Embedding-predictor heads per (task, layer), from olakernels.perceiver (SPEC 2.2, 2.3).
"""One ``EmbeddingPredictorHead`` per tapped layer of a task, kept in ``nn.ModuleList``s named
as the seed's (``image_{task}_heads.{i}.projector.*``, ``.linear_{1,2,3}`` for depth), so the
state_dict imports seed checkpoints key for key.

Queries: depth/seg read their task-token parameter (shared by all samples: the fast path runs
its projections once); gen reads the 8 gen task tokens' hidden states of the tapped layer, which
the resampler mean-pools to its single query (SPEC 2.3).
"""
from __future__ import annotations

from torch import nn

from olakernels.perceiver import EmbeddingPredictorHead, TaskTokenResampler

from .config import HeadConfig

__all__ = ["build_task_heads"]


def build_task_heads(task: str, cfg: HeadConfig, num_layers: int, hidden_size: int,
                     impl: str) -> nn.ModuleList:
    dim = cfg.dim or (hidden_size if task == "depth" else cfg.output_dim)
    heads = []
    for _ in range(num_layers):
        resampler = TaskTokenResampler(
            dim=dim, depth=cfg.depth, dim_head=cfg.dim_head, heads=cfg.heads,
            num_queries=cfg.num_queries, embedding_dim=hidden_size, output_dim=cfg.output_dim,
            ff_mult=cfg.ff_mult, impl=_head_impl(impl))
        heads.append(EmbeddingPredictorHead(resampler, num_mlps=cfg.num_mlps))
    return nn.ModuleList(heads)


def _head_impl(impl: str) -> str:
    return impl if impl in ("reference", "torch", "triton") else "auto"
