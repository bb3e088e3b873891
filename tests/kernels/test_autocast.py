# The ops under torch.autocast: the LM head casts its operands as autocast casts F.linear's; the
# others give what they give without it (their own fp32 math; eager's elementwise ops and losses
# are not recast either), and no torch path lets autocast recast its inner matmuls. The
# perceiver heads' fast path follows autocast as the seed's eager math does.
from __future__ import annotations

import copy

import pytest
import torch
from test_perceiver import _head, _inputs

from olakernels import embedding_distill_loss, linear_cross_entropy, rotary_embedding, silu_mul
from olakernels.perceiver import EmbeddingPredictorHead
from olakernels.testing import assert_close_to_reference

DTYPES = [torch.float32, torch.bfloat16]


def _run(fn, inputs, autocast: bool):
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    sum(o.float().sum() for o in outs if o.requires_grad).backward()
    grads = [x.grad for x in leaves if x.grad is not None]
    return [o.detach() for o in outs] + grads


def _assert_autocast_changes_nothing(fn, inputs):
    plain, under = _run(fn, inputs, False), _run(fn, inputs, True)
    assert len(plain) == len(under)
    for i, (a, b) in enumerate(zip(plain, under, strict=True)):
        assert a.dtype == b.dtype, (i, a.dtype, b.dtype)
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=lambda m, i=i: f"output {i}: {m}")


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["torch", "triton", "reference"])
def test_linear_cross_entropy_casts_its_operands_as_f_linear(impl, dtype, bias):
    """Under autocast the LM head's GEMM runs in the autocast dtype, as eager's F.linear would
    (an AMP model with fp32 weights: the eager model's numbers, tensor cores): exactly the op
    on operands cast to bf16 by hand, gradients back in the inputs' dtypes."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 13, 48, generator=g).to(dtype)
    weight = (torch.randn(257, 48, generator=g) * 0.1).to(dtype)
    inputs = [hidden, weight] + ([torch.randn(257, generator=g).to(dtype)] if bias else [])
    labels = torch.randint(0, 257, (3, 13), generator=g)
    labels[:, :5] = -100

    def fn(h, w, b=None):
        return linear_cross_entropy(h, w, labels, bias=b, label_smoothing=0.1,
                                    z_loss_weight=1e-3, impl=impl)

    under = _run(fn, inputs, True)
    by_hand = _run(lambda *t: fn(*(x.to(torch.bfloat16) for x in t)), inputs, False)
    for i, (a, b) in enumerate(zip(under, by_hand, strict=True)):
        assert a.dtype == b.dtype, (i, a.dtype, b.dtype)
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda m, i=i: f"output {i}: {m}")
    assert [t.dtype for t in under[1:]] == [dtype] * len(inputs)  # each grad in its input's


def test_linear_cross_entropy_under_autocast_matches_the_eager_head():
    """The loss of an fp32 head under bf16 autocast is what the eager head computes there
    (F.linear in bf16, cross-entropy in fp32), against the float64 oracle of the bf16 values."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(64, 96, generator=g)
    weight = torch.randn(301, 96, generator=g) * 0.1
    labels = torch.randint(0, 301, (64,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(hidden, weight, labels, impl="triton")
        eager = torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(hidden, weight).float(), labels)
    as_bf16 = [t.to(torch.bfloat16).double() for t in (hidden, weight)]
    ref = torch.nn.functional.cross_entropy(as_bf16[0] @ as_bf16[1].T, labels)
    assert_close_to_reference(ours, ref, eager, name="loss", dtype=torch.bfloat16,
                              reduction_size=96)
    without = linear_cross_entropy(hidden, weight, labels, impl="triton")
    assert not torch.equal(ours, without)  # the premise: autocast changed the operands


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_embedding_distill_loss(impl, dtype):
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(5, 24, 16, generator=g).to(dtype)
    target = torch.randn(5, 24, 16, generator=g)
    mask = torch.tensor([1, 0, 1, 1, 1])
    scale = torch.tensor(2.5)
    _assert_autocast_changes_nothing(
        lambda p, s: embedding_distill_loss(p, target, mask, s, impl=impl), [pred, scale])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_silu_mul_and_rotary(impl, dtype):
    g = torch.Generator().manual_seed(2)
    gate, up = (torch.randn(7, 40, generator=g).to(dtype) for _ in range(2))
    _assert_autocast_changes_nothing(lambda a, b: silu_mul(a, b, impl=impl), [gate, up])
    q = torch.randn(2, 4, 9, 16, generator=g).to(dtype)
    k = torch.randn(2, 2, 9, 16, generator=g).to(dtype)
    angle = torch.randn(1, 9, 8, generator=g).repeat(1, 1, 2)
    _assert_autocast_changes_nothing(
        lambda a, b: rotary_embedding(a, b, angle.cos().to(dtype), angle.sin().to(dtype),
                                      impl=impl), [q, k])


@pytest.mark.parametrize("task", ["depth", "ragged"])
def test_perceiver_fast_path_under_autocast_is_as_close_as_the_seed_math(task):
    """An fp32 head under bf16 autocast (AMP): the fast path, which keeps LayerNorm and GELU
    outputs out of autograd's saved tensors, is as close to the float64 oracle as the seed's
    eager math under the same autocast, output and every gradient in fp32 (their leaves')."""
    def run(impl, dtype, autocast):
        module = copy.deepcopy(_head(task)).to(dtype)
        module.impl = impl
        if isinstance(module, EmbeddingPredictorHead):
            module.projector.impl = impl
        x, latents = _inputs(task)
        x = x.to(dtype)
        lat = None if latents is None else latents.to(dtype).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(x) if lat is None else module(x, lat)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=dtype)
        (out.to(dtype) * w).sum().backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        if lat is not None:
            grads["<latents>"] = lat.grad
        return out, grads

    out, grads = run("torch", torch.float32, True)
    eager, e_grads = run("reference", torch.float32, True)
    ref, r_grads = run("reference", torch.float64, False)
    assert out.dtype == eager.dtype == torch.bfloat16
    assert_close_to_reference(out, ref, eager, name=f"{task}.out", k=3.0)
    assert set(grads) == set(e_grads)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        assert_close_to_reference(grad, r_grads[name], e_grads[name], k=3.0, dtype=torch.bfloat16,
                                  name=f"{task}.grad[{name}]", reduction_size=20)
