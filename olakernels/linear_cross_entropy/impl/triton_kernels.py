# Triton kernels of linear_cross_entropy: logits tiles recomputed on the fly, never stored whole.
"""Kernels for impl="triton" (launchers and autograd live in impl/triton.py).

Every kernel walks *compacted* rows: ORDER lists the token positions whose label is not
ignore_index first, and COUNT (a device scalar) says how many there are. A program whose rows
all lie past COUNT returns at once, so unlabelled rows cost no FLOPs and the host never reads
COUNT (no synchronization: safe under CUDA graphs and torch.compile).

    _lce_fwd_kernel        grid (row blocks, V splits): logits tiles h @ W^T (+ bias, softcap)
                           reduced on the fly to per-split partials of an online logsumexp,
                           the label's logit, the sum of logits (label smoothing) and the argmax.
    _lce_combine_kernel    grid (row blocks): partials -> lse, per-token loss, argmax == label.
    _lce_dlogits_kernel    grid (chunk row blocks, V blocks): recomputes a logits tile and writes
                           d loss / d logits for one chunk of rows into a (chunk, V) buffer
                           (ZERO_PAST_COUNT: rows past COUNT get 0 instead of being skipped;
                           WRITE_LOGITS: the logits themselves, for the grad-in-forward mode).
    _lce_rows_grad_kernel  grid (chunk rows): grad-in-forward mode; one row of the logits buffer
                           -> lse, loss, argmax == label, and d loss / d logits in place
                           (RAW_LOGITS: a vendor GEMM's h @ W^T, bias and softcap added on
                           load; ZERO_PAST_COUNT: rows past COUNT set to 0; the BLAS schedule).
    _lce_dhidden_kernel    grid (chunk row blocks, H blocks): dlogits @ W, scattered to the rows.
    _lce_dhidden_slab_kernel  the vocab schedule's: W is one slab, and the fp32 sum over the
                           slabs is loaded (ACC_IN) and stored (ACC_OUT) in compacted row order;
                           its H tile is two accumulators of half the width.
    _lce_dweight_kernel    grid (V blocks, H blocks): dW (+)= dlogits^T @ h over the chunk's rows
                           (gathered into a dense buffer first), in fp32, and the bias gradient
                           (the vocab schedule: one slab's rows of dW over all labelled rows,
                           stored in the weight's dtype).
All arithmetic is fp32 (half-precision operands feed tl.dot directly: exact products, fp32
accumulation); under TRITON_INTERPRET=1 operands are converted to fp32 first.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot_acc(a, b, acc, DOT_NATIVE: tl.constexpr):
    """acc + a @ b: half-precision operands as they are, fp32 ones in IEEE fp32 (never tf32)."""
    if DOT_NATIVE:
        return tl.dot(a, b, acc)
    return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")


@triton.jit
def _tanh(x):
    # tanh without libdevice (absent in the interpreter): e / (e + 2) with e = expm1(2|x|), and
    # expm1 by Kahan's trick (u - 1) * y / log(u), accurate to a few ulps also near 0.
    a = tl.minimum(tl.abs(x), 15.0)  # tanh(15) == 1 in fp32
    y = 2.0 * a
    u = tl.exp(y)
    um1 = u - 1.0
    small = um1 == 0.0
    e = tl.where(small, y, um1 * y / tl.log(tl.where(small, 2.0, u)))
    t = e / (e + 2.0)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(
    HID, W, BIAS, rows, ok_rows, cols, ok_cols, H, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_NATIVE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """fp32 logits (BLOCK_N, BLOCK_V) of the given rows and vocabulary columns."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
    row_base = rows.to(tl.int64)[:, None] * H
    col_base = cols.to(tl.int64)[:, None] * H
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ok_k = ks < H
        a = tl.load(HID + row_base + ks[None, :], mask=ok_rows[:, None] & ok_k[None, :], other=0.0)
        b = tl.load(W + col_base + ks[None, :], mask=ok_cols[:, None] & ok_k[None, :], other=0.0)
        acc = _dot_acc(a, tl.trans(b), acc, DOT_NATIVE)
    if HAS_BIAS:
        acc += tl.load(BIAS + cols, mask=ok_cols, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return acc


@triton.jit
def _lce_fwd_kernel(
    HID, W, BIAS, ORDER, LABELS, COUNT,
    PART_M, PART_S, PART_ZY, PART_SZ, PART_BEST, PART_IDX,  # (S, N) each, compact row order
    N, V, H, V_PER_SPLIT, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_NATIVE: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,  # label_smoothing > 0: the sum of the logits is needed
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The reductions after each logits tile run while the tensor cores idle, with the fp32
    # tile in registers: each one skipped or made cheaper shortens the kernel (it spilled on
    # sm_90 with all of them, benchmarks/gpu/kernel_report.py).
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    count = tl.load(COUNT)
    start = pid_n * BLOCK_N
    if start >= count:  # only unlabelled rows here: no work at all
        return
    rc = start + tl.arange(0, BLOCK_N)
    ok = rc < count
    rows = tl.load(ORDER + rc, mask=ok, other=0)
    label = tl.load(LABELS + rows, mask=ok, other=-1)
    m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    s = tl.zeros([BLOCK_N], dtype=tl.float32)
    zy = tl.zeros([BLOCK_N], dtype=tl.float32)
    sz = tl.zeros([BLOCK_N], dtype=tl.float32)
    best = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    v_lo = pid_s * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok_c = cols < v_hi
        z = _logits_tile(HID, W, BIAS, rows, ok, cols, ok_c, H, softcap,
                         HAS_BIAS, HAS_SOFTCAP, DOT_NATIVE, BLOCK_N, BLOCK_V, BLOCK_K)
        z = tl.where(ok_c[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        new_m = tl.maximum(m, tile_max)
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m[:, None]), axis=1)
        m = new_m
        zy += tl.sum(tl.where(cols[None, :] == label[:, None], z, 0.0), axis=1)
        if HAS_SMOOTHING:
            sz += tl.sum(tl.where(ok_c[None, :], z, 0.0), axis=1)
        better = tile_max > best  # strict: the first maximum wins ties, as torch.argmax
        # (tl.argmax spills less on sm_90 than a min over the columns equal to tile_max.)
        best_idx = tl.where(better, v0 + tl.argmax(z, axis=1), best_idx)
        best = tl.where(better, tile_max, best)
    out = pid_s * N + rc
    tl.store(PART_M + out, m, mask=ok)
    tl.store(PART_S + out, s, mask=ok)
    tl.store(PART_ZY + out, zy, mask=ok)
    tl.store(PART_SZ + out, sz, mask=ok)
    tl.store(PART_BEST + out, best, mask=ok)
    tl.store(PART_IDX + out, best_idx, mask=ok)


@triton.jit
def _lce_combine_kernel(
    PART_M, PART_S, PART_ZY, PART_SZ, PART_BEST, PART_IDX, ORDER, LABELS, COUNT,
    LSE, LOSS, CORRECT,  # LSE (N,) compact; LOSS (N,) fp32 and CORRECT (N,) int8 by position
    N, V, NUM_SPLITS, label_smoothing, z_loss_weight,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    count = tl.load(COUNT)
    if pid * BLOCK >= count:
        return
    rc = pid * BLOCK + tl.arange(0, BLOCK)
    ok = rc < count
    m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for sp in range(0, NUM_SPLITS):  # (rows past the count read 0: finite, never stored)
        m = tl.maximum(m, tl.load(PART_M + sp * N + rc, mask=ok, other=0.0))
    total = tl.zeros([BLOCK], dtype=tl.float32)
    zy = tl.zeros([BLOCK], dtype=tl.float32)
    sz = tl.zeros([BLOCK], dtype=tl.float32)
    best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK], dtype=tl.int32)
    for sp in range(0, NUM_SPLITS):
        part_m = tl.load(PART_M + sp * N + rc, mask=ok, other=0.0)
        part_s = tl.load(PART_S + sp * N + rc, mask=ok, other=0.0)
        # Empty splits hold m = -inf, s = 0: they add exp(-inf) * 0 = 0.
        total += tl.where(part_s > 0, part_s * tl.exp(part_m - m), 0.0)
        zy += tl.load(PART_ZY + sp * N + rc, mask=ok, other=0.0)
        sz += tl.load(PART_SZ + sp * N + rc, mask=ok, other=0.0)
        part_best = tl.load(PART_BEST + sp * N + rc, mask=ok, other=float("-inf"))
        better = part_best > best  # splits are in vocabulary order: first maximum wins
        best_idx = tl.where(better, tl.load(PART_IDX + sp * N + rc, mask=ok, other=0), best_idx)
        best = tl.where(better, part_best, best)
    lse = m + tl.log(tl.where(ok, total, 1.0))
    loss = lse - (1.0 - label_smoothing) * zy - label_smoothing * sz / V
    loss += z_loss_weight * lse * lse
    rows = tl.load(ORDER + rc, mask=ok, other=0)
    label = tl.load(LABELS + rows, mask=ok, other=-1)
    tl.store(LSE + rc, lse, mask=ok)
    tl.store(LOSS + rows, loss, mask=ok)
    tl.store(CORRECT + rows, (best_idx == label).to(tl.int8), mask=ok)


@triton.jit
def _lce_dlogits_kernel(
    HID, W, BIAS, ORDER, LABELS, COUNT, LSE, GRAD_LOSS, DLOGITS,
    # Vocabulary columns [col_start, col_end) of the chunk's rows, stored at column
    # (col - col_start) of DLOGITS, whose rows hold col_end - col_start values (the rows
    # schedule: 0 and V; the vocab schedule: one slab of the vocabulary for every row).
    chunk_start, col_start, col_end, V, H, softcap, label_smoothing, z_loss_weight,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_NATIVE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    # dw_backend="torch" multiplies the whole (chunk, V) buffer with cuBLAS, which cannot stop at
    # the device-side COUNT: rows past it must hold 0, not whatever the buffer held before.
    ZERO_PAST_COUNT: tl.constexpr = False,
    # grad-in-forward mode (impl/triton_fused_grad.py): store the (softcapped) logits, not
    # dlogits; LSE and GRAD_LOSS are not read. Same tiles, early exit and zeroing as dlogits.
    WRITE_LOGITS: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    count = tl.load(COUNT)
    start = chunk_start + pid_n * BLOCK_N
    LD = col_end - col_start
    if start >= count:
        if ZERO_PAST_COUNT:  # a store of zeros costs chunk x V x 2 bytes, no GEMM
            cols0 = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
            local0 = (start - chunk_start + tl.arange(0, BLOCK_N)).to(tl.int64)
            tl.store(DLOGITS + local0[:, None] * LD + cols0[None, :],
                     tl.zeros([BLOCK_N, BLOCK_V], dtype=DLOGITS.dtype.element_ty),
                     mask=(cols0 < LD)[None, :])
        return
    rc = start + tl.arange(0, BLOCK_N)
    ok = rc < count
    rows = tl.load(ORDER + rc, mask=ok, other=0)
    cols = col_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    ok_c = cols < col_end
    z = _logits_tile(HID, W, BIAS, rows, ok, cols, ok_c, H, softcap,
                     HAS_BIAS, HAS_SOFTCAP, DOT_NATIVE, BLOCK_N, BLOCK_V, BLOCK_K)
    if WRITE_LOGITS:
        dz = tl.where(ok[:, None] & ok_c[None, :], z, 0.0)
    else:
        label = tl.load(LABELS + rows, mask=ok, other=-1)
        lse = tl.load(LSE + rc, mask=ok, other=0.0)
        g = tl.load(GRAD_LOSS + rows, mask=ok, other=0.0)  # d total / d loss[token]
        p = tl.exp(z - lse[:, None])
        # d/dz [lse - (1-eps) z_y - eps mean(z) + zw lse^2]
        #   = p (1 + 2 zw lse) - (1-eps) [v=y] - eps/V
        dz = p * (1.0 + 2.0 * z_loss_weight * lse)[:, None] - label_smoothing / V
        dz -= tl.where(cols[None, :] == label[:, None], 1.0 - label_smoothing, 0.0)
        if HAS_SOFTCAP:  # z = c tanh(u / c): dz/du = 1 - (z / c)^2
            zc = z / softcap
            dz *= 1.0 - zc * zc
        dz = tl.where(ok[:, None] & ok_c[None, :], dz * g[:, None], 0.0)
    local = (rc - chunk_start).to(tl.int64)
    store_rows = ok
    if ZERO_PAST_COUNT:  # rows past the count in this block: the 0 from the tl.where above
        store_rows = rc >= 0
    tl.store(DLOGITS + local[:, None] * LD + (cols - col_start)[None, :],
             dz.to(DLOGITS.dtype.element_ty), mask=store_rows[:, None] & ok_c[None, :])



@triton.jit
def _finish_logits(z, BIAS, cols, ok_c, softcap, HAS_BIAS: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr):
    """Raw GEMM logits -> the op's logits: + bias, then the softcap (as _logits_tile), fp32."""
    if HAS_BIAS:
        z += tl.load(BIAS + cols, mask=ok_c, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _lce_rows_grad_kernel(
    LOGITS,  # (chunk, V): logits of the chunk's compacted rows in, d loss / d logits out
    ORDER, LABELS, COUNT,
    LSE, LOSS, CORRECT,  # as _lce_combine_kernel's: LSE compact, LOSS/CORRECT by position
    BIAS,  # (V,), read only with RAW_LOGITS and HAS_BIAS
    chunk_start, V,
    row_stride,  # elements between LOGITS rows: V, or the BLAS schedule's padded row (>= V)
    softcap, label_smoothing, z_loss_weight,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, BLOCK_V: tl.constexpr,
    # The BLAS schedule (impl/blas_fused_grad.py): LOGITS holds h @ W^T as a vendor GEMM wrote
    # it, so the bias and the softcap are applied here, on every load, in fp32; and the GEMMs
    # that read the buffer next multiply every row, so rows past COUNT are overwritten with 0.
    RAW_LOGITS: tl.constexpr = False, HAS_BIAS: tl.constexpr = False,
    ZERO_PAST_COUNT: tl.constexpr = False,
):
    """Grad-in-forward mode, one program per row of the chunk: the loss terms of
    _lce_fwd_kernel + _lce_combine_kernel and the d loss / d logits of _lce_dlogits_kernel with
    a per-token weight of 1 (the gradient of the "sum"), computed from the stored logits. The
    row is read twice (online log-sum-exp, then the gradient) and written once, in place.
    Memory-bound: both loops are software-pipelined (tl.range num_stages=3, cp.async), which a
    plain range does not do for loads that feed no tl.dot."""
    pid = tl.program_id(0)
    count = tl.load(COUNT)
    rc = chunk_start + pid
    base = LOGITS + pid.to(tl.int64) * row_stride
    # Loads and stores run to the padded row end (row_stride, a multiple of 16 from the BLAS
    # schedule), so an odd V still gets vectorized, pipelined accesses; the math masks at V
    # (the padding holds whatever the GEMM left there, and the GEMMs never read it back).
    if rc >= count:  # unlabelled row: its buffer row is not read by dhidden/dweight (or is 0)
        if ZERO_PAST_COUNT:
            for v0 in tl.range(0, V, BLOCK_V):
                cols = v0 + tl.arange(0, BLOCK_V)
                tl.store(base + cols, tl.zeros([BLOCK_V], dtype=LOGITS.dtype.element_ty),
                         mask=cols < row_stride)
        return
    row = tl.load(ORDER + rc)
    label = tl.load(LABELS + row).to(tl.int32)
    m = float("-inf")
    s = 0.0
    zy = 0.0
    sz = 0.0
    best = float("-inf")
    best_idx = 0
    for v0 in tl.range(0, V, BLOCK_V, num_stages=3):
        cols = v0 + tl.arange(0, BLOCK_V)
        ok_c = cols < V
        z = tl.load(base + cols, mask=cols < row_stride, other=0.0).to(tl.float32)
        z = tl.where(ok_c, z, 0.0)  # the padding's leftovers never enter the arithmetic
        if RAW_LOGITS:
            z = _finish_logits(z, BIAS, cols, ok_c, softcap, HAS_BIAS, HAS_SOFTCAP)
        z = tl.where(ok_c, z, float("-inf"))
        tile_max = tl.max(z, axis=0)
        new_m = tl.maximum(m, tile_max)
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(z - new_m), axis=0)
        m = new_m
        zy += tl.sum(tl.where(cols == label, z, 0.0), axis=0)
        if HAS_SMOOTHING:
            sz += tl.sum(tl.where(ok_c, z, 0.0), axis=0)
        better = tile_max > best  # strict: the first maximum wins ties, as torch.argmax
        best_idx = tl.where(better, v0 + tl.argmax(z, axis=0), best_idx)
        best = tl.where(better, tile_max, best)
    lse = m + tl.log(s)
    loss = lse - (1.0 - label_smoothing) * zy - label_smoothing * sz / V
    loss += z_loss_weight * lse * lse
    tl.store(LSE + rc, lse)
    tl.store(LOSS + row, loss)
    tl.store(CORRECT + row, (best_idx == label).to(tl.int8))
    coef = 1.0 + 2.0 * z_loss_weight * lse
    for v0 in tl.range(0, V, BLOCK_V, num_stages=3):  # _lce_dlogits_kernel's formula, weight 1
        cols = v0 + tl.arange(0, BLOCK_V)
        ok_c = cols < V
        z = tl.load(base + cols, mask=cols < row_stride, other=0.0).to(tl.float32)
        z = tl.where(ok_c, z, 0.0)  # padding: a finite dz, stored there and never read
        if RAW_LOGITS:
            z = _finish_logits(z, BIAS, cols, ok_c, softcap, HAS_BIAS, HAS_SOFTCAP)
        dz = tl.exp(z - lse) * coef - label_smoothing / V
        dz -= tl.where(cols == label, 1.0 - label_smoothing, 0.0)
        if HAS_SOFTCAP:
            zc = z / softcap
            dz *= 1.0 - zc * zc
        tl.store(base + cols, dz.to(LOGITS.dtype.element_ty), mask=cols < row_stride)

@triton.jit
def _lce_dhidden_kernel(
    DLOGITS, W, ORDER, COUNT, GRAD_HID,
    chunk_start, V, H,  # V: the columns of DLOGITS (its row length) and rows of W to reduce
    DOT_NATIVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    count = tl.load(COUNT)
    start = chunk_start + pid_m * BLOCK_M
    if start >= count:
        return
    rc = start + tl.arange(0, BLOCK_M)
    ok = rc < count
    local = (rc - chunk_start).to(tl.int64)
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    ok_h = hs < H
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_K):
        vs = v0 + tl.arange(0, BLOCK_K)
        ok_v = vs < V
        a = tl.load(DLOGITS + local[:, None] * V + vs[None, :],
                    mask=ok[:, None] & ok_v[None, :], other=0.0)
        b = tl.load(W + vs.to(tl.int64)[:, None] * H + hs[None, :],
                    mask=ok_v[:, None] & ok_h[None, :], other=0.0)
        acc = _dot_acc(a, b, acc, DOT_NATIVE)
    rows = tl.load(ORDER + rc, mask=ok, other=0)
    tl.store(GRAD_HID + rows.to(tl.int64)[:, None] * H + hs[None, :],
             acc.to(GRAD_HID.dtype.element_ty), mask=ok[:, None] & ok_h[None, :])


@triton.jit
def _lce_dhidden_slab_kernel(
    DLOGITS, W, ORDER, COUNT, GRAD_HID,
    ACC,  # (rows, H) fp32 in compacted row order: the sum over earlier slabs
    V, H,  # V: the slab's columns (DLOGITS's row length) and rows of W (the slab) to reduce
    DOT_NATIVE: tl.constexpr,
    ACC_IN: tl.constexpr,  # start from ACC (a later slab) instead of 0
    ACC_OUT: tl.constexpr,  # store the fp32 sum to ACC (not the last slab), else scatter rows
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # The H tile is two accumulators of BLOCK_H / 2 columns that share each loaded dlogits
    # tile: a 128 x 256 tile's arithmetic intensity, while the fp32 sum loaded into them
    # converts to the MMA layout half a tile at a time. As one 128 x 256 accumulator it spilled
    # 136-456 bytes per thread on sm_90; as two halves none, for H a multiple of 16 (an odd H
    # spills some: kernel_report.py --no-specialize).
    HALF: tl.constexpr = BLOCK_H // 2
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1)
    count = tl.load(COUNT)
    start = pid_m * BLOCK_M
    if start >= count:
        return
    rc = start + tl.arange(0, BLOCK_M)
    ok = rc < count
    h0 = pid_h * BLOCK_H + tl.arange(0, HALF)
    h1 = h0 + HALF
    ok0 = ok[:, None] & (h0 < H)[None, :]
    ok1 = ok[:, None] & (h1 < H)[None, :]
    if ACC_IN:
        acc0 = tl.load(ACC + rc.to(tl.int64)[:, None] * H + h0[None, :], mask=ok0, other=0.0)
        acc1 = tl.load(ACC + rc.to(tl.int64)[:, None] * H + h1[None, :], mask=ok1, other=0.0)
    else:
        acc0 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_M, HALF], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_K):
        vs = v0 + tl.arange(0, BLOCK_K)
        ok_v = vs < V
        a = tl.load(DLOGITS + rc.to(tl.int64)[:, None] * V + vs[None, :],
                    mask=ok[:, None] & ok_v[None, :], other=0.0)
        b0 = tl.load(W + vs.to(tl.int64)[:, None] * H + h0[None, :],
                     mask=ok_v[:, None] & (h0 < H)[None, :], other=0.0)
        b1 = tl.load(W + vs.to(tl.int64)[:, None] * H + h1[None, :],
                     mask=ok_v[:, None] & (h1 < H)[None, :], other=0.0)
        acc0 = _dot_acc(a, b0, acc0, DOT_NATIVE)
        acc1 = _dot_acc(a, b1, acc1, DOT_NATIVE)
    if ACC_OUT:  # (offsets recomputed here: a 2-D int64 tile kept across the loop spills)
        tl.store(ACC + rc.to(tl.int64)[:, None] * H + h0[None, :], acc0, mask=ok0)
        tl.store(ACC + rc.to(tl.int64)[:, None] * H + h1[None, :], acc1, mask=ok1)
    else:
        rows = tl.load(ORDER + rc, mask=ok, other=0).to(tl.int64)
        tl.store(GRAD_HID + rows[:, None] * H + h0[None, :],
                 acc0.to(GRAD_HID.dtype.element_ty), mask=ok0)
        tl.store(GRAD_HID + rows[:, None] * H + h1[None, :],
                 acc1.to(GRAD_HID.dtype.element_ty), mask=ok1)


