# linear_cross_entropy's Triton backward for a trainable LM head: the vocabulary in the outer loop.
"""The "vocab" schedule (tile knob `schedule`, the default when grad_weight is needed,
dw_backend="triton" and 3 N <= 2 V: impl/triton.uses_vocab_schedule). impl/triton.py's "rows"
schedule loops over chunks of
compacted rows; each chunk adds its part of grad_weight = dlogits^T @ hidden to an fp32 (V, H)
accumulator, so Llama-3's head (V = 128,256, H = 4,096) holds a 2 GB buffer next to the 1 GB
gradient it returns and reads and writes that buffer once per chunk (4 GB, 8 times at
N = 16,384).

Here the loop runs over slabs of the vocabulary instead, each for every labelled row:

1. _lce_dlogits_kernel: d loss / d logits of the slab's columns for all compacted rows, into an
   (N, width) buffer (rows past the labelled count are neither computed nor read; with the
   caller's bound on the labelled count, ``max_valid_tokens``, every N x buffer below holds
   only that many rows, and slab_width sizes the slabs for them);
2. _lce_dweight_kernel: grad_weight[slab] = dlogits^T @ hidden[order], summed over all labelled
   rows in fp32 registers and stored once, in the weight's dtype: no (V, H) accumulator at all;
3. _lce_dhidden_slab_kernel: grad_hidden += dlogits @ W[slab]. This sum runs over the slabs,
   so it is the one kept in fp32 between launches: an (N, H) buffer in compacted row order
   (256 MiB at N = 16,384 for Llama-3, an eighth of the (V, H) one), which the last slab
   scatters to the rows in the hidden states' dtype. With a single slab (small vocabularies,
   few rows) there is no buffer at all.

Same FLOPs as the rows schedule (dlogits recomputed once, one GEMM each for dX and dW); the
fp32 traffic becomes 2 x N x H x 4 bytes per slab instead of 2 x V x H x 4 per row chunk.
Memory for Llama-3 at N = 16,384, bf16: grad_weight 1 GB + the dlogits slab 256 MiB + the fp32
grad_hidden sum 256 MiB + the gathered hidden rows 128 MiB + grad_hidden 128 MiB (1770 MiB
measured on an H200), against the rows schedule's 1 + 2 (fp32) + 0.5 (dlogits chunk) + 0.13 GB.
Time on an H200 (docs/PERF.md, linear_cross_entropy run 6): dW 15.4 ms instead of the rows
schedule's 20.5 at N = 8,192; grad_hidden then ran 128 x 128 tiles at 452 TFLOP/s, now two
halves of a 128 x 256 tile (_lce_dhidden_slab_kernel; NOT measured yet).
"""
from __future__ import annotations

import torch
import triton

from .triton_kernels import _lce_dhidden_slab_kernel, _lce_dlogits_kernel, _lce_dweight_kernel

# Bytes of the (N, width) dlogits slab. Wider slabs mean fewer read-modify-writes of the fp32
# grad_hidden sum (N x H x 8 bytes per slab), narrower ones less memory. The slab holds twice
# the rows' hidden-state bytes (liger-kernel's logits chunk holds about one: 2 H columns),
# clamped to [SLAB_FLOOR_BYTES, SLAB_BUDGET_BYTES]: 256 MiB at N = 16,384 for Llama-3 (8,192
# columns, 16 slabs; 8 GB of fp32 traffic in all, ~2 ms at the H200's 4.3 TB/s; the rows
# schedule moved 32 GB); at the 1,792 rows of a bounded 90%-ignored batch the 64 MiB floor
# (18,688 columns, 7 slabs), which keeps the backward's peak under liger-kernel's
# (docs/PERF.md, run 6). The floor keeps slabs wide enough to fill the GPU when few rows are
# labelled.
SLAB_BUDGET_BYTES = 256 * 2**20
SLAB_FLOOR_BYTES = 64 * 2**20


def slab_h_tile(blk: dict, native: bool) -> int:
    """The H tile of the slabs' grad_hidden: the tile knob slab_h, at most 128 for fp32
    operands (no tensor cores: at 128 x 256 the kernel spilled ~85 KB per thread on sm_90)."""
    return blk["slab_h"] if native else min(blk["slab_h"], 128)


