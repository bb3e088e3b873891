# rotary_embedding: Triton and torch paths against the float64 oracle, layouts, gradients, errors.
from __future__ import annotations

import importlib

import pytest
import torch

from olakernels import rotary_embedding
from olakernels.rotary_embedding import rotary_embedding_ref
from olakernels.testing import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (B, L, Hq, Hk, D): Llama-3's grouping (4 query heads per key head) and head_dim 128, scaled
# down in B and L; a ragged case (prime length, 5 heads over 1, half-dim 12: not a power of 2);
# one token with one head of the smallest head_dim.
SHAPES = {"llama_gqa": (2, 37, 8, 2, 128), "ragged": (3, 13, 5, 1, 24), "tiny": (1, 1, 1, 1, 2)}


def _rope_tables(batch: int, length: int, dim: int, *, per_sample: bool, seed: int = 0):
    """Real RoPE tables (theta 500000, as Llama-3), positions shifted per sample when
    ``per_sample`` (packed or offset sequences), in fp32."""
    g = torch.Generator().manual_seed(seed)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    offsets = torch.randint(0, 4000, (batch if per_sample else 1, 1), generator=g)
    pos = (torch.arange(length)[None, :] + offsets).double()
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


def _inputs(shape, dtype, *, transposed=True, per_sample=True, seed=1):
    b, length, hq, hk, d = shape
    g = torch.Generator().manual_seed(seed)
    if transposed:  # Hugging Face: proj(x).view(B, L, H, D).transpose(1, 2)
        q = torch.randn(b, length, hq, d, generator=g).transpose(1, 2)
        k = torch.randn(b, length, hk, d, generator=g).transpose(1, 2)
    else:
        q = torch.randn(b, hq, length, d, generator=g)
        k = torch.randn(b, hk, length, d, generator=g)
    cos, sin = _rope_tables(b, length, d, per_sample=per_sample)
    return q.to(dtype), k.to(dtype), cos.to(dtype), sin.to(dtype)


def _run(impl, q, k, cos, sin, grads):
    # clone() keeps the (transposed) strides of q and k
    qi, ki = q.detach().clone().requires_grad_(True), k.detach().clone().requires_grad_(True)
    outs = rotary_embedding(qi, ki, cos, sin, impl=impl) if impl != "eager" else \
        rotary_embedding_ref(qi, ki, cos, sin)
    torch.autograd.backward(outs, grads)
    return outs, (qi.grad, ki.grad)


def _check_against_oracle(impl, q, k, cos, sin, *, label):
    """Outputs and both gradients of ``impl`` within the budget of eager in q's dtype."""
    g = torch.Generator().manual_seed(5)
    grads = tuple(torch.randn(t.shape, generator=g).to(q.dtype).to(q.device) for t in (q, k))
    ref = _run("reference", *(t.double() for t in (q, k, cos, sin)),
               tuple(t.double() for t in grads))
    eager = _run("eager", q, k, cos, sin, grads)
    out = _run(impl, q, k, cos, sin, grads)
    names = (("q'", "k'"), ("grad_q", "grad_k"))
    for part in range(2):  # outputs, then gradients
        for i, name in enumerate(names[part]):
            o, r = out[part][i], ref[part][i]
            assert o.dtype == q.dtype and o.shape == r.shape
            assert_close_to_reference(o, r, eager[part][i], name=f"{label} {name}",
                                      reduction_size=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(SHAPES), ids=str)
@pytest.mark.parametrize("per_sample", [True, False], ids=["cos_per_sample", "cos_shared"])
def test_triton_matches_float64_oracle(shape, dtype, per_sample):
    q, k, cos, sin = _inputs(SHAPES[shape], dtype, per_sample=per_sample)
    _check_against_oracle("triton", q, k, cos, sin, label=shape)


