# Tests of linear_cross_entropy: triton and torch paths against the float64 eager reference.
import re

import pytest
import torch

from olakernels import LinearCrossEntropy, linear_cross_entropy
from olakernels.linear_cross_entropy.impl import triton as triton_impl
from olakernels.testing import (
    assert_close_to_reference,
    make_lm_head_inputs,
    track_peak_memory,
)

# (leading shape of hidden/labels, H, V). Scaled down for the Triton interpreter.
SHAPES = {
    "llama_like": ((2, 24), 64, 512),  # (B, L) tokens, aligned H and V (real: H 4096, V 128256)
    "ragged": ((37,), 23, 101),  # prime sizes: partial tiles in every dimension
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FAST_IMPLS = ["triton", "torch"]


def _run(impl, hidden, weight, labels, bias=None, *, grad_weights=None, freeze=(), **opts):
    """Loss and gradients of one impl on fresh leaves (frozen names get no grad)."""
    leaves = {"hidden": hidden, "weight": weight, "bias": bias}
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(k not in freeze)
              for k, v in leaves.items()}
    out = linear_cross_entropy(leaves["hidden"], leaves["weight"], labels, bias=leaves["bias"],
                               impl=impl, return_stats=True, **opts)
    loss = out.loss
    if loss.dim():  # reduction="none": a weighted sum exercises per-token gradients
        loss = (loss * grad_weights.to(loss.dtype)).sum()
    loss.backward()
    grads = {k: None if v is None else v.grad for k, v in leaves.items()}
    return out, grads


def _check(impl, inputs, **opts):
    hidden, weight, labels, bias = inputs
    n_tokens = labels.numel()
    g = torch.rand(labels.shape, generator=torch.Generator().manual_seed(3))
    out, grads = _run(impl, hidden, weight, labels, bias, grad_weights=g, **opts)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ref, r_grads = _run("reference", d(hidden), d(weight), labels, d(bias), grad_weights=g, **opts)
    eager, e_grads = _run("reference", hidden, weight, labels, bias, grad_weights=g, **opts)
    assert_close_to_reference(out.loss, ref.loss, eager.loss, name=f"{impl}.loss",
                              dtype=torch.float32, reduction_size=hidden.shape[-1])
    assert torch.equal(out.num_valid.cpu(), ref.num_valid.cpu())
    # argmax can flip on near-ties between dtypes; it must agree where the eager code agrees.
    agree = eager.correct == ref.correct
    assert torch.equal(out.correct[agree], ref.correct[agree]), f"{impl}.correct"
    for name, grad in grads.items():
        if r_grads[name] is None or grad is None:
            assert grad is None and (r_grads[name] is None or name in opts.get("freeze", ()))
            continue
        # grad_hidden sums V terms per entry (dlogits @ W); grad_weight and grad_bias sum tokens.
        terms = weight.shape[0] if name == "hidden" else n_tokens
        assert_close_to_reference(grad, r_grads[name], e_grads[name], name=f"{impl}.grad_{name}",
                                  k=3.0, reduction_size=terms)
    return out, grads


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("ignored", [0.0, 0.3, 0.9])
def test_matches_reference(impl, dtype, shape, ignored, device):
    inputs = make_lm_head_inputs(*shape, dtype=dtype, device=device, ignored=ignored)
    _check(impl, inputs)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_reductions_and_bias(impl, reduction, bias, device):
    inputs = make_lm_head_inputs(*SHAPES["ragged"], device=device, ignored=0.3, bias=bias)
    _check(impl, inputs, reduction=reduction)


OPTIONS = {
    "smoothing": dict(label_smoothing=0.1),
    "z_loss": dict(z_loss_weight=1e-2),
    "softcap": dict(logit_softcap=3.0),
    "all": dict(label_smoothing=0.2, z_loss_weight=1e-3, logit_softcap=5.0, reduction="sum"),
}


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("option", OPTIONS.values(), ids=OPTIONS.keys())
def test_options(impl, dtype, option, device):
    inputs = make_lm_head_inputs(*SHAPES["llama_like"], dtype=dtype, device=device, ignored=0.3,
                                 bias=True)
    _check(impl, inputs, **option)


