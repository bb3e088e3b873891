# linear_cross_entropy's BLAS schedule (impl/blas_fused_grad.py) and the rule that picks it.
"""Gradients in the forward with the vendor GEMMs (torch.mm on the CPU here): checked against
the float64 reference in fp16/bf16 with several chunks (a tiny dlogits budget; ragged N: a last
chunk shorter than the buffer), bounded and unbounded, every option and frozen input; rows past
the count must reach no gradient (inf in their hidden states, a bias that makes their logits
non-zero); the backward must only scale; and forward_schedule must take this path exactly when
docs/ops/linear_cross_entropy.md says.
"""
import pytest
import torch
from test_linear_cross_entropy import _check, _run, assert_compiled_matches_eager

from olakernels import linear_cross_entropy
from olakernels._triton import interpreter_enabled
from olakernels.linear_cross_entropy import api
from olakernels.linear_cross_entropy.impl import blas_fused_grad
from olakernels.linear_cross_entropy.impl import triton as triton_impl
from olakernels.testing import assert_close_to_reference, make_lm_head_inputs, track_peak_memory

HALF = [torch.float16, torch.bfloat16]
RAGGED = ((150,), 23, 101)  # prime H and V; N not a multiple of the 16-row chunk step


class Calls:
    def __init__(self):
        self.blas: list[tuple] = []
        self.backward = 0
        self.triton_grad = 0