def test_any_tables_not_only_equal_halves():
    # Real tables repeat their frequencies in both halves; the kernel must not rely on it.
    q, k, _, _ = _inputs(SHAPES["ragged"], torch.float32)
    g = torch.Generator().manual_seed(9)
    cos, sin = torch.randn(2, 3, 13, 24, generator=g)
    q.requires_grad_(True)
    k.requires_grad_(True)
    out = rotary_embedding(q, k, cos, sin, impl="triton")
    q64, k64 = (t.detach().double().requires_grad_(True) for t in (q, k))
    ref = rotary_embedding_ref(q64, k64, cos.double(), sin.double())
    grads = [torch.randn(t.shape, generator=g) for t in out]
    torch.autograd.backward(out, grads)
    torch.autograd.backward(ref, [t.double() for t in grads])
    for got, want in zip((*out, q.grad, k.grad), (*ref, q64.grad, k64.grad), strict=True):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_outputs_keep_the_input_layout_and_strided_inputs_work():
    q, k, cos, sin = _inputs(SHAPES["llama_gqa"], torch.float32, transposed=True)
    out_q, out_k = rotary_embedding(q, k, cos, sin, impl="triton")
    assert out_q.stride() == q.stride() and out_k.stride() == k.stride()
    ref_q, ref_k = rotary_embedding_ref(q, k, cos, sin)
    torch.testing.assert_close(out_q, ref_q)
    torch.testing.assert_close(out_k, ref_k)
    # A view with a strided last dimension is copied first, not misread.
    wide = torch.randn(*q.shape[:-1], 2 * q.shape[-1])[..., ::2]
    got, _ = rotary_embedding(wide, k, cos, sin, impl="triton")
    torch.testing.assert_close(got, rotary_embedding_ref(wide, k, cos, sin)[0])


def test_torch_and_auto_paths_are_the_formula():
    q, k, cos, sin = _inputs(SHAPES["ragged"], torch.bfloat16)
    ref = rotary_embedding_ref(q, k, cos, sin)
    for impl in ("torch", "auto", "reference"):
        got = rotary_embedding(q, k, cos, sin, impl=impl)
        assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True)), impl


def test_partial_gradients_and_unused_outputs():
    q, k, cos, sin = _inputs(SHAPES["ragged"], torch.float32)
    q.requires_grad_(True)  # k is frozen; only q' is used
    out_q, out_k = rotary_embedding(q, k, cos, sin, impl="triton")
    assert not out_k.requires_grad
    out_q.sum().backward()
    ref_q, _ = rotary_embedding_ref(q.detach().double().requires_grad_(True), k.double(),
                                    cos.double(), sin.double())
    q64 = q.detach().double().requires_grad_(True)
    rotary_embedding_ref(q64, k.double(), cos.double(), sin.double())[0].sum().backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-5, atol=1e-6)
    # Both require grad, only k' is used: q's gradient is zero.
    q2, k2 = q.detach().requires_grad_(True), k.clone().requires_grad_(True)
    rotary_embedding(q2, k2, cos, sin, impl="triton")[1].sum().backward()
    assert torch.equal(q2.grad, torch.zeros_like(q2)) and k2.grad.abs().sum() > 0


def test_double_backward_is_exact():
    # A gradient penalty differentiates the backward: it must be the torch path's answer.
    q, k, cos, sin = _inputs(SHAPES["ragged"], torch.float64)
    results = []
    for impl in ("torch", "triton"):
        qi = q.clone().requires_grad_(True)
        ki = k.clone().requires_grad_(True)
        out_q, out_k = rotary_embedding(qi, ki, cos, sin, impl=impl) if impl == "torch" else \
            rotary_embedding(qi.float(), ki.float(), cos.float(), sin.float(), impl=impl)
        g_q, g_k = torch.autograd.grad((out_q ** 3).sum() + (out_k ** 3).sum(), (qi, ki),
                                       create_graph=True)
        penalty = (g_q ** 2).sum() + (g_k ** 2).sum() + (qi ** 2).sum()
        results.append(torch.autograd.grad(penalty, (qi, ki)))
    for want, got in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_saves_only_cos_and_sin():
    q, k, cos, sin = _inputs(SHAPES["llama_gqa"], torch.bfloat16)
    q.requires_grad_(True)
    k.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rotary_embedding(q, k, cos, sin, impl="triton")
    assert len(saved) == 2 and {t.data_ptr() for t in saved} == {cos.data_ptr(), sin.data_ptr()}


