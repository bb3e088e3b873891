# Eager linear cross-entropy (lm_head + F.cross_entropy): the oracle and the benchmark baseline.
"""Reference implementation of ``linear_cross_entropy``.

This is what a model's eager loss does: materialize the (N, V) logits, upcast them to fp32 and
call F.cross_entropy. Run it on float64 inputs to get the oracle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def shift_for_next_token(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """labels[..., t] <- labels[..., t + 1]; the last position of each sequence is ignored."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    logit_softcap: float | None = None,
    shift_labels: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (loss, num_valid, correct); inputs are assumed validated by the api."""
    if shift_labels:
        labels = shift_for_next_token(labels, ignore_index)
    if hidden.dtype != weight.dtype:  # the api's rule for mixed operands: the wider dtype's math
        common = torch.promote_types(hidden.dtype, weight.dtype)
        hidden, weight = hidden.to(common), weight.to(common)
    acc = torch.promote_types(hidden.dtype, torch.float32)
    if bias is not None and bias.dtype != hidden.dtype:  # (an fp32 bias over bf16 operands:
        logits = F.linear(hidden, weight).to(acc) + bias.to(acc)  # added in fp32, as the api)
    else:
        logits = F.linear(hidden, weight, bias).to(acc)  # (..., V), what the fast path avoids
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    flat = logits.reshape(-1, logits.shape[-1])
    target = labels.reshape(-1).long()  # (int32 labels: F.cross_entropy wants int64)
    valid = target != ignore_index
    per_token = F.cross_entropy(flat, target, ignore_index=ignore_index, reduction="none",
                                label_smoothing=label_smoothing)
    if z_loss_weight:
        lse = torch.logsumexp(flat, dim=-1)
        per_token = per_token + torch.where(valid, z_loss_weight * lse.square(), 0.0)
    num_valid = valid.sum()
    correct = (flat.argmax(dim=-1) == target) & valid
    if reduction == "none":
        loss = per_token.reshape(labels.shape)
    elif reduction == "sum":
        loss = per_token.sum()
    else:  # "mean" over labelled tokens; 0 (not NaN) when every label is ignored
        loss = per_token.sum() / num_valid.clamp_min(1)
    return loss, num_valid, correct.reshape(labels.shape)
