# The memory-lean SwiGLU computes what the decoder's own MLP does and saves less.
from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from olakernels.testing import assert_close_to_reference
from olavlm.models.lean_mlp import LeanSwiGLUMLP, SiLUMul, make_mlps_lean

CONFIGS = {
    "llama": (tf.LlamaConfig, "LlamaMLP"),
    "qwen2": (tf.Qwen2Config, "Qwen2MLP"),
    "phi3": (tf.Phi3Config, "Phi3MLP"),  # one fused gate_up_proj
}


def _mlp(kind):
    cls, name = CONFIGS[kind]
    config = cls(hidden_size=32, intermediate_size=80)
    import importlib

    modeling = importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    module = getattr(modeling, name)(config)
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return module


def _saved_bytes(fn):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_same_outputs_and_gradients_less_saved(kind, dtype):
    mlp = _mlp(kind).to(dtype)
    lean = LeanSwiGLUMLP(copy.deepcopy(mlp))
    mlp.requires_grad_(False)  # pre-training: frozen weights, gradients to the input only
    lean.requires_grad_(False)
    x = torch.randn(3, 7, 32, dtype=dtype, generator=torch.Generator().manual_seed(1))
    x64 = x.double().requires_grad_(True)
    ref_mlp = copy.deepcopy(mlp).double()
    ref = ref_mlp(x64)
    ref.backward(torch.ones_like(ref))
    outs = {}
    for name, module in (("eager", mlp), ("lean", lean)):
        xi = x.clone().requires_grad_(True)
        y, saved = _saved_bytes(lambda m=module, xi=xi: m(xi))
        y.backward(torch.ones_like(y))
        outs[name] = (y, xi.grad, saved)
    assert_close_to_reference(outs["lean"][0], ref, outs["eager"][0], name=f"{kind} out")
    assert_close_to_reference(outs["lean"][1], x64.grad, outs["eager"][1],
                              name=f"{kind} grad_x", reduction_size=80)
    with torch.no_grad():  # inference keeps the decoder's own ops: bit for bit
        assert torch.equal(lean(x), mlp(x))
    # The backward runs eager autograd's own kernels on a bit-identical recomputed silu(gate).
    assert torch.equal(outs["lean"][0], outs["eager"][0])
    assert torch.equal(outs["lean"][1], outs["eager"][1]), f"{kind} grad_x differs from eager"
    # eager keeps gate, silu(gate), up (+ x for nothing: frozen); lean keeps gate and up.
    per = 3 * 7 * 80 * x.element_size()
    assert outs["eager"][2] - outs["lean"][2] == per


def test_silu_mul_gradcheck():
    g = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    u = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiLUMul.apply, (g, u))


def test_swap_keeps_parameters_and_keys():
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, vocab_size=50)
    model = tf.LlamaForCausalLM(config)
    keys = set(model.state_dict())
    assert make_mlps_lean(model.model.layers) == 2
    assert make_mlps_lean(model.model.layers) == 0  # idempotent
    assert set(model.state_dict()) == keys
    ids = torch.randint(0, 50, (2, 5))
    assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_triton_silu_mul_inside_the_mlp(kind, monkeypatch):
    from olakernels.silu_mul.impl import triton as silu_triton

    inplace = []
    real_bwd = silu_triton.silu_mul_bwd
    monkeypatch.setattr(silu_triton, "silu_mul_bwd",
                        lambda *a, **kw: inplace.append(kw.get("inplace"))
                        or real_bwd(*a, **kw))
    mlp = _mlp(kind).to(torch.bfloat16).requires_grad_(False)
    lean = LeanSwiGLUMLP(copy.deepcopy(mlp))
    lean.impl = "triton"  # what OlaVLM.set_impl("triton") sets; "auto" picks it on GPUs
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    x64 = x.double().requires_grad_(True)
    ref = copy.deepcopy(mlp).double()(x64)
    ref.backward(torch.ones_like(ref))
    outs = {}
    for name, module in (("eager", mlp), ("lean", lean)):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.backward(torch.ones_like(y))
        outs[name] = (y, xi.grad)
    assert_close_to_reference(outs["lean"][0], ref, outs["eager"][0], name=f"{kind} out")
    assert_close_to_reference(outs["lean"][1], x64.grad, outs["eager"][1],
                              name=f"{kind} grad_x", reduction_size=80)
    assert inplace == [True]  # the gradients went over the MLP's own gate and up
    with torch.no_grad():  # inference keeps the decoder's own ops: bit for bit
        assert torch.equal(lean(x), mlp(x))


@pytest.mark.parametrize("kind", ["llama", "phi3"])
def test_triton_silu_mul_in_place_under_activation_checkpointing(kind):
    """The trainer's activation checkpointing recomputes the block in the backward: the in-place
    silu_mul backward then overwrites the recomputed gate and up, and the gradients must equal
    those of the same MLP without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    lean = LeanSwiGLUMLP(_mlp(kind).to(torch.bfloat16))
    lean.impl = "triton"
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2)).bfloat16()
    grads = []
    for ac in (False, True):
        lean.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = checkpoint(lean, xi, use_reentrant=False) if ac else lean(xi)
        (y.float() ** 2).sum().backward()
        grads.append([xi.grad] + [p.grad for p in lean.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        assert torch.equal(plain, recomputed)