@pytest.fixture
def blas(monkeypatch):
    """blas="always", ~32-row chunks (5 at N=150); spies on which forward and backward run."""
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"blas": "always"})
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 32 * 128 * 2)  # V padded to 128
    calls = Calls()
    fwd = blas_fused_grad.lce_forward_with_grads_blas
    backward = triton_impl.lce_backward
    from olakernels.linear_cross_entropy.impl import triton_fused_grad
    triton_grad = triton_fused_grad.lce_forward_with_grads

    def spy_fwd(*args):
        calls.blas.append(args[8:12])  # (need_hidden, need_weight, need_bias, max_rows)
        return fwd(*args)

    def spy_backward(*args):
        calls.backward += 1
        return backward(*args)

    def spy_triton_grad(*args):
        calls.triton_grad += 1
        return triton_grad(*args)

    monkeypatch.setattr(blas_fused_grad, "lce_forward_with_grads_blas", spy_fwd)
    monkeypatch.setattr(triton_impl, "lce_backward", spy_backward)
    monkeypatch.setattr(triton_fused_grad, "lce_forward_with_grads", spy_triton_grad)
    return calls


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignored", [0.0, 0.5, 1.0])
def test_matches_reference(blas, dtype, reduction, ignored, device):
    inputs = make_lm_head_inputs(*RAGGED, dtype=dtype, device=device, ignored=ignored, bias=True)
    _check("triton", inputs, reduction=reduction)
    assert blas.blas == [(True, True, True, 0)] and blas.backward == 0
    if interpreter_enabled():  # (a GPU's row step is 128: one chunk there)
        assert blas_fused_grad.chunk_rows_blas(150, 101, 23, 2, True) == 32  # 5 chunks ran


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_bounded_rows_scatter_to_their_positions(blas, dtype, device, monkeypatch):
    """A bound far below N: the compacted grad_hidden rows land at their positions, the rest
    of grad_hidden is 0, and lse holds the bounded rows only."""
    monkeypatch.setattr(api, "ROW_QUANTUM", 16)
    inputs = make_lm_head_inputs(*RAGGED, dtype=dtype, device=device, ignored=0.8, bias=True)
    count = int((inputs[2] != -100).sum())
    out, grads = _check("triton", inputs, max_valid_tokens=count, label_smoothing=0.1)
    rows = -(-count // 16) * 16
    assert rows < 150 and blas.blas == [(True, True, True, rows)]
    assert torch.count_nonzero(grads["hidden"][inputs[2] == -100]) == 0


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_option_together(blas, reduction, device):
    inputs = make_lm_head_inputs(*RAGGED, dtype=torch.bfloat16, device=device, ignored=0.3,
                                 bias=True)
    _check("triton", inputs, label_smoothing=0.2, z_loss_weight=1e-3, logit_softcap=5.0,
           reduction=reduction)
    assert len(blas.blas) == 1


@pytest.mark.parametrize("frozen", [("weight",), ("hidden",), ("weight", "bias"), ("bias",)])
def test_frozen_inputs(blas, frozen, device):
    inputs = make_lm_head_inputs(*RAGGED, dtype=torch.bfloat16, device=device, ignored=0.5,
                                 bias=True)
    _, grads = _check("triton", inputs, freeze=frozen)
    assert all(grads[name] is None for name in frozen)
    assert blas.blas == [(*(name not in frozen for name in ("hidden", "weight", "bias")), 0)]


def test_frozen_weight_runs_no_weight_gemm(blas, device, monkeypatch):
    gemms = []
    real = blas_fused_grad.gemm_fp32_out
    monkeypatch.setattr(blas_fused_grad, "gemm_fp32_out",
                        lambda out, a, b, accumulate: gemms.append(tuple(out.shape))
                        or real(out, a, b, accumulate))
    hidden, weight, labels, _ = make_lm_head_inputs(*RAGGED, dtype=torch.bfloat16,
                                                    device=device, ignored=0.5)
    _run("triton", hidden, weight, labels, freeze=("weight",))
    chunk = blas_fused_grad.chunk_rows_blas(150, 101, 23, 2, False)  # a frozen head's chunk
    assert gemms and all(shape[0] <= chunk and shape[1] == 23 for shape in gemms)  # dX only
    gemms.clear()
    _run("triton", hidden, weight, labels)
    assert (101, 23) in gemms  # the trainable head's dW GEMMs


def test_chunk_rows_follow_the_memory_rule():
    """Llama-3's head at the real budget: a trainable head and a dense frozen one get the whole
    dlogits budget per chunk; a frozen head on few rows (90% ignored, the bound 1,792) keeps a
    quarter of it (liger-kernel's memory); the chunk never exceeds the rows."""
    v, h = 128256, 4096
    budget = triton_impl.DLOGITS_BUDGET_BYTES
    row_bytes = -(-v // blas_fused_grad.LOGITS_ROW_ALIGN) * blas_fused_grad.LOGITS_ROW_ALIGN * 2
    step = 16 if interpreter_enabled() else 128  # rows per chunk come in multiples of it
    trainable = blas_fused_grad.chunk_rows_blas(16384, v, h, 2, True)
    dense = blas_fused_grad.chunk_rows_blas(16384, v, h, 2, False)
    sparse = blas_fused_grad.chunk_rows_blas(1792, v, h, 2, False)
    assert trainable == dense and budget - step * row_bytes < dense * row_bytes <= budget
    assert budget // 4 - step * row_bytes < sparse * row_bytes <= budget // 4
    assert blas_fused_grad.chunk_rows_blas(40, v, h, 2, False) == -(-40 // step) * step


def test_logits_rows_are_padded_for_aligned_gemms(blas, device, monkeypatch):
    """V = 101 (odd, like Llama-3 with an added pad token): the GEMMs read and write a (chunk, V)
    view of a buffer whose rows are padded to LOGITS_ROW_ALIGN elements (cuBLAS falls back to
    unaligned legacy kernels otherwise), and the row kernel walks that stride."""
    seen = []
    kernel = blas_fused_grad._lce_rows_grad_kernel
    monkeypatch.setattr(blas_fused_grad, "_lce_rows_grad_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: (
            lambda *a, **kw: seen.append((a[0].shape[1], a[0].stride(0), a[10]))
            or kernel[grid](*a, **kw))})())
    gemm_inputs = []
    real = blas_fused_grad.gemm_fp32_out
    monkeypatch.setattr(blas_fused_grad, "gemm_fp32_out",
                        lambda out, a, b, accumulate: gemm_inputs.append(a.stride())
                        or real(out, a, b, accumulate))
    inputs = make_lm_head_inputs(*RAGGED, dtype=torch.bfloat16, device=device, ignored=0.3,
                                 bias=True)
    _check("triton", inputs)
    align = blas_fused_grad.LOGITS_ROW_ALIGN
    assert seen and all(cols == 101 and stride == 128 == row_stride and stride % align == 0
                        for cols, stride, row_stride in seen)
    # grad_hidden reads dlogits (c, V) with row stride 128; grad_weight its transpose
    assert (128, 1) in gemm_inputs and (1, 128) in gemm_inputs


