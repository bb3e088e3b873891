# LayerNorm -> Linear and GELU -> Linear with recomputed middles: values, gradients, memory.
import copy

import pytest
import torch
import torch.nn.functional as F
from test_perceiver import _head, _inputs, _run

from olakernels.perceiver import modules
from olakernels.perceiver.impl.recompute import gelu_linear, layer_norm_linear
from olakernels.testing import assert_close_to_reference


def _eager(x, ln_w, ln_b, w, with_gelu):
    if with_gelu:
        return F.linear(F.gelu(x), w)
    return F.linear(F.layer_norm(x, (x.shape[-1],), ln_w, ln_b, 1e-5), w)


@pytest.mark.parametrize("with_gelu", [False, True], ids=["layer_norm_linear", "gelu_linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen_weights"])
def test_matches_the_float64_composition(with_gelu, dtype, frozen):
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(3, 17, 24, generator=g, dtype=torch.float64)  # ragged sizes
    ln_w64 = 1 + 0.1 * torch.randn(24, generator=g, dtype=torch.float64)
    ln_b64 = 0.1 * torch.randn(24, generator=g, dtype=torch.float64)
    w64 = torch.randn(13, 24, generator=g, dtype=torch.float64) / 5
    dy64 = torch.randn(3, 17, 13, generator=g, dtype=torch.float64)

    def run(fn, dt):
        leaves = [t.detach().to(dt).clone().requires_grad_(not (frozen and i > 0))
                  for i, t in enumerate((x64, ln_w64, ln_b64, w64))]
        x, ln_w, ln_b, w = leaves
        y = fn(x, ln_w, ln_b, w)
        (y * dy64.to(dt)).sum().backward()
        return y, [t.grad for t in leaves]

    if with_gelu:
        fused = lambda x, lw, lb, w: gelu_linear(x, w)  # noqa: E731
    else:
        fused = lambda x, lw, lb, w: layer_norm_linear(x, lw, lb, 1e-5, w)  # noqa: E731
    eager = lambda x, lw, lb, w: _eager(x, lw, lb, w, with_gelu)  # noqa: E731
    y, grads = run(fused, dtype)
    y_ref, grads_ref = run(eager, torch.float64)
    y_eager, grads_eager = run(eager, dtype)
    assert_close_to_reference(y, y_ref, y_eager, name="y", reduction_size=24)
    names = ("grad_x", "grad_ln_w", "grad_ln_b", "grad_w")
    for name, got, ref, eag in zip(names, grads, grads_ref, grads_eager, strict=True):
        if with_gelu and name in ("grad_ln_w", "grad_ln_b"):
            continue  # not inputs of gelu_linear
        if ref is None:
            assert got is None, name
            continue
        assert_close_to_reference(got, ref, eag, name=name, reduction_size=3 * 17)


def _saved_bytes(module, impl, x, latents):
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _run(module, impl, x, latents, torch.float32)
    return total[0]


def test_the_depth_head_keeps_three_activations_fewer(monkeypatch):
    """Per block: the inputs' LayerNorm output (B, N, dim), the feed-forward's LayerNorm and
    GELU outputs (B, M, dim each) are no longer saved for the backward."""
    head = _head("depth")
    x, latents = _inputs("depth", batch=3, tokens=20)
    fused = _saved_bytes(head, "torch", x, latents)

    class Unfused(modules._TorchOps):
        @staticmethod
        def layer_norm_linear(x, ln, weight):
            return F.linear(modules._TorchOps.layer_norm(x, ln), weight)

        @staticmethod
        def gelu_linear(a, weight):
            return F.linear(F.gelu(a), weight)

    monkeypatch.setattr(modules, "_TorchOps", Unfused)
    unfused = _saved_bytes(copy.deepcopy(head), "torch", x, latents)
    b, n, m, dim = 3, 20, 36, 96
    assert unfused - fused == (b * n * dim + 2 * b * m * dim) * 4


def test_autocast_keeps_the_plain_composition():
    """Under autocast the custom functions would miss the casts: the ops fall back."""
    x = torch.randn(2, 5, 8, requires_grad=True)
    ln = torch.nn.LayerNorm(8)
    w = torch.randn(4, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = modules._TorchOps.layer_norm_linear(x, ln, w)
        z = modules._TorchOps.gelu_linear(x, w)
    assert y.dtype == z.dtype == torch.bfloat16
    assert "LayerNormLinear" not in y.grad_fn.name()  # a plain mm/addmm node
    assert "GeluLinear" not in z.grad_fn.name()
    (y.float().sum() + z.float().sum()).backward()
    assert x.grad is not None and w.grad is not None
