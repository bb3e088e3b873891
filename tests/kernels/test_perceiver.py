# Tests of the perceiver resampler heads: fast paths against the float64 seed reference.
import copy
import re

import pytest
import torch

from olakernels.perceiver import (
    EmbeddingPredictorHead,
    PerceiverResampler,
    TaskTokenResampler,
    adapt_latents,
)
from olakernels.perceiver.impl import triton as triton_impl
from olakernels.testing import assert_close_to_reference

E = 96  # the LLM hidden size, scaled down (Llama-3: 4096)


def _head(task: str) -> torch.nn.Module:
    """The three pre-training heads of SPEC 2.2, scaled down (queries 576 -> 36)."""
    torch.manual_seed(0)
    common = dict(depth=1, dim_head=8, heads=4, embedding_dim=E, ff_mult=1)
    if task == "gen":  # 1 query from the mean of the 8 gen-token states; dim = output_dim
        return TaskTokenResampler(dim=64, num_queries=1, output_dim=64, **common)
    if task == "seg":  # many shared queries; dim = output_dim, "1536-like"
        return TaskTokenResampler(dim=48, num_queries=36, output_dim=48, **common)
    if task == "depth":  # dim = the LLM hidden size, plus the depth MLPs
        projector = TaskTokenResampler(dim=E, num_queries=36, output_dim=32, **common)
        return EmbeddingPredictorHead(projector, num_mlps=3)
    # ragged: odd sizes everywhere, two blocks, learned latents
    return PerceiverResampler(dim=40, depth=2, dim_head=7, heads=3, num_queries=5,
                              embedding_dim=29, output_dim=11, ff_mult=2)


def _inputs(task: str, batch: int = 3, tokens: int = 20):
    g = torch.Generator().manual_seed(1)
    emb = 29 if task == "ragged" else E
    x = torch.randn(batch, tokens, emb, generator=g)
    if task == "gen":
        latents = torch.randn(batch, 8, E, generator=g)  # per-sample task-token states
    elif task in ("seg", "depth"):
        latents = torch.randn(36, E, generator=g)  # a shared task-token parameter
    else:
        latents = None
    return x, latents


def _run(module, impl, x, latents, dtype, mask=None):
    module = copy.deepcopy(module).to(dtype)
    module.impl = impl  # "depth" wraps the resampler: set it where it lives
    if isinstance(module, EmbeddingPredictorHead):
        module.projector.impl = impl
    x = x.to(dtype)
    lat = None if latents is None else latents.detach().to(dtype).clone().requires_grad_(True)
    args = (x,) if isinstance(module, PerceiverResampler) and lat is None else (x, lat)
    out = module(*args, attend_mask=mask) if mask is not None else module(*args)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (out * w.to(device=out.device, dtype=dtype)).sum().backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    if lat is not None:
        grads["<latents>"] = lat.grad
    return out, grads


TASKS = ["gen", "seg", "depth", "ragged"]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("task", TASKS)
def test_matches_reference(task, dtype, impl):
    module = _head(task)
    x, latents = _inputs(task)
    out, grads = _run(module, impl, x, latents, dtype)
    ref, r_grads = _run(module, "reference", x, latents, torch.float64)
    eager, e_grads = _run(module, "reference", x, latents, dtype)
    assert_close_to_reference(out, ref, eager, name=f"{task}.{impl}.out", k=3.0)
    assert set(grads) == set(r_grads)
    for name, grad in grads.items():
        assert_close_to_reference(grad, r_grads[name], e_grads[name], k=3.0,
                                  name=f"{task}.{impl}.grad[{name}]", reduction_size=x.shape[1])


def test_depth_head_computes_only_linear_1():
    head = _head("depth")
    x, latents = _inputs("depth")
    out = head(x, latents)
    v = head.projector(x, latents)
    torch.testing.assert_close(out, head.linear_1(v))
    vis = head.visualisation_outputs(x, latents)
    assert len(vis) == 4 and torch.allclose(vis[1], head.linear_2(v))
    out.sum().backward()
    assert head.linear_2[0].weight.grad is None and head.linear_3[0].weight.grad is None


