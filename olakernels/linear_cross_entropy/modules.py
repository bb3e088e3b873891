# LinearCrossEntropy: an nn.Linear LM head whose forward returns the loss when given labels.
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .api import IMPLS, REDUCTIONS, linear_cross_entropy


class LinearCrossEntropy(nn.Linear):
    """Drop-in LM head: ``nn.Linear(H, V)`` with the same state_dict (``weight``, ``bias``).

    ``head(hidden)`` returns logits (for generation; softcapped when ``logit_softcap`` is set,
    as the loss sees them); ``head(hidden, labels)`` returns the cross-entropy of those logits
    without materializing them (see :func:`linear_cross_entropy`). Loss options are fixed when
    the module is built.

    Example::

        head = LinearCrossEntropy.from_linear(model.lm_head, shift_labels=True)
        loss = head(hidden_states, input_labels)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss_weight: float = 0.0,
        logit_softcap: float | None = None,
        shift_labels: bool = False,
        max_valid_tokens: int | str | None = None,
        impl: str = "auto",
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        if max_valid_tokens is not None and max_valid_tokens != "count" and (
                isinstance(max_valid_tokens, bool) or not isinstance(max_valid_tokens, int)
                or max_valid_tokens < 0):
            raise ValueError("max_valid_tokens must be None, an int >= 0 or 'count', got "
                             f"{max_valid_tokens!r}")
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss_weight = z_loss_weight
        self.logit_softcap = logit_softcap
        self.shift_labels = shift_labels
        # The default for forward's max_valid_tokens: "count" lets a drop-in head (no CPU copy
        # of the labels in the loop) size its buffers and pick its schedule from the true
        # count, at one device sync per call.
        self.max_valid_tokens = max_valid_tokens
        self.impl = impl

    @classmethod
    def from_linear(cls, linear: nn.Linear, **options) -> LinearCrossEntropy:
        """A head sharing ``linear``'s parameters (no copy), e.g. a model's tied ``lm_head``."""
        head = cls(linear.in_features, linear.out_features, bias=False, device="meta",
                   **options)
        head.weight = linear.weight
        head.bias = linear.bias
        return head

    def forward(self, hidden: torch.Tensor, labels: torch.Tensor | None = None,
                return_stats: bool = False, max_valid_tokens: int | str | None = None):
        """Logits without ``labels``; the loss with them (``max_valid_tokens``: a host-side
        bound on the labelled tokens, or "count", see :func:`linear_cross_entropy`; None: the
        module's own, set at construction, which a call cannot switch off)."""
        if max_valid_tokens is None:
            max_valid_tokens = self.max_valid_tokens
        if labels is None:
            logits = F.linear(hidden, self.weight, self.bias)
            if self.logit_softcap is not None:
                logits = self.logit_softcap * torch.tanh(logits / self.logit_softcap)
            return logits
        return linear_cross_entropy(
            hidden, self.weight, labels, bias=self.bias, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
            z_loss_weight=self.z_loss_weight, logit_softcap=self.logit_softcap,
            shift_labels=self.shift_labels, return_stats=return_stats,
            max_valid_tokens=max_valid_tokens, impl=self.impl,
        )

    def extra_repr(self) -> str:
        bound = (f", max_valid_tokens={self.max_valid_tokens!r}"
                 if self.max_valid_tokens is not None else "")
        return (f"{super().extra_repr()}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}{bound}, impl={self.impl!r}")