def test_gradcheck_float64_torch_path_and_triton_fp32_against_it():
    q, k, cos, sin = _inputs((1, 3, 2, 1, 4), torch.float64)
    q.requires_grad_(True)
    k.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: rotary_embedding(a, b, cos, sin, impl="torch"),
                                    (q, k))


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_compile_fullgraph_traces_the_torch_path(impl):
    q, k, cos, sin = _inputs(SHAPES["ragged"], torch.float32)
    fn = torch.compile(lambda a, b, c, s: rotary_embedding(a, b, c, s, impl=impl),
                       fullgraph=True, backend="aot_eager")
    got = fn(q, k, cos, sin)
    ref = rotary_embedding_ref(q, k, cos, sin)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b)


def test_bad_inputs_name_the_argument():
    q, k, cos, sin = _inputs(SHAPES["ragged"], torch.float32)
    cases = [
        ((q[0], k, cos, sin), "q and k must be (B, heads, L, head_dim)"),
        ((q, k[:, :, :5], cos, sin), "must share q's batch, length and head_dim"),
        ((q[..., :23], k[..., :23], cos[..., :23], sin[..., :23]), "head_dim must be even"),
        ((q, k, cos, sin[:, :5]), "must have the same shape"),
        ((q, k, cos[:, :5], sin[:, :5]), "cos and sin must be (B=3 or 1, L=13, head_dim=24)"),
        ((q[:1], k[:1], cos[:1, :, :12], sin[:1, :, :12]),  # Phi-4-mini-like partial rotary
         "must be (B=1, L=13, head_dim=24) for q (1, 5, 13, 24), got (1, 13, 12) (a partial "
         "rotary factor"),
        ((q.long(), k, cos, sin), "q must be a floating tensor"),
        ((q, k, cos.requires_grad_(True), sin), "not supported"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            rotary_embedding(*args, impl="triton")
    cos.requires_grad_(False)
    with pytest.raises(ValueError, match="impl must be one of"):
        rotary_embedding(q, k, cos, sin, impl="cuda")
    with pytest.raises(ValueError, match="q and k of one dtype"):
        rotary_embedding(q, k.double(), cos, sin, impl="triton")


def test_mixed_dtypes_rotate_each_tensor_in_its_own_dtype(monkeypatch):
    """q and k of different dtypes: "reference" rotates k with tables in k's dtype (not q's),
    and "auto" picks the torch path even where it would pick the one-dtype kernel."""
    q, k, cos, sin = _inputs(SHAPES["ragged"], torch.float32)
    for q_, k_ in ((q.bfloat16(), k), (q, k.bfloat16())):
        torch_out = rotary_embedding(q_, k_, cos, sin, impl="torch")
        ref_out = rotary_embedding(q_, k_, cos, sin, impl="reference")
        oracle = rotary_embedding_ref(q_.double(), k_.double(), cos.double(), sin.double())
        for got, want, x in zip(ref_out, oracle, (q_, k_), strict=True):
            assert got.dtype == x.dtype
            assert_close_to_reference(got, want, rotary_embedding_ref(
                x, x, cos.to(x.dtype), sin.to(x.dtype))[0], name="reference")
        for got, want in zip(torch_out, ref_out, strict=True):
            assert got.dtype == want.dtype
    # (by module name: olakernels.rotary_embedding, the attribute, is the function)
    api = importlib.import_module("olakernels.rotary_embedding.api")
    monkeypatch.setattr(api, "resolve_impl", lambda impl, *a: "triton" if impl == "auto"
                        else impl)  # as on a CUDA q
    out = rotary_embedding(q.bfloat16(), k, cos, sin, impl="auto")
    assert out[0].dtype == torch.bfloat16 and out[1].dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_llama3_shape(dtype):
    q, k, cos, sin = (t.cuda() for t in _inputs((2, 676, 32, 8, 128), dtype))
    _check_against_oracle("auto", q, k, cos, sin, label="gpu")