@pytest.mark.parametrize("n, expected", [(12, "tiled"), (5, "mean"), (36, "same")])
def test_latents_adaptation_rule(n, expected):
    lat = torch.randn(2, n, 4)
    out = adapt_latents(lat, 36)
    assert out.shape == (2, 36, 4)
    if expected == "tiled":  # [l0..l11, l0..l11, l0..l11], as Tensor.repeat
        torch.testing.assert_close(out, torch.cat([lat] * 3, dim=1))
    elif expected == "mean":
        torch.testing.assert_close(out, lat.mean(1, keepdim=True).expand(2, 36, 4))
    else:
        assert out is lat
    torch.testing.assert_close(adapt_latents(torch.ones(1, 8, 3), 1), torch.ones(1, 1, 3))


@pytest.mark.parametrize("task, latents_shape, expected", [
    ("gen", (3, 8), "reference"),  # per-sample latents, one query: nothing to share
    ("gen", (3, 40), "reference"),  # many latents, still one query after the adaptation
    ("seg", (3, 36), "torch"),  # per-sample, but 36 queries (> AUTO_REFERENCE_MAX_LATENTS)
    ("seg", (36,), "torch"),  # a shared task-token parameter
    ("seg", (1, 36), "torch"),
    ("ragged", None, "torch"),  # learned latents
])
def test_auto_runs_the_path_measured_faster(task, latents_shape, expected, monkeypatch):
    """impl="auto": the seed's eager math for per-sample latents and few queries (the gen head),
    else the fast path with PyTorch's LayerNorm/GELU (docs/ops/perceiver.md)."""
    from olakernels.perceiver.impl import fast, reference

    ran = []
    for module, name in ((reference, "resampler_ref"), (fast, "resampler_fast")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, _n=name: ran.append(_n) or _r(*a))
    head = _head(task)
    x, _ = _inputs(task)
    emb = x.shape[-1]
    latents = None if latents_shape is None else torch.randn(*latents_shape, emb)
    args = (x,) if latents is None else (x, latents)
    out = head(*args)
    assert ran == ["resampler_ref" if expected == "reference" else "resampler_fast"]
    assert out.shape[:2] == (x.shape[0], head.num_queries)


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_shared_latents_equal_per_sample_copies(impl):
    head = _head("seg")
    head.impl = impl
    x, latents = _inputs("seg")
    shared = head(x, latents)
    copies = head(x, latents.expand(x.shape[0], -1, -1))
    torch.testing.assert_close(shared, copies, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["reference", "torch", "triton"])
def test_attend_mask_equals_slicing_the_padding_away(impl):
    head = _head("gen")
    head.impl = impl
    x, latents = _inputs("gen", batch=2, tokens=20)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 13:] = False  # the second sample has 7 padding positions
    masked = head(x, latents, attend_mask=mask)
    sliced = head(x[1:, :13], latents[1:])
    torch.testing.assert_close(masked[1:], sliced, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked[:1], head(x[:1], latents[:1]), rtol=1e-5, atol=1e-6)


def _seed_depth_head_keys(depth: int = 1) -> list[str]:
    """The key names of a seed depth head (SPEC 11), written out independently of our modules."""
    keys = [f"projector.{m}.{p}" for m in ("proj_in", "proj_out", "norm_out")
            for p in ("weight", "bias")]
    for j in range(depth):
        a = f"projector.layers.{j}.0"
        keys += [f"{a}.{n}.{p}" for n in ("norm1", "norm2") for p in ("weight", "bias")]
        keys += [f"{a}.to_q.weight", f"{a}.to_kv.weight", f"{a}.to_out.weight"]
        f = f"projector.layers.{j}.1"
        keys += [f"{f}.0.weight", f"{f}.0.bias", f"{f}.1.weight", f"{f}.3.weight"]
    keys += [f"linear_{i}.{k}.{p}" for i in (1, 2, 3) for k in (0, 2) for p in ("weight", "bias")]
    return keys


