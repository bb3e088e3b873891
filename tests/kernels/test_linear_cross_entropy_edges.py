# linear_cross_entropy at its edges: argmax ties, saturated softcap, the fused-gradient row kernel.
"""Inputs the main tests never produce: exact ties for the top logit (the ``correct`` statistic
must follow torch.argmax: the first maximum wins, across vocabulary tiles and splits), logits far
past the softcap (tanh saturates), an fp32 bias on a bf16 head together with a softcap (the BLAS
schedule adds it in its row kernel), a z-loss large enough that its gradient stands out of
rounding, and label smoothing on the BLAS schedule's padded logits rows (V = 101 in rows of
128), checked with an identity that rounding cannot blur.
"""
import pytest
import torch
from test_linear_cross_entropy import SHAPES, _check, _run

from olakernels import linear_cross_entropy
from olakernels._triton import interpreter_enabled
from olakernels.linear_cross_entropy import api
from olakernels.linear_cross_entropy.impl import blas_fused_grad
from olakernels.linear_cross_entropy.impl import triton as triton_impl
from olakernels.testing import assert_close_to_reference, make_lm_head_inputs

RAGGED = ((150,), 23, 101)  # prime H and V (BLAS: rows padded to 128); N not a multiple of 16


def _tied_head(device, offset):
    """llama_like inputs whose head has an exact copy of each token's top row ``offset`` columns
    further on (mod V), and labels = the float64 argmax (the first of the tied maxima): the
    top logit of every token is attained twice, in another BLOCK_V tile (offset 40 > the
    interpreter's 32 columns) or, with offset V / 2, in the other vocabulary split."""
    hidden, weight, _, _ = make_lm_head_inputs(*SHAPES["llama_like"], device=device, ignored=0.0)
    v = weight.shape[0]
    flat = hidden.reshape(-1, hidden.shape[-1])
    weight = weight.clone()
    for top in (flat @ weight.T).argmax(-1).unique().tolist():
        weight[(top + offset) % v] = weight[top]
    logits = flat.double() @ weight.double().T
    labels = logits.argmax(-1)
    tied = (logits == logits.max(-1, keepdim=True).values).sum(-1) >= 2
    return hidden, weight, labels.reshape(hidden.shape[:-1]), tied.reshape(hidden.shape[:-1])


def _assert_correct_matches(hidden, weight, labels, tied, **opts):
    out = linear_cross_entropy(hidden, weight, labels, impl="triton", return_stats=True,
                               reduction="none", **opts)
    ref = linear_cross_entropy(hidden.double(), weight.double(), labels, impl="reference",
                               return_stats=True, reduction="none")
    labelled = labels != -100
    assert int((tied & labelled).sum()) >= 8  # the premise: many labelled rows with a tie
    assert bool(ref.correct[labelled].all())  # the labels are torch.argmax's choice
    # Exact: the tied logits are bit-equal (the same weight row), so no rounding excuses a miss.
    assert torch.equal(out.correct.cpu(), ref.correct.cpu())


def test_argmax_ties_across_vocab_tiles_go_to_the_first_maximum(device):
    """A head with duplicate rows (tied embeddings, a copied special token) gives exactly equal
    top logits in two column tiles: the forward kernel must keep the first one, as torch.argmax,
    or the ``correct`` statistic (token accuracy) counts right predictions as wrong."""
    hidden, weight, labels, tied = _tied_head(device, 40)
    _assert_correct_matches(hidden, weight, labels, tied)


def test_argmax_ties_across_vocab_splits_go_to_the_first_maximum(device, monkeypatch):
    """With a bound the forward grid splits the vocabulary (2 splits of 256 columns under the
    interpreter) and a combine kernel merges the splits' argmaxes: a tie between the splits must
    also go to the first split. (A mixed batch: 34 of the 48 tokens unlabelled.)"""
    monkeypatch.setattr(api, "ROW_QUANTUM", 16)  # so that the bound is below N
    hidden, weight, labels, tied = _tied_head(device, SHAPES["llama_like"][2] // 2)
    labels = labels.clone()
    drop = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))[:34]
    labels.view(-1)[drop] = -100
    count = int((labels != -100).sum())
    grids = []
    kernel = triton_impl._lce_fwd_kernel
    monkeypatch.setattr(triton_impl, "_lce_fwd_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: grids.append(grid) or kernel[grid]})())
    _assert_correct_matches(hidden, weight, labels, tied, max_valid_tokens=count)
    if interpreter_enabled():  # the premise (a GPU's wider tiles give one split here)
        assert grids[0][1] == 2


SOFTCAP_SCHEDULES = {
    "plain": ({"blas": "never"}, torch.float32),
    "grad_in_forward": ({"blas": "never", "grad_in_forward": True}, torch.float32),
}


@pytest.mark.parametrize("schedule", SOFTCAP_SCHEDULES, ids=SOFTCAP_SCHEDULES.keys())
def test_softcap_far_below_the_logits(schedule, device, monkeypatch):
    """logit_softcap=1.0 with logits up to ~11: z / softcap reaches ~11, where tanh is 1 - 5e-10.
    The kernels' own tanh must stay accurate out there (a clamp of its argument that is too
    small, e.g. at 4 where tanh is 1 - 7e-4, shifts every large logit by ~7e-4 x softcap)."""
    blocks, dtype = SOFTCAP_SCHEDULES[schedule]
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", blocks)
    inputs = make_lm_head_inputs(*SHAPES["llama_like"], dtype=dtype, device=device, ignored=0.3)
    logits = inputs[0].reshape(-1, inputs[0].shape[-1]) @ inputs[1].T
    assert logits.abs().max() > 8.0  # the premise: far into tanh's saturation
    _check("triton", inputs, logit_softcap=1.0, reduction="sum")


@pytest.fixture
def blas(monkeypatch):
    """blas="always": the BLAS schedule (half precision), ~32-row chunks (5 at N=150)."""
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"blas": "always"})
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 32 * 128 * 2)  # V padded to 128
    calls = []
    fwd = blas_fused_grad.lce_forward_with_grads_blas
    monkeypatch.setattr(blas_fused_grad, "lce_forward_with_grads_blas",
                        lambda *args: calls.append(args) or fwd(*args))
    return calls


