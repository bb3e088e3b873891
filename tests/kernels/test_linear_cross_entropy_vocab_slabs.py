# linear_cross_entropy's Triton backward in vocabulary slabs (a trainable head's default).
"""The "vocab" schedule (impl/triton_vocab_slabs.py): per slab of the vocabulary, dlogits of every
labelled row, grad_weight of the slab finished in one pass (stored in the weight's dtype), and
grad_hidden summed over the slabs in an fp32 buffer that the last slab scatters to the rows.
These tests make several slabs matter: a slab budget of 32 columns at N=60 gives 4 slabs of
V=101 (the last one 5 columns: ragged tiles), so grad_hidden goes through the first (no load),
middle (load and store the fp32 sum) and last (load, scatter) launches; grad_hidden's H tile
(two halves of 16) covers H=23 in one program whose second half is ragged, the dW tiles of 16
in two blocks (the second ragged). A second case (H=70) has several H programs, the last with
one half partly and one wholly past H, and slabs sized by the default budget rule. The
schedule is taken where its N x H buffers are the smaller ones, 3 N <= 2 V (60 rows of a
101-token vocabulary).
"""
import pytest
import torch
from test_linear_cross_entropy import _check, _run

from olakernels.linear_cross_entropy.impl import triton as triton_impl
from olakernels.linear_cross_entropy.impl import triton_vocab_slabs
from olakernels.testing import make_lm_head_inputs, track_peak_memory

N, H, V = 60, 23, 101
TILES = {"dw_m": 16, "dw_h": 16, "dw_k": 16, "narrow_h": 16, "slab_h": 32}


def _slab_budget(rows: int, cols: int, itemsize: int = 4) -> int:
    return rows * cols * itemsize


@pytest.fixture
def small_slabs(monkeypatch):
    """32-column slabs at N=60 (fp32 dlogits under the interpreter), dW H tiles of 16,
    grad_hidden's two halves of 16 (H = 23: the second half is ragged)."""
    monkeypatch.setattr(triton_vocab_slabs, "SLAB_BUDGET_BYTES", _slab_budget(N, 32))
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", dict(TILES))


class _Launches:
    """Counts the launches of one kernel (and keeps their constexpr flags) around the real one."""

    def __init__(self, kernel):
        self.kernel, self.flags = kernel, []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.flags.append({k: v for k, v in kwargs.items() if k.isupper()})
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture
def launches(monkeypatch):
    spies = {name: _Launches(getattr(triton_vocab_slabs, name)) for name in
             ("_lce_dlogits_kernel", "_lce_dhidden_slab_kernel", "_lce_dweight_kernel")}
    for name, spy in spies.items():
        monkeypatch.setattr(triton_vocab_slabs, name, spy)
    return spies


CASES = [(torch.float32, 0.0, "mean"), (torch.float32, 0.4, "none"),
         (torch.bfloat16, 0.4, "mean"), (torch.float16, 0.0, "sum")]


@pytest.mark.parametrize(("dtype", "ignored", "reduction"), CASES,
                         ids=lambda c: str(c).removeprefix("torch."))
def test_several_slabs_with_bias_smoothing_z_loss_and_softcap(small_slabs, launches, dtype,
                                                              ignored, reduction, device):
    inputs = make_lm_head_inputs((N,), H, V, dtype=dtype, device=device, ignored=ignored,
                                 bias=True)
    _check("triton", inputs, label_smoothing=0.1, z_loss_weight=1e-3, logit_softcap=4.0,
           reduction=reduction)
    # The layout the test relies on (so that a change of defaults cannot make it vacuous).
    assert len(launches["_lce_dlogits_kernel"].flags) == 4  # ceil(101 / 32) slabs
    acc = [(f["ACC_IN"], f["ACC_OUT"]) for f in launches["_lce_dhidden_slab_kernel"].flags]
    assert acc == [(False, True), (True, True), (True, True), (True, False)]
    assert all(not f["ACCUMULATE"] for f in launches["_lce_dweight_kernel"].flags)


