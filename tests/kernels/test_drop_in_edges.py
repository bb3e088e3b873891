# The public ops used as a drop-in library: argument shapes, transforms and module options.
"""What a user wiring olakernels' ops into another model's code meets beyond the main tests:
a logit scale of another one-element shape, torch.func transforms (the fused impls cannot run
there and must say so, naming the op and the way out), latents on another device, and impl
values checked when a module is built or switched, not silently run as another impl.
Numbers are compared with the float64 reference through the main tests' oracle checks.
"""
import copy
import re

import pytest
import torch
from test_embedding_distill_loss import SHAPES, _check_against_oracle, _run
from test_perceiver import _head, _inputs

from olakernels import EmbeddingDistillLoss, embedding_distill_loss, linear_cross_entropy
from olakernels.perceiver import PerceiverResampler
from olakernels.testing import make_embedding_pair, make_lm_head_inputs, make_sample_mask

FUNC_REFUSAL = (r"impl='(auto|triton|torch)' cannot run under torch\.func transforms .* "
                r"use impl='reference'")


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("mask_mode", ["per_sample", "seed"])
def test_a_logit_scale_of_any_one_element_shape_is_the_scalar(impl, mask_mode, device):
    """A (1, 1, 1) logit scale passes the "one element" check; "torch" broadcast its logits to
    (1, B, B_global) and returned a silently wrong loss (0.62 for 0.44), "reference" crashed.
    It must be the scalar: the float64 oracle's result, and the 0-dim scale's bit for bit,
    with its gradient in its own shape."""
    pred, target = make_embedding_pair(SHAPES["gen"], device=device, seed=3)
    mask = make_sample_mask(pred.shape[0], "mixed", device=device)
    scale = torch.full((1, 1, 1), 2.0, device=device)
    out, g_pred, g_scale = _check_against_oracle(impl, pred, target, mask, scale,
                                                 mask_mode=mask_mode)
    assert out.loss.shape == () and g_scale.shape == (1, 1, 1)
    want, w_pred, w_scale = _run(impl, pred, target, mask, scale.reshape(()), mask_mode=mask_mode)
    assert torch.equal(out.loss, want.loss) and torch.equal(g_pred, w_pred)
    assert torch.equal(g_scale.reshape(()), w_scale)


def _embedding_call(impl):
    pred, target = make_embedding_pair((2, 4, 8), seed=5)
    mask = make_sample_mask(4, "mixed").float()
    return (lambda p, t, m: embedding_distill_loss(p, t, m, 2.0, impl=impl).loss), \
        (pred, target, mask[None].expand(2, 4).clone())


def _lce_call(impl):
    hidden, weight, labels, _ = make_lm_head_inputs((2, 6), 16, 40, ignored=0.3)
    return (lambda h, y: linear_cross_entropy(h, weight, y, impl=impl)), (hidden, labels)


@pytest.mark.parametrize("impl", ["triton", "torch", "auto"])
@pytest.mark.parametrize("transform", ["vmap", "grad"])
@pytest.mark.parametrize("op", ["embedding_distill_loss", "linear_cross_entropy"])
def test_func_transforms_are_refused_by_name(op, transform, impl):
    """torch.func.vmap/grad over a fused impl failed inside PyTorch ("must override the
    setup_context staticmethod", "data-dependent control flow"): the op and the way out
    (impl='reference') must be named instead."""
    fn, args = (_embedding_call if op == "embedding_distill_loss" else _lce_call)(impl)
    if transform == "vmap":
        call = lambda: torch.func.vmap(fn)(*args)  # noqa: E731
    else:
        call = lambda: torch.func.grad(fn)(*(a[0] for a in args))  # noqa: E731
    with pytest.raises(RuntimeError, match=f"{op}: {FUNC_REFUSAL}"):
        call()


