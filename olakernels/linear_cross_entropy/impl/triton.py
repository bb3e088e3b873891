# Launchers, custom ops and autograd of linear_cross_entropy's Triton path.
"""impl="triton": the LM head and cross-entropy without (N, V) logits or unlabelled rows.

Forward: compaction on the device (labelled positions first, their count as a device scalar),
then _lce_fwd_kernel + _lce_combine_kernel: per-token loss, lse and argmax-correctness with
O(splits x N) extra memory. Backward, per chunk of CHUNK compacted rows (a host loop over the
upper bound N; chunks past the labelled count return at once on the device, or write zero
dlogits for dw_backend="torch", whose GEMM cannot stop at the count): dlogits for the
chunk (CHUNK x V, the only large temporary: O(chunk x V)), then grad_hidden = dlogits @ W
scattered to the rows, and grad_weight (fp32) += dlogits^T @ hidden (a Triton kernel, or
cuBLAS/hipBLAS with the tile knob dw_backend="torch"). A frozen weight skips the grad_weight
GEMM, hidden without grad skips grad_hidden. The tile knob grad_in_forward moves this loop into
the forward for "mean"/"sum" (impl/triton_fused_grad.py, which reuses the helpers below).
That is the "rows" schedule; with a trainable head the backward runs the "vocab" schedule by
default (impl/triton_vocab_slabs.py: slabs of the vocabulary outside, no fp32 (V, H) buffer).
"""
from __future__ import annotations

import warnings

import torch
import triton

from ..._triton import interpreter_enabled, num_sms
from .double_backward import refuse_double_backward
from .triton_kernels import (
    _lce_combine_kernel,
    _lce_dhidden_kernel,
    _lce_dlogits_kernel,
    _lce_dweight_kernel,
    _lce_fwd_kernel,
)

_HALF = (torch.float16, torch.bfloat16)
# Bytes of the (chunk, V) dlogits buffer: large chunks amortize the fp32 read-modify-write of
# grad_weight (V x H x 8 bytes per chunk), small ones bound memory. 512 MiB holds 2048 rows of
# Llama-3's 128,256-token vocabulary in bf16.
DLOGITS_BUDGET_BYTES = 512 * 2**20