@pytest.mark.parametrize("impl", [*FAST_IMPLS, "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored_gives_zero(impl, reduction, device):
    hidden, weight, labels, _ = make_lm_head_inputs(*SHAPES["ragged"], device=device,
                                                    ignored=1.0)
    out, grads = _run(impl, hidden, weight, labels, grad_weights=torch.ones(labels.shape),
                      reduction=reduction)
    assert torch.count_nonzero(out.loss) == 0 and not out.loss.isnan().any()
    assert out.num_valid.item() == 0 and not out.correct.any()
    assert torch.count_nonzero(grads["hidden"]) == 0 and torch.count_nonzero(grads["weight"]) == 0


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("frozen", [("weight",), ("hidden",), ("weight", "bias")])
def test_frozen_inputs_get_no_grad(impl, frozen, device):
    inputs = make_lm_head_inputs(*SHAPES["llama_like"], device=device, ignored=0.5, bias=True)
    _, grads = _check(impl, inputs, freeze=frozen)
    for name in frozen:
        assert grads[name] is None


def test_frozen_weight_skips_the_weight_gemm(monkeypatch, device):
    calls = []
    original = triton_impl.lce_backward

    def spy(*args):
        calls.append(args[-2:])  # (need_weight, need_bias)
        return original(*args)

    monkeypatch.setattr(triton_impl, "lce_backward", spy)
    hidden, weight, labels, _ = make_lm_head_inputs(*SHAPES["ragged"], device=device)
    _run("triton", hidden, weight, labels, freeze=("weight",))
    assert calls == [(False, False)]


def test_backward_in_several_chunks(monkeypatch, device):
    # The rows schedule (a trainable head's default is the vocabulary slabs) with a tiny dlogits
    # budget: one chunk per 32 rows exercises the fp32 grad_weight accumulation across chunks
    # and chunks past the labelled count.
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"schedule": "rows"})
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 32 * 101 * 4)
    inputs = make_lm_head_inputs((150,), 23, 101, device=device, ignored=0.4, bias=True)
    _check("triton", inputs)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_shift_labels_is_next_token_prediction(impl, device):
    hidden, weight, labels, _ = make_lm_head_inputs(*SHAPES["llama_like"], device=device,
                                                    ignored=0.3)
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    a = linear_cross_entropy(hidden, weight, labels, shift_labels=True, impl=impl)
    b = linear_cross_entropy(hidden, weight, shifted, impl="reference")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_triton_and_torch_agree_and_triton_is_deterministic(device):
    inputs = make_lm_head_inputs(*SHAPES["ragged"], device=device, ignored=0.3, bias=True)
    runs = [_run(i, *inputs) for i in ("triton", "triton", "torch")]
    assert torch.equal(runs[0][0].loss, runs[1][0].loss)
    assert torch.equal(runs[0][1]["weight"], runs[1][1]["weight"])
    torch.testing.assert_close(runs[0][0].loss, runs[2][0].loss, rtol=1e-5, atol=1e-6)
    for name in ("hidden", "weight", "bias"):
        torch.testing.assert_close(runs[0][1][name], runs[2][1][name], rtol=1e-4, atol=1e-6)


def test_module_is_a_drop_in_linear(device):
    head = LinearCrossEntropy(23, 101, bias=True, impl="triton").to(device)
    plain = torch.nn.Linear(23, 101).to(device)
    assert list(head.state_dict()) == list(plain.state_dict())
    head.load_state_dict(plain.state_dict())
    hidden, _, labels, _ = make_lm_head_inputs(*SHAPES["ragged"], device=device)
    torch.testing.assert_close(head(hidden), plain(hidden))  # no labels: logits
    loss = head(hidden, labels)
    ref = torch.nn.functional.cross_entropy(plain(hidden).float(), labels)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    shared = LinearCrossEntropy.from_linear(plain, shift_labels=False, impl="torch")
    assert shared.weight is plain.weight and shared.bias is plain.bias


