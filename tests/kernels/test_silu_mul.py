# silu_mul: Triton and torch paths against the float64 oracle, strided halves, saving, errors.
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from olakernels import silu_mul
from olakernels.silu_mul import silu_mul_ref
from olakernels.testing import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows..., N): a decoder's (B, L, intermediate) scaled down; a ragged one whose N crosses the
# kernel's 1024-column block with a prime remainder; a single element.
SHAPES = {"decoder": (2, 37, 448), "ragged": (3, 13, 1031), "tiny": (1, 1, 1)}


def _inputs(shape, dtype, *, chunked=False, seed=0):
    """gate and up with SwiGLU's scale (pre-activations of a Linear); ``chunked``: the two
    halves of one (..., 2N) tensor, as Phi-3's gate_up_proj gives (row-strided views)."""
    g = torch.Generator().manual_seed(seed)
    if chunked:
        both = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 2).to(dtype)
        return both.chunk(2, dim=-1)
    return ((torch.randn(shape, generator=g) * 2).to(dtype),
            torch.randn(shape, generator=g).to(dtype))


def _run(impl, gate, up, grad):
    gi, ui = gate.detach().clone().requires_grad_(True), up.detach().clone().requires_grad_(True)
    y = silu_mul(gi, ui, impl=impl) if impl != "eager" else F.silu(gi) * ui
    y.backward(grad)
    return y, gi.grad, ui.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
def test_triton_matches_float64_oracle(shape, dtype):
    gate, up = _inputs(SHAPES[shape], dtype)
    grad = torch.randn(SHAPES[shape], generator=torch.Generator().manual_seed(3)).to(dtype)
    ref = _run("reference", gate.double(), up.double(), grad.double())
    eager = _run("eager", gate, up, grad)
    out = _run("triton", gate, up, grad)
    for name, o, r, e in zip(("y", "grad_gate", "grad_up"), out, ref, eager, strict=True):
        assert o.dtype == dtype and o.shape == r.shape
        assert_close_to_reference(o, r, e, name=f"{shape} {name}")


