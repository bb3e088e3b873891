# Functional entry point of the fused embedding-distillation loss: validation and dispatch.
from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

from .._checks import fail_if_any, refuse_func_transforms
from .._triton import resolve_impl
from .distributed import GatheredTargets, gather_targets
from .epilogue import losses_from_stats

IMPLS = ("auto", "triton", "torch", "reference")
MASK_MODES = ("per_sample", "seed")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class EmbeddingDistillLossOutput(NamedTuple):
    """loss = smooth_l1 + contrastive; all three are fp32 scalars (float64 for fp64 inputs)."""

    loss: torch.Tensor
    smooth_l1: torch.Tensor
    contrastive: torch.Tensor


def embedding_distill_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    logit_scale: torch.Tensor | float | None = None,
    *,
    beta: float = 1.0,
    contrastive_weight: float = 0.3,
    max_logit_scale: float = 100.0,
    mask_mode: str = "per_sample",
    process_group=None,
    gathered: GatheredTargets | None = None,
    impl: str = "auto",
) -> EmbeddingDistillLossOutput:
    """OLA-VLM's embedding distillation loss: smooth-L1 plus a weighted InfoNCE term, fused.

    Shapes and dtypes:
        pred:   (B, ...) fp32/fp16/bf16, the predictor head's output (flattened per sample to D)
        target: same shape as pred, any float dtype (may differ from pred's); a frozen teacher's
                embedding, so it must not require grad
        mask:   (B,) of 0/1 (bool, int or float): 1 for a sample with a real image
        logit_scale: one-element tensor of any shape, read as the scalar (learnable, e.g.
                EmbeddingDistillLoss.logit_scale, shape (1,)), a number, or None
    Returns ``(loss, smooth_l1, contrastive)``, fp32 scalars; ``contrastive`` already includes
    ``contrastive_weight`` and ``loss = smooth_l1 + contrastive``. Accumulation is fp32 always.

    Equivalent PyTorch, single process, ``mask_mode="per_sample"`` (``m = mask.float()``)::

        sl1 = F.smooth_l1_loss(pred.float(), target.float(), reduction="none", beta=beta)
        n = m.sum().clamp_min(1)
        smooth_l1 = (sl1.flatten(1).sum(1) * m).sum() / (n * D)
        p = F.normalize(pred.flatten(1).float(), dim=-1)
        t = F.normalize(target.flatten(1).float(), dim=-1)
        logits = (p @ t.T) * torch.clamp(logit_scale.exp(), max=max_logit_scale)
        logits = logits.masked_fill(m[None, :] == 0, -inf)   # masked targets are no candidates
        ce = F.cross_entropy(logits[m > 0], arange(B)[m > 0], reduction="sum")
        contrastive = contrastive_weight * ce / n
        loss = smooth_l1 + contrastive

    ``mask_mode="seed"`` reproduces the seed's arithmetic: every sample is a row and a candidate,
    ``smooth_l1 = (sl1 * m.view(B, 1, ...)).mean()`` and
    ``contrastive = contrastive_weight * mean(cross_entropy(logits, arange(B))) * m.mean()``.
    An all-masked batch gives 0 and zero gradients in both modes; NaN inputs give a NaN loss.
    ``logit_scale=None`` computes smooth-L1 only (contrastive is 0).

    Distributed (``process_group`` given): the targets (in their own dtype) and masks of every
    rank are all-gathered once, without autograd, and serve as the contrastive candidates; the
    labels are this rank's rows offset by the sizes of the ranks before it, so ranks may hold
    different batch sizes (this costs one host sync for the sizes). Weighting, per_sample mode:
    each rank returns ``world_size / N_global`` times the sum of its valid samples' terms, where
    ``N_global`` counts valid samples over all ranks. The mean over ranks -- what FSDP/DDP
    gradient averaging computes -- is then exactly the loss of one process on the concatenated
    global batch, even with unequal batches or masks. ``mask_mode="seed"`` keeps the seed's
    per-rank means (exact only for equal batches with all-ones masks).

    Gradients flow to ``pred`` and ``logit_scale`` (zero while the clamp at max_logit_scale is
    active, as torch.clamp gives). ``target`` gets none: a target that requires grad is an error.

    ``gathered``: the result of ``gather_targets(target.reshape(B, -1), mask, process_group)``
    computed once and reused, e.g. by the several layers' heads of one task that share their
    targets (SPEC section 9, item 7: gather once per task per step). Ignored by "reference".

    impl: "triton" (fused kernels: forward reads pred and target once, backward once more and
    writes grad_pred in pred's dtype; no fp32 copies of the inputs; deterministic, no atomics),
    "torch" (chunked pure PyTorch, bounded fp32 temporaries), "reference" (the seed's eager
    math, the test oracle), "auto" (triton on CUDA/ROCm tensors, torch elsewhere). Under
    torch.func transforms (vmap, grad, ...) only "reference" runs; the others refuse by name.
    """
    _validate(pred, target, mask, logit_scale, beta, contrastive_weight, max_logit_scale,
              mask_mode, impl)
    if logit_scale is not None and not isinstance(logit_scale, torch.Tensor):
        # torch.full: no host-to-device copy (which would synchronize on a GPU)
        logit_scale = torch.full((), float(logit_scale), device=pred.device)
    elif logit_scale is not None:
        # Any one-element shape is the scalar (the module's is (1,)): a (1, 1, 1) one broadcast
        # the logits to 3-D, a silently wrong "torch" loss and a crash in "reference".
        logit_scale = logit_scale.reshape(())
    impl = resolve_impl(impl, pred, "embedding_distill_loss", "pred")
    if impl == "reference":
        from .impl.reference import embedding_distill_loss_ref

        return EmbeddingDistillLossOutput(*embedding_distill_loss_ref(
            pred, target, mask, logit_scale, beta=beta, contrastive_weight=contrastive_weight,
            max_logit_scale=max_logit_scale, mask_mode=mask_mode, process_group=process_group,
        ))

    batch = pred.shape[0]
    pred2d = pred.reshape(batch, -1).contiguous()
    target2d = target.reshape(batch, -1).contiguous()
    acc = torch.promote_types(pred.dtype, torch.float32)
    m = torch.ones(batch, device=pred.device, dtype=acc) if mask is None else mask.to(acc)
    m = m.contiguous()
    with_dot = logit_scale is not None
    if gathered is None:
        gathered = gather_targets(target2d if with_dot else None, m, process_group)
    elif gathered.mask.shape[0] < gathered.offset + batch or (
            with_dot and gathered.world_size > 1
            and gathered.targets.shape[1] != target2d.shape[1]):
        raise ValueError(
            f"embedding_distill_loss: gathered must come from gather_targets of this batch's "
            f"targets (B={batch}, D={target2d.shape[1]}), got a mask of "
            f"{gathered.mask.shape[0]} rows"
        )
    else:  # its mask decides the denominator and the candidates: it must be this call's
        mine = gathered.mask[gathered.offset:gathered.offset + batch].to(acc)
        fail_if_any(mine != m, m, "embedding_distill_loss: gathered.mask differs from mask "
                    "on this rank's samples: gathered must come from gather_targets(target, "
                    "mask, ...) with this call's mask")
    others = gathered.targets if (with_dot and gathered.world_size > 1) else None
    if impl == "triton":
        from .impl.triton import embedding_distill_loss_fwd

        ls32 = logit_scale.float().reshape(()) if with_dot else None
        loss, smooth_l1, contrastive, *_internal = embedding_distill_loss_fwd(
            pred2d, target2d, others, m, gathered.mask, ls32, float(beta),
            float(contrastive_weight), float(max_logit_scale), gathered.offset,
            gathered.world_size, mask_mode == "seed",
        )
        return EmbeddingDistillLossOutput(loss, smooth_l1, contrastive)

    from .impl.torch_chunked import EmbeddingStatsTorchFunction

    sl1, pp, dot, tt = EmbeddingStatsTorchFunction.apply(
        pred2d, target2d, others, float(beta), with_dot
    )
    return EmbeddingDistillLossOutput(*losses_from_stats(
        sl1, pp, dot if with_dot else None, tt if with_dot else None,
        mask=m, gathered_mask=gathered.mask, offset=gathered.offset,
        world_size=gathered.world_size, per_sample_numel=pred2d.shape[1],
        logit_scale=logit_scale, contrastive_weight=contrastive_weight,
        max_logit_scale=max_logit_scale, mask_mode=mask_mode,
    ))