# Tile sizes on a GPU. n x v: the logits tile of the forward and dlogits kernels; m x h: the
# output tile of dhidden/dweight; k: the reduction step of all. BLOCKS_OVERRIDE (a dict with
# some of these keys) lets benchmarks/gpu/profile_lce.py sweep tiles without editing code;
# dw_m / dw_h / dw_k / dw_warps / dw_stages give the dW kernel its own tiles (default: m, h, k,
# num_warps, num_stages), since it is the one the H200 sweep left behind.
# dw_backend: who computes grad_weight (and grad_bias). "triton": _lce_dweight_kernel, which
# reads only the labelled rows of each chunk (chunks past the count cost nothing) but reached
# only ~260 TFLOP/s on the H200. "torch": one cuBLAS/hipBLAS GEMM per chunk on the whole
# (chunk, V) buffer; the chunk count is a host loop over the upper bound N and the host never
# reads the labelled count (sync-free), so it also multiplies the ignored rows of every chunk
# (zeros): predicted to win at 0% ignored and to lose at ~90% (docs/PERF.md; NOT measured yet,
# hence not the default, and no "auto": the choice depends on the ignored fraction, which only
# the device knows).
# grad_in_forward: for reduction "mean"/"sum" with a gradient needed, compute the gradients
# during the forward (impl/triton_fused_grad.py): logits once per chunk, 3 GEMM passes over
# n x V x H instead of 4, the backward only scales them. Off by default: NOT measured on a GPU
# yet (docs/PERF.md). row_v / row_warps: the tiles of its row kernel (_lce_rows_grad_kernel).
# schedule: the backward's outer loop when grad_weight is needed and dw_backend="triton".
# "vocab": slabs of the vocabulary, grad_weight finished per slab in registers
# (impl/triton_vocab_slabs.py: no fp32 (V, H) accumulator, 2 GB less for Llama-3), taken
# where its N x H buffers are the smaller (uses_vocab_schedule: 3 N <= 2 V); "rows": chunks of
# rows with the fp32 (V, H) accumulator. A frozen weight always runs "rows" (nothing to
# accumulate over the vocabulary, and grad_hidden needs no fp32 sum there).
# narrow_h: the H tile of a frozen head's grad_hidden, whose chunks are one wave of its
# programs: narrower tiles halve the chunk (Llama-3 on an H100: 512 rows, 131 MB of bf16
# dlogits, liger-kernel's chunk size) and double the programs when only a few rows are
# labelled (pre-training: ~230 rows, 2 row blocks).
# slab_h: the H tile of the vocab schedule's grad_hidden (_lce_dhidden_slab_kernel, two
# accumulators of slab_h / 2 columns). Until 2026-11-27 it ran one 128 x 128 accumulator
# (narrow_h), measured at 452 TFLOP/s on an H200 against 661-676 for the rows schedule's
# 128 x 256 (docs/PERF.md, run 6); a single 128 x 256 accumulator spilled there.
# CUDA: the best of the sweep on an H200 (docs/PERF.md, linear_cross_entropy run 5): 1.7x the
# first tiles (64 x 128) at 0% ignored, 1.16x at 90%. ROCm: smaller tiles with 2 stages so the
# operands fit MI300X's 64 KiB of LDS (not measured on an MI300X).
# blas: the BLAS schedule (impl/blas_fused_grad.py: gradients in the forward, the three GEMMs
# by cuBLAS/hipBLAS, liger-kernel's algorithm on our compacted rows), for half-precision
# operands, "mean"/"sum", a gradient needed. "auto": taken when the host gave a bound
# (max_valid_tokens; without one the labelled fraction is unknown and the vendor GEMMs would
# multiply every row) and either the head is frozen (no fp32 (V, H) gradient to hold) or the
# bound is at least blas_min_fraction of the rows (a trainable head's fp32 unit grad_weight,
# 2.1 GB for Llama-3, is worth its speed only when most rows are labelled; at 90% ignored the
# vocab slabs stay under liger-kernel's memory). "always": whenever the conditions above the
# bound hold (benchmarks, profile_lce); "never": the Triton kernels only (as before
# 2026-11-27). The default is a prediction from run 6 (liger-kernel's cuBLAS path 1.7x faster
# than our kernels at 0% ignored), NOT measured: docs/PERF.md.
GPU_BLOCKS = dict(n=128, v=256, k=64, m=128, h=256, num_warps=8, num_stages=3,
                  dw_backend="triton", grad_in_forward=False, row_v=4096, row_warps=8,
                  schedule="vocab", narrow_h=128, slab_h=256, blas="auto",
                  blas_min_fraction=0.5)
ROCM_BLOCKS = dict(n=64, v=128, k=64, m=128, h=128, num_warps=8, num_stages=2,
                   dw_backend="triton", grad_in_forward=False, row_v=4096, row_warps=8,
                   schedule="vocab", narrow_h=128, slab_h=128, blas="auto",
                   blas_min_fraction=0.5)
BLOCKS_OVERRIDE: dict = {}
DW_BACKENDS = ("triton", "torch")
SCHEDULES = ("vocab", "rows")
BLAS_MODES = ("auto", "never", "always")