def test_loads_a_seed_layout_state_dict():
    head = _head("depth")
    seed_keys = _seed_depth_head_keys()
    assert sorted(head.state_dict()) == sorted(seed_keys)
    seed_state = {k: torch.randn_like(v) for k, v in head.state_dict().items()}
    fresh = _head("depth")
    fresh.load_state_dict(seed_state, strict=True)
    torch.testing.assert_close(fresh.projector.layers[0][0].to_kv.weight,
                               seed_state["projector.layers.0.0.to_kv.weight"])
    learned = _head("ragged")
    assert "latents" in learned.state_dict() and learned.latents.shape == (1, 5, 40)


def _bad_cases():
    head = _head("seg")
    x, latents = _inputs("seg")
    yield "x_hidden", lambda: head(torch.randn(3, 20, 7), latents), "x must have shape"
    yield "lat_hidden", lambda: head(x, torch.randn(36, 7)), "latents must have shape"
    yield "lat_empty", lambda: head(x, torch.randn(3, 0, E)), "n >= 1"
    yield "lat_batch", lambda: head(x, torch.randn(2, 36, E)), "B in (1, 3)"
    yield "mask_shape", lambda: head(x, latents, torch.ones(3, 19, dtype=torch.bool)), "(B, N)"
    yield "mask_dtype", lambda: head(x, latents, torch.ones(3, 20)), "bool tensor"
    yield "impl", lambda: TaskTokenResampler(impl="cuda"), "impl must be one of"
    yield "dims", lambda: TaskTokenResampler(dim=0), "dim must be a positive int"
    yield "bool_heads", lambda: TaskTokenResampler(heads=True), "heads must be a positive int"
    learned = EmbeddingPredictorHead(_head("ragged"))
    x29 = torch.randn(3, 20, 29)
    yield "head_latents", lambda: learned(x29, torch.randn(5, 40)), "pass latents=None"


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_bad_input_errors(case):
    _, call, message = case
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_inputs_of_the_wrong_kind_are_named():
    """A PyTorch-style key_padding_mask (True = padding) would attend only the padding here:
    the name is refused; lists, an empty batch, a mask on another device and float64 on the
    Triton kernels are named, not an AttributeError or a silent fp32 result."""
    head, (x, latents) = _head("seg"), _inputs("seg")
    pad = torch.zeros(3, 20, dtype=torch.bool)
    for call in (lambda: head(x, latents, key_padding_mask=pad),
                 lambda: EmbeddingPredictorHead(head)(x, latents, key_padding_mask=pad)):
        with pytest.raises(TypeError, match=r"attend_mask=~key_padding_mask"):
            call()
    with pytest.raises(TypeError, match="x must be a Tensor"):
        head(x.tolist(), latents)
    with pytest.raises(TypeError, match="attend_mask must be a bool Tensor"):
        head(x, latents, pad.tolist())
    with pytest.raises(ValueError, match="with B >= 1"):
        head(x[:0], latents)
    with pytest.raises(ValueError, match="attend_mask must be on x's device cpu, got meta"):
        head(x, latents, pad.to("meta"))
    triton_head = copy.deepcopy(head).double()
    triton_head.impl = "triton"
    with pytest.raises(NotImplementedError, match="no float64 kernels"):
        triton_head(x.double(), latents.double())


def test_the_depth_mlps_take_their_width():
    """mlp_dim: Linear(output_dim, mlp_dim), ReLU, Linear(mlp_dim, output_dim) (it built
    mlp_dim x mlp_dim layers that could not take the projector's output)."""
    head = EmbeddingPredictorHead(_head("seg"), num_mlps=3, mlp_dim=10)
    x, latents = _inputs("seg")
    out = head(x, latents)
    assert out.shape == (3, 36, 48) and head.linear_2[0].weight.shape == (10, 48)
    assert [v.shape for v in head.visualisation_outputs(x, latents)] == [(3, 36, 48)] * 4


def test_the_reference_is_a_float64_oracle_in_float64():
    """Its softmax is the seed's fp32 for half-precision scores but stays float64 for float64
    ones (it rounded them to fp32: a float64 'oracle' 5e-8 off)."""
    head, (x, latents) = _head("seg").double(), _inputs("seg")
    x, latents = x.double(), latents.double()
    head.impl = "reference"
    ref = head(x, latents)
    head.impl = "torch"  # SDPA in float64: another route to the same float64 math
    torch.testing.assert_close(head(x, latents), ref, rtol=1e-12, atol=1e-12)