def _validate(pred, target, mask, logit_scale, beta, contrastive_weight, max_logit_scale,
              mask_mode, impl) -> None:
    name = "embedding_distill_loss"
    check_options(name, beta, contrastive_weight, max_logit_scale, mask_mode, impl)
    if impl != "reference":  # (before the mask check, which vmap cannot run either)
        refuse_func_transforms(name, impl)
    for arg, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: {arg} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(
                f"{name}: {arg} must be a floating tensor (fp32/fp16/bf16/fp64), got dtype "
                f"{t.dtype}"
            )
    if pred.dim() < 2:
        raise ValueError(
            f"{name}: pred must have shape (B, ...) with at least 2 dims (batch first), "
            f"got {tuple(pred.shape)}"
        )
    if pred.shape[0] == 0:
        raise ValueError(f"{name}: pred must hold at least one sample, got an empty batch "
                         f"{tuple(pred.shape)}")
    if target.shape[0] != pred.shape[0]:
        raise ValueError(
            f"{name}: target must have the batch size of pred ({pred.shape[0]}), got "
            f"{target.shape[0]} (target shape {tuple(target.shape)})"
        )
    if target.shape != pred.shape:
        raise ValueError(
            f"{name}: target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}"
        )
    if pred.numel() == 0:
        raise ValueError(f"{name}: pred must have at least one element per sample, got shape "
                         f"{tuple(pred.shape)}")
    if target.device != pred.device:
        raise ValueError(f"{name}: target must be on pred's device {pred.device}, got "
                         f"{target.device}")
    if target.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            f"{name}: target must not require grad (targets come from frozen teachers and get "
            "no gradient); pass target.detach()"
        )
    if mask is not None:
        _validate_mask(name, mask, pred)
    if logit_scale is not None:
        if isinstance(logit_scale, torch.Tensor):
            if logit_scale.numel() != 1 or not logit_scale.is_floating_point():
                raise ValueError(
                    f"{name}: logit_scale must be a floating scalar tensor, got shape "
                    f"{tuple(logit_scale.shape)} dtype {logit_scale.dtype}"
                )
            if logit_scale.device != pred.device:
                raise ValueError(f"{name}: logit_scale must be on pred's device {pred.device}, "
                                 f"got {logit_scale.device}")
        elif isinstance(logit_scale, bool) or not isinstance(logit_scale, numbers.Real):
            raise TypeError(f"{name}: logit_scale must be a Tensor, a float or None, got "
                            f"{type(logit_scale).__name__}")