def test_rows_past_the_count_reach_no_gradient(blas, device):
    """Unlabelled rows are multiplied by the GEMMs here: inf/NaN in their hidden states and a
    bias (non-zero logits in those rows) must not reach any gradient or the loss."""
    hidden, weight, labels, bias = make_lm_head_inputs(*RAGGED, dtype=torch.bfloat16,
                                                       device=device, ignored=0.5, bias=True)
    ignored = labels == -100
    poisoned = hidden.clone()
    poisoned[ignored.nonzero()[::2, 0]] = float("inf")
    poisoned[ignored.nonzero()[1::2, 0]] = float("nan")
    out, grads = _run("triton", poisoned, weight, labels, bias)
    ref, ref_grads = _run("triton", hidden, weight, labels, bias)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, ref.loss, rtol=0, atol=0)
    for name in ("weight", "bias"):
        assert torch.isfinite(grads[name]).all(), name
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=0, atol=0)
    assert torch.count_nonzero(grads["hidden"][ignored]) == 0
    assert len(blas.blas) == 2


def _blas_vs_kernels(hidden, weight, labels, bias, reduction="mean", upstream=None):
    """Gradients of the BLAS schedule and of the Triton kernels' full backward (both in the
    inputs' dtype), with loss -> upstream(loss) before backward."""
    grads = []
    for mode in ("always", "never"):
        triton_impl.BLOCKS_OVERRIDE["blas"] = mode
        leaves = {k: t.detach().clone().requires_grad_(True)
                  for k, t in (("hidden", hidden), ("weight", weight), ("bias", bias))}
        loss = linear_cross_entropy(leaves["hidden"], leaves["weight"], labels,
                                    bias=leaves["bias"], reduction=reduction, impl="triton")
        (loss if upstream is None else upstream(loss)).backward()
        grads.append({k: v.grad.float() for k, v in leaves.items()})
    for name in grads[0]:  # rounding differs (the logits are rounded by the GEMM here)
        scale = grads[1][name].abs().max().item()
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0.05, atol=0.02 * scale)


def test_a_bias_in_another_dtype_is_added_by_the_row_kernel(blas, device):
    """An fp32 bias on a bf16 head (eager's F.linear refuses it; the kernels take it): added
    in fp32 on load, as the Triton kernels do."""
    hidden, weight, labels, bias = make_lm_head_inputs(*RAGGED, dtype=torch.bfloat16,
                                                       device=device, ignored=0.3, bias=True)
    bias = (bias.float() + torch.rand_like(bias.float()) * 1e-2).requires_grad_(True)
    _blas_vs_kernels(hidden, weight, labels, bias)
    assert len(blas.blas) == 1 and blas.backward == 1


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_upstream_gradient_scales_the_unit_gradients(blas, reduction, device):
    """(loss * 3.7 + loss ** 2).backward() against the Triton kernels' full backward."""
    hidden, weight, labels, bias = make_lm_head_inputs(*RAGGED, dtype=torch.bfloat16,
                                                       device=device, ignored=0.4, bias=True)
    _blas_vs_kernels(hidden, weight, labels, bias, reduction, lambda loss: loss * 3.7 + loss ** 2)
    assert len(blas.blas) == 1 and blas.backward == 1