# ---- the Triton LayerNorm and GELU on their own ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(4, 33, 96), (7, 1500)], ids=["tokens", "wide_ragged"])
def test_triton_layer_norm_and_gelu(shape, dtype):
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    b = (0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)

    def ln(impl_dtype, use_triton):
        xx, ww, bb = (t.to(impl_dtype).clone().requires_grad_(True) for t in (x, w, b))
        if use_triton:
            y = triton_impl.layer_norm_fwd(xx, ww, bb, 1e-5)[0]
        else:
            y = torch.nn.functional.layer_norm(xx, (shape[-1],), ww, bb, 1e-5)
        y.backward(dy.to(impl_dtype))
        return [y, xx.grad, ww.grad, bb.grad]

    def gelu(impl_dtype, use_triton):
        xx = x.to(impl_dtype).clone().requires_grad_(True)
        y = triton_impl.gelu_fwd(xx) if use_triton else torch.nn.functional.gelu(xx)
        y.backward(dy.to(impl_dtype))
        return [y, xx.grad]

    for name, fn in (("layer_norm", ln), ("gelu", gelu)):
        outs, refs, eagers = fn(dtype, True), fn(torch.float64, False), fn(dtype, False)
        for i, (o, r, e) in enumerate(zip(outs, refs, eagers, strict=True)):
            assert_close_to_reference(o, r, e, name=f"{name}[{i}]", k=3.0,
                                      reduction_size=x.numel() // shape[-1] if i > 1 else 1)


def test_opcheck_layer_norm_and_gelu():
    x = torch.randn(5, 24, requires_grad=True)
    w, b = torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True)
    torch.library.opcheck(triton_impl.layer_norm_fwd, (x, w, b, 1e-5))
    torch.library.opcheck(triton_impl.gelu_fwd, (x,))
    with torch.no_grad():
        _, mean, rstd = triton_impl.layer_norm_fwd(x, w, b, 1e-5)
    torch.library.opcheck(triton_impl.layer_norm_bwd, (torch.randn(5, 24), x.detach(),
                                                       w.detach(), mean, rstd))
    torch.library.opcheck(triton_impl.gelu_bwd, (torch.randn(5, 24), x.detach()))
    # A transposed input: the kernels' outputs are contiguous, and so must the fakes' be
    # (torch.compile checks the strides the fakes promise).
    xt = torch.randn(24, 5).t().requires_grad_(True)
    torch.library.opcheck(triton_impl.layer_norm_fwd, (xt, w, b, 1e-5))
    torch.library.opcheck(triton_impl.gelu_fwd, (xt,))
    torch.library.opcheck(triton_impl.gelu_bwd, (torch.randn(24, 5).t(), xt.detach()))
    with torch.no_grad():
        _, mean, rstd = triton_impl.layer_norm_fwd(xt, w, b, 1e-5)
    torch.library.opcheck(triton_impl.layer_norm_bwd, (torch.randn(24, 5).t(), xt.detach(),
                                                       w.detach(), mean, rstd))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_layer_norm_fp32_out_is_autocasts_layer_norm(dtype):
    """``fp32_out`` (what CUDA autocast's LayerNorm returns): the fp32 output is LayerNorm in
    fp32 of the half-precision input, rounded once by whoever casts it next; the input's
    gradient comes back in its own dtype; the fake promises the same dtypes."""
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(5, 33, 96, generator=g) * 3 + 1).to(dtype)
    w, b = 1 + 0.1 * torch.randn(96, generator=g), 0.1 * torch.randn(96, generator=g)
    dy = torch.randn(5, 33, 96, generator=g)

    def run(fn, cast=None):
        xx, ww, bb = (t.to(cast or t.dtype).clone().requires_grad_(True) for t in (x, w, b))
        y = fn(xx, ww, bb)
        y.backward(dy.to(y.dtype))
        return [y, xx.grad, ww.grad, bb.grad]

    got = run(lambda xx, ww, bb: triton_impl.layer_norm_fwd(xx, ww, bb, 1e-5, True)[0])
    # Eager under CUDA autocast: every input cast to fp32, the gradients cast back.
    eager = run(lambda xx, ww, bb: torch.nn.functional.layer_norm(
        xx.float(), (96,), ww.float(), bb.float(), 1e-5))
    ref = run(lambda xx, ww, bb: torch.nn.functional.layer_norm(xx, (96,), ww, bb, 1e-5),
              torch.float64)
    assert [t.dtype for t in got] == [torch.float32, dtype, torch.float32, torch.float32]
    assert [t.dtype for t in got] == [t.dtype for t in eager]
    for i, (o, r, e) in enumerate(zip(got, ref, eager, strict=True)):
        assert_close_to_reference(o, r, e, name=f"layer_norm_fp32_out[{i}]", k=3.0,
                                  reduction_size=5 * 33 if i > 1 else 1)
    torch.library.opcheck(triton_impl.layer_norm_fwd,
                          (x.clone().requires_grad_(True), w, b, 1e-5, True))