def _blocks() -> dict:
    if interpreter_enabled():  # small tiles: the interpreter runs programs one by one
        base = dict(n=16, v=32, k=32, m=16, h=32, num_warps=4, num_stages=1, dw_backend="triton",
                    grad_in_forward=False, row_v=64, row_warps=4, schedule="vocab",
                    narrow_h=32, slab_h=32, blas="auto", blas_min_fraction=0.5)
    else:
        base = ROCM_BLOCKS if torch.version.hip else GPU_BLOCKS
    blk = {**base, **BLOCKS_OVERRIDE}
    if blk.get("dw_backend", "triton") not in DW_BACKENDS:
        raise ValueError(f"BLOCKS_OVERRIDE['dw_backend'] must be one of {DW_BACKENDS}, "
                         f"got {blk['dw_backend']!r}")
    if blk.get("schedule", "vocab") not in SCHEDULES:
        raise ValueError(f"BLOCKS_OVERRIDE['schedule'] must be one of {SCHEDULES}, "
                         f"got {blk['schedule']!r}")
    if not isinstance(blk.get("grad_in_forward", False), bool):
        raise ValueError("BLOCKS_OVERRIDE['grad_in_forward'] must be True or False, got "
                         f"{blk['grad_in_forward']!r}")
    if blk.get("blas", "auto") not in BLAS_MODES:
        raise ValueError(f"BLOCKS_OVERRIDE['blas'] must be one of {BLAS_MODES}, "
                         f"got {blk['blas']!r}")
    fraction = blk.get("blas_min_fraction", 0.5)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or \
            not 0 <= fraction <= 1:
        raise ValueError("BLOCKS_OVERRIDE['blas_min_fraction'] must be a number in [0, 1] (the "
                         f"share of rows a bound must reach), got {fraction!r}")
    slab_h = blk.get("slab_h", 32)
    if not (isinstance(slab_h, int) and 32 <= slab_h <= 256 and slab_h & (slab_h - 1) == 0):
        raise ValueError("BLOCKS_OVERRIDE['slab_h'] must be a power of two in [32, 256] (two "
                         f"halves of 16 to 128 columns for tl.dot), got {slab_h!r}")
    return blk


def forward_schedule(hidden: torch.Tensor, weight: torch.Tensor, bound: int | None,
                     need_weight: bool, grads_in_forward_exact: bool,
                     fraction_hint: float | None = None) -> str:
    """Which forward the api runs: "blas" (impl/blas_fused_grad.py), "grad_in_forward"
    (impl/triton_fused_grad.py) or "plain" (lce_forward, the backward recomputes).
    grads_in_forward_exact: reduction "mean"/"sum" with grad mode on and a gradient needed
    (the only case where the forward may compute the gradients; triton_fused_grad says why).
    bound: the caller's max_valid_tokens as given (not rounded up to ROW_QUANTUM: at small N
    the rounding alone would pass the fraction test), None without one. fraction_hint: without
    a bound, a host-side guess of the labelled fraction (the api's labelled_fraction_hint): at
    least blas_min_fraction takes the BLAS schedule over all N rows, for a frozen head too."""
    if not grads_in_forward_exact:
        return "plain"
    blk = _blocks()
    mode = blk.get("blas", "auto")
    # Half precision only: fp32 operands would meet TF32 in the vendor GEMM whenever the user
    # allowed it; the Triton kernels multiply fp32 in IEEE fp32.
    half = hidden.dtype in _HALF and weight.dtype == hidden.dtype
    if half and mode == "always":
        return "blas"
    # "auto" takes bf16 only: the vendor GEMM rounds the logits to the operands' dtype before
    # the log-sum-exp, and fp16 logits above 65504 become inf (NaN loss and gradients) where
    # the Triton kernels keep them in fp32 and give the finite loss.
    if half and mode == "auto" and hidden.dtype == torch.bfloat16:
        n = hidden.shape[0]
        dense = blk.get("blas_min_fraction", 0.5)
        if bound is not None:
            if not need_weight or min(n, bound) >= dense * n:
                return "blas"
        elif fraction_hint is not None and fraction_hint >= dense:
            return "blas"
    return "grad_in_forward" if blk.get("grad_in_forward", False) else "plain"