def test_the_reference_runs_under_func_transforms():
    """The way out the refusal names works: torch.func.grad of impl='reference' is autograd's
    gradient, and vmap over the samples (inputs batched, labels and masks shared) is a loop."""
    fn, (pred, target, mask) = _embedding_call("reference")
    p = pred[0].detach().clone().requires_grad_(True)
    fn(p, target[0], mask[0]).backward()
    torch.testing.assert_close(torch.func.grad(fn)(pred[0], target[0], mask[0]), p.grad,
                               rtol=0, atol=0)
    fn, (hidden, labels) = _lce_call("reference")
    got = torch.func.vmap(lambda h: fn(h, labels[0]))(hidden)
    want = torch.stack([fn(h, labels[0]) for h in hidden])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_perceiver_fast_paths_refuse_func_transforms(impl):
    """The heads' fast paths (autograd Functions, custom ops) under torch.func: refused by
    name; the reference runs there."""
    head, (x, latents) = _head("seg"), _inputs("seg")
    head.impl = impl
    with pytest.raises(RuntimeError, match=f"TaskTokenResampler: {FUNC_REFUSAL}"):
        torch.func.grad(lambda t: head(t, latents).sum())(x)
    head.impl = "reference"
    g = torch.func.grad(lambda t: head(t, latents).sum())(x)
    xg = x.clone().requires_grad_(True)
    head(xg, latents).sum().backward()
    torch.testing.assert_close(g, xg.grad, rtol=0, atol=0)


def test_task_token_latents_on_another_device_are_named():
    """Latents on another device than x failed inside proj_in ("Tensor on device cpu is not on
    the expected device meta!"), naming neither argument."""
    head, (x, latents) = _head("seg"), _inputs("seg")
    with pytest.raises(ValueError, match=re.escape(
            "TaskTokenResampler: latents must be on x's device cpu, got meta")):
        head(x, latents.to("meta"))


def test_a_perceiver_impl_set_after_construction_is_checked():
    """OlaVLM.set_impl and the benchmarks set ``impl`` on built heads: an unknown value ran
    the torch fast path silently (a typo'd "refrence" was not the oracle)."""
    head, (x, latents) = _head("seg"), _inputs("seg")
    head.impl = "refrence"
    with pytest.raises(ValueError, match=re.escape(
            "TaskTokenResampler: impl must be one of ('auto', 'triton', 'torch', 'reference'), "
            "got 'refrence'")):
        head(x, latents)
    learned = _head("ragged")
    assert isinstance(learned, PerceiverResampler)
    learned.impl = None
    with pytest.raises(ValueError, match="PerceiverResampler: impl must be one of"):
        learned(torch.randn(2, 4, 29))


@pytest.mark.parametrize("options, error, message", [
    (dict(impl="cuda"), ValueError, "impl must be one of ('auto', 'triton', 'torch', "
                                    "'reference'), got 'cuda'"),
    (dict(beta=-1.0), ValueError, "beta must be >= 0, got -1.0"),
    (dict(contrastive_weight=None), TypeError, "contrastive_weight must be a number, got "
                                               "NoneType"),
    (dict(max_logit_scale=0.0), ValueError, "max_logit_scale must be > 0, got 0.0"),
    (dict(mask_mode="mean"), ValueError, "mask_mode must be one of"),
])
def test_the_embedding_loss_module_checks_its_options_when_built(options, error, message):
    """EmbeddingDistillLoss(impl="cuda") was built and failed at its first forward, unlike
    LinearCrossEntropy and the perceiver heads, which check when built."""
    with pytest.raises(error, match=re.escape(f"EmbeddingDistillLoss: {message}")):
        EmbeddingDistillLoss(**options)


def test_the_embedding_loss_module_round_trips():
    """deepcopy, pickling (torch.save of the module) and the seed's 0-dim key give the same
    loss and gradient as the original."""
    import io

    loss_fn = EmbeddingDistillLoss(contrastive_weight=0.5, impl="torch")
    loss_fn.load_state_dict({"logit_scale": torch.tensor(1.5)})  # the seed's 0-dim scalar
    buffer = io.BytesIO()
    torch.save(loss_fn, buffer)
    buffer.seek(0)
    pred, target = make_embedding_pair(SHAPES["gen"], seed=9)
    mask = make_sample_mask(pred.shape[0], "mixed")
    results = []
    for fn in (loss_fn, copy.deepcopy(loss_fn), torch.load(buffer, weights_only=False)):
        out = fn(pred, target, mask)
        out.loss.backward()
        results.append((out.loss.detach(), fn.logit_scale.grad))
    for got in results[1:]:
        assert torch.equal(got[0], results[0][0]) and torch.equal(got[1], results[0][1])
