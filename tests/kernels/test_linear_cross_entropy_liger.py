# linear_cross_entropy agrees with liger-kernel's fused linear cross-entropy on shared options.
import pytest
import torch

from olakernels import linear_cross_entropy
from olakernels.testing import make_lm_head_inputs

liger = pytest.importorskip("liger_kernel.transformers")  # in the test extra; optional for users

# Softcapping is left out: liger's kernel calls .to() on its scalar softcap argument, which the
# Triton CPU interpreter passes as a Python float (it works on GPUs). The float64 reference
# tests in test_linear_cross_entropy.py cover softcap.
OPTIONS = {
    "plain_mean": dict(),
    "sum": dict(reduction="sum"),
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss_weight=1e-2),
    "smoothing_z_loss_sum": dict(label_smoothing=0.1, z_loss_weight=1e-3, reduction="sum"),
}


def _grads(loss, *leaves):
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("option", OPTIONS.values(), ids=OPTIONS.keys())
def test_matches_liger(impl, option, bias, device):
    hidden, weight, labels, b = make_lm_head_inputs((2, 20), 32, 96, device=device, ignored=0.3,
                                                    bias=bias)
    leaves = [t.requires_grad_(True) for t in (hidden, weight) + ((b,) if bias else ())]
    ours = linear_cross_entropy(hidden, weight, labels, bias=b, impl=impl, **option)
    theirs_fn = liger.LigerFusedLinearCrossEntropyLoss(
        ignore_index=-100, lse_square_scale=option.get("z_loss_weight", 0.0),
        label_smoothing=option.get("label_smoothing", 0.0),
        reduction=option.get("reduction", "mean"), softcap=option.get("logit_softcap"),
    )
    theirs = theirs_fn(weight, hidden.view(-1, 32), labels.view(-1), bias=b)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), rtol=1e-4, atol=1e-5)
    for a, t in zip(_grads(ours, *leaves), _grads(theirs, *leaves), strict=True):
        torch.testing.assert_close(a, t, rtol=1e-4, atol=1e-5)