def _dot_native(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    return not interpreter_enabled() and hidden.dtype in _HALF and weight.dtype == hidden.dtype


def compact_labels(labels: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, count): labelled positions first (stable), and how many, both on the device."""
    ignored = labels == ignore_index
    count = (~ignored).sum().to(torch.int32).reshape(1)
    order = torch.argsort(ignored.to(torch.int8), stable=True).to(torch.int32)
    return order, count


def row_capacity(n: int, max_rows: int) -> int:
    """Compacted rows the kernels and buffers are sized for: all N, or the caller's host-side
    bound on the labelled count (``max_valid_tokens``), whichever is smaller."""
    return n if max_rows <= 0 else min(n, max_rows)


def kernel_count(count: torch.Tensor, rows: int, n: int) -> torch.Tensor:
    """The labelled count the kernels walk: at most ``rows`` (a bound the caller got wrong
    must not send them past their buffers; the api turns the loss NaN then, on the device)."""
    return count if rows >= n else count.clamp(max=rows)


def vocab_splits(v: int, row_blocks: int, blk: dict, device, bounded: bool) -> int:
    """Vocabulary splits of the forward grid. Without a bound the grid is sized for all N rows
    and most of its blocks may exit at once, so 16 splits (of >= 8,192 columns) keep a few
    labelled row blocks busy. With a bound the row blocks are known to be few: split until
    about two programs per SM, at least 4 column tiles each (pre-training, ~230 labelled rows
    of Llama-3: 2 row blocks x 126 splits of 1,024 columns on an H100, instead of 2 x 16 = 32
    programs on 132 SMs)."""
    splits = max(1, min(16, triton.cdiv(v, 8192)))
    if bounded:
        splits = max(splits, triton.cdiv(2 * num_sms(device), row_blocks))
    splits = min(splits, triton.cdiv(v, 4 * blk["v"]), 256)  # >= 4 column tiles per split
    if interpreter_enabled():
        splits = min(splits, 2)
    return max(1, splits)


def lce_forward(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss_weight,
                softcap, max_rows: int = 0):
    """Returns (loss per token (N,) fp32, correct (N,) bool, lse (rows,) compact, order,
    count); rows = row_capacity(N, max_rows)."""
    n, h = hidden.shape
    v = weight.shape[0]
    rows = row_capacity(n, max_rows)
    order, count = compact_labels(labels, ignore_index)
    kcount = kernel_count(count, rows, n)
    blk = _blocks()
    row_blocks = triton.cdiv(rows, blk["n"])
    splits = vocab_splits(v, row_blocks, blk, hidden.device, rows < n)
    v_per_split = triton.cdiv(triton.cdiv(v, splits), blk["v"]) * blk["v"]
    splits = triton.cdiv(v, v_per_split)  # after rounding the split up to whole tiles
    f32 = dict(device=hidden.device, dtype=torch.float32)
    parts = [torch.empty((splits, rows), **f32) for _ in range(5)]
    part_idx = torch.empty((splits, rows), device=hidden.device, dtype=torch.int32)
    has_softcap = softcap > 0
    _lce_fwd_kernel[(row_blocks, splits)](
        hidden, weight, bias if bias is not None else weight, order, labels, kcount,
        *parts, part_idx,
        rows, v, h, v_per_split, float(softcap) if has_softcap else 1.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap,
        DOT_NATIVE=_dot_native(hidden, weight), HAS_SMOOTHING=label_smoothing > 0,
        BLOCK_N=blk["n"], BLOCK_V=blk["v"], BLOCK_K=blk["k"],
        num_warps=blk["num_warps"], num_stages=blk["num_stages"],
    )
    lse = torch.zeros((rows,), **f32)  # entries past the labelled count stay 0 (deterministic)
    loss = torch.zeros((n,), **f32)  # ignored positions keep 0
    correct = torch.zeros((n,), device=hidden.device, dtype=torch.int8)
    block = 128 if not interpreter_enabled() else 32
    _lce_combine_kernel[(triton.cdiv(rows, block),)](
        *parts, part_idx, order, labels, kcount, lse, loss, correct,
        rows, v, splits, float(label_smoothing), float(z_loss_weight), BLOCK=block,
    )
    return loss, correct.bool(), lse, order, count


def chunk_rows(n: int, v: int, itemsize: int, multiple: int) -> int:
    rows = max(multiple, DLOGITS_BUDGET_BYTES // max(1, v * itemsize))
    rows = min(rows, triton.cdiv(n, multiple) * multiple)
    return max(multiple, rows // multiple * multiple)


# (device type, operand dtype, accumulate) -> whether torch.mm/addmm with out_dtype=float32
# ran there; absent: not tried yet. The .dtype overloads exist for CUDA (half/bf16 operands,
# fp32 output), not for CPU; older torch wants addmm's `self` in the operand dtype.
_FP32_OUT_GEMM: dict[tuple[str, torch.dtype, bool], bool] = {}
# Devices where a GEMM without fp32 output always upcasts its operands (exact): the CPU, where
# tests run, whatever the caller's fallback.
EXACT_FALLBACK_DEVICES = ("cpu",)


def gemm_into_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool,
                   *, upcast_fallback: bool = True, who: str = "dw_backend='torch'") -> None:
    """acc (+)= a @ b with fp32 accumulation and output; a, b in one dtype, acc fp32.

    Half operands on CUDA go straight into acc (mm/addmm with out_dtype=float32, probed once
    per device type, dtype and kind). Where that overload is missing: ``upcast_fallback``
    multiplies fp32 copies of the operands (exact, slower, more memory: dw_backend="torch"'s
    choice), else the product is rounded to the operands' dtype before the fp32 sum (the BLAS
    schedule's: an fp32 copy of the weight per chunk would cost 2 GB for Llama-3); a warning
    says which, once. fp32 operands and the CPU always multiply in fp32."""
    key = (a.device.type, a.dtype, accumulate)
    half = a.dtype in _HALF
    fallback = "upcasting the operands to fp32 (slower)" if upcast_fallback else \
        f"each product is rounded to {a.dtype} before the fp32 sum"
    if half and a.device.type == "cuda" and _FP32_OUT_GEMM.get(key, True):
        try:  # half operands straight into the fp32 accumulator: no fp32 copies, one pass
            if accumulate:
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            else:
                torch.mm(a, b, out_dtype=torch.float32, out=acc)
            _FP32_OUT_GEMM[key] = True
            return
        except torch.OutOfMemoryError:
            raise
        except (RuntimeError, TypeError) as exc:  # NotImplementedError is a RuntimeError
            # A missing overload (NotImplementedError, TypeError) or a dtype rule of an older
            # torch ("self" in the operands' dtype) means: no fp32-output GEMM here. Any other
            # error (a CUDA fault) is real, and so is any error once the overload has run.
            missing = isinstance(exc, (NotImplementedError, TypeError)) or "dtype" in str(exc)
            if _FP32_OUT_GEMM.get(key) or not missing:
                raise
            _FP32_OUT_GEMM[key] = False
            op = "addmm" if accumulate else "mm"
            warnings.warn(f"linear_cross_entropy ({who}): torch.{op}(out_dtype=float32) is not "
                          f"available on {a.device.type} {a.dtype} ({exc}); {fallback}",
                          stacklevel=2)
    elif half and a.device.type not in (*EXACT_FALLBACK_DEVICES, "cuda") \
            and key not in _FP32_OUT_GEMM:
        _FP32_OUT_GEMM[key] = False  # (warn once per device type, dtype and kind)
        warnings.warn(f"linear_cross_entropy ({who}): no half GEMM with fp32 output on "
                      f"{a.device.type}; {fallback}", stacklevel=2)
    if half and not upcast_fallback and a.device.type not in EXACT_FALLBACK_DEVICES:
        product = a @ b
        if accumulate:
            acc += product
        else:
            acc.copy_(product)
        return
    # Upcast (exact: half products are exact in fp32).
    a32, b32 = a.float(), b.float()
    if accumulate:
        acc.addmm_(a32, b32)
    else:
        torch.mm(a32, b32, out=acc)


def _dweight_torch(dlogits, hidden, order, count, grad_w32, grad_b32, start, rows):
    """dw_backend="torch": grad_w32 (+)= dlogits^T @ hidden[order[start:start+rows]] (fp32) and
    grad_b32 (+)= dlogits.sum(0), over all `rows` rows (their dlogits past the count are 0)."""
    dl = dlogits[:rows]
    accumulate = start > 0
    if grad_w32 is not None:
        h_rows = hidden.index_select(0, order[start:start + rows])
        # Ignored rows have dlogits 0, but 0 x inf/NaN in their hidden state would still poison
        # grad_weight (the Triton kernel never reads them): zero them (chunk x H, cheap).
        live = torch.arange(start, start + rows, device=hidden.device, dtype=torch.int32) < count
        h_rows.masked_fill_(~live[:, None], 0)
        if dl.dtype != h_rows.dtype:  # fp32 dlogits (interpreter, mixed dtypes): exact upcast
            dl, h_rows = dl.float(), h_rows.float()
        gemm_into_fp32(grad_w32, dl.t(), h_rows, accumulate)
    if grad_b32 is not None:
        if accumulate:
            grad_b32 += dl.sum(0, dtype=torch.float32)
        else:
            torch.sum(dl, 0, dtype=torch.float32, out=grad_b32)


def one_wave_rows(h: int, m_tile: int, h_tile: int, sms: int, step: int) -> int:
    """Rows of a chunk whose grad_hidden grid (rows / m_tile x cdiv(H, h_tile) programs, each
    as long as the others: a full pass over V) fits the GPU's SMs in one wave."""
    blocks = max(1, sms // triton.cdiv(h, h_tile))
    return max(step, blocks * m_tile // step * step)


def dhidden_h_tile(blk: dict, weight_frozen: bool) -> int:
    """grad_hidden's H tile in the rows schedule: narrow for a frozen head (one-wave chunks)."""
    return blk.get("narrow_h", blk["h"]) if weight_frozen else blk["h"]


def chunk_layout(hidden: torch.Tensor, weight: torch.Tensor, need_weight_grad: bool = True,
                 rows: int | None = None) -> tuple[dict, bool, torch.dtype, int]:
    """(tiles, native dot, dlogits dtype, rows per chunk) of the chunked gradient loop.

    With grad_weight, chunks are as large as DLOGITS_BUDGET_BYTES allows: each one costs a
    read-modify-write of the whole fp32 (V, H) accumulator. Without it (a frozen LM head, as in
    pre-training) a chunk only has to fill the GPU once with grad_hidden programs of the
    narrow H tile: one wave of them (Llama-3 on an H100: 512 rows, 131 MB of bf16 dlogits
    instead of 512 MiB; Phi-3: 640 rows, 41 MB), the same waves in all."""
    blk = _blocks()
    native = _dot_native(hidden, weight)
    dl_dtype = weight.dtype if native else torch.float32
    step = blk["n"] * blk["m"] // min(blk["n"], blk["m"])  # a multiple of both row tiles
    rows = hidden.shape[0] if rows is None else rows  # the row capacity (row_capacity)
    chunk = chunk_rows(rows, weight.shape[0], torch.finfo(dl_dtype).bits // 8, step)
    if not need_weight_grad:
        chunk = min(chunk, one_wave_rows(weight.shape[1], blk["m"], dhidden_h_tile(blk, True),
                                         num_sms(hidden.device), step))
    return blk, native, dl_dtype, chunk


def grad_buffers(hidden, weight, bias, need_hidden, need_weight, need_bias,
                 hidden_dtype: torch.dtype | None = None):
    """(grad_hidden zero-filled | None, grad_weight fp32 | None, grad_bias fp32 | None)."""
    v, h = weight.shape
    grad_hidden = torch.zeros(hidden.shape, device=hidden.device,  # unlabelled rows: 0
                              dtype=hidden_dtype or hidden.dtype) if need_hidden else None
    grad_w32 = torch.empty((v, h), device=hidden.device, dtype=torch.float32) \
        if need_weight else None
    grad_b32 = torch.empty((v,), device=hidden.device, dtype=torch.float32) \
        if (need_bias and bias is not None) else None
    return grad_hidden, grad_w32, grad_b32


def uses_vocab_schedule(blk: dict, need_weight: bool, n: int, v: int) -> bool:
    """The backward loops over vocabulary slabs (impl/triton_vocab_slabs.py): the schedule
    knob says "vocab", grad_weight is needed, the Triton kernel computes it, and the slabs'
    N x H buffers (fp32 grad_hidden sum + gathered rows: 6 N H bytes in bf16) are smaller than
    the rows schedule's fp32 (V, H) accumulator (4 V H): 3 N <= 2 V, true for Llama-3's head up
    to N = 85k rows, for Phi-3's up to 21k. (A trainable bias alone needs only a (V,) sum.)"""
    return (blk.get("schedule", "vocab") == "vocab" and blk["dw_backend"] == "triton"
            and need_weight and 3 * n <= 2 * v)


def uses_torch_dw(blk: dict, grad_w32, grad_b32) -> bool:
    return blk["dw_backend"] == "torch" and (grad_w32 is not None or grad_b32 is not None)


def launch_dlogits(blk, native, chunk, hidden, weight, bias, order, labels, count, lse,
                   grad_loss, dlogits, start, softcap, label_smoothing, z_loss_weight,
                   zero_past_count, write_logits=False):
    """_lce_dlogits_kernel over one chunk (write_logits: the logits themselves)."""
    v, h = weight.shape
    has_softcap = softcap > 0
    _lce_dlogits_kernel[(chunk // blk["n"], triton.cdiv(v, blk["v"]))](
        hidden, weight, bias if bias is not None else weight, order, labels, count, lse,
        grad_loss, dlogits,
        start, 0, v, v, h, float(softcap) if has_softcap else 1.0, float(label_smoothing),
        float(z_loss_weight),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=has_softcap, DOT_NATIVE=native,
        BLOCK_N=blk["n"], BLOCK_V=blk["v"], BLOCK_K=blk["k"], ZERO_PAST_COUNT=zero_past_count,
        WRITE_LOGITS=write_logits, num_warps=blk["num_warps"], num_stages=blk["num_stages"],
    )


def chunk_grads(blk, native, chunk, dlogits, hidden, weight, order, count, grad_hidden,
                grad_w32, grad_b32, start, rows: int | None = None):
    """grad_hidden rows (+ scatter) and grad_weight/grad_bias (+)= from one chunk's dlogits;
    ``rows``: the row capacity (default N)."""
    n, h = hidden.shape
    n = n if rows is None else rows
    v = weight.shape[0]
    if grad_hidden is not None:
        h_tile = dhidden_h_tile(blk, grad_w32 is None)  # as chunk_layout sized the chunk
        _lce_dhidden_kernel[(chunk // blk["m"], triton.cdiv(h, h_tile))](
            dlogits, weight, order, count, grad_hidden, start, v, h, DOT_NATIVE=native,
            BLOCK_M=blk["m"], BLOCK_H=h_tile, BLOCK_K=blk["k"],
            num_warps=blk["num_warps"], num_stages=blk["num_stages"],
        )
    if grad_w32 is None and grad_b32 is None:
        return
    if uses_torch_dw(blk, grad_w32, grad_b32):
        _dweight_torch(dlogits, hidden, order, count, grad_w32, grad_b32, start,
                       min(chunk, n - start))
        return
    dw_m, dw_h = blk.get("dw_m", blk["m"]), blk.get("dw_h", blk["h"])
    # The chunk's hidden rows in compacted order, dense (chunk x H: 16 MB for Llama-3 in
    # bf16), so that the kernel's operand loads pipeline (see _lce_dweight_kernel).
    h_rows = hidden.index_select(0, order[start:start + min(chunk, n - start)]) \
        if grad_w32 is not None else dlogits
    _lce_dweight_kernel[(triton.cdiv(v, dw_m), triton.cdiv(h, dw_h))](
        dlogits, h_rows, count,
        grad_w32 if grad_w32 is not None else dlogits,
        grad_b32 if grad_b32 is not None else dlogits,
        start, chunk, v, h,
        ACCUMULATE=start > 0, HAS_WEIGHT_GRAD=grad_w32 is not None,
        HAS_BIAS=grad_b32 is not None, DOT_NATIVE=native,
        BLOCK_M=dw_m, BLOCK_H=dw_h, BLOCK_K=blk.get("dw_k", blk["k"]),
        num_warps=blk.get("dw_warps", blk["num_warps"]),
        num_stages=blk.get("dw_stages", blk["num_stages"]),
    )


def lce_backward(hidden, weight, bias, labels, order, count, lse, grad_loss, label_smoothing,
                 z_loss_weight, softcap, need_hidden, need_weight, need_bias,
                 max_rows: int = 0):
    """Returns (grad_hidden | None, grad_weight | None, grad_bias | None)."""
    n = row_capacity(hidden.shape[0], max_rows)
    count = kernel_count(count, n, hidden.shape[0])
    blk, native, dl_dtype, chunk = chunk_layout(hidden, weight, need_weight, n)
    if uses_vocab_schedule(blk, need_weight, n, weight.shape[0]):
        from .triton_vocab_slabs import lce_backward_vocab_slabs
        return lce_backward_vocab_slabs(blk, native, dl_dtype, hidden, weight, bias, labels,
                                        order, count, lse, grad_loss, label_smoothing,
                                        z_loss_weight, softcap, need_hidden, need_weight,
                                        need_bias, rows=n)
    dlogits = torch.empty((chunk, weight.shape[0]), device=hidden.device, dtype=dl_dtype)
    grad_hidden, grad_w32, grad_b32 = grad_buffers(hidden, weight, bias, need_hidden,
                                                   need_weight, need_bias)
    grad_loss = grad_loss.contiguous().float()
    torch_dw = uses_torch_dw(blk, grad_w32, grad_b32)
    for start in range(0, n, chunk):
        launch_dlogits(blk, native, chunk, hidden, weight, bias, order, labels, count, lse,
                       grad_loss, dlogits, start, softcap, label_smoothing, z_loss_weight,
                       zero_past_count=torch_dw)
        chunk_grads(blk, native, chunk, dlogits, hidden, weight, order, count, grad_hidden,
                    grad_w32, grad_b32, start, rows=n)
    grad_w = None if grad_w32 is None else grad_w32.to(weight.dtype)
    grad_b = None if grad_b32 is None else grad_b32.to(bias.dtype)
    return grad_hidden, grad_w, grad_b


# ---- registered custom ops: torch.compile(fullgraph=True) sees one opaque node each ----


@torch.library.custom_op("olakernels::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss_weight: float,
    softcap: float,
    max_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per token fp32 (N,), correct bool (N,), lse (rows,), order int32 (N,), count (1,));
    max_rows > 0: at most that many labelled rows (row_capacity), else N."""
    return lce_forward(hidden, weight, bias, labels, ignore_index, label_smoothing,
                       z_loss_weight, softcap, max_rows)


@linear_cross_entropy_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index, label_smoothing, z_loss_weight, softcap,
      max_rows=0):
    n = hidden.shape[0]
    rows = row_capacity(n, max_rows)
    return (hidden.new_empty((n,), dtype=torch.float32), hidden.new_empty((n,), dtype=torch.bool),
            hidden.new_empty((rows,), dtype=torch.float32),
            hidden.new_empty((n,), dtype=torch.int32), hidden.new_empty((1,), dtype=torch.int32))


@torch.library.custom_op("olakernels::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    order: torch.Tensor,
    count: torch.Tensor,
    lse: torch.Tensor,
    grad_loss: torch.Tensor,
    label_smoothing: float,
    z_loss_weight: float,
    softcap: float,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
    max_rows: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight, grad_bias); an unneeded one is an empty tensor."""
    gh, gw, gb = lce_backward(hidden, weight, bias, labels, order, count, lse, grad_loss,
                              label_smoothing, z_loss_weight, softcap, need_hidden, need_weight,
                              need_bias, max_rows)
    empty = hidden.new_empty((0,))
    return (empty if gh is None else gh, empty.clone() if gw is None else gw,
            empty.clone() if gb is None else gb)


@linear_cross_entropy_bwd.register_fake
def _(hidden, weight, bias, labels, order, count, lse, grad_loss, label_smoothing,
      z_loss_weight, softcap, need_hidden, need_weight, need_bias, max_rows=0):
    gh = torch.empty_like(hidden) if need_hidden else hidden.new_empty((0,))
    gw = torch.empty_like(weight) if need_weight else hidden.new_empty((0,))
    gb = torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty((0,))
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, _ignore, smoothing, z_loss, softcap, *rest = inputs
    _loss, _correct, lse, order, count = output
    ctx.save_for_backward(hidden, weight, bias, labels, order, count, lse)
    ctx.options = (smoothing, z_loss, softcap)
    ctx.max_rows = rest[0] if rest else 0
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)  # (no zeros for correct/lse/order/count; None is handled)


def _backward(ctx, grad_loss, *_unused):
    refuse_double_backward()  # (the backward op has no autograd formula: say what to use)
    hidden, weight, bias, labels, order, count, lse = ctx.saved_tensors
    need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], \
        bias is not None and ctx.needs_input_grad[2]
    if grad_loss is None or not (need_h or need_w or need_b):
        return (None,) * 9
    gh, gw, gb = linear_cross_entropy_bwd(hidden, weight, bias, labels, order, count, lse,
                                          grad_loss, *ctx.options, need_h, need_w, need_b,
                                          ctx.max_rows)
    return (gh if need_h else None, gw if need_w else None, gb if need_b else None,
            None, None, None, None, None, None)


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)