def test_module_logits_are_the_linears_and_the_softcap_is_the_losss():
    """head(hidden) is the nn.Linear it replaces, softcap or not (Gemma-2's forward softcaps
    lm_head's output itself: a capped head would cap twice); the loss softcaps."""
    plain = torch.nn.Linear(23, 101)
    head = LinearCrossEntropy.from_linear(plain, shift_labels=False, logit_softcap=5.0,
                                          impl="torch")
    hidden, _, labels, _ = make_lm_head_inputs(*SHAPES["ragged"])
    torch.testing.assert_close(head(hidden), plain(hidden), rtol=0, atol=0)
    capped = 5.0 * torch.tanh(plain(hidden).double() / 5.0)
    ref = torch.nn.functional.cross_entropy(capped, labels)
    torch.testing.assert_close(head(hidden, labels).double(), ref, rtol=1e-5, atol=1e-6)


def test_from_linear_needs_shift_labels_and_refuses_what_it_would_drop():
    """shift_labels has no silent default (HF labels unshifted train each position on its own
    token); a module with a forward of its own (a LoRA adapter) or PEFT's base_layer wrapper
    would lose its additions in the fused head."""
    plain = torch.nn.Linear(8, 16)
    with pytest.raises(TypeError, match="pass shift_labels=True for Hugging Face-style"):
        LinearCrossEntropy.from_linear(plain)

    class LoraLinear(torch.nn.Linear):
        def __init__(self):
            super().__init__(8, 16)
            self.lora_a = torch.nn.Linear(8, 2, bias=False)
            self.lora_b = torch.nn.Linear(2, 16, bias=False)

        def forward(self, x):
            return super().forward(x) + self.lora_b(self.lora_a(x))

    class Wrapped(torch.nn.Linear):  # PEFT's layout: the original under base_layer
        def __init__(self):
            super().__init__(8, 16)
            self.base_layer = torch.nn.Linear(8, 16)

    for bad, match in ((LoraLinear(), "LoraLinear \\(its forward is its own"),
                       (Wrapped(), "got Wrapped:"), (torch.nn.Identity(), "got Identity")):
        with pytest.raises(TypeError, match=match):
            LinearCrossEntropy.from_linear(bad, shift_labels=True)
    again = LinearCrossEntropy.from_linear(
        LinearCrossEntropy.from_linear(plain, shift_labels=True), shift_labels=True)
    assert again.weight is plain.weight


def test_module_takes_labels_made_under_inference_mode():
    """Labels built under torch.inference_mode (a data pipeline's) have no version counter:
    the module's rerun bookkeeping must not read it (it raised)."""
    head = LinearCrossEntropy(23, 101, impl="torch")
    hidden, _, labels, _ = make_lm_head_inputs(*SHAPES["ragged"])
    with torch.inference_mode():
        frozen_labels = labels.clone()
    hidden = hidden.requires_grad_(True)
    loss = head(hidden, frozen_labels)
    loss.backward()
    want = linear_cross_entropy(hidden.detach(), head.weight.detach(), labels,
                                bias=head.bias.detach(), impl="torch")
    torch.testing.assert_close(loss.detach(), want, rtol=0, atol=0)


def test_reference_takes_an_fp32_bias_over_half_operands():
    """A bf16 hidden and weight with an fp32 bias: the fast impls accept it (the bias added
    in fp32); the reference, the oracle and the double-backward path, did not (a bare dtype
    error from F.linear)."""
    hidden, weight, labels, bias = make_lm_head_inputs(*SHAPES["ragged"], bias=True)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    ref = linear_cross_entropy(hidden.double(), weight.double(), labels, bias=bias.double(),
                               impl="reference")
    for impl in ("reference", "torch"):
        got = linear_cross_entropy(hidden, weight, labels, bias=bias.float(), impl=impl)
        torch.testing.assert_close(got.double(), ref, rtol=2e-3, atol=1e-4)


