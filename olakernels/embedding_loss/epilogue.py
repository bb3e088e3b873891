# From per-sample statistics (B and B x B_global sized) to the losses, for impl="torch".
"""The small end of the chunked PyTorch loss.

impl="torch" reduces the big (B, D) inputs to per-sample statistics chunk by chunk:

    sl1[i] = sum_d smooth_l1(pred[i, d] - target[i, d])      (B,)
    pp[i]  = sum_d pred[i, d]^2                              (B,)
    dot[i, j] = sum_d pred[i, d] * targets_global[j, d]      (B, B_global)
    tt[j]  = sum_d targets_global[j, d]^2                    (B_global,)

Everything after that is O(B * B_global) and lives here as plain differentiable PyTorch in fp32:
autograd hands the gradients of sl1, pp and dot back to the chunked backward, which turns them
into grad_pred in one more pass. The normalisation follows F.normalize (eps 1e-12). The Triton
path computes the same math, with analytic gradients, inside its rows kernel (impl/triton.py).
"""
from __future__ import annotations

import torch

_NORM_EPS = 1e-12  # F.normalize's default eps


def losses_from_stats(
    sl1: torch.Tensor,
    pp: torch.Tensor,
    dot: torch.Tensor | None,
    tt: torch.Tensor | None,
    *,
    mask: torch.Tensor,
    gathered_mask: torch.Tensor,
    offset: int,
    world_size: int,
    per_sample_numel: int,
    logit_scale: torch.Tensor | None,
    contrastive_weight: float,
    max_logit_scale: float,
    mask_mode: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (loss, smooth_l1, contrastive) as fp32 scalars; see api.py for the semantics."""
    batch = sl1.shape[0]
    m = mask.to(sl1.dtype)
    if mask_mode == "seed":
        # Masked samples still count in the denominator (the seed's mean over all elements).
        smooth_l1 = (m * sl1).sum() / (batch * per_sample_numel)
    else:
        num_valid = gathered_mask.to(sl1.dtype).sum().clamp_min(1.0)
        # world / num_valid: the mean over ranks (what data-parallel gradient averaging takes)
        # then equals the mean over the valid samples of the global batch.
        smooth_l1 = (m * sl1).sum() * (world_size / (num_valid * per_sample_numel))
    if logit_scale is None:
        contrastive = smooth_l1.new_zeros(())
        return smooth_l1 + contrastive, smooth_l1, contrastive

    # sqrt(max(x, eps^2)) == max(sqrt(x), eps) with a finite gradient at x == 0.
    p_norm = pp.clamp_min(_NORM_EPS**2).sqrt()
    t_norm = tt.clamp_min(_NORM_EPS**2).sqrt()
    cos = dot / (p_norm[:, None] * t_norm[None, :])
    scale = torch.clamp(logit_scale.to(cos.dtype).exp(), max=max_logit_scale)
    labels = torch.arange(batch, device=cos.device) + offset
    # Logits relative to the label's: z[i, label_i] == 0 exactly. A well-trained predictor's own
    # target wins by a wide margin, so the loss is small next to the logits; working relative to
    # the label keeps its precision, and keeps d(loss)/d(logit_scale) = sum softmax * (cos -
    # cos_label) free of the 1 - softmax cancellation.
    z = (cos - cos.gather(1, labels[:, None])) * scale
    if mask_mode == "seed":
        ce = _cross_entropy_relative(z)
        contrastive = contrastive_weight * ce.mean() * m.mean()
    else:
        rows, cols = m > 0, gathered_mask > 0
        # A masked sample's target is no real image: drop it from every row's candidates.
        z = z.masked_fill(~cols[None, :], float("-inf"))
        # Rows of masked samples take no part; give them finite dummies so nothing is NaN.
        z = z.masked_fill(~rows[:, None], 0.0)
        ce = torch.where(rows, _cross_entropy_relative(z), 0.0)
        num_valid = gathered_mask.to(sl1.dtype).sum().clamp_min(1.0)
        contrastive = contrastive_weight * ce.sum() * (world_size / num_valid)
    return smooth_l1 + contrastive, smooth_l1, contrastive


def _cross_entropy_relative(z: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy from logits already shifted so that the label's entry is 0.

    ce = log(sum_j exp(z_j)) = m + log1p(sum_{j != argmax} exp(z_j - m)), m = max(z) >= 0.
    When the label dominates (m == 0) this is log1p of a small sum: full relative precision,
    where logsumexp(l) - l[label] would lose it to the rounding of a number near the logits
    (1 ulp of 5.0 is 5e-7).
    """
    top = z.max(dim=1, keepdim=True)
    rest = torch.exp(z - top.values).scatter(1, top.indices, 0.0)
    return top.values.squeeze(1) + torch.log1p(rest.sum(1))
