# Peak memory of embedding_distill_loss on the CPU: no fp32 copy of whole half-precision inputs.
"""The api docstring and docs/ops/embedding_distill_loss.md: "triton" makes no fp32 copies of
the inputs (O(chunks x B x B_global) partials), "torch" (auto's choice on the CPU) keeps its
fp32 temporaries to chunks of ``_CHUNK_ELEMENTS`` values. track_peak_memory counts every tensor
made inside the block, the custom ops' temporaries included.
"""
import pytest
import torch

from olakernels import embedding_distill_loss
from olakernels.embedding_loss.impl import torch_chunked
from olakernels.testing import make_embedding_pair, make_sample_mask, track_peak_memory

SHAPE = (16, 24, 24, 24)  # seg-like (C, H, W) targets, scaled down: D = 13,824 per sample
CHUNK = 1 << 12  # fp32 values per chunk of the torch path (16 MiB at real sizes, 16 KiB here)


@pytest.mark.parametrize("mask_kind", ["ones", "mixed"])
@pytest.mark.parametrize("impl", ["triton", "auto"])
def test_no_fp32_copy_of_bf16_inputs(impl, mask_kind, device, monkeypatch):
    # A chunk far below one sample batch's fp32 copy, as at real sizes (seg: B=32 x 884,736).
    monkeypatch.setattr(torch_chunked, "_CHUNK_ELEMENTS", CHUNK)
    pred, target = make_embedding_pair(SHAPE, dtype=torch.bfloat16, device=device)
    mask = make_sample_mask(SHAPE[0], mask_kind, device=device)
    scale = torch.full((1,), 2.0, device=device, requires_grad=True)
    fp32_copy = pred.numel() * 4
    grad_bytes = pred.numel() * pred.element_size()
    with track_peak_memory() as mem:
        out = embedding_distill_loss(pred, target, mask, scale, impl=impl)
        forward_peak = mem.peak
        out.loss.backward()
    assert pred.grad is not None and pred.grad.dtype == torch.bfloat16
    extra = mem.peak - grad_bytes  # beyond the gradient the backward must return
    if impl == "triton":  # partial sums only
        assert forward_peak < fp32_copy / 32, (forward_peak, fp32_copy)
        assert extra < fp32_copy / 32, (mem.peak, grad_bytes, fp32_copy)
    else:  # a few chunk-sized fp32 temporaries at a time
        assert forward_peak <= 8 * CHUNK * 4 < fp32_copy / 2, (forward_peak, fp32_copy)
        assert extra <= 8 * CHUNK * 4, (mem.peak, grad_bytes, fp32_copy)
    # Non-vacuous: the tracker sees the seed's fp32 copies.
    pred.grad = None
    with track_peak_memory() as ref_mem:
        embedding_distill_loss(pred, target, mask, scale, impl="reference").loss.backward()
    assert ref_mem.peak > 2 * fp32_copy
