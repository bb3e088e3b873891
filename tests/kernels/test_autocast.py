# Every op under torch.autocast gives what it gives without it: the ops pick their own precision
# (fp32 accumulation), and their torch paths must not let autocast recast their matmuls.
from __future__ import annotations

import pytest
import torch

from olakernels import embedding_distill_loss, linear_cross_entropy, rotary_embedding, silu_mul

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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_linear_cross_entropy(impl, dtype):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 13, 48, generator=g).to(dtype)
    weight = (torch.randn(257, 48, generator=g) * 0.1).to(dtype)
    labels = torch.randint(0, 257, (3, 13), generator=g)
    labels[:, :5] = -100

    def fn(h, w):
        return linear_cross_entropy(h, w, labels, label_smoothing=0.1, z_loss_weight=1e-3,
                                    impl=impl)

    _assert_autocast_changes_nothing(fn, [hidden, weight])


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