def test_several_h_programs_and_the_budget_rule(launches, device, monkeypatch):
    """H = 70 in three grad_hidden programs of 32 columns (the last: one half 6 columns wide,
    the other empty), and slabs from the default rule, twice the rows' hidden bytes: 2 H = 140
    columns, rounded down to the 32-column tile, so 128 + 128 + 44 for V = 300."""
    monkeypatch.setattr(triton_vocab_slabs, "SLAB_FLOOR_BYTES", 0)
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", dict(TILES))
    inputs = make_lm_head_inputs((N,), 70, 300, device=device, ignored=0.3, bias=True)
    _check("triton", inputs, label_smoothing=0.1, z_loss_weight=1e-3)
    assert len(launches["_lce_dlogits_kernel"].flags) == 3
    assert [(f["ACC_IN"], f["ACC_OUT"]) for f in launches["_lce_dhidden_slab_kernel"].flags] \
        == [(False, True), (True, True), (True, False)]


def test_vocab_and_rows_schedules_agree(small_slabs, device, monkeypatch):
    """Both schedules sum the same fp32 products in another order: their gradients agree far
    more tightly than the reference tolerance (a dropped or doubled slab or row does not)."""
    inputs = make_lm_head_inputs((N,), H, V, device=device, ignored=0.4, bias=True)
    opts = dict(label_smoothing=0.1, reduction="sum")
    out_vocab, vocab = _run("triton", *inputs[:3], inputs[3], **opts)
    monkeypatch.setitem(triton_impl.BLOCKS_OVERRIDE, "schedule", "rows")
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 16 * V * 4)  # 4 row chunks
    out_rows, rows = _run("triton", *inputs[:3], inputs[3], **opts)
    torch.testing.assert_close(out_vocab.loss, out_rows.loss, rtol=0, atol=0)  # same forward
    for name in ("hidden", "weight", "bias"):
        torch.testing.assert_close(vocab[name], rows[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_one_slab_needs_no_fp32_sum(launches, device):
    """A vocabulary that fits one slab: grad_hidden is stored straight to the rows."""
    inputs = make_lm_head_inputs((N,), H, V, device=device, ignored=0.3)
    _check("triton", inputs)
    assert [(f["ACC_IN"], f["ACC_OUT"]) for f in launches["_lce_dhidden_slab_kernel"].flags] == \
        [(False, False)]


@pytest.mark.parametrize("freeze", [(), ("weight",), ("hidden",), ("weight", "bias")],
                         ids=lambda f: "-".join(f) or "none")
def test_which_gradients_take_which_schedule(small_slabs, launches, freeze, device):
    """A frozen weight runs the rows schedule, with or without a trainable bias (whose (V,)
    sum needs no slabs); a frozen hidden state skips grad_hidden."""
    inputs = make_lm_head_inputs((N,), H, V, device=device, ignored=0.3, bias=True)
    _check("triton", inputs, freeze=freeze)
    slabs = len(launches["_lce_dlogits_kernel"].flags)
    assert slabs == (0 if "weight" in freeze else 4)
    assert len(launches["_lce_dhidden_slab_kernel"].flags) == (0 if "hidden" in freeze else slabs)
    assert all(f["HAS_WEIGHT_GRAD"] and f["HAS_BIAS"] for f in launches["_lce_dweight_kernel"]
               .flags)


def test_many_more_rows_than_the_vocabulary_take_the_rows_schedule(small_slabs, launches,
                                                                   device):
    """3 N > 2 V: the slabs' N x H buffers would outweigh the (V, H) accumulator."""
    inputs = make_lm_head_inputs((2 * V,), H, V, device=device, ignored=0.3)
    _check("triton", inputs)
    assert not launches["_lce_dlogits_kernel"].flags
    assert not triton_impl.uses_vocab_schedule(triton_impl._blocks(), True, 152, 101)
    assert triton_impl.uses_vocab_schedule(triton_impl._blocks(), True, 67, 101)


def test_nothing_labelled_gives_zero_gradients(small_slabs, device):
    hidden, weight, labels, bias = make_lm_head_inputs((N,), H, V, device=device, bias=True)
    labels = torch.full_like(labels, -100)
    _, grads = _run("triton", hidden, weight, labels, bias, reduction="sum")
    for name, grad in grads.items():
        assert grad is not None and torch.count_nonzero(grad) == 0, name


def test_non_finite_hidden_in_ignored_rows_does_not_reach_the_gradients(small_slabs, device):
    """Rows past the labelled count are never read: inf/NaN there stays out of grad_weight."""
    hidden, weight, labels, bias = make_lm_head_inputs((N,), H, V, device=device, ignored=0.5,
                                                       bias=True)
    hidden = hidden.clone()
    hidden[labels == -100] = float("nan")
    _, grads = _run("triton", hidden, weight, labels, bias, reduction="sum")
    assert grads["weight"].isfinite().all() and grads["bias"].isfinite().all()
    assert grads["hidden"][labels != -100].isfinite().all()
    assert torch.count_nonzero(grads["hidden"][labels == -100]) == 0


def test_no_fp32_vocabulary_by_hidden_buffer(device, monkeypatch):
    """The point of the schedule: the backward's temporaries are the dlogits slab and N x H
    buffers; the rows schedule adds an fp32 (V, H) accumulator on top of grad_weight."""
    n, h, v = 64, 32, 2048
    monkeypatch.setattr(triton_vocab_slabs, "SLAB_BUDGET_BYTES", _slab_budget(n, 256))
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", _slab_budget(16, v))
    # bf16 parameters: their gradients are bf16, the rows schedule's accumulator fp32 (under
    # the interpreter dlogits are fp32 whatever the inputs).
    hidden, weight, labels, _ = make_lm_head_inputs((n,), h, v, dtype=torch.bfloat16,
                                                    device=device, ignored=0.25)

    def peak(schedule):
        monkeypatch.setitem(triton_impl.BLOCKS_OVERRIDE, "schedule", schedule)
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight)]
        loss = triton_impl.linear_cross_entropy_fwd(*leaves[:2], None, labels, -100, 0.0, 0.0,
                                                    0.0)[0].sum()
        with track_peak_memory() as mem:
            loss.backward()
        return mem.peak

    grads = (n * h + v * h) * 2
    vocab, rows = peak("vocab"), peak("rows")
    slab = n * 256 * 4
    row_bufs = n * h * (4 + 2) + 1024  # fp32 grad_hidden sum, gathered bf16 rows, small ones
    assert vocab <= grads + slab + row_bufs, (vocab, grads, slab)
    assert rows >= grads + v * h * 4, (rows, grads)  # the accumulator the slabs do without