def test_chunked_halves_without_a_copy():
    gate, up = _inputs(SHAPES["ragged"], torch.bfloat16, chunked=True)
    assert not gate.is_contiguous()
    grad = torch.randn(SHAPES["ragged"]).bfloat16()
    ref = _run("reference", gate.double(), up.double(), grad.double())
    eager = _run("eager", gate, up, grad)
    out = _run("triton", gate, up, grad)
    for name, o, r, e in zip(("y", "grad_gate", "grad_up"), out, ref, eager, strict=True):
        assert_close_to_reference(o, r, e, name=f"chunked {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_path_is_eager_bit_for_bit(dtype):
    gate, up = _inputs(SHAPES["decoder"], dtype, chunked=True)
    grad = torch.randn(SHAPES["decoder"]).to(dtype)
    for got, want in zip(_run("torch", gate, up, grad), _run("eager", gate, up, grad),
                         strict=True):
        assert torch.equal(got, want)
    assert torch.equal(silu_mul(gate, up), silu_mul_ref(gate, up))  # auto on the CPU


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_saves_only_gate_and_up(impl):
    gate, up = _inputs(SHAPES["decoder"], torch.bfloat16)
    gate.requires_grad_(True)
    up.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        silu_mul(gate, up, impl=impl)
    assert sorted(t.data_ptr() for t in saved) == sorted((gate.data_ptr(), up.data_ptr()))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_double_backward_matches_the_formula(impl):
    gate, up = _inputs((3, 5, 9), torch.float64)
    results = []
    for path in ("reference", impl):
        g, u = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
        args = (g.float(), u.float()) if path == "triton" else (g, u)
        y = silu_mul(*args, impl=path)
        dg, du = torch.autograd.grad((y ** 2).sum(), (g, u), create_graph=True)
        results.append(torch.autograd.grad((dg ** 2).sum() + (du ** 2).sum(), (g, u)))
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_frozen_input_gets_no_gradient():
    gate, up = _inputs(SHAPES["ragged"], torch.float32)
    gate.requires_grad_(True)
    silu_mul(gate, up, impl="triton").sum().backward()
    g64 = gate.detach().double().requires_grad_(True)
    silu_mul_ref(g64, up.double()).sum().backward()
    torch.testing.assert_close(gate.grad.double(), g64.grad, rtol=1e-5, atol=1e-6)
    assert up.grad is None


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_compile_fullgraph_traces_the_torch_path(impl):
    gate, up = _inputs(SHAPES["ragged"], torch.float32)
    fn = torch.compile(lambda g, u: silu_mul(g, u, impl=impl), fullgraph=True,
                       backend="aot_eager")
    torch.testing.assert_close(fn(gate, up), silu_mul_ref(gate, up))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_empty_inputs_and_0d_rejected(impl):
    for shape in ((3, 0), (0, 5)):
        g = torch.randn(shape, requires_grad=True)
        u = torch.randn(shape, requires_grad=True)
        y = silu_mul(g, u, impl=impl)
        y.sum().backward()
        assert y.shape == shape and g.grad.shape == shape
    with pytest.raises(ValueError, match="at least one dimension"):
        silu_mul(torch.tensor(1.0), torch.tensor(2.0), impl=impl)


def test_bad_inputs_name_the_argument():
    gate, up = _inputs(SHAPES["ragged"], torch.float32)
    with pytest.raises(ValueError, match="gate and up must match in shape"):
        silu_mul(gate, up[..., :5])
    with pytest.raises(ValueError, match="gate and up must match in shape, dtype"):
        silu_mul(gate, up.double())
    with pytest.raises(ValueError, match="up must be a floating tensor, got torch.int64"):
        silu_mul(gate, up.long())
    with pytest.raises(ValueError, match="impl must be one of"):
        silu_mul(gate, up, impl="cuda")


# ---- inplace_backward: gradients written over gate and up (intermediates only) ----

def _intermediates(shape, dtype, chunked):
    """gate and up as a model makes them: outputs of an op on leaves that require grad (for
    ``chunked``, the two halves of one projection, Phi-3's gate_up_proj)."""
    gate, up = _inputs(shape, dtype, chunked=chunked)
    if chunked:
        both = torch.cat([gate, up], -1).requires_grad_(True)
        return both, (both * 1).chunk(2, dim=-1)
    leaves = (gate.clone().requires_grad_(True), up.clone().requires_grad_(True))
    return leaves, (leaves[0] * 1, leaves[1] * 1)


@pytest.mark.parametrize("chunked", [False, True], ids=["separate", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_gives_the_same_gradients_over_its_inputs(dtype, chunked):
    shape = SHAPES["ragged"]
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    results = []
    for inplace in (False, True):
        leaves, (gate, up) = _intermediates(shape, dtype, chunked)
        ptrs = (gate.data_ptr(), up.data_ptr())
        seen = []
        gate.register_hook(lambda g, seen=seen: seen.append(g.data_ptr()))
        up.register_hook(lambda g, seen=seen: seen.append(g.data_ptr()))
        silu_mul(gate, up, impl="triton", inplace_backward=inplace).backward(grad)
        assert (sorted(seen) == sorted(ptrs)) == inplace  # the gradients are gate's/up's memory
        results.append([t.grad for t in (leaves if isinstance(leaves, tuple) else (leaves,))])
    for want, got in zip(*results, strict=True):
        assert torch.equal(got, want)  # the same kernel math, only the destination differs


def test_inplace_backward_never_overwrites_leaves_or_a_gradient_not_needed():
    gate, up = _inputs(SHAPES["decoder"], torch.float32)
    g_leaf, u_leaf = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    silu_mul(g_leaf, u_leaf, impl="triton", inplace_backward=True).sum().backward()
    assert torch.equal(g_leaf.detach(), gate) and torch.equal(u_leaf.detach(), up)
    # Only gate's gradient wanted (up is frozen): up must stay as it was.
    g_leaf = gate.clone().requires_grad_(True)
    g_mid, u_mid = g_leaf * 1, up.clone() + 0
    silu_mul(g_mid, u_mid, impl="triton", inplace_backward=True).sum().backward()
    assert torch.equal(u_mid, up)


def test_inplace_backward_fails_loudly_when_another_node_saved_gate():
    """An op that saved gate and runs its backward after silu_mul's would read gradients:
    the version counter is bumped, so autograd raises instead."""
    (g_leaf, u_leaf), (gate, up) = _intermediates(SHAPES["decoder"], torch.float32, False)
    w = torch.randn(SHAPES["decoder"], requires_grad=True)
    other = (gate * w).sum()  # saves gate (for w's gradient); created first, so runs last
    y = silu_mul(gate, up, impl="triton", inplace_backward=True).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y + other).backward()


def _eager_grads(gate, up, grad):
    g, u = gate.detach().clone().requires_grad_(True), up.detach().clone().requires_grad_(True)
    (F.silu(g) * u).backward(grad)
    return g.grad, u.grad


def test_inplace_backward_never_writes_through_a_view_of_a_leaf():
    """A chunk of a caller's input, slices of a parameter, an expanded leaf: views whose
    grad_fn is set but whose memory is the caller's. They must keep their values."""
    both = torch.randn(3, 5, 80, requires_grad=True)
    param = torch.nn.Parameter(torch.randn(15, 80))
    row = torch.randn(1, 40, requires_grad=True)
    cases = {
        "chunk of an input": lambda: both.chunk(2, dim=-1),
        "slices of a parameter": lambda: (param[:, :40], param[:, 40:]),
        "expanded leaf": lambda: (row.expand(15, 40), row.expand(15, 40) * 1),
    }
    for name, make in cases.items():
        gate, up = make()
        before = [t.detach().clone() for t in (both, param, row)]
        silu_mul(gate, up, impl="triton", inplace_backward=True).backward(
            torch.randn(gate.shape))
        after = [t.detach() for t in (both, param, row)]
        assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), name


def test_inplace_backward_refuses_overlapping_layouts():
    """The same tensor twice, or an expanded non-leaf (rows sharing memory): writing in place
    would make the gradients alias each other. The gradients must equal eager's."""
    from olakernels.silu_mul.impl.triton import in_place_is_safe

    leaf = torch.randn(6, 40, requires_grad=True)
    grad = torch.randn(6, 40)
    cases = {
        "same tensor": lambda: (lambda h: (h, h))(leaf * 1),
        "expanded rows": lambda: ((leaf[:1] * 1).expand(6, 40), leaf * 2),
    }
    for name, make in cases.items():
        grads = []
        for fn in (lambda g, u: silu_mul(g, u, impl="triton", inplace_backward=True),
                   lambda g, u: F.silu(g) * u):
            gate, up = make()
            assert not in_place_is_safe(gate, up), name
            leaf.grad = None
            fn(gate, up).backward(grad)
            grads.append(leaf.grad)
        torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6, msg=name)
    # What the model passes is accepted: two projections, or the halves of one (Phi-3).
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(80, 8)
    assert in_place_is_safe(x @ w[:40].T, x @ w[40:].T)
    assert in_place_is_safe(*(x @ w.T).chunk(2, dim=-1))
    both = x @ w.T
    assert not in_place_is_safe(both[..., :40], both[..., 20:60])  # columns overlap
    assert in_place_is_safe(both[..., :40], both[..., 40:])


