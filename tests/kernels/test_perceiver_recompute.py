# LayerNorm -> Linear and GELU -> Linear with recomputed middles: values, gradients, memory.
import copy

import pytest
import torch
import torch.nn.functional as F
from test_perceiver import _head, _inputs, _run

from olakernels.perceiver import modules
from olakernels.perceiver.impl import recompute
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


class _Unfused(modules._TorchOps):
    """The fast path's torch ops with the plain compositions (autograd keeps the middles)."""

    @staticmethod
    def layer_norm_linear(x, ln, weight):
        return F.linear(modules._TorchOps.layer_norm(x, ln), weight)

    @staticmethod
    def gelu_linear(a, weight):
        return F.linear(F.gelu(a), weight)


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

    monkeypatch.setattr(modules, "_TorchOps", _Unfused)
    unfused = _saved_bytes(copy.deepcopy(head), "torch", x, latents)
    b, n, m, dim = 3, 20, 36, 96
    assert unfused - fused == (b * n * dim + 2 * b * m * dim) * 4


def _autocast_run(fn, leaves, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    with torch.autocast(dy.device.type, dtype=torch.bfloat16):
        y = fn(*leaves)
    (y.float() * dy).sum().backward()
    return [y.detach()] + [t.grad for t in leaves]


def _cuda_policy_layer_norm(x, ln_w, ln_b):
    """LayerNorm as CUDA autocast runs it (all inputs cast to fp32; CPU autocast runs it in
    the input's dtype): the recompute must follow whatever the middle op does under autocast."""
    return F.layer_norm(x.float(), (x.shape[-1],), ln_w.float(), ln_b.float(), 1e-5)


MIDDLES = {
    "layer_norm": (lambda x, lw, lb, w: recompute.autocast_layer_norm_linear(x, lw, lb, 1e-5, w),
                   lambda x, lw, lb, w: _eager(x, lw, lb, w, with_gelu=False)),
    "gelu": (lambda x, lw, lb, w: recompute.autocast_gelu_linear(x, w) + 0 * (lw + lb).sum(),
             lambda x, lw, lb, w: _eager(x, lw, lb, w, with_gelu=True) + 0 * (lw + lb).sum()),
    "layer_norm_cuda_policy": (
        lambda x, lw, lb, w: recompute._AutocastMiddleLinear.apply(
            _cuda_policy_layer_norm, x, w, lw, lb),
        lambda x, lw, lb, w: F.linear(_cuda_policy_layer_norm(x, lw, lb), w)),
}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("middle", list(MIDDLES))
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_under_autocast_equals_the_eager_composition_under_autocast(middle, x_dtype, device):
    """Values and gradients (in the leaves' own dtypes) are eager's under bf16 autocast, bit
    for bit on the CPU: the middle op runs under the forward's autocast state in both passes.
    On CUDA (LayerNorm in fp32 there) the GEMMs may pick other kernels for the written-out
    backward: equal to bf16 rounding."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 17, 24, generator=g).to(x_dtype)  # ragged sizes
    ln_w, ln_b = 1 + 0.1 * torch.randn(24, generator=g), 0.1 * torch.randn(24, generator=g)
    w = torch.randn(13, 24, generator=g) / 5  # an fp32 (master) weight, as under AMP
    dy = torch.randn(3, 17, 13, generator=g)
    x, ln_w, ln_b, w, dy = (t.to(device) for t in (x, ln_w, ln_b, w, dy))
    fused, eager = MIDDLES[middle]
    got = _autocast_run(fused, [x, ln_w, ln_b, w], dy)
    want = _autocast_run(eager, [x, ln_w, ln_b, w], dy)
    no_amp = eager(x.float(), ln_w, ln_b, w)
    assert not torch.equal(want[0].float(), no_amp.float())  # the premise: autocast matters
    exact = dict(rtol=0, atol=0) if device == "cpu" else {}
    for name, a, b in zip(("y", "grad_x", "grad_ln_w", "grad_ln_b", "grad_w"), got, want,
                          strict=True):
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        tol = exact or (dict(rtol=1.6e-2, atol=1e-3) if name != "y" else {})
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_under_autocast_frozen_inputs_get_no_gradient():
    """Only the inputs that require a gradient get one (a frozen LayerNorm bias and Linear
    weight: none), equal to eager's; a double backward raises instead of dropping terms."""
    g = torch.Generator().manual_seed(5)
    x0, lw0, lb0, w0 = (torch.randn(*s, generator=g) for s in ((2, 5, 8), (8,), (8,), (4, 8)))

    def run(fn):
        x, ln_w = x0.clone().requires_grad_(True), lw0.clone().requires_grad_(True)
        ln_b, w = lb0.clone(), w0.clone()  # frozen
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = fn(x, ln_w, ln_b, w)
        y.float().sum().backward()
        return x.grad, ln_w.grad, ln_b.grad, w.grad

    for fused, eager in ((lambda x, lw, lb, w: recompute.autocast_layer_norm_linear(
                              x, lw, lb, 1e-5, w),
                          lambda x, lw, lb, w: _eager(x, lw, lb, w, with_gelu=False)),
                         (lambda x, lw, lb, w: recompute.autocast_gelu_linear(x, w),
                          lambda x, lw, lb, w: _eager(x, lw, lb, w, with_gelu=True))):
        got, want = run(fused), run(eager)
        assert got[2] is None and got[3] is None  # frozen: no gradient computed
        for a, b in zip(got, want, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    x = x0.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = recompute.autocast_gelu_linear(x, w0)
    assert "AutocastMiddleLinear" in y.grad_fn.name() and y.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="has no double backward"):
        torch.autograd.grad(y.float().sum(), x, create_graph=True)
    torch.autograd.grad(y.float().sum(), x)  # a plain backward is fine


def _saved_activation_bytes(module, impl, x, latents):
    """Bytes autograd saves for the backward, a parameter's own storage not counted."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    total = [0]

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t

    module.impl = impl
    if hasattr(module, "projector"):
        module.projector.impl = impl
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x, latents)
    out.float().sum().backward()
    return total[0]


def test_under_autocast_the_depth_head_keeps_the_middles_out(monkeypatch):
    """Under bf16 autocast (fp32 parameters, as AMP trains): per block the bf16 copies of the
    inputs' LayerNorm output (B, N, dim), of the feed-forward's LayerNorm and GELU outputs
    (B, M, dim each), the two LayerNorms' statistics (fp32 mean and rstd per row) and the bf16
    casts of the three weights (recast in the backward) are no longer saved."""
    head = _head("depth")
    x, latents = _inputs("depth", batch=3, tokens=20)
    fused = _saved_activation_bytes(head, "torch", x, latents)

    monkeypatch.setattr(modules, "_TorchOps", _Unfused)
    unfused = _saved_activation_bytes(copy.deepcopy(head), "torch", x, latents)
    b, n, m, dim, inner = 3, 20, 36, 96, 8 * 4  # inner: dim_head * heads
    bf16, stats = 2, 2 * 4
    activations = (b * n + 2 * b * m) * dim * bf16 + (b * n + b * m) * stats
    weights = (2 * inner * dim + dim * dim + dim * dim) * bf16  # to_kv, ff[1], ff[3] (ff_mult 1)
    assert unfused - fused == activations + weights