@pytest.mark.parametrize("mode", ["blas", "grad_in_forward"])
def test_double_backward_is_refused_not_zero(mode, device, monkeypatch):
    """The unit gradients are constants to autograd: a penalty on grad_hidden would get a
    second-order gradient of 0 through the head, silently. Both fused-gradient forwards refuse
    create_graph=True (as the kernel path, whose backward op has no autograd formula)."""
    blocks = {"blas": "always"} if mode == "blas" else {"blas": "never", "grad_in_forward": True}
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", blocks)
    hidden, weight, labels, _ = make_lm_head_inputs(*RAGGED, dtype=torch.bfloat16,
                                                    device=device, ignored=0.3)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    loss = linear_cross_entropy(hidden, weight, labels, impl="triton")
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\).*reference"):
        torch.autograd.grad(loss, hidden, create_graph=True)


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_double_backward_names_the_way_out_on_every_fused_path(impl, device, monkeypatch):
    """The Triton kernels' backward (no autograd formula) and the chunked torch path (an
    in-place accumulation) failed with opaque errors under create_graph=True."""
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"blas": "never"})
    hidden, weight, labels, _ = make_lm_head_inputs(*RAGGED, device=device, ignored=0.3)
    hidden.requires_grad_(True)
    loss = linear_cross_entropy(hidden, weight, labels, impl=impl, reduction="none").sum()
    with pytest.raises(RuntimeError, match=r"double backward \(create_graph=True\).*reference"):
        torch.autograd.grad(loss, hidden, create_graph=True)


def test_all_ignored_gives_zero(blas, device):
    hidden, weight, labels, bias = make_lm_head_inputs(*RAGGED, dtype=torch.bfloat16,
                                                       device=device, ignored=1.0, bias=True)
    out, grads = _run("triton", hidden, weight, labels, bias)
    assert float(out.loss.detach()) == 0.0 and int(out.num_valid) == 0 and not out.correct.any()
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())


def test_deterministic(blas, device):
    inputs = make_lm_head_inputs(*RAGGED, dtype=torch.bfloat16, device=device, ignored=0.3,
                                 bias=True)
    (out_a, grads_a), (out_b, grads_b) = _run("triton", *inputs), _run("triton", *inputs)
    assert torch.equal(out_a.loss, out_b.loss)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_the_fallback_gemm_rounds_per_chunk_and_stays_close(blas, device, monkeypatch):
    """Where torch has no half GEMM with fp32 output (and not on the CPU), each chunk's product
    is rounded to the operands' dtype before the fp32 sum: still within the test budget."""
    monkeypatch.setattr(triton_impl, "EXACT_FALLBACK_DEVICES", ())
    monkeypatch.setattr(triton_impl, "_FP32_OUT_GEMM", {})
    inputs = make_lm_head_inputs(*RAGGED, dtype=torch.bfloat16, device=device, ignored=0.2,
                                 bias=True)
    with pytest.warns(UserWarning, match="rounded to torch.bfloat16 before the fp32 sum"):
        _check("triton", inputs)
    assert len(blas.blas) == 1


class _FakeCuda:
    """Stands in for a CUDA operand in gemm_fp32_out's probe (device.type == "cuda")."""

    def __init__(self, t):
        self.t, self.dtype = t, t.dtype
        self.device = type("D", (), {"type": "cuda"})()

    def __matmul__(self, other):
        return self.t @ other.t

    def float(self):
        return _FakeCuda(self.t.float())


@pytest.mark.parametrize("error, falls_back", [
    (NotImplementedError("Could not run 'aten::mm.dtype'"), True),
    (TypeError("mm() got an unexpected keyword argument 'out_dtype'"), True),
    (RuntimeError("expected self and mat2 to have the same dtype"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), False),
])
def test_fp32_output_gemm_probe(monkeypatch, error, falls_back):
    """Only a missing fp32-output overload switches to the per-chunk rounding (with a
    warning); any other error is raised, not hidden behind a slower path."""
    monkeypatch.setattr(triton_impl, "_FP32_OUT_GEMM", {})

    def raising(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "mm", raising)
    a, b = torch.randn(4, 8).bfloat16(), torch.randn(8, 3).bfloat16()
    out = torch.empty(4, 3)
    if not falls_back:
        with pytest.raises(type(error)):
            blas_fused_grad.gemm_fp32_out(out, _FakeCuda(a), _FakeCuda(b), accumulate=False)
        return
    with pytest.warns(UserWarning, match="is not available"):
        blas_fused_grad.gemm_fp32_out(out, _FakeCuda(a), _FakeCuda(b), accumulate=False)
    torch.testing.assert_close(out, (a @ b).float())  # rounded once to bf16, then fp32
    assert triton_impl._FP32_OUT_GEMM == {("cuda", torch.bfloat16, False): False}


