# embedding_distill_loss at its edges: the logit-scale clamp's boundary, all-zero rows.
"""Inputs the main tests never produce: a logit scale exactly at max_logit_scale (the
reference's torch.clamp passes no gradient there), an all-zero prediction (F.normalize's eps:
the row's cosines are 0, its gradient finite) and an all-zero teacher target (text-only samples
often carry zero-filled targets; masked, it must change nothing, in either mask mode). Each is
compared with the float64 reference through the main tests' oracle check.
"""
import pytest
import torch
from test_embedding_distill_loss import FAST_IMPLS, SHAPES, _check_against_oracle

from olakernels.testing import make_embedding_pair, make_sample_mask


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_logit_scale_exactly_at_the_clamp_gets_the_reference_gradient(impl, device):
    """exp(0) == 1.0 == max_logit_scale exactly. The reference clamps with
    torch.clamp(logit_scale.exp(), max=max_logit_scale), whose gradient at the limit itself is
    0 (a number as ``max``: only values strictly below it pass the gradient), so
    grad_logit_scale must be exactly 0 there, as just above the limit."""
    pred, target = make_embedding_pair(SHAPES["gen"], device=device, seed=3)
    mask = make_sample_mask(pred.shape[0], "mixed", device=device)
    scale = torch.tensor(0.0, device=device)
    _, _, g_scale = _check_against_oracle(impl, pred, target, mask, scale, max_logit_scale=1.0)
    assert g_scale.item() == 0.0


# (The interpreter evaluates both sides of the kernel's tl.where(|p|^2 > eps, x / |p|^2, 0).)
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("mask_mode", ["per_sample", "seed"])
def test_an_all_zero_prediction_has_a_finite_gradient(impl, mask_mode, device):
    """An all-zero prediction row (a dead head output): F.normalize divides by max(|p|, eps),
    so its cosines are 0 and its gradient is finite. The |p|^2 term of d cos / d pred must be
    skipped there (0 / 0 otherwise: NaN in the whole row)."""
    pred, target = make_embedding_pair(SHAPES["gen"], device=device, seed=3)
    pred = pred.detach().clone()
    pred[1] = 0
    mask = make_sample_mask(pred.shape[0], "ones", device=device)
    _check_against_oracle(impl, pred, target, mask, torch.tensor(2.0, device=device),
                          mask_mode=mask_mode)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("mask_mode", ["per_sample", "seed"])
def test_an_all_zero_target_of_a_masked_sample_changes_nothing(impl, mask_mode, device):
    """A text-only sample with a zero-filled target, masked: F.normalize gives it a zero unit
    target (|t| clamped at eps), so its cosines are 0 and finite. Without the clamp 0 / 0 reaches
    the contrastive coefficients of its column, and every row's gradient becomes NaN."""
    pred, target = make_embedding_pair(SHAPES["gen"], device=device, seed=3)
    target = target.clone()
    target[-1] = 0
    mask = make_sample_mask(pred.shape[0], "mixed", device=device)
    assert mask[-1] == 0  # the zero target belongs to a masked sample
    _check_against_oracle(impl, pred, target, mask, torch.tensor(2.0, device=device),
                          mask_mode=mask_mode)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_a_nan_logit_scale_is_not_hidden_by_the_clamp(impl, device):
    """torch.clamp(nan.exp(), max=100) is NaN, and so must every impl's loss and logit-scale
    gradient be: the Triton kernel's tl.minimum returned the limit, so a NaN temperature (after
    one overflowed step) trained on pinned at 100 with a zero gradient, unnoticed."""
    from olakernels import embedding_distill_loss

    pred, target = make_embedding_pair(SHAPES["gen"], device=device, seed=3)
    scale = torch.tensor(float("nan"), device=device, requires_grad=True)
    pred = pred.detach().clone().requires_grad_(True)
    out = embedding_distill_loss(pred, target, None, scale, impl=impl)
    out[0].backward()
    assert out[0].isnan() and out[2].isnan() and scale.grad.isnan()


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_gathered_targets_must_carry_this_calls_mask(impl, device):
    """gathered= (one gather per task, reused across its layers) decides the denominator and
    the candidates by its mask: one built with another mask (stale, reused after the mask
    changed) is refused, not used (the loss was another batch's)."""
    from olakernels import embedding_distill_loss
    from olakernels.embedding_loss import gather_targets

    pred, target = make_embedding_pair(SHAPES["gen"], device=device, seed=3)
    mask = make_sample_mask(pred.shape[0], "mixed", device=device)
    flat = target.reshape(target.shape[0], -1)
    scale = torch.tensor(2.0, device=device)
    want = embedding_distill_loss(pred, target, mask, scale, impl=impl)
    got = embedding_distill_loss(pred, target, mask, scale, impl=impl,
                                 gathered=gather_targets(flat, mask.float()))
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    stale = gather_targets(flat, torch.ones_like(mask, dtype=torch.float32))
    with pytest.raises(ValueError, match="gathered.mask differs from mask"):
        embedding_distill_loss(pred, target, mask, scale, impl=impl, gathered=stale)
