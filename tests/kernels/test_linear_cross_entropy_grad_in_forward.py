# linear_cross_entropy's Triton path with the tile knob grad_in_forward (gradients in the forward).
"""The forward computes unit gradients (those of loss.sum()) per chunk and the backward only
scales them by the upstream scalar: checked against the float64 reference in every dtype, for
"mean"/"sum", with several chunks (a tiny dlogits budget, ragged N: chunks wholly past the
count, one partly labelled, a last chunk shorter than the buffer), and that the mode is taken
only when it is exact and useful ("none", no_grad, nothing trainable: the normal path).
"""
import pytest
import torch
from test_linear_cross_entropy import DTYPES, _check, _run, assert_compiled_matches_eager

from olakernels import linear_cross_entropy
from olakernels.linear_cross_entropy.impl import triton as triton_impl
from olakernels.linear_cross_entropy.impl import triton_fused_grad
from olakernels.testing import make_lm_head_inputs, track_peak_memory

RAGGED = ((150,), 23, 101)  # N not a multiple of the 16-row interpreter tile; prime H and V


class Calls:
    """Spies: arguments of each forward-with-gradients call, and count of normal backwards."""

    def __init__(self):
        self.fused: list[tuple] = []
        self.backward = 0


@pytest.fixture
def grad_fwd(monkeypatch):
    """grad_in_forward on, 32-row chunks (5 at N=150); monkeypatch restores both and the spies."""
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"grad_in_forward": True})
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 32 * 101 * 4)
    calls = Calls()
    fused, backward = triton_fused_grad.lce_forward_with_grads, triton_impl.lce_backward

    def spy_fused(*args):
        calls.fused.append(args[8:11])  # (need_hidden, need_weight, need_bias)
        return fused(*args)

    def spy_backward(*args):
        calls.backward += 1
        return backward(*args)

    monkeypatch.setattr(triton_fused_grad, "lce_forward_with_grads", spy_fused)
    monkeypatch.setattr(triton_impl, "lce_backward", spy_backward)
    return calls