def test_peak_memory_far_below_logits(blas, device, monkeypatch):
    """256 tokens x a 4096-token vocabulary, a budget of 1/16 of the bf16 logits."""
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 16 * 4096 * 2)
    triton_impl.BLOCKS_OVERRIDE["row_v"] = 4096  # one row tile: the interpreter is slow per tile
    hidden, weight, labels, _ = make_lm_head_inputs((256,), 32, 4096, dtype=torch.bfloat16,
                                                    device=device, ignored=0.5)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logits_bytes = labels.numel() * weight.shape[0] * 4
    with track_peak_memory() as mem:
        linear_cross_entropy(hidden, weight, labels, impl="triton").backward()
    # fp32 unit gradients kept from the forward, the scaled ones, and (CPU only) the fp32
    # operand copies of the exact fallback GEMM (weight, one chunk).
    grads = (hidden.numel() + weight.numel()) * (4 + 2) + weight.numel() * 4
    assert mem.peak - grads < logits_bytes / 4, (mem.peak, grads, logits_bytes)
    assert len(blas.blas) == 1


def test_opcheck(device):
    hidden, weight, labels, bias = make_lm_head_inputs((24,), 16, 40, dtype=torch.bfloat16,
                                                       device=device, bias=True, ignored=0.3)
    for need in ((True, True, True), (False, True, False), (True, False, True)):
        for max_rows in (0, 16):
            args = (hidden.requires_grad_(need[0]), weight.requires_grad_(need[1]),
                    bias.requires_grad_(need[2]), labels, -100, 0.1, 1e-3, 3.0, *need, max_rows)
            torch.library.opcheck(blas_fused_grad.linear_cross_entropy_fwd_grad_blas, args)


def test_compile_fullgraph_matches_eager(blas, device):
    hidden, weight, labels, bias = make_lm_head_inputs((2, 12), 16, 64, dtype=torch.bfloat16,
                                                       device=device, bias=True)

    def loss_fn(h, w, b, y):
        return linear_cross_entropy(h, w, y, bias=b, shift_labels=True, impl="triton") * 3.7

    assert_compiled_matches_eager(loss_fn, hidden, weight, bias, labels)
    assert len(blas.blas) == 2 and blas.backward == 0


# ---- the rule (forward_schedule) ----

def _schedule(n=100, dtype=torch.bfloat16, bound=None, need_weight=True, exact=True,
              hint=None, **blocks):
    triton_impl.BLOCKS_OVERRIDE.clear()
    triton_impl.BLOCKS_OVERRIDE.update(blocks)
    hidden = torch.empty(n, 8, dtype=dtype)
    weight = torch.empty(16, 8, dtype=dtype)
    return triton_impl.forward_schedule(hidden, weight, bound, need_weight, exact, hint)


@pytest.fixture
def clean_blocks(monkeypatch):
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {})


def test_auto_takes_blas_with_a_bound_when_dense_or_frozen(clean_blocks):
    assert _schedule(bound=None) == "plain"  # no bound: the labelled fraction is unknown
    assert _schedule(bound=50) == "blas"  # half the rows (blas_min_fraction 0.5)
    assert _schedule(bound=48) == "plain"  # a trainable head, mostly ignored: vocab slabs
    assert _schedule(bound=0, need_weight=False) == "blas"  # frozen head: any bound
    assert _schedule(bound=512) == "blas"  # a bound above N is N
    assert _schedule(bound=48, blas_min_fraction=0.4) == "blas"
    assert _schedule(bound=48, grad_in_forward=True) == "grad_in_forward"
    # The caller's bound itself, not rounded up to ROW_QUANTUM (256): 5 of 500 rows is sparse.
    assert _schedule(n=500, bound=5) == "plain" and _schedule(n=500, bound=250) == "blas"