def test_triton_layer_norm_of_no_rows():
    """An empty input (no tokens): zero weight gradients, not a division by zero."""
    x = torch.randn(0, 24, requires_grad=True)
    w, b = torch.randn(24, requires_grad=True), torch.randn(24, requires_grad=True)
    y = triton_impl.layer_norm_fwd(x, w, b, 1e-5)[0]
    y.sum().backward()
    assert x.grad.shape == (0, 24)
    assert torch.equal(w.grad, torch.zeros(24)) and torch.equal(b.grad, torch.zeros(24))


# ---- GPU: the real head sizes (H = 4096), compiled LayerNorm/GELU, SDPA's GPU kernels ----

GPU_HEADS = {
    "depth": dict(dim=4096, num_queries=576, output_dim=1024, latents=(576,)),
    "seg": dict(dim=1536, num_queries=576, output_dim=1536, latents=(576,)),
    "gen": dict(dim=1024, num_queries=1, output_dim=1024, latents=(2, 8)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("task", GPU_HEADS)
def test_gpu_real_head_sizes(task):
    spec = dict(GPU_HEADS[task])
    lat_shape = spec.pop("latents") + (4096,)
    torch.manual_seed(0)
    head = TaskTokenResampler(depth=1, dim_head=32, heads=4, embedding_dim=4096, ff_mult=1,
                              **spec).cuda()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 300, 4096, generator=g).cuda()
    latents = torch.randn(lat_shape, generator=g).cuda()
    out, grads = _run(head, "triton", x, latents, torch.bfloat16)
    ref, r_grads = _run(head, "reference", x, latents, torch.float64)
    eager, e_grads = _run(head, "reference", x, latents, torch.bfloat16)
    assert_close_to_reference(out, ref, eager, name=f"{task}.out", k=3.0)
    for name in ("proj_in.weight", "layers.0.0.to_kv.weight", "layers.0.1.1.weight",
                 "<latents>"):
        assert_close_to_reference(grads[name], r_grads[name], e_grads[name], k=3.0,
                                  name=f"{task}.grad[{name}]", reduction_size=300)


@pytest.mark.gpu
@pytest.mark.parametrize("task", ["seg", "ragged"])
def test_gpu_triton_head_under_autocast_returns_eagers_dtype(task):
    """An fp32 head under CUDA bf16 autocast: eager's final LayerNorm returns fp32 (CUDA
    autocast's fp32 policy), and so does the Triton path (fp32_out), with eager's values."""
    module, (x, latents) = _head(task).cuda(), _inputs(task)
    x = x.cuda()
    latents = None if latents is None else latents.cuda()
    outs = {}
    for impl in ("reference", "triton"):
        head = copy.deepcopy(module)
        head.impl = impl
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outs[impl] = head(x) if latents is None else head(x, latents)
    assert outs["triton"].dtype == outs["reference"].dtype == torch.float32
    torch.testing.assert_close(outs["triton"], outs["reference"], rtol=1.6e-2, atol=1e-2)