# ---- bad input: ValueError naming the argument, the expected and the received ----

def _bad_cases():
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    y = torch.tensor([1, 2, -100, 3])
    yield "weight_shape", dict(hidden=h, weight=torch.randn(10, 7), labels=y), "weight must have"
    yield "labels_shape", dict(hidden=h, weight=w, labels=y[:3]), "labels must have hidden's"
    yield "labels_float", dict(hidden=h, weight=w, labels=y.float()), "must be an integer"
    yield "label_high", dict(hidden=h, weight=w, labels=torch.tensor([1, 10, 2, 3])), "[0, 10)"
    yield "label_neg", dict(hidden=h, weight=w, labels=torch.tensor([1, -5, 2, 3])), "got -5"
    yield "reduction", dict(hidden=h, weight=w, labels=y, reduction="avg"), "reduction must be"
    yield "bias", dict(hidden=h, weight=w, labels=y, bias=torch.randn(9)), "bias must have"
    yield "smoothing", dict(hidden=h, weight=w, labels=y, label_smoothing=1.5), "label_smoothing"
    yield "softcap", dict(hidden=h, weight=w, labels=y, logit_softcap=0.0), "logit_softcap"
    yield "softcap_inf", dict(hidden=h, weight=w, labels=y, logit_softcap=float("inf")), \
        "finite number > 0"
    yield "int_hidden", dict(hidden=h.long(), weight=w, labels=y), "hidden must be a floating"
    yield "empty", dict(hidden=h[:0], weight=w, labels=y[:0]), "at least one token"
    yield "empty_vocab", dict(hidden=h, weight=w[:0], labels=torch.full((4,), -100)), "V > 0"
    yield "int_bias", dict(hidden=h, weight=w, labels=y, bias=torch.ones(10, dtype=torch.long)), \
        "bias must be a floating"
    yield "shift_one_label", dict(hidden=h[0], weight=w, labels=y[0], shift_labels=True), \
        "shift_labels=True needs labels with a sequence"
    yield "smoothing_none", dict(hidden=h, weight=w, labels=y, label_smoothing=None), \
        "label_smoothing must be a number in [0, 1], got None"
    yield "z_loss_inf", dict(hidden=h, weight=w, labels=y, z_loss_weight=float("inf")), \
        "z_loss_weight must be a finite number >= 0, got inf"
    yield "ignore_float", dict(hidden=h, weight=w, labels=y, ignore_index=-100.5), \
        "ignore_index must be an int, got -100.5"


@pytest.mark.parametrize("options, message", [
    (dict(label_smoothing=2.0), "label_smoothing must be a number in [0, 1], got 2.0"),
    (dict(z_loss_weight=-1.0), "z_loss_weight must be a finite number >= 0"),
    (dict(ignore_index=True), "ignore_index must be an int, got True"),
    (dict(logit_softcap=-3.0), "logit_softcap must be a finite number > 0"),
])
def test_the_module_checks_its_options_when_built(options, message):
    """LinearCrossEntropy(label_smoothing=2.0) was built and failed at its first forward."""
    with pytest.raises(ValueError, match=re.escape(f"LinearCrossEntropy: {message}")):
        LinearCrossEntropy(8, 10, **options)