def check_options(name: str, beta, contrastive_weight, max_logit_scale, mask_mode,
                  impl) -> None:
    """The loss's options (the function's, and the module's when it is built)."""
    if impl not in IMPLS:
        raise ValueError(f"{name}: impl must be one of {IMPLS}, got {impl!r}")
    if mask_mode not in MASK_MODES:
        raise ValueError(f"{name}: mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
    for arg, value, positive in (("beta", beta, False),
                                 ("contrastive_weight", contrastive_weight, False),
                                 ("max_logit_scale", max_logit_scale, True)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name}: {arg} must be a number, got {type(value).__name__}")
        if not (value > 0 if positive else value >= 0):  # (NaN fails both)
            raise ValueError(f"{name}: {arg} must be {'> 0' if positive else '>= 0'}, got "
                             f"{value}")


def _validate_mask(name: str, mask, pred: torch.Tensor) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name}: mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.shape != (pred.shape[0],):
        raise ValueError(
            f"{name}: mask must have shape (B,) = ({pred.shape[0]},), got {tuple(mask.shape)}"
        )
    if mask.device != pred.device:
        raise ValueError(f"{name}: mask must be on pred's device {pred.device}, got {mask.device}")
    if mask.is_complex():
        raise ValueError(f"{name}: mask must hold 0/1 values, got dtype {mask.dtype}")
    if mask.dtype != torch.bool:
        fail_if_any((mask != 0) & (mask != 1), mask, f"{name}: mask must hold only 0/1 values")