def _leaves(hidden, weight, bias, freeze=()):
    named = {"hidden": hidden, "weight": weight, "bias": bias}
    return {k: None if v is None else v.detach().clone().requires_grad_(k not in freeze)
            for k, v in named.items()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("ignored", [0.0, 0.5, 1.0])
def test_matches_reference(grad_fwd, dtype, reduction, ignored, device):
    inputs = make_lm_head_inputs(*RAGGED, dtype=dtype, device=device, ignored=ignored, bias=True)
    _check("triton", inputs, reduction=reduction)
    assert grad_fwd.fused == [(True, True, True)] and grad_fwd.backward == 0


@pytest.mark.parametrize("dw_backend", ["triton", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_option_together(grad_fwd, dw_backend, reduction, device):
    triton_impl.BLOCKS_OVERRIDE["dw_backend"] = dw_backend
    inputs = make_lm_head_inputs(*RAGGED, dtype=torch.bfloat16, device=device, ignored=0.3,
                                 bias=True)
    _check("triton", inputs, label_smoothing=0.2, z_loss_weight=1e-3, logit_softcap=5.0,
           reduction=reduction)
    assert len(grad_fwd.fused) == 1


def test_leading_dims_and_one_chunk(grad_fwd, device, monkeypatch):
    # (B, L) tokens and the default budget: a single chunk holds every row.
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 512 * 2**20)
    inputs = make_lm_head_inputs((2, 24), 64, 512, device=device, ignored=0.3)
    _check("triton", inputs)
    assert len(grad_fwd.fused) == 1


@pytest.mark.parametrize("frozen", [("weight",), ("hidden",), ("weight", "bias"), ("bias",)])
def test_frozen_inputs(grad_fwd, frozen, device):
    inputs = make_lm_head_inputs(*RAGGED, device=device, ignored=0.5, bias=True)
    _, grads = _check("triton", inputs, freeze=frozen)
    assert all(grads[name] is None for name in frozen)
    # Only the needed gradients are computed: a frozen weight skips dW, hidden skips dX.
    assert grad_fwd.fused == [tuple(name not in frozen for name in ("hidden", "weight", "bias"))]


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch, then launches the real one."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("dw_backend", ["triton", "torch"])
def test_frozen_weight_skips_the_weight_gemm(grad_fwd, dw_backend, device, monkeypatch):
    triton_impl.BLOCKS_OVERRIDE["dw_backend"] = dw_backend
    launched = []
    torch_dw = triton_impl._dweight_torch
    monkeypatch.setattr(triton_impl, "_dweight_torch",
                        lambda *a: launched.append("torch") or torch_dw(*a))
    monkeypatch.setattr(triton_impl, "_lce_dweight_kernel",
                        _LaunchSpy(triton_impl._lce_dweight_kernel, launched))
    inputs = make_lm_head_inputs(*RAGGED, device=device, ignored=0.5, bias=True)
    _run("triton", *inputs, freeze=("weight",))  # the bias still trains: its column sum runs
    assert len(launched) == 5 and grad_fwd.fused == [(True, False, True)]
    launched.clear()
    _run("triton", *inputs, freeze=("weight", "bias"))
    assert launched == [] and grad_fwd.fused[-1] == (True, False, False)


def test_reduction_none_takes_the_normal_path(grad_fwd, device):
    inputs = make_lm_head_inputs(*RAGGED, device=device, ignored=0.3, bias=True)
    _check("triton", inputs, reduction="none")  # per-token weights: unit gradients are wrong
    assert grad_fwd.fused == [] and grad_fwd.backward == 1


def test_no_gradient_work_without_grad(grad_fwd, device):
    hidden, weight, labels, bias = make_lm_head_inputs(*RAGGED, device=device, ignored=0.3,
                                                       bias=True)
    leaves = _leaves(hidden, weight, bias)
    with torch.no_grad():
        under_no_grad = linear_cross_entropy(leaves["hidden"], leaves["weight"], labels,
                                             bias=leaves["bias"], impl="triton")
    frozen = linear_cross_entropy(hidden, weight, labels, bias=bias, impl="triton")  # eval
    assert grad_fwd.fused == [] and grad_fwd.backward == 0
    assert not under_no_grad.requires_grad and not frozen.requires_grad
    with_grad = linear_cross_entropy(leaves["hidden"], leaves["weight"], labels,
                                     bias=leaves["bias"], impl="triton")
    assert len(grad_fwd.fused) == 1
    assert torch.equal(with_grad.detach(), under_no_grad) and torch.equal(frozen, under_no_grad)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_upstream_gradient_scales_the_unit_gradients(grad_fwd, reduction, device):
    """(loss * 3.7 + loss ** 2).backward(): the op gets the same scalar at every token (the
    claim that makes scaling exact); compared with the default path's full backward."""
    hidden, weight, labels, bias = make_lm_head_inputs(*RAGGED, device=device, ignored=0.4,
                                                       bias=True)
    grads = []
    for knob in (True, False):
        triton_impl.BLOCKS_OVERRIDE["grad_in_forward"] = knob
        leaves = _leaves(hidden, weight, bias)
        loss = linear_cross_entropy(leaves["hidden"], leaves["weight"], labels,
                                    bias=leaves["bias"], reduction=reduction, impl="triton")
        (loss * 3.7 + loss ** 2).backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    assert len(grad_fwd.fused) == 1 and grad_fwd.backward == 1
    for name in grads[0]:  # same math, rounding in another order (scaled before/after dW)
        scale = grads[1][name].abs().max().item()
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_ignored_gives_zero(grad_fwd, reduction, device):
    hidden, weight, labels, bias = make_lm_head_inputs(*RAGGED, device=device, ignored=1.0,
                                                       bias=True)
    out, grads = _run("triton", hidden, weight, labels, bias, reduction=reduction)
    assert torch.count_nonzero(out.loss) == 0 and not out.loss.isnan().any()
    assert out.num_valid.item() == 0 and not out.correct.any()
    for grad in grads.values():
        assert torch.count_nonzero(grad) == 0
    assert len(grad_fwd.fused) == 1


def test_deterministic(grad_fwd, device):
    inputs = make_lm_head_inputs(*RAGGED, device=device, ignored=0.3, bias=True)
    (out_a, grads_a), (out_b, grads_b) = _run("triton", *inputs), _run("triton", *inputs)
    assert torch.equal(out_a.loss, out_b.loss)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_peak_memory_far_below_logits(grad_fwd, device, monkeypatch):
    # As test_linear_cross_entropy's: 256 tokens x 4096-token vocabulary with a budget of 1/16
    # of the logits; this mode also keeps fp32 unit gradients from the forward to the backward.
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 16 * 4096 * 4)
    triton_impl.BLOCKS_OVERRIDE["row_v"] = 4096  # one row tile: the interpreter is slow per tile
    hidden, weight, labels, _ = make_lm_head_inputs((256,), 32, 4096, device=device, ignored=0.5)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logits_bytes = labels.numel() * weight.shape[0] * 4
    with track_peak_memory() as mem:
        linear_cross_entropy(hidden, weight, labels, impl="triton").backward()
    grads = (hidden.numel() + weight.numel()) * 4 * 2  # unit fp32 + scaled gradients
    assert mem.peak - grads < logits_bytes / 4, (mem.peak, grads, logits_bytes)
    assert len(grad_fwd.fused) == 1


def test_opcheck(device):
    hidden, weight, labels, bias = make_lm_head_inputs((24,), 16, 40, device=device, bias=True)
    for need in ((True, True, True), (False, True, False), (True, False, True)):
        args = (hidden.requires_grad_(need[0]), weight.requires_grad_(need[1]),
                bias.requires_grad_(need[2]), labels, -100, 0.1, 1e-3, 3.0, *need)
        torch.library.opcheck(triton_fused_grad.linear_cross_entropy_fwd_grad, args)


def test_compile_fullgraph_matches_eager(grad_fwd, device):
    hidden, weight, labels, bias = make_lm_head_inputs((2, 12), 16, 64, device=device, bias=True)

    def loss_fn(h, w, b, y):
        return linear_cross_entropy(h, w, y, bias=b, shift_labels=True, impl="triton") * 3.7

    assert_compiled_matches_eager(loss_fn, hidden, weight, bias, labels)
    assert len(grad_fwd.fused) == 2 and grad_fwd.backward == 0  # compiled: the same mode


def test_knob_must_be_a_bool(monkeypatch, device):
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"grad_in_forward": "yes"})
    hidden, weight, labels, _ = make_lm_head_inputs((8,), 16, 40, device=device)
    with pytest.raises(ValueError, match="grad_in_forward"):
        _run("triton", hidden, weight, labels)


# ---- GPU: bf16 logits buffer (the loss reduces bf16-rounded logits), real vocabulary ----

@pytest.mark.gpu
@pytest.mark.parametrize("dw_backend", ["triton", "torch"])
def test_gpu_real_vocabulary(grad_fwd, dw_backend, monkeypatch):
    triton_impl.BLOCKS_OVERRIDE["dw_backend"] = dw_backend
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 256 * 32064 * 2)  # 4 chunks
    inputs = make_lm_head_inputs((1000,), 1024, 32064, dtype=torch.bfloat16, device="cuda",
                                 ignored=0.5, bias=True)
    _check("triton", inputs, label_smoothing=0.05, z_loss_weight=1e-4)
    assert len(grad_fwd.fused) == 1