def test_auto_leaves_fp16_to_the_triton_kernels(clean_blocks, device):
    """fp16 logits above 65504 round to inf in the vendor GEMM's output (NaN loss and
    gradients) where the Triton kernels keep fp32: "auto" takes the BLAS schedule for bf16
    only, so a bound or a dense hint no longer turns a finite fp16 loss into NaN."""
    assert _schedule(bound=50, dtype=torch.float16) == "plain"
    assert _schedule(hint=0.9, dtype=torch.float16) == "plain"
    assert _schedule(bound=50, dtype=torch.float16, blas="always") == "blas"  # asked for
    triton_impl.BLOCKS_OVERRIDE.clear()
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(16, 32, generator=g) * 60).half().to(device)
    weight = (torch.randn(45, 32, generator=g) * 60).half().to(device)
    labels = torch.randint(0, 45, (16,), generator=g).to(device)
    assert (hidden.double() @ weight.double().T).abs().max() > 65504
    want = linear_cross_entropy(hidden.double(), weight.double(), labels, impl="reference")
    h = hidden.clone().requires_grad_(True)
    loss = linear_cross_entropy(h, weight, labels, impl="triton", max_valid_tokens=16)
    loss.backward()
    assert torch.isfinite(loss) and h.grad.isfinite().all()
    torch.testing.assert_close(loss.double(), want, rtol=1e-3, atol=0)


def test_fraction_hint_picks_the_schedule_without_a_bound(clean_blocks):
    """labelled_fraction_hint: dense (>= blas_min_fraction) -> BLAS over all N rows, also for a
    frozen head; sparse -> the kernels that skip rows; a bound, when given, decides instead."""
    assert _schedule(hint=0.9) == "blas" and _schedule(hint=0.5) == "blas"
    assert _schedule(hint=0.49) == "plain"
    assert _schedule(hint=0.9, need_weight=False) == "blas"
    assert _schedule(hint=0.1, need_weight=False) == "plain"  # frozen, sparse: skip the rows
    assert _schedule(hint=0.9, bound=10) == "plain"  # the bound wins
    assert _schedule(hint=0.1, bound=90) == "blas"
    assert _schedule(hint=0.3, blas_min_fraction=0.25) == "blas"
    assert _schedule(hint=0.9, dtype=torch.float32) == "plain"
    assert _schedule(hint=0.9, exact=False) == "plain"
    assert _schedule(hint=0.9, blas="never") == "plain"


def test_module_compiles_fullgraph_without_its_history(device):
    """Under torch.compile(fullgraph=True) the module keeps no host-side history (nothing to
    trace) and gives the eager module's loss and gradients."""
    from olakernels import LinearCrossEntropy

    torch.manual_seed(0)
    head = LinearCrossEntropy(16, 64, bias=True, shift_labels=True, impl="triton").to(device)
    hidden, _, labels, _ = make_lm_head_inputs((2, 12), 16, 64, device=device)

    def loss_fn(h, w, b, y):
        return torch.func.functional_call(head, {"weight": w, "bias": b}, (h, y))

    assert_compiled_matches_eager(loss_fn, hidden, head.weight, head.bias, labels)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "dense", True, float("nan")])
def test_bad_fraction_hint_is_a_value_error(bad):
    hidden, weight, labels, _ = make_lm_head_inputs(*RAGGED, ignored=0.3)
    with pytest.raises(ValueError, match="labelled_fraction_hint"):
        linear_cross_entropy(hidden, weight, labels, labelled_fraction_hint=bad)


