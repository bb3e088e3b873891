# linear_cross_entropy with max_valid_tokens: buffers and grids sized by a host-side bound.
"""A caller that knows (on the host) how many tokens carry a label passes ``max_valid_tokens``;
the Triton path then sizes its compacted-row buffers and grids for that many rows (rounded up
to ROW_QUANTUM, patched small here so that the bound is far below N) instead of N. The results
must equal the reference's on every schedule (vocab slabs, rows, frozen head, gradients in the
forward); a bound below the true count must give NaN, never a partial loss.
"""
import pytest
import torch
import triton
from test_linear_cross_entropy import _check

from olakernels import linear_cross_entropy
from olakernels.linear_cross_entropy import api
from olakernels.linear_cross_entropy.impl import triton as triton_impl
from olakernels.linear_cross_entropy.impl import triton_vocab_slabs
from olakernels.testing import make_lm_head_inputs

LEADING, H, V = (3, 50), 23, 301  # 150 positions, ~30 labelled at 80% ignored
QUANTUM = 16


@pytest.fixture
def small_quantum(monkeypatch):
    monkeypatch.setattr(api, "ROW_QUANTUM", QUANTUM)


class _Grids:
    """Records the grids one kernel is launched with (then launches it)."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def _labelled(labels) -> int:
    return int((labels != -100).sum())


SCHEDULES = {  # (blas="never": a frozen head with a bound would take the BLAS schedule)
    "vocab": dict(freeze=()),
    "rows": dict(freeze=(), blocks={"schedule": "rows"}),
    "frozen_head": dict(freeze=("weight",), blocks={"blas": "never"}),
    "grad_in_forward": dict(freeze=(), blocks={"grad_in_forward": True}),
    # "always": fp16 too ("auto" takes bf16 only); fp32: never taken (the frozen head's kernels)
    "blas": dict(freeze=("weight",), blocks={"blas": "always"}),
}


@pytest.mark.parametrize("schedule", SCHEDULES, ids=SCHEDULES.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_bounded_rows_match_the_reference(small_quantum, monkeypatch, schedule, dtype, device):
    case = SCHEDULES[schedule]
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", dict(case.get("blocks", {})))
    forward = _Grids(triton_impl._lce_fwd_kernel)
    monkeypatch.setattr(triton_impl, "_lce_fwd_kernel", forward)
    inputs = make_lm_head_inputs(LEADING, H, V, dtype=dtype, device=device, ignored=0.8,
                                 bias=True)
    count = _labelled(inputs[2])
    assert 16 < count <= 48  # so that the bound (rounded to 16) is far below the 150 rows
    reduction = "sum" if schedule in ("grad_in_forward", "blas") else "mean"
    out, _ = _check("triton", inputs, max_valid_tokens=count, label_smoothing=0.1,
                    reduction=reduction, freeze=case["freeze"])
    assert int(out.num_valid) == count
    rows = -(-count // QUANTUM) * QUANTUM
    blk = triton_impl._blocks()
    blas = schedule == "blas" and dtype != torch.float32
    if schedule != "grad_in_forward" and not blas:  # (those have no forward grid of their own)
        assert forward.grids[0][0] == triton.cdiv(rows, blk["n"])  # not cdiv(150, 16)
    assert (forward.grids == []) == (schedule == "grad_in_forward" or blas)


def test_the_vocab_slabs_widen_with_a_bound(small_quantum, monkeypatch, device):
    """Same slab budget, a third of the rows: a third of the slabs."""
    monkeypatch.setattr(triton_vocab_slabs, "SLAB_BUDGET_BYTES", 150 * 64 * 4)
    slabs = _Grids(triton_vocab_slabs._lce_dlogits_kernel)
    monkeypatch.setattr(triton_vocab_slabs, "_lce_dlogits_kernel", slabs)
    inputs = make_lm_head_inputs(LEADING, H, V, device=device, ignored=0.8)
    count = _labelled(inputs[2])
    for bound in (None, count):
        slabs.grids.clear()
        _check("triton", inputs, max_valid_tokens=bound)
        rows = 150 if bound is None else -(-count // QUANTUM) * QUANTUM
        width = triton_vocab_slabs.slab_width(rows, V, H, 4, 32)
        assert len(slabs.grids) == triton.cdiv(V, width)
        assert slabs.grids[0][0] == triton.cdiv(rows, triton_impl._blocks()["n"])
    assert width > 64  # the bounded run's slabs are wider than the unbounded 64 columns


@pytest.mark.parametrize("impl", ["triton", "torch", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_a_bound_below_the_count_gives_nan_not_a_partial_loss(small_quantum, impl, reduction,
                                                              device):
    hidden, weight, labels, _ = make_lm_head_inputs(LEADING, H, V, device=device, ignored=0.3)
    count = _labelled(labels)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = linear_cross_entropy(hidden, weight, labels, max_valid_tokens=count // 3,
                               reduction=reduction, return_stats=True, impl=impl)
    assert torch.isnan(out.loss).all()
    assert int(out.num_valid) == count  # the true count
    out.loss.sum().backward()
    assert torch.isnan(weight.grad).all() and torch.isnan(hidden.grad).any()
    # The exact count, or any larger bound: finite.
    for bound in (count, count + 1000):
        ok = linear_cross_entropy(hidden, weight, labels, max_valid_tokens=bound, impl=impl,
                                  reduction=reduction)
        assert torch.isfinite(ok).all()


def test_bound_zero_with_nothing_labelled(small_quantum, device):
    hidden, weight, labels, _ = make_lm_head_inputs((40,), H, V, device=device, ignored=1.0)
    hidden.requires_grad_(True)
    loss = linear_cross_entropy(hidden, weight, labels, max_valid_tokens=0, impl="triton")
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(hidden.grad, torch.zeros_like(hidden))


@pytest.mark.parametrize("bad", [-1, True, 2.5, "8", "auto", torch.tensor(8)])
def test_a_bad_bound_is_refused(bad):
    hidden, weight, labels, _ = make_lm_head_inputs((8,), H, V)
    with pytest.raises(ValueError, match=r"max_valid_tokens must be None, an int >= 0 .* or "
                                         r"'count'"):
        linear_cross_entropy(hidden, weight, labels, max_valid_tokens=bad)


def test_a_numpy_integer_bound_is_an_int():
    import numpy as np

    hidden, weight, labels, _ = make_lm_head_inputs((8,), H, V)
    count = int((labels != -100).sum())
    torch.testing.assert_close(
        linear_cross_entropy(hidden, weight, labels, max_valid_tokens=np.int64(count)),
        linear_cross_entropy(hidden, weight, labels, max_valid_tokens=count), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_count_on_the_host_is_the_exact_bound(small_quantum, monkeypatch, dtype, device):
    """max_valid_tokens="count": the op counts the (shifted) labels itself and behaves exactly
    as if the caller had passed that count; the module can make it its default."""
    from olakernels import LinearCrossEntropy

    seen = []
    real = triton_impl.forward_schedule
    monkeypatch.setattr(triton_impl, "forward_schedule",
                        lambda h, w, bound, *a: seen.append(bound) or real(h, w, bound, *a))
    hidden, weight, labels, _ = make_lm_head_inputs(LEADING, H, V, dtype=dtype, device=device,
                                                    ignored=0.3)
    shifted = int((labels[..., 1:] != -100).sum())
    results = []
    for bound in ("count", shifted):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = linear_cross_entropy(h, w, labels, shift_labels=True, impl="triton",
                                    max_valid_tokens=bound)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    assert seen == [shifted, shifted]
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)
    head = LinearCrossEntropy(H, V, bias=False, shift_labels=True, max_valid_tokens="count",
                              impl="triton").to(device, dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
    assert torch.equal(head(hidden, labels), results[0][0])
    assert seen[-1] == shifted and "max_valid_tokens='count'" in repr(head)
    with pytest.raises(ValueError, match=r"^LinearCrossEntropy: max_valid_tokens must be None, "
                                         r"an int >= 0 .* or 'count' .*got 'auto'"):
        LinearCrossEntropy(H, V, max_valid_tokens="auto")  # refused when built, not at use


def test_count_on_the_host_is_refused_under_compile(device):
    hidden, weight, labels, _ = make_lm_head_inputs((16,), H, V, device=device)
    fn = torch.compile(lambda h, w, y: linear_cross_entropy(h, w, y, impl="torch",
                                                            max_valid_tokens="count"),
                       fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="max_valid_tokens='count' reads the labels on the host"):
        fn(hidden, weight, labels)


def test_bounded_forward_splits_fill_the_gpu(monkeypatch):
    """The split count on a 132-SM GPU for Llama-3's head with 2 labelled row blocks (no
    launch: a pure function of the shapes)."""
    monkeypatch.setattr(triton_impl, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(triton_impl, "num_sms", lambda device: 132)
    blk = dict(triton_impl.GPU_BLOCKS)
    assert triton_impl.vocab_splits(128256, 2, blk, None, bounded=False) == 16
    # 2 x 132 programs wanted; capped at 126 splits of >= 4 column tiles (1,024 columns).
    assert triton_impl.vocab_splits(128256, 2, blk, None, bounded=True) == 126
    assert triton_impl.vocab_splits(128256, 6, blk, None, bounded=True) == 44
    assert triton_impl.vocab_splits(128256, 200, blk, None, bounded=True) == 16  # many rows
    assert triton_impl.vocab_splits(2000, 1, blk, None, bounded=True) == 2  # >= 4 tiles each


def test_opcheck_and_compile_with_a_bound(small_quantum, device):
    """The custom ops' fake shapes follow max_rows (lse holds the bounded rows), and the bound
    traces under torch.compile(fullgraph=True) with the eager result."""
    from test_linear_cross_entropy import assert_compiled_matches_eager

    hidden, weight, labels, bias = make_lm_head_inputs((40,), 16, 40, device=device, bias=True,
                                                       ignored=0.7)
    count = _labelled(labels)
    max_rows = -(-count // QUANTUM) * QUANTUM
    assert max_rows < 40
    args = (hidden.requires_grad_(True), weight.requires_grad_(True), bias, labels, -100, 0.1,
            1e-3, 0.0, max_rows)
    torch.library.opcheck(triton_impl.linear_cross_entropy_fwd, args)
    with torch.no_grad():
        loss, _, lse, order, cnt = triton_impl.linear_cross_entropy_fwd(*args)
    assert lse.shape == (max_rows,)
    torch.library.opcheck(
        triton_impl.linear_cross_entropy_bwd,
        (hidden.detach(), weight.detach(), bias, labels, order, cnt, lse,
         torch.rand(40, device=device), 0.1, 1e-3, 0.0, True, True, True, max_rows),
    )

    def loss_fn(h, w, b, y):
        return linear_cross_entropy(h, w, y, bias=b, impl="triton", max_valid_tokens=count)

    assert_compiled_matches_eager(loss_fn, hidden.detach(), weight.detach(), bias, labels)


def test_the_module_passes_the_bound(small_quantum, device):
    from olakernels import LinearCrossEntropy

    hidden, weight, labels, _ = make_lm_head_inputs((40,), 16, 40, device=device, ignored=0.7)
    head = LinearCrossEntropy(16, 40, bias=False, impl="triton").to(device)
    with torch.no_grad():
        head.weight.copy_(weight)
    count = _labelled(labels)
    torch.testing.assert_close(head(hidden, labels, max_valid_tokens=count), head(hidden, labels))
    assert torch.isnan(head(hidden, labels, max_valid_tokens=count - 1))