def test_inplace_backward_returns_gradients_without_a_graph():
    """The gradients share gate's and up's memory but not their place in the forward graph."""
    (g_leaf, u_leaf), (gate, up) = _intermediates(SHAPES["decoder"], torch.float32, False)
    y = silu_mul(gate, up, impl="triton", inplace_backward=True)
    dg, du = torch.autograd.grad(y, (gate, up), torch.ones_like(y))
    assert dg.grad_fn is None and du.grad_fn is None and not dg.requires_grad
    want_g, want_u = _eager_grads(g_leaf, u_leaf, torch.ones_like(y))
    torch.testing.assert_close(dg, want_g, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(du, want_u, rtol=1e-5, atol=1e-6)


def test_inplace_backward_must_be_a_bool():
    gate, up = _inputs(SHAPES["tiny"], torch.float32)
    with pytest.raises(ValueError, match="inplace_backward must be True or False"):
        silu_mul(gate, up, inplace_backward="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_llama3_shape(dtype):
    gate, up = (t.cuda() for t in _inputs((2, 676, 14336), dtype))
    grad = torch.randn(gate.shape, device="cuda").to(dtype)
    ref = _run("reference", gate.double(), up.double(), grad.double())
    eager = _run("eager", gate, up, grad)
    out = _run("auto", gate, up, grad)
    for name, o, r, e in zip(("y", "grad_gate", "grad_up"), out, ref, eager, strict=True):
        assert_close_to_reference(o, r, e, name=f"gpu {name}")


@pytest.mark.gpu
def test_gpu_inplace_backward_llama3_shape():
    """The in-place backward on the GPU: the same gradients as the out-of-place one, written
    over gate and up (the model's LeanSwiGLUMLP path)."""
    grad = torch.randn((2, 676, 14336), device="cuda").bfloat16()
    results = []
    for inplace in (False, True):
        (g_leaf, u_leaf), (gate, up) = _intermediates((2, 676, 14336), torch.bfloat16, False)
        g_leaf, u_leaf = (t.detach().cuda().requires_grad_(True) for t in (g_leaf, u_leaf))
        gate, up = g_leaf * 1, u_leaf * 1
        ptr = gate.data_ptr()
        silu_mul(gate, up, inplace_backward=inplace).backward(grad)
        assert (torch.equal(gate, g_leaf.grad) and ptr == gate.data_ptr()) == inplace
        results.append((g_leaf.grad, u_leaf.grad))
    for want, got in zip(*results, strict=True):
        assert torch.equal(got, want)