@pytest.mark.parametrize("case", list(_bad_cases()), ids=lambda c: c[0])
def test_bad_input_errors(case):
    _, kwargs, message = case
    with pytest.raises(ValueError, match=re.escape(message)):
        linear_cross_entropy(**kwargs)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_label_dtypes_other_than_int64(impl, dtype, device):
    """Labels of any integer dtype mean what their int64 values mean (uint8 compared with
    ignore_index=-100 or V must not wrap around)."""
    hidden, weight, labels, _ = make_lm_head_inputs((37,), 16, 300, device=device, ignored=0.3)
    labels = labels.clamp(max=250)  # (uint8 holds 0..255; -100 stays ignored in the others)
    want = linear_cross_entropy(hidden, weight, labels, impl="reference", return_stats=True)
    narrow = labels.to(dtype) if dtype != torch.uint8 else labels.clamp(min=0).to(dtype)
    if dtype == torch.uint8:  # no -100 in uint8: nothing ignored
        want = linear_cross_entropy(hidden, weight, labels.clamp(min=0), impl="reference",
                                    return_stats=True)
    got = linear_cross_entropy(hidden, weight, narrow, impl=impl, return_stats=True)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert int(got.num_valid) == int(want.num_valid)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_peak_memory_far_below_logits(impl, device, monkeypatch):
    # 256 tokens x 4096-token vocabulary: eager fp32 logits alone are 4 MiB. The fast paths hold
    # at most one chunk of logits rows (512 MiB by default: 2048 rows of a 128K vocabulary in
    # bf16) or one vocabulary slab of all rows (the Triton backward of a trainable head: 256
    # MiB); a budget of 1/16 of these logits stands in for N >> chunk at real sizes.
    # track_peak_memory also counts the temporaries inside the Triton path's custom ops.
    from olakernels.linear_cross_entropy.impl import torch_chunked, triton_vocab_slabs

    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 16 * 4096 * 4)
    monkeypatch.setattr(triton_vocab_slabs, "SLAB_BUDGET_BYTES", 16 * 4096 * 4)
    monkeypatch.setattr(torch_chunked, "_CHUNK_ELEMENTS", 16 * 4096)
    hidden, weight, labels, _ = make_lm_head_inputs((256,), 32, 4096, device=device, ignored=0.5)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logits_bytes = labels.numel() * weight.shape[0] * 4
    with track_peak_memory() as mem:
        loss = linear_cross_entropy(hidden, weight, labels, impl=impl)
        loss.backward()
    grads = hidden.numel() * 4 + weight.numel() * 4 * 2  # grads (+ fp32 grad_weight buffer)
    assert mem.peak - grads < logits_bytes / 4, (mem.peak, grads, logits_bytes)
    with track_peak_memory() as ref_mem:
        linear_cross_entropy(hidden, weight, labels, impl="reference").backward()
    assert ref_mem.peak > 2 * logits_bytes  # the tracker sees the eager logits


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_compile_fullgraph_matches_eager(impl, device):
    hidden, weight, labels, bias = make_lm_head_inputs((2, 12), 16, 64, device=device, bias=True)

    def loss_fn(h, w, b, y):
        return linear_cross_entropy(h, w, y, bias=b, shift_labels=True, impl=impl)

    assert_compiled_matches_eager(loss_fn, hidden, weight, bias, labels)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_compiled_ignored_rows_stay_out_of_the_math(impl, device):
    """Under compile the torch path takes every row and masks the ignored ones: an
    ignore_index outside [0, V) (allowed) must not index the logits, and inf in an ignored
    row's hidden state (padding) must not reach a gradient (0 x inf)."""
    hidden, weight, labels, bias = make_lm_head_inputs((30,), 16, 40, device=device, bias=True,
                                                       ignored=0.3)
    ignored = labels == -100
    labels = torch.where(ignored, 40, labels)  # ignore_index = V
    hidden = hidden.clone()
    hidden[ignored.nonzero()[0, 0]] = float("inf")

    def loss_fn(h, w, b, y):
        return linear_cross_entropy(h, w, y, bias=b, ignore_index=40, impl=impl)

    assert_compiled_matches_eager(loss_fn, hidden, weight, bias, labels)


