# nn.Module owning the learnable logit scale of the embedding distillation loss.
from __future__ import annotations

import torch
from torch import nn

from .api import EmbeddingDistillLossOutput, check_options, embedding_distill_loss


class EmbeddingDistillLoss(nn.Module):
    """Module form of :func:`embedding_distill_loss`, owning ``logit_scale`` (init 2.0).

    The state_dict holds one entry, ``logit_scale``, an fp32 parameter of shape (1,): the
    seed's per-task ``{depth,seg,gen}_logit_scale`` are 0-dim, which load too (reshaped), but
    FSDP2's ``fully_shard`` refuses 0-dim parameters. ``use_contrastive=False`` drops the
    parameter and the InfoNCE term (smooth-L1 only).

    Example::

        loss_fn = EmbeddingDistillLoss(contrastive_weight=0.3)
        loss, sl1, con = loss_fn(pred, target, mask)
    """

    def __init__(
        self,
        *,
        beta: float = 1.0,
        contrastive_weight: float = 0.3,
        max_logit_scale: float = 100.0,
        init_logit_scale: float = 2.0,
        use_contrastive: bool = True,
        mask_mode: str = "per_sample",
        process_group=None,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        # Checked when built, not at the first forward (a typo'd impl ran until then).
        check_options("EmbeddingDistillLoss", beta, contrastive_weight, max_logit_scale,
                      mask_mode, impl)
        self.beta = beta
        self.contrastive_weight = contrastive_weight
        self.max_logit_scale = max_logit_scale
        self.mask_mode = mask_mode
        self.process_group = process_group
        self.impl = impl
        if use_contrastive:
            self.logit_scale = nn.Parameter(torch.full((1,), float(init_logit_scale)))
        else:
            self.register_parameter("logit_scale", None)
        self._register_load_state_dict_pre_hook(_scalar_logit_scale_as_1d)

    def forward(
        self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
        *, gathered=None,
    ) -> EmbeddingDistillLossOutput:
        """``gathered``: :func:`gather_targets` of this call's targets and mask, done once
        outside (several heads of one task; torch.compile(fullgraph=True) with a group)."""
        return embedding_distill_loss(
            pred, target, mask, self.logit_scale,
            beta=self.beta, contrastive_weight=self.contrastive_weight,
            max_logit_scale=self.max_logit_scale, mask_mode=self.mask_mode,
            process_group=self.process_group, gathered=gathered, impl=self.impl,
        )

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, contrastive_weight={self.contrastive_weight}, "
                f"max_logit_scale={self.max_logit_scale}, mask_mode={self.mask_mode!r}, "
                f"impl={self.impl!r}")


def _scalar_logit_scale_as_1d(state_dict, prefix, *_args) -> None:
    """A seed checkpoint's 0-dim logit scale loads into the (1,) parameter."""
    key = prefix + "logit_scale"
    value = state_dict.get(key)
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        state_dict[key] = value.reshape(1)
