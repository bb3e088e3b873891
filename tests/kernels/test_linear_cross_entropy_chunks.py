# linear_cross_entropy's Triton backward over several chunks, against the float64 reference.
"""The "rows" schedule (the frozen head's, and the trainable head's with schedule="rows"). The
dW kernel (_lce_dweight_kernel) reads each chunk's hidden rows from a buffer gathered by the
launcher (hidden.index_select(0, order[start:...])), starts later chunks (ACCUMULATE) from
the stored fp32 sum, and adds the bias gradient of each chunk to the stored one from the H block
0 only. These tests make every one of those paths matter at once: 32-row chunks (5 at N=150, the
last one 22 rows), a labelled count that is not a multiple of the dW kernel's row tile and ends
inside a later chunk, several H blocks (dw_h=16 < H=23), bias and label smoothing (the forward
sums the logits only then: HAS_SMOOTHING). The forward's label-smoothing sum over several
vocabulary splits (V > 8192) is checked separately: no other CPU test has more than one split.
"""
import pytest
import torch
from test_linear_cross_entropy import _check

from olakernels import linear_cross_entropy
from olakernels.linear_cross_entropy.impl import triton as triton_impl
from olakernels.testing import assert_close_to_reference, make_lm_head_inputs

N, H, V = 150, 23, 101
DW_TILES = {"dw_m": 16, "dw_h": 16, "dw_k": 16}


@pytest.fixture
def small_chunks(monkeypatch):
    """The rows schedule, 32-row chunks and dW tiles of 16 (2 H blocks at H=23); monkeypatch
    restores them. (A trainable head runs the vocab schedule by default:
    test_linear_cross_entropy_vocab_slabs.py.)"""
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 32 * V * 4)
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {**DW_TILES, "schedule": "rows"})


# ignored 0.0: the count ends inside the short last chunk; 0.4: inside the third of five.
CASES = [(torch.float32, 0.0, "mean"), (torch.float32, 0.4, "none"),
         (torch.bfloat16, 0.4, "mean"), (torch.bfloat16, 0.0, "none")]


@pytest.mark.parametrize(("dtype", "ignored", "reduction"), CASES,
                         ids=lambda c: str(c).removeprefix("torch."))
def test_several_chunks_with_bias_and_smoothing(small_chunks, dtype, ignored, reduction, device):
    hidden, weight, labels, bias = make_lm_head_inputs((N,), H, V, dtype=dtype, device=device,
                                                       ignored=ignored, bias=True)
    # The layout the test relies on (so that a change of defaults cannot make it vacuous).
    _, _, _, chunk = triton_impl.chunk_layout(hidden, weight)
    count = int((labels != -100).sum())
    assert chunk == 32 and count > 2 * chunk, (chunk, count)
    assert count % chunk % DW_TILES["dw_k"] != 0  # a ragged tile in a later (ACCUMULATE) chunk
    assert triton_impl.triton.cdiv(H, DW_TILES["dw_h"]) > 1
    _check("triton", (hidden, weight, labels, bias), label_smoothing=0.1, reduction=reduction)