def assert_compiled_matches_eager(loss_fn, hidden, weight, bias, labels):
    """loss_fn(h, w, b, labels) eager and under torch.compile(fullgraph=True): the same loss
    and gradients of hidden, weight and bias."""
    results = []
    for fn in (loss_fn, torch.compile(loss_fn, fullgraph=True)):
        h, w, b = (t.detach().clone().requires_grad_(True) for t in (hidden, weight, bias))
        loss = fn(h, w, b, labels)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad, b.grad))
        assert all(g.isfinite().all() for g in results[-1]), results[-1]
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_opcheck(device):
    hidden, weight, labels, bias = make_lm_head_inputs((24,), 16, 40, device=device, bias=True)
    args = (hidden.requires_grad_(True), weight.requires_grad_(True), bias, labels, -100, 0.1,
            1e-3, 0.0)
    torch.library.opcheck(triton_impl.linear_cross_entropy_fwd, args)
    with torch.no_grad():
        loss, _, lse, order, count = triton_impl.linear_cross_entropy_fwd(*args)
    torch.library.opcheck(
        triton_impl.linear_cross_entropy_bwd,
        (hidden.detach(), weight.detach(), bias, labels, order, count, lse,
         torch.rand(24, device=device), 0.1, 1e-3, 0.0, True, True, True),
    )


# ---- GPU: compiled kernels (bf16 tensor-core tiles, several chunks, real vocabulary sizes) ----

GPU_CASES = {
    "phi3_vocab_bf16": ((2, 512), 1024, 32064, torch.bfloat16, 0.9),
    "llama3_vocab_bf16": ((1024,), 512, 128256, torch.bfloat16, 0.5),
    "ragged_fp32": ((999,), 200, 5003, torch.float32, 0.3),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_gpu_real_vocabularies(case, monkeypatch):
    leading, h, v, dtype, ignored = case
    # Small chunks (frozen head, rows schedule) and slabs (the default for a trainable head) so
    # that even these sizes take several of them.
    from olakernels.linear_cross_entropy.impl import triton_vocab_slabs

    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 256 * v * 4)
    monkeypatch.setattr(triton_vocab_slabs, "SLAB_BUDGET_BYTES", 64 * v * 4)
    inputs = make_lm_head_inputs(leading, h, v, dtype=dtype, device="cuda", ignored=ignored)
    _check("triton", inputs, label_smoothing=0.05, z_loss_weight=1e-4)


def test_dweight_tile_overrides_give_the_same_gradients(monkeypatch):
    """The dW kernel's own tiles (dw_*, swept by benchmarks/gpu/profile_lce.py) change the
    schedule, not the result."""
    inputs = make_lm_head_inputs(*SHAPES["ragged"], ignored=0.3)
    _, base = _run("triton", *inputs[:3], inputs[3])
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"dw_m": 32, "dw_h": 16, "dw_k": 16})
    _, tiled = _run("triton", *inputs[:3], inputs[3])
    torch.testing.assert_close(tiled["weight"], base["weight"], rtol=1e-5, atol=1e-7)


def test_inputs_drawn_on_the_device_are_shaped_like_the_host_draw(device):
    """make_lm_head_inputs(draw_on_device=True), the benchmarks' fast draw at real sizes."""
    fast = make_lm_head_inputs((48,), 32, 300, device=device, ignored=0.25, draw_on_device=True)
    slow = make_lm_head_inputs((48,), 32, 300, device=device, ignored=0.25)
    for a, b in zip(fast[:3], slow[:3], strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
    rms = fast[0].float().square().mean(-1)
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-4, atol=1e-4)
    assert int((fast[2] == -100).sum()) == 12  # the ignored fraction, as the host draw
    loss = linear_cross_entropy(*fast[:3], impl="triton")
    ref = linear_cross_entropy(*fast[:3], impl="reference")
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)


def test_torch_path_computes_in_float64_when_the_weight_is():
    """fp32 hidden and a float64 weight: the warning says float64, and the torch path must
    compute (and return) float64 as the reference does (it computed fp32)."""
    hidden, weight, labels, _ = make_lm_head_inputs(*SHAPES["ragged"])
    weight = weight.double().requires_grad_(True)
    ref = linear_cross_entropy(hidden.double(), weight.detach(), labels, impl="reference")
    with pytest.warns(UserWarning, match="computes in torch.float64"):
        got = linear_cross_entropy(hidden, weight, labels, impl="torch")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    got.backward()
    assert weight.grad.dtype == torch.float64
