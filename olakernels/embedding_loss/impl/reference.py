# Eager, seed-faithful embedding distillation loss: the test oracle and the benchmark baseline.
"""Reference implementation of ``embedding_distill_loss`` (SPEC sections 4.1, 4.2 and 12).

This is the seed's eager math, readable and differentiable, with the project's two mask modes.
It upcasts whole tensors to fp32 and materializes normalized copies, exactly as the seed does;
that is what the fast paths are measured against. Run it on float64 inputs to get the oracle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed import gather_targets


def embedding_distill_loss_ref(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    logit_scale: torch.Tensor | None = None,
    *,
    beta: float = 1.0,
    contrastive_weight: float = 0.3,
    max_logit_scale: float = 100.0,
    mask_mode: str = "per_sample",
    process_group=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (loss, smooth_l1, contrastive); inputs are assumed validated by the api."""
    batch = pred.shape[0]
    acc = torch.promote_types(pred.dtype, torch.float32)
    target = target.to(pred.dtype)  # the seed casts targets to the predictions' dtype
    m = torch.ones(batch, device=pred.device, dtype=acc) if mask is None else mask.to(acc)
    m_view = m.view((batch,) + (1,) * (pred.dim() - 1))
    per_elem = pred[0].numel()

    sl1 = F.smooth_l1_loss(pred.to(acc), target.to(acc), reduction="none", beta=beta)
    if mask_mode == "seed":
        # The seed's arithmetic: masked samples still count in the denominator.
        smooth_l1 = (sl1 * m_view).mean()
    else:
        gathered_mask = gather_targets(None, m, process_group)
        world = gathered_mask.world_size
        num_valid = gathered_mask.mask.sum().clamp_min(1.0)
        # Scaled so that the mean over ranks is the mean over the global batch's valid samples.
        smooth_l1 = (sl1 * m_view).sum() * world / (num_valid * per_elem)

    if logit_scale is None:
        contrastive = smooth_l1.new_zeros(())
        return smooth_l1 + contrastive, smooth_l1, contrastive

    p = F.normalize(pred.flatten(1), dim=-1)
    t = F.normalize(target.flatten(1), dim=-1)
    gathered = gather_targets(t, m, process_group)
    logits = p @ gathered.targets.T  # in the predictions' dtype, as the seed does
    scale = torch.clamp(logit_scale.exp(), max=max_logit_scale)
    logits = logits * scale
    labels = torch.arange(batch, device=pred.device) + gathered.offset
    if mask_mode == "seed":
        ce = F.cross_entropy(logits, labels, reduction="none")
        # The seed writes (w * ce * mask.view(B, 1, 1)).mean(): the (B,) x (B, 1, 1) broadcast
        # makes a (B, 1, B) tensor whose mean is mean(ce) * mean(mask).
        contrastive = contrastive_weight * ce.mean() * m.mean()
    else:
        rows, cols = m > 0, gathered.mask > 0
        logits = logits.masked_fill(~cols[None, :], float("-inf"))
        ce_sum = F.cross_entropy(logits[rows], labels[rows], reduction="sum")
        num_valid = gathered.mask.sum().clamp_min(1.0)
        contrastive = contrastive_weight * ce_sum * gathered.world_size / num_valid
    return smooth_l1 + contrastive, smooth_l1, contrastive