def slab_width(n: int, v: int, h: int, itemsize: int, multiple: int) -> int:
    """Columns per slab for n rows: within min(SLAB_BUDGET_BYTES, max(SLAB_FLOOR_BYTES,
    2 n h itemsize)) bytes, a multiple of `multiple`, at most the vocabulary rounded up to
    it."""
    budget = min(SLAB_BUDGET_BYTES, max(SLAB_FLOOR_BYTES, 2 * n * h * itemsize))
    cols = max(multiple, budget // max(1, n * itemsize))
    cols = min(cols, triton.cdiv(v, multiple) * multiple)
    return max(multiple, cols // multiple * multiple)


def lce_backward_vocab_slabs(blk, native, dl_dtype, hidden, weight, bias, labels, order, count,
                             lse, grad_loss, label_smoothing, z_loss_weight, softcap,
                             need_hidden, need_weight, need_bias, rows: int | None = None):
    """(grad_hidden | None, grad_weight | None, grad_bias | None), as impl/triton.lce_backward.
    ``rows``: the compacted rows to size for (impl/triton.row_capacity; ``count`` is at most
    that), default N."""
    h = hidden.shape[1]
    n = hidden.shape[0] if rows is None else rows
    v = weight.shape[0]
    dev = hidden.device
    dw_m, dw_h = blk.get("dw_m", blk["m"]), blk.get("dw_h", blk["h"])
    slab_h = slab_h_tile(blk, native)  # grad_hidden's H tile (two fp32 halves)
    # A multiple of the dlogits kernel's column tile and of the dW kernel's row tile (powers of
    # two), so that only the last slab has ragged tiles.
    width = slab_width(n, v, h, torch.finfo(dl_dtype).bits // 8, max(blk["v"], dw_m))
    slabs = list(range(0, v, width))
    # Flat, so that each slab views it with rows as long as the slab (the kernels take one row
    # length for indexing and masking: a separate stride argument made them spill on sm_90).
    dlogits_flat = torch.empty((n * width,), device=dev, dtype=dl_dtype)
    grad_hidden = torch.zeros(hidden.shape, device=dev, dtype=hidden.dtype) \
        if need_hidden else None  # unlabelled rows: 0
    grad_w = torch.empty(weight.shape, device=dev, dtype=weight.dtype) if need_weight else None
    grad_b32 = torch.empty((v,), device=dev, dtype=torch.float32) \
        if (need_bias and bias is not None) else None
    # fp32 grad_hidden summed over the slabs, compacted rows (those past the count unused).
    acc = torch.empty((n, h), device=dev, dtype=torch.float32) \
        if (need_hidden and len(slabs) > 1) else None
    # The labelled rows' hidden states, dense and in compacted order, gathered once for all
    # slabs (pipelined operand loads in the dW kernel, as in the rows schedule).
    h_rows = hidden.index_select(0, order[:n]) if need_weight else None
    grad_loss = grad_loss.contiguous().float()
    has_softcap = softcap > 0
    for i, v0 in enumerate(slabs):
        w = min(width, v - v0)
        dlogits = dlogits_flat[:n * w].view(n, w)
        _lce_dlogits_kernel[(triton.cdiv(n, blk["n"]), triton.cdiv(w, blk["v"]))](
            hidden, weight, bias if bias is not None else weight, order, labels, count, lse,
            grad_loss, dlogits,
            0, v0, v0 + w, v, h, float(softcap) if has_softcap else 1.0,
            float(label_smoothing), float(z_loss_weight),
            HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap, DOT_NATIVE=native,
            BLOCK_N=blk["n"], BLOCK_V=blk["v"], BLOCK_K=blk["k"], ZERO_PAST_COUNT=False,
            WRITE_LOGITS=False, num_warps=blk["num_warps"], num_stages=blk["num_stages"],
        )
        if grad_hidden is not None:
            _lce_dhidden_slab_kernel[(triton.cdiv(n, blk["m"]), triton.cdiv(h, slab_h))](
                dlogits, weight[v0:v0 + w], order, count, grad_hidden,
                acc if acc is not None else grad_hidden, w, h,
                DOT_NATIVE=native, ACC_IN=i > 0, ACC_OUT=i < len(slabs) - 1,
                BLOCK_M=blk["m"], BLOCK_H=slab_h, BLOCK_K=blk["k"],
                num_warps=blk["num_warps"], num_stages=blk["num_stages"],
            )
        if grad_w is not None or grad_b32 is not None:
            _lce_dweight_kernel[(triton.cdiv(w, dw_m), triton.cdiv(h, dw_h))](
                dlogits, h_rows if h_rows is not None else dlogits, count,
                grad_w[v0:v0 + w] if grad_w is not None else dlogits,
                grad_b32[v0:v0 + w] if grad_b32 is not None else dlogits,
                0, n, w, h,
                ACCUMULATE=False, HAS_WEIGHT_GRAD=grad_w is not None,
                HAS_BIAS=grad_b32 is not None, DOT_NATIVE=native,
                BLOCK_M=dw_m, BLOCK_H=dw_h, BLOCK_K=blk.get("dw_k", blk["k"]),
                num_warps=blk.get("dw_warps", blk["num_warps"]),
                num_stages=blk.get("dw_stages", blk["num_stages"]),
            )
    grad_b = None if grad_b32 is None else grad_b32.to(bias.dtype)
    return grad_hidden, grad_w, grad_b