@triton.jit
def _lce_dweight_kernel(
    DLOGITS, HID_ROWS, COUNT, GRAD_W, GRAD_B,  # GRAD_W (V, H), GRAD_B (V,): fp32 to accumulate
    chunk_start, chunk_rows, V, H,  # V: the columns of DLOGITS (its row length)
    ACCUMULATE: tl.constexpr,  # add to GRAD_W (later chunks) or overwrite it (the first)
    HAS_WEIGHT_GRAD: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_NATIVE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # HID_ROWS (chunk_rows, H): the chunk's hidden rows, already gathered in compacted order.
    # Gathering them here through ORDER made each B tile depend on an index load, and
    # Triton's pipeliner then kept one buffer of the dlogits tile and two of the hidden tile
    # instead of num_stages each (benchmarks/gpu/kernel_report.py: ~260 TFLOP/s on an H200).
    pid_v = tl.program_id(0)
    pid_h = tl.program_id(1)
    count = tl.load(COUNT)
    num_rows = tl.minimum(count - chunk_start, chunk_rows)
    if ACCUMULATE:
        if num_rows <= 0:  # this chunk holds no labelled rows: nothing to add
            return
    vs = pid_v * BLOCK_M + tl.arange(0, BLOCK_M)
    ok_v = vs < V
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    ok_h = hs < H
    out = vs.to(tl.int64)[:, None] * H + hs[None, :]
    m_out = ok_v[:, None] & ok_h[None, :]
    # Later chunks start from the stored sum: adding it after the loop held a second
    # (BLOCK_M, BLOCK_H) fp32 tile in registers next to the accumulator (spills on sm_90).
    if HAS_WEIGHT_GRAD and ACCUMULATE:
        acc = tl.load(GRAD_W + out, mask=m_out, other=0.0)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    acc_b = tl.zeros([BLOCK_M], dtype=tl.float32)
    for r0 in range(0, num_rows, BLOCK_K):
        rr = r0 + tl.arange(0, BLOCK_K)
        ok_r = rr < num_rows
        a = tl.load(DLOGITS + rr.to(tl.int64)[None, :] * V + vs[:, None],
                    mask=ok_v[:, None] & ok_r[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
        if HAS_WEIGHT_GRAD:
            b = tl.load(HID_ROWS + rr.to(tl.int64)[:, None] * H + hs[None, :],
                        mask=ok_r[:, None] & ok_h[None, :], other=0.0)  # (BLOCK_K, BLOCK_H)
            acc = _dot_acc(a, b, acc, DOT_NATIVE)
        if HAS_BIAS:
            acc_b += tl.sum(a.to(tl.float32), axis=1)
    if HAS_WEIGHT_GRAD:  # (the vocab schedule stores the finished sum in the weight's dtype)
        tl.store(GRAD_W + out, acc.to(GRAD_W.dtype.element_ty), mask=m_out)
    if HAS_BIAS:
        if pid_h == 0:
            if ACCUMULATE:
                acc_b += tl.load(GRAD_B + vs, mask=ok_v, other=0.0)
            tl.store(GRAD_B + vs, acc_b.to(GRAD_B.dtype.element_ty), mask=ok_v)