def test_module_picks_the_schedule_from_the_previous_count(clean_blocks, device, monkeypatch):
    """LinearCrossEntropy without a bound: the first call has no history (the kernels); each
    later call follows the previous call's labelled fraction (dense -> BLAS, sparse -> the
    kernels); results equal the reference whichever ran; a bound, adaptive_schedule=False and
    a deep copy (fresh history) switch it off."""
    import copy

    from olakernels import LinearCrossEntropy

    calls = []
    real = blas_fused_grad.linear_cross_entropy_fwd_grad_blas
    monkeypatch.setattr(blas_fused_grad, "linear_cross_entropy_fwd_grad_blas",
                        lambda *a: calls.append(a[11]) or real(*a))  # a[11]: max_rows
    torch.manual_seed(0)
    head = LinearCrossEntropy(23, 101, bias=False, impl="triton").to(device, torch.bfloat16)
    hidden = torch.randn(150, 23, device=device, dtype=torch.bfloat16, requires_grad=True)
    dense = torch.randint(0, 101, (150,), device=device)
    sparse = dense.clone()
    sparse[torch.rand(150, generator=torch.Generator().manual_seed(1)) < 0.9] = -100
    ran = []
    for labels in (dense, dense, sparse, sparse, dense):
        before = len(calls)
        loss = head(hidden, labels)
        ran.append("blas" if len(calls) > before else "kernels")
        ref = linear_cross_entropy(hidden.double(), head.weight.double(), labels,
                                   impl="reference")
        eager = linear_cross_entropy(hidden, head.weight, labels, impl="reference")
        assert_close_to_reference(loss, ref, eager, name="module loss", dtype=torch.float32,
                                  reduction_size=23)
    assert ran == ["kernels", "blas", "blas", "kernels", "kernels"]
    assert calls == [0, 0]  # no bound: every one of the N rows
    head(hidden, dense)  # history: dense
    assert copy.deepcopy(head)._history.fraction() is None  # a copy starts without history
    before = len(calls)
    head(hidden, dense, max_valid_tokens=40)  # a bound decides (40 of 150 rows: sparse)
    head.adaptive_schedule = False
    head(hidden, dense)
    assert len(calls) == before
    # A bounded call is recorded too: the next unbounded call follows its (sparse) fraction.
    head.adaptive_schedule = True
    head(hidden, dense)
    head(hidden, sparse, max_valid_tokens=int((sparse != -100).sum()))
    before = len(calls)
    head(hidden, dense)
    assert len(calls) == before  # the kernels, not BLAS over all rows
    with pytest.raises(ValueError, match="adaptive_schedule"):
        LinearCrossEntropy(23, 101, adaptive_schedule="yes")


def test_module_under_activation_checkpointing_reruns_the_same_schedule(clean_blocks, device):
    """Non-reentrant checkpointing runs the head's forward again in the backward: that rerun
    must take the schedule the first run took (the previous call's fraction), not this call's
    own (recorded by the first run), or the checkpoint finds other saved tensors and fails.
    Gradients equal the un-checkpointed head's, through dense/sparse switches."""
    from torch.utils.checkpoint import checkpoint

    from olakernels import LinearCrossEntropy

    torch.manual_seed(0)
    head = LinearCrossEntropy(23, 101, bias=False, impl="triton").to(device, torch.bfloat16)
    plain = LinearCrossEntropy(23, 101, bias=False, impl="triton").to(device, torch.bfloat16)
    plain.load_state_dict(head.state_dict())
    for seed, ignored in enumerate((0.0, 0.9, 0.0, 0.0)):  # dense -> sparse -> dense
        hidden, _, labels, _ = make_lm_head_inputs((150,), 23, 101, dtype=torch.bfloat16,
                                                   device=device, ignored=ignored, seed=seed)
        h1 = hidden.clone().requires_grad_(True)
        checkpoint(head, h1, labels, use_reentrant=False).backward()
        h2 = hidden.clone().requires_grad_(True)
        plain(h2, labels).backward()
        torch.testing.assert_close(h1.grad, h2.grad, rtol=0, atol=0)
        torch.testing.assert_close(head.weight.grad, plain.weight.grad, rtol=0, atol=0)
    assert head._history.fraction() == plain._history.fraction() == 1.0


def test_module_repr_shows_the_options_that_change_the_loss():
    from olakernels import LinearCrossEntropy

    head = LinearCrossEntropy(8, 30, shift_labels=True, label_smoothing=0.1,
                              z_loss_weight=1e-3, logit_softcap=30.0, adaptive_schedule=False)
    assert repr(head) == (
        "LinearCrossEntropy(in_features=8, out_features=30, bias=True, ignore_index=-100, "
        "reduction='mean', label_smoothing=0.1, z_loss_weight=0.001, logit_softcap=30.0, "
        "shift_labels=True, adaptive_schedule=False, impl='auto')")
    assert "smoothing" not in repr(LinearCrossEntropy(8, 30))  # defaults stay quiet


