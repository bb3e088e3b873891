# The lean RMSNorm computes what the decoder's own norm does and saves its input, not an fp32 copy.
from __future__ import annotations

import copy
import importlib

import pytest
import torch
import transformers as tf

from olakernels.testing import assert_close_to_reference
from olavlm.models.lean_norm import LeanRMSNorm, RMSNormFunction, make_norms_lean, rms_norm_eager

KINDS = ["llama", "mistral", "qwen2", "qwen3", "phi3"]


def _norm(kind: str, hidden: int = 48, eps: float = 1e-5) -> torch.nn.Module:
    modeling = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    cls = next(getattr(modeling, n) for n in dir(modeling) if n.lower() == f"{kind}rmsnorm")
    module = cls(hidden, eps=eps)
    torch.nn.init.normal_(module.weight, mean=1.0, std=0.3,
                          generator=torch.Generator().manual_seed(2))
    return module


def _oracle(x64, w64, eps):
    """RMSNorm in float64 throughout (the decoders' module casts to float32 inside)."""
    return w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps))


def _saved(fn):
    sizes = {}

    def pack(t):  # count each storage once, as the allocator holds it
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("weight_trainable", [False, True], ids=["frozen", "trainable"])
def test_same_output_close_gradients_input_saved(kind, dtype, weight_trainable):
    norm = _norm(kind).to(dtype)
    lean = LeanRMSNorm(copy.deepcopy(norm))
    for m in (norm, lean):
        m.weight.requires_grad_(weight_trainable)
    # A ragged (3, 7) batch with rows of very different scales.
    x = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(1)) \
        * torch.logspace(-2, 2, 7)[None, :, None]
    x = x.to(dtype)
    grad = torch.randn(3, 7, 48, generator=torch.Generator().manual_seed(3)).to(dtype)

    w64 = norm.weight.detach().double().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    _oracle(x64, w64, norm.variance_epsilon).backward(grad.double())
    outs = {}
    for name, module in (("eager", norm), ("lean", lean)):
        xi = x.clone().requires_grad_(True)
        y, saved = _saved(lambda m=module, xi=xi: m(xi))
        y.backward(grad)
        outs[name] = (y, xi.grad, module.weight.grad, saved)

    assert torch.equal(outs["lean"][0], outs["eager"][0]), "the forward is the decoder's formula"
    assert_close_to_reference(outs["lean"][1], x64.grad, outs["eager"][1], name=f"{kind} grad_x",
                              reduction_size=48)
    if weight_trainable:
        assert_close_to_reference(outs["lean"][2], w64.grad, outs["eager"][2],
                                  name=f"{kind} grad_weight", reduction_size=21)
    else:
        assert outs["lean"][2] is None
    # Eager keeps the fp32 copy of x and the fp32 reciprocal RMS (+ the normalized copy, in
    # x's dtype, for a trainable weight); lean keeps x in its own dtype and the reciprocal RMS.
    rows, size = 3 * 7, x.numel()
    weight_bytes = norm.weight.numel() * norm.weight.element_size()
    lean_act = sum(outs["lean"][3].values()) - weight_bytes
    eager_act = sum(outs["eager"][3].values()) - weight_bytes
    assert lean_act == size * x.element_size() + rows * 4
    assert eager_act == size * 4 + rows * 4 + (size * x.element_size() if weight_trainable else 0)


def test_gradcheck_float64():
    x = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (x, w))


def test_double_backward_equals_the_decoders():
    """A gradient penalty through the norm (create_graph=True): the saved rstd is a constant to
    autograd, so differentiating the analytic backward dropped d rstd / dx and gave wrong second
    derivatives silently (x off by ~0.7 here). Oracle: the formula in float64 (the decoder's
    module would compute in float32)."""
    lean = LeanRMSNorm(_norm("llama", hidden=8, eps=1e-6).double())
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    probe = torch.linspace(-1, 1, 24, dtype=torch.float64).reshape(3, 8)

    def penalty_grads(forward):
        xi = x.clone().requires_grad_(True)
        (g,) = torch.autograd.grad((forward(xi) * probe).sum(), xi, create_graph=True)
        return torch.autograd.grad(g.pow(2).sum(), (xi, lean.weight))

    got = penalty_grads(lean)
    want = penalty_grads(lambda xi: _oracle(xi, lean.weight, 1e-6))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    xi = x.clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda a, b: RMSNormFunction.apply(a, b, 1e-6), (xi, w))


def test_zero_rows_and_nan_propagate():
    norm = LeanRMSNorm(_norm("llama", hidden=8, eps=1e-6))
    x = torch.zeros(3, 8)
    x[1] = torch.randn(8)
    x[2, 3] = float("nan")
    x.requires_grad_(True)
    y = norm(x)
    y.sum().backward()
    assert torch.equal(y[0], torch.zeros(8)) and torch.isfinite(x.grad[:2]).all()
    assert torch.isnan(y[2]).all() and torch.isnan(x.grad[2]).all()


def test_gemma_and_unknown_norms_are_left_alone():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    class MyRMSNorm(torch.nn.Module):  # same attributes, another formula
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return self.weight * x

    model = torch.nn.Sequential(GemmaRMSNorm(8), MyRMSNorm(), _norm("llama", hidden=8))
    assert make_norms_lean(model) == 1
    assert isinstance(model[2], LeanRMSNorm)
    assert not isinstance(model[0], LeanRMSNorm) and not isinstance(model[1], LeanRMSNorm)


def test_swap_keeps_parameters_keys_and_outputs():
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(config).to(torch.bfloat16)
    ids = torch.randint(0, 50, (2, 5))
    before = model(ids).logits
    keys = set(model.state_dict())
    assert make_norms_lean(model) == 2 * 2 + 1  # two per block and the final norm
    assert make_norms_lean(model) == 0  # idempotent
    assert set(model.state_dict()) == keys
    assert torch.equal(model(ids).logits, before)


def test_eager_formula_matches_decoder():
    norm = _norm("llama").to(torch.bfloat16)
    x = torch.randn(5, 48).to(torch.bfloat16)
    assert torch.equal(rms_norm_eager(x, norm.weight, norm.variance_epsilon), norm(x))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_kernels_on_gpu(dtype):
    from olavlm.models.lean_norm import _use_fused

    norm = _norm("llama", hidden=4096).to("cuda", dtype)
    lean = LeanRMSNorm(copy.deepcopy(norm))
    x = torch.randn(4, 333, 4096, device="cuda").to(dtype)
    grad = torch.randn_like(x)
    if not _use_fused(x, norm.weight):
        pytest.skip("this torch has no fused RMSNorm backward on this GPU (eager path tested)")
    w64 = norm.weight.detach().double().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    ref = _oracle(x64, w64, norm.variance_epsilon)
    ref.backward(grad.double())
    outs = {}
    for name, module in (("eager", norm), ("lean", lean)):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.backward(grad)
        outs[name] = (y, xi.grad, module.weight.grad)
    assert_close_to_reference(outs["lean"][0], ref, outs["eager"][0], name="fused out")
    assert_close_to_reference(outs["lean"][1], x64.grad, outs["eager"][1], name="fused grad_x",
                              reduction_size=4096)
    assert_close_to_reference(outs["lean"][2], w64.grad, outs["eager"][2],
                              name="fused grad_weight", reduction_size=4 * 333)