def test_many_chunks_equal_one_chunk(small_chunks, device, monkeypatch):
    """Chunking changes the order of the fp32 sums only: the gradients of 5 chunks and of one
    agree far more tightly than the reference tolerance (a dropped or doubled row does not)."""
    hidden, weight, labels, bias = make_lm_head_inputs((N,), H, V, device=device, ignored=0.4,
                                                       bias=True)

    def grads():
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        loss = linear_cross_entropy(leaves[0], leaves[1], labels, bias=leaves[2],
                                    impl="triton", label_smoothing=0.1, reduction="sum")
        loss.backward()
        return loss.detach(), [t.grad for t in leaves]

    loss_many, many = grads()
    monkeypatch.setattr(triton_impl, "DLOGITS_BUDGET_BYTES", 512 * 2**20)
    assert triton_impl.chunk_layout(hidden, weight)[3] >= N
    loss_one, one = grads()
    torch.testing.assert_close(loss_many, loss_one, rtol=0, atol=0)  # the forward is the same
    for name, a, b in zip(("hidden", "weight", "bias"), many, one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_smoothing_over_two_vocabulary_splits(device):
    """V > 8192: the forward splits the vocabulary (2 splits under the interpreter) and the
    combine kernel adds the per-split logit sums of label smoothing. Forward only (~5 s)."""
    hidden, weight, labels, bias = make_lm_head_inputs((24,), 16, 8219, device=device,
                                                       ignored=0.25, bias=True)
    opts = dict(label_smoothing=0.3, reduction="none", bias=bias)
    with torch.no_grad():
        out = linear_cross_entropy(hidden, weight, labels, impl="triton", **opts)
        eager = linear_cross_entropy(hidden, weight, labels, impl="reference", **opts)
        ref = linear_cross_entropy(hidden.double(), weight.double(), labels, impl="reference",
                                   **{**opts, "bias": bias.double()})
    assert_close_to_reference(out, ref, eager, name="loss", dtype=torch.float32,
                              reduction_size=weight.shape[0])


def test_a_frozen_head_takes_chunks_of_one_grad_hidden_wave():
    """Without grad_weight a chunk only has to fill the GPU once with grad_hidden programs of
    the narrow H tile: Llama-3 and Phi-3 heads on an H100 (132 SMs) and MI300X tiles (304 CUs).
    Llama-3's chunk is then liger-kernel's (512 rows: 131 MB of bf16 dlogits)."""
    from olakernels.linear_cross_entropy.impl.triton import (
        GPU_BLOCKS,
        ROCM_BLOCKS,
        dhidden_h_tile,
        one_wave_rows,
    )

    def rows(h, blk, sms):
        return one_wave_rows(h, blk["m"], dhidden_h_tile(blk, weight_frozen=True), sms, 128)

    assert dhidden_h_tile(GPU_BLOCKS, weight_frozen=False) == 256
    assert rows(4096, GPU_BLOCKS, 132) == 512  # 4 x 32 = 128 programs
    assert rows(3072, GPU_BLOCKS, 132) == 640  # 5 x 24 = 120
    assert rows(4096, ROCM_BLOCKS, 304) == 1152  # 9 x 32 = 288
    assert rows(16384, GPU_BLOCKS, 8) == 128  # never below one row tile
    assert 512 * 128256 * 2 < triton_impl.DLOGITS_BUDGET_BYTES / 4  # a quarter of a trainable's


def test_frozen_and_trainable_heads_chunk_differently(monkeypatch):
    hidden = torch.zeros(4096, 64)
    weight = torch.zeros(1000, 64)
    monkeypatch.setattr(triton_impl, "num_sms", lambda device: 8)
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"narrow_h": 16})
    blk, _, _, trainable = triton_impl.chunk_layout(hidden, weight, need_weight_grad=True)
    _, _, _, frozen = triton_impl.chunk_layout(hidden, weight, need_weight_grad=False)
    tiles_h = -(-64 // 16)  # the narrow H tile
    assert frozen == max(1, 8 // tiles_h) * blk["m"] < trainable


def test_frozen_head_with_a_narrow_h_tile_matches_the_reference(monkeypatch, device):
    """A frozen head's grad_hidden runs the narrow H tile (16 here, 2 tiles at H=23, the last
    ragged) over several one-wave chunks."""
    monkeypatch.setattr(triton_impl, "num_sms", lambda device: 4)
    monkeypatch.setattr(triton_impl, "BLOCKS_OVERRIDE", {"narrow_h": 16})
    inputs = make_lm_head_inputs((N,), H, V, device=device, ignored=0.2)
    assert triton_impl.chunk_layout(inputs[0], inputs[1], need_weight_grad=False)[3] == 32
    _check("triton", inputs, freeze=("weight",))