def test_slab_width_is_within_the_budget_and_tile_aligned(monkeypatch):
    monkeypatch.setattr(triton_vocab_slabs, "SLAB_BUDGET_BYTES", 256 * 2**20)
    monkeypatch.setattr(triton_vocab_slabs, "SLAB_FLOOR_BYTES", 64 * 2**20)
    width = triton_vocab_slabs.slab_width
    assert width(16384, 128256, 4096, 2, 256) == 8192  # Llama-3 at N = 16k: 16 slabs, 256 MiB
    assert width(32768, 128256, 4096, 2, 256) == 4096
    # A bounded 90%-ignored batch (1,792 rows): 2 x its hidden rows is 28 MiB, the floor 64.
    assert width(1792, 128256, 4096, 2, 256) == 18688
    assert width(4096, 32064, 3072, 2, 256) == 8192  # Phi-3 at N = 4k: 48 MiB -> the floor
    assert width(512, 32064, 3072, 2, 256) == 32256  # one slab (V rounded up to the tile)
    assert width(10**7, 128256, 4096, 2, 256) == 256  # never below one tile


def test_unknown_schedule_is_a_value_error(monkeypatch, device):
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"schedule": "columns"})
    inputs = make_lm_head_inputs((8,), 16, 40, device=device)
    with pytest.raises(ValueError, match="schedule.*'columns'"):
        _run("triton", *inputs[:3])
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"slab_h": 48})
    with pytest.raises(ValueError, match="slab_h'.* power of two in .32, 256.*got 48"):
        _run("triton", *inputs[:3])


@pytest.mark.gpu
@pytest.mark.parametrize("schedule", ["vocab", "rows"])
def test_gpu_real_vocabulary_several_slabs(schedule, monkeypatch):
    """Llama-3's vocabulary in 8 slabs, or in 4 row chunks with the fp32 (V, H) accumulator
    (bf16, GPU tiles), against the float64 reference."""
    monkeypatch.setitem(triton_impl.BLOCKS_OVERRIDE, "schedule", schedule)
    monkeypatch.setattr(triton_vocab_slabs, "SLAB_BUDGET_BYTES", _slab_budget(1024, 16384, 2))
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", _slab_budget(256, 128256, 2))
    inputs = make_lm_head_inputs((1024,), 512, 128256, dtype=torch.bfloat16, device="cuda",
                                 ignored=0.5, bias=True)
    _check("triton", inputs, label_smoothing=0.05, z_loss_weight=1e-4)