def test_blas_needs_half_operands_and_exact_gradients(clean_blocks):
    for dtype in (torch.float32, torch.float64):
        assert _schedule(dtype=dtype, bound=100) == "plain"  # fp32: TF32 in cuBLAS
        assert _schedule(dtype=dtype, blas="always") == "plain"
    assert _schedule(bound=100, exact=False) == "plain"  # "none", no_grad, nothing to train
    assert _schedule(blas="always", exact=False) == "plain"
    assert _schedule(blas="always") == "blas"
    assert _schedule(bound=100, blas="never") == "plain"
    assert _schedule(bound=100, blas="never", grad_in_forward=True) == "grad_in_forward"


def test_reduction_none_and_no_grad_take_the_kernels(clean_blocks, device):
    hidden, weight, labels, _ = make_lm_head_inputs(*RAGGED, dtype=torch.bfloat16,
                                                    device=device, ignored=0.3)
    hidden.requires_grad_(True)
    triton_impl.BLOCKS_OVERRIDE["blas"] = "always"
    calls = []
    real = blas_fused_grad.linear_cross_entropy_fwd_grad_blas
    try:
        blas_fused_grad.linear_cross_entropy_fwd_grad_blas = \
            lambda *a: calls.append(1) or real(*a)
        linear_cross_entropy(hidden, weight, labels, reduction="none", impl="triton")
        with torch.no_grad():
            linear_cross_entropy(hidden, weight, labels, impl="triton")
        assert calls == []
        linear_cross_entropy(hidden, weight, labels, impl="triton")
        assert calls == [1]
    finally:
        blas_fused_grad.linear_cross_entropy_fwd_grad_blas = real


@pytest.mark.parametrize("bad", [dict(blas="cublas"), dict(blas_min_fraction=1.5),
                                 dict(blas_min_fraction="half"), dict(blas_min_fraction=True)])
def test_bad_knobs_are_value_errors(clean_blocks, bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        _schedule(**bad)


# ---- GPU: cuBLAS with fp32 output, Llama-3's vocabulary ----

@pytest.mark.gpu
@pytest.mark.parametrize("frozen", [(), ("weight",)])
@pytest.mark.parametrize("vocab", [128256, 128257])  # Llama-3, and with the seed's pad token
def test_gpu_real_vocabulary(blas, frozen, vocab, monkeypatch):
    """cuBLAS with fp32 output; at the odd vocabulary the GEMMs read and write the (chunk, V)
    view of the padded logits buffer (strided operands and outputs, bias in the GEMM)."""
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 512 * 128256 * 2)  # 2 chunks
    inputs = make_lm_head_inputs((1000,), 1024, vocab, dtype=torch.bfloat16, device="cuda",
                                 ignored=0.1, bias=True)
    _check("triton", inputs, label_smoothing=0.05, z_loss_weight=1e-4, freeze=frozen)
    assert len(blas.blas) == 1
    assert triton_impl._FP32_OUT_GEMM.get(("cuda", torch.bfloat16, False)) is True
    if not frozen:  # grad_weight's accumulating addmm (2 chunks) ran with fp32 output too
        assert triton_impl._FP32_OUT_GEMM.get(("cuda", torch.bfloat16, True)) is True


@pytest.mark.gpu
def test_gpu_module_reads_the_previous_count_without_a_sync(monkeypatch):
    """On CUDA the count travels by a non-blocking copy into pinned memory; the next call reads
    it after the event and takes the BLAS schedule for a dense batch."""
    from olakernels import LinearCrossEntropy

    calls = []
    real = blas_fused_grad.linear_cross_entropy_fwd_grad_blas
    monkeypatch.setattr(blas_fused_grad, "linear_cross_entropy_fwd_grad_blas",
                        lambda *a: calls.append(1) or real(*a))
    head = LinearCrossEntropy(256, 1000, bias=False).to("cuda", torch.bfloat16)
    hidden = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 1000, (512,), device="cuda")
    head(hidden, labels).backward()
    assert calls == [] and head._history.host.is_pinned()
    head(hidden, labels).backward()
    assert calls == [1] and head._history.fraction() == 1.0