def test_blas_bias_in_another_dtype_is_added_before_the_softcap(blas, device):
    """An fp32 bias on a bf16 head reaches the BLAS schedule's row kernel (the GEMM cannot add
    it): logits = softcap * tanh((h @ W^T + b) / softcap), the bias inside the tanh. The bias
    is large (x20) so that it matters, and exactly representable in bf16 so that eager (which
    needs a bias of the head's dtype) sees the same values."""
    hidden, weight, labels, bias = make_lm_head_inputs(*RAGGED, dtype=torch.bfloat16,
                                                       device=device, ignored=0.3, bias=True)
    bias16 = (bias.float() * 20).bfloat16()
    opts = dict(logit_softcap=2.0)
    out, grads = _run("triton", hidden, weight, labels, bias16.float(), **opts)
    assert len(blas) == 1  # the BLAS schedule ran
    d = lambda t: t.double()  # noqa: E731
    ref, r_grads = _run("reference", d(hidden), d(weight), labels, d(bias16), **opts)
    eager, e_grads = _run("reference", hidden, weight, labels, bias16, **opts)
    assert_close_to_reference(out.loss, ref.loss, eager.loss, name="loss", dtype=torch.float32,
                              reduction_size=RAGGED[1])
    for name, terms in (("hidden", RAGGED[2]), ("weight", 150), ("bias", 150)):
        assert_close_to_reference(grads[name], r_grads[name], e_grads[name], name=f"grad_{name}",
                                  k=3.0, reduction_size=terms)


def test_grad_in_forward_z_loss_gradient(device, monkeypatch):
    """The fused-gradient row kernel's d loss / d logits with a z-loss: p * (1 + 2 zw lse) -
    onehot. A z-loss weight of 0.05 makes the lse term ~50% of p (lse ~5), in fp32 against the
    float64 reference (at the usual 1e-4..1e-3 it hides inside half-precision rounding)."""
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"blas": "never", "grad_in_forward": True})
    inputs = make_lm_head_inputs(*RAGGED, device=device, ignored=0.3, bias=True)
    _check("triton", inputs, z_loss_weight=0.05, reduction="sum")


def test_blas_z_loss_gradient(blas, device):
    """The same row kernel on the BLAS schedule (half precision only): with z_loss_weight=0.1
    the z-loss term 2 zw lse p is about as large as p (lse ~5), far above fp16's rounding
    (bf16's budget floor, 8 bits of mantissa over a 101-term sum, would hide a wrong factor)."""
    dtype = torch.float16
    inputs = make_lm_head_inputs(*RAGGED, dtype=dtype, device=device, ignored=0.3, bias=True)
    _check("triton", inputs, z_loss_weight=0.1, reduction="sum")
    assert len(blas) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_blas_label_smoothing_gradient_sums_to_zero_over_the_vocabulary(blas, dtype, device):
    """Without z-loss and softcap every row of d loss / d logits sums to 0 over the V columns:
    sum_v (p_v - eps / V) - (1 - eps) = 0. grad_bias is the weighted sum of those rows, so its
    entries sum to 0 too. The BLAS schedule's logits rows are padded (V = 101 in rows of 128):
    dividing the smoothing by the padded row length instead of V leaves eps * (1 - 101/128) per
    row, ~0.021 at eps = 0.1, in the mean. Half-precision gradients round each stored entry by
    at most eps(dtype) / 2 relative, and each row's entries have |.| summing to at most 2, so
    with the mean's weights (summing to 1) rounding moves the sum by at most eps(dtype)."""
    hidden, weight, labels, bias = make_lm_head_inputs(*RAGGED, dtype=dtype, device=device,
                                                       ignored=0.3, bias=True)
    _, grads = _run("triton", hidden, weight, labels, bias, label_smoothing=0.1)
    assert len(blas) == 1
    grad_bias = grads["bias"].double()
    assert grad_bias.abs().max() > 1e-2  # not trivially 0
    total = float(grad_bias.sum())
    assert abs(total) <= torch.finfo(dtype).eps, f"sum of grad_bias {total:.3e}"


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32),
                                    (torch.float32, torch.float16)],
                         ids=["bf16-hidden-fp32-weight", "fp32-hidden-fp16-weight"])
def test_mixed_operand_dtypes_compute_in_the_wider_dtype(impl, dtypes, device):
    """hidden and weight of different dtypes (bf16 activations and an fp32 master weight
    outside autocast): the op warns, computes as if both were in the wider dtype (the oracle:
    float64 of the same values), and returns each gradient in its own input's dtype."""
    hidden, weight, labels, bias = make_lm_head_inputs(*RAGGED, device=device, ignored=0.3)
    hidden, weight = hidden.to(dtypes[0]), weight.to(dtypes[1])
    with pytest.warns(UserWarning, match=r"hidden \(torch\.\w+\) and weight \(torch\.\w+\) "
                                         r"differ: the op computes in torch.float32"):
        _, grads = _check(impl, (hidden, weight, labels, None))
    assert grads["hidden"].dtype == dtypes[0] and grads["weight"].dtype == dtypes[1]
