# Triton kernels for embedding_distill_loss: 3 launches forward, 1 backward, no host syncs.
"""impl="triton": the whole loss in four kernel launches.

Forward
  1. _embedding_distill_loss_fwd_kernel, grid (num_chunks, B tiles, B_global tiles): one read
     of pred and the targets, split over the feature dim D (each program a fixed set of column
     blocks, interleaved with the other programs': INTERLEAVE_CHUNKS); per program partial
     sums (fp32) of
        sl1[i] = sum_d smooth_l1(pred - target)   pp[i] = |pred_i|^2
        dot[i, j] = pred_i . targets_j (tl.dot)     tt[j] = |targets_j|^2
     bf16/fp16 operands go to tl.dot as they are (exact products, fp32 accumulation); fp32
     operands use IEEE fp32, never tf32.
  2. _embedding_distill_loss_rows_kernel, grid (B,): per sample, sums the partials over chunks
     (a fixed order: deterministic, no atomics), computes its smooth-L1 and InfoNCE terms and
     the analytic gradient coefficients (see _rows_kernel's comments), and d(loss)/d(logit_scale).
  3. _embedding_distill_loss_total_kernel, grid (1,): sums the per-sample terms into
     out = [loss, smooth_l1, contrastive, d(contrastive)/d(logit_scale)].
Backward
  4. _embedding_distill_loss_bwd_kernel, grid (D blocks, B tiles): reads pred and the targets
     once more and writes, in pred's dtype,
        grad_pred[i] = u_sl1 * coef_sl1[i] * smooth_l1'(pred_i - target_i)
                     + u_con * (coef_p[i] * pred_i + sum_j coef_c[i, j] * targets_j)
     with u_sl1 = g_loss + g_smooth_l1 and u_con = g_loss + g_contrastive read from the device
     (no host sync), and grad_logit_scale = u_con * out[3].
Under TRITON_INTERPRET=1 every operand is converted to fp32 first (the interpreter computes bf16
arithmetic on raw bits) and a single autotune config is used.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import interpreter_enabled, next_power_of_2, num_sms

_HALF = (torch.float16, torch.bfloat16)
_NORM_EPS_SQ = 1e-24  # F.normalize's eps (1e-12), squared: norms are taken of sums of squares
# Forward programs per SM (D chunks x row tiles). 4 leaves room: at B=32 with 64-column tiles
# 8 fit an SM (64 registers x 128 threads, 16 KiB of shared memory). Run 6 measured the
# forward at 31-36% of the copy bandwidth with 4; benchmarks/gpu/profile_embedding_loss.py
# sweeps 2-16 to see whether more programs in flight are what it lacks.
CHUNKS_PER_SM = 4
# The forward's row sums (smooth-L1, |p|^2, |g|^2) accumulated as (rows, BLOCK_D) fp32 tiles
# and reduced across the columns once after the loop, instead of a cross-lane reduction of
# each tile every iteration (three shuffle trees per 64 columns, on the loop's critical path).
# Measured on an H100 (run 7, docs/PERF.md): forward 81.7 -> 78.0 us at seg B=32 and 37.9 ->
# 36.3 us at depth B=8 (4-5%; predicted up to 1.3-1.5x: the shuffles are a small part of the
# per-step latency). Only for tiles of at most 2,048 elements (BLOCK_B x BLOCK_D): larger ones
# spill the three accumulators on sm_90 (B=64 x 128 did; B=32 x 64 with 4 warps takes 128
# registers, 64 without). False restores the per-tile reduction.
DEFER_ROW_SUMS = True
# How the forward's programs split the feature dim. Interleaved (True): program c reads column
# blocks c, c + C, c + 2C, ... (C programs), so at any moment the C programs stream adjacent
# BLOCK_D-column blocks of the same rows: every DRAM page a row crosses is read by neighbours
# at about the same time, as in the backward (grid over column blocks, 70-76% of copy on the
# H200 and H100). Blocked (False, the layout measured up to run 7): program c reads one
# contiguous chunk of D / C columns, so ~C x 2B row streams each read 128 bytes at a time from
# pages ~D/C apart, and a page is reopened for every 128 bytes (run 7: 42-48% of copy; the
# sweeps above ruled out occupancy, tile width and per-tile reductions). Either way each
# program sums a fixed set of columns in a fixed order: deterministic.
INTERLEAVE_CHUNKS = True


def _configs(bwd: bool) -> list[triton.Config]:
    if interpreter_enabled():
        return [triton.Config({"BLOCK_D": 64}, num_warps=4, num_stages=1)]
    # (BLOCK_D, num_warps, num_stages): few enough that autotuning a new shape takes seconds.
    if bwd:
        choices = [(128, 4, 2), (256, 4, 2), (256, 8, 2), (128, 8, 3)]
    else:
        # Wide BLOCK_D and deeper pipelines put more bytes in flight per program: at B=8 the
        # forward was latency-bound (H200 profile, docs/PERF.md run 4).
        choices = [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3), (128, 4, 2), (256, 4, 2),
                   (512, 8, 3), (512, 8, 4), (1024, 8, 2)]
    return [triton.Config({"BLOCK_D": d}, num_warps=w, num_stages=s) for d, w, s in choices]


@triton.autotune(configs=_configs(bwd=False),
                 key=["B", "BG", "D", "WITH_DOT", "DOT_NATIVE", "SHARED_TILE", "DEFER_SUMS",
                      "INTERLEAVE"])
@triton.jit
def _embedding_distill_loss_fwd_kernel(
    P, T, G,  # pred (B, D), local targets (B, D), global targets (BG, D); rows contiguous
    SL1_PART, PP_PART, DOT_PART, TT_PART,  # fp32 (C, B), (C, B), (C, B, BG), (C, BG)
    B, BG, D, NUM_CHUNKS,
    beta, inv_beta,
    WITH_DOT: tl.constexpr,
    DOT_NATIVE: tl.constexpr,  # feed the loaded half-precision tiles to tl.dot directly
    SHARED_TILE: tl.constexpr,  # T's rows are exactly G's tile: load once
    BLOCK_B: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DEFER_SUMS: tl.constexpr = False,  # DEFER_ROW_SUMS (taken for tiles <= 2,048 elements)
    INTERLEAVE: tl.constexpr = True,  # INTERLEAVE_CHUNKS: the column split
):
    pid_c = tl.program_id(0)
    pid_b = tl.program_id(1)
    pid_g = tl.program_id(2)
    rows_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rows_g = pid_g * BLOCK_G + tl.arange(0, BLOCK_G)
    ok_b = rows_b < B
    ok_g = rows_g < BG
    # int64 row offsets: B_global * D can pass 2^31 (256 seg targets are 226M values).
    base_b = rows_b.to(tl.int64)[:, None] * D
    base_g = rows_g.to(tl.int64)[:, None] * D
    if INTERLEAVE:  # column blocks pid_c, pid_c + NUM_CHUNKS, ... (INTERLEAVE_CHUNKS)
        d_lo = pid_c * BLOCK_D
        d_step = NUM_CHUNKS * BLOCK_D
        n_iter = tl.cdiv(tl.maximum(D - d_lo, 0), d_step)
    else:  # one contiguous chunk
        chunk = tl.cdiv(tl.cdiv(D, NUM_CHUNKS), BLOCK_D) * BLOCK_D
        d_lo = pid_c * chunk
        d_step = BLOCK_D
        n_iter = chunk // BLOCK_D

    acc_sl1 = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_pp = tl.zeros([BLOCK_B], dtype=tl.float32)
    acc_dot = tl.zeros([BLOCK_B, BLOCK_G], dtype=tl.float32)
    acc_tt = tl.zeros([BLOCK_G], dtype=tl.float32)
    DEFER: tl.constexpr = DEFER_SUMS and BLOCK_B * BLOCK_D <= 2048 and BLOCK_G * BLOCK_D <= 2048
    if DEFER:  # (rows, BLOCK_D) partial sums, reduced over the columns after the loop
        acc_sl1_2d = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        acc_pp_2d = tl.zeros([BLOCK_B, BLOCK_D], dtype=tl.float32)
        acc_tt_2d = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    # The loop body has no run-time branches, so Triton can software-pipeline its loads (a
    # branch on pid_g here made every iteration wait for DRAM). Programs of other candidate
    # tiles recompute sl1/pp and tt redundantly; only one of them stores each.
    for it in range(0, n_iter):
        cols = d_lo + it * d_step + tl.arange(0, BLOCK_D)
        ok_d = cols < D
        m_b = ok_b[:, None] & ok_d[None, :]
        p_raw = tl.load(P + base_b + cols[None, :], mask=m_b, other=0.0)
        p = p_raw.to(tl.float32)
        if WITH_DOT:
            m_g = ok_g[:, None] & ok_d[None, :]
            g_raw = tl.load(G + base_g + cols[None, :], mask=m_g, other=0.0)
            g = g_raw.to(tl.float32)
            if DEFER:
                acc_tt_2d += g * g
            else:
                acc_tt += tl.sum(g * g, axis=1)
            if DOT_NATIVE:
                acc_dot = tl.dot(p_raw, tl.trans(g_raw), acc_dot)
            else:
                acc_dot = tl.dot(p, tl.trans(g), acc_dot, input_precision="ieee")
        if SHARED_TILE:  # single GPU, one tile: the local targets are the candidate tile
            t = g
        else:
            t = tl.load(T + base_b + cols[None, :], mask=m_b, other=0.0).to(tl.float32)
        diff = p - t
        ad = tl.abs(diff)
        loss = tl.where(ad < beta, 0.5 * diff * diff * inv_beta, ad - 0.5 * beta)
        if DEFER:
            acc_sl1_2d += loss
            acc_pp_2d += p * p
        else:
            acc_sl1 += tl.sum(loss, axis=1)
            acc_pp += tl.sum(p * p, axis=1)
    if DEFER:
        acc_sl1 = tl.sum(acc_sl1_2d, axis=1)
        acc_pp = tl.sum(acc_pp_2d, axis=1)
        if WITH_DOT:
            acc_tt = tl.sum(acc_tt_2d, axis=1)

    part_b = pid_c * B + rows_b
    first_g = pid_g == 0
    tl.store(SL1_PART + part_b, acc_sl1, mask=ok_b & first_g)
    tl.store(PP_PART + part_b, acc_pp, mask=ok_b & first_g)
    if WITH_DOT:
        dot_ptr = DOT_PART + part_b.to(tl.int64)[:, None] * BG + rows_g[None, :]
        tl.store(dot_ptr, acc_dot, mask=ok_b[:, None] & ok_g[None, :])
        tl.store(TT_PART + pid_c * BG + rows_g, acc_tt, mask=ok_g & (pid_b == 0))


@triton.jit
def _log1p(x):
    # log1p without libdevice (the interpreter has none): Goldberg's correction keeps full
    # relative precision for small x, where log(1 + x) would lose it.
    u = 1.0 + x
    exact = u == 1.0
    return tl.where(exact, x, tl.log(u) * x / tl.where(exact, 1.0, u - 1.0))


@triton.jit
def _embedding_distill_loss_rows_kernel(
    SL1_PART, PP_PART, DOT_PART, TT_PART,  # partials of the forward kernel
    MASK, GMASK, LOGIT_SCALE,  # fp32 (B,), (BG,), scalar
    ROW_OUT,  # fp32 (3, B): smooth-L1 term, contrastive term, d(con)/d(logit_scale) term
    COEF_SL1, COEF_P, COEF_C,  # fp32 (B,), (B,), (B, BG): gradient coefficients
    B, BG, C, offset, world, numel,
    contrastive_weight, max_logit_scale,
    SEED_MODE: tl.constexpr,
    WITH_DOT: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_GC: tl.constexpr,  # >= BG: one row of candidates in one tile
    BLOCK_BM: tl.constexpr,  # >= B
    NUM_STAGES: tl.constexpr = 3,  # the chunk loops' software pipelining (rows_kernel_tiles)
):
    i = tl.program_id(0)
    cs = tl.arange(0, BLOCK_C)
    acc_sl1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_pp = tl.zeros([BLOCK_C], dtype=tl.float32)
    # Wide tiles (rows_kernel_tiles): all C chunks' partials in one or two rounds of loads,
    # not a chain of small pipelined blocks (run 4-6: 10-16 us for 528 chunks, mostly waiting).
    for c0 in tl.range(0, C, BLOCK_C, num_stages=NUM_STAGES):
        ok = c0 + cs < C
        acc_sl1 += tl.load(SL1_PART + (c0 + cs) * B + i, mask=ok, other=0.0)
        acc_pp += tl.load(PP_PART + (c0 + cs) * B + i, mask=ok, other=0.0)
    sl1 = tl.sum(acc_sl1)
    pp = tl.sum(acc_pp)
    m_i = tl.load(MASK + i)
    bm = tl.arange(0, BLOCK_BM)
    m_sum = tl.sum(tl.load(MASK + bm, mask=bm < B, other=0.0))
    cols = tl.arange(0, BLOCK_GC)
    ok_g = cols < BG
    gm = tl.load(GMASK + cols, mask=ok_g, other=0.0)
    num_valid = tl.maximum(tl.sum(gm), 1.0)
    # d(smooth_l1)/d(sl1[i]): masked samples count in the seed's denominator, not in ours.
    # (Divisions one at a time: B * numel can pass 2^31 as an int32 product.)
    if SEED_MODE:
        coef_sl1 = m_i / B / numel
    else:
        coef_sl1 = m_i * world / num_valid / numel
    tl.store(COEF_SL1 + i, coef_sl1)
    tl.store(ROW_OUT + i, coef_sl1 * sl1)
    zero = tl.sum(tl.zeros([16], dtype=tl.float32))  # a typed fp32 scalar 0
    row_con = zero
    row_dls = zero
    coef_p = zero
    if WITH_DOT:
        dot = tl.zeros([BLOCK_GC], dtype=tl.float32)
        tt = tl.zeros([BLOCK_GC], dtype=tl.float32)
        for c0 in tl.range(0, C, BLOCK_C, num_stages=NUM_STAGES):
            okc = (c0 + cs) < C
            m2 = okc[:, None] & ok_g[None, :]
            rows = (c0 + cs).to(tl.int64)
            dot += tl.sum(tl.load(DOT_PART + (rows[:, None] * B + i) * BG + cols[None, :],
                                  mask=m2, other=0.0), axis=0)
            tt += tl.sum(tl.load(TT_PART + rows[:, None] * BG + cols[None, :], mask=m2,
                                 other=0.0), axis=0)
        # cos = dot / (max(|p|, eps) max(|t|, eps)), as F.normalize then a dot product.
        pn = tl.sqrt(tl.maximum(pp, 1e-24))
        tn = tl.sqrt(tl.maximum(tt, 1e-24))
        cos = dot / (pn * tn)
        e_ls = tl.exp(tl.load(LOGIT_SCALE).to(tl.float32))
        # As torch.clamp(max=): a NaN scale stays NaN (tl.minimum would return the limit and
        # a NaN logit_scale would train on, pinned at it, with a zero gradient).
        scale = tl.where(e_ls > max_logit_scale, max_logit_scale, e_ls)
        is_label = cols == offset + i
        # Logits relative to the label's (z[label] == 0 exactly): keeps a small loss and the
        # logit-scale gradient free of cancellation (see epilogue.py).
        dcos = cos - tl.sum(tl.where(is_label, cos, 0.0))
        z = dcos * scale
        if SEED_MODE:
            ok_col = ok_g
            weight = contrastive_weight * m_sum / B / B  # w * mean(ce) * mean(mask)
            z = tl.where(ok_col, z, float("-inf"))
        else:
            ok_col = ok_g & (gm > 0)  # a masked sample's target is no candidate
            row_ok = m_i > 0
            weight = tl.where(row_ok, contrastive_weight * world / num_valid, 0.0)
            z = tl.where(ok_col, z, float("-inf"))
            z = tl.where(row_ok, z, tl.where(ok_g, 0.0, float("-inf")))  # finite dummies
        z_max = tl.max(z, axis=0)
        arg = tl.argmax(z, axis=0)
        ez = tl.exp(z - z_max)
        rest = tl.sum(tl.where(cols == arg, 0.0, ez))  # sum(exp(z - max)) = 1 + rest
        denom = 1.0 + rest
        ce = z_max + _log1p(rest)
        # d(ce)/d(z) = softmax, minus 1 at the label, written as -(sum of the other
        # probabilities) so that a confident row keeps its small gradient exactly.
        others = tl.sum(tl.where(is_label, 0.0, ez))
        dz = tl.where(is_label, -others / denom, ez / denom)
        dz = tl.where(ok_col, dz, 0.0)
        row_con = weight * ce
        # d(con)/d(cos) = weight * scale * dz; cos depends on pred through dot and pp.
        g_cos = weight * scale * dz
        tl.store(COEF_C + i.to(tl.int64) * BG + cols, g_cos / (pn * tn), mask=ok_g)
        # d cos / d pp = -cos / (2 pp); grad_pred gets 2 pred * d/dpp. Zero under the clamp.
        coef_p = tl.where(pp > 1e-24, -tl.sum(g_cos * tl.where(ok_col, cos, 0.0)) / pp, 0.0)
        # d z / d logit_scale = dcos * exp(logit_scale), zero while the clamp is active: at
        # the limit itself too, as torch.clamp(x, max=m) passes no gradient at x == m.
        live = tl.where(e_ls >= max_logit_scale, 0.0, 1.0)  # (NaN: live, so NaN flows on)
        row_dls = weight * tl.sum(dz * tl.where(ok_col, dcos, 0.0)) * scale * live
    tl.store(COEF_P + i, coef_p)
    tl.store(ROW_OUT + B + i, row_con)
    tl.store(ROW_OUT + 2 * B + i, row_dls)


@triton.jit
def _embedding_distill_loss_total_kernel(ROW_OUT, OUT, LOSS, SL1, CON, B, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc_sl1 = tl.zeros([BLOCK], dtype=tl.float32)
    acc_con = tl.zeros([BLOCK], dtype=tl.float32)
    acc_dls = tl.zeros([BLOCK], dtype=tl.float32)
    for b0 in range(0, B, BLOCK):
        ok = b0 + offs < B
        acc_sl1 += tl.load(ROW_OUT + b0 + offs, mask=ok, other=0.0)
        acc_con += tl.load(ROW_OUT + B + b0 + offs, mask=ok, other=0.0)
        acc_dls += tl.load(ROW_OUT + 2 * B + b0 + offs, mask=ok, other=0.0)
    s_sl1 = tl.sum(acc_sl1)
    s_con = tl.sum(acc_con)
    tl.store(OUT, s_sl1 + s_con)
    tl.store(OUT + 1, s_sl1)
    tl.store(OUT + 2, s_con)
    tl.store(OUT + 3, tl.sum(acc_dls))
    # The three differentiable outputs on their own (not views of OUT): each gets its own
    # gradient, or None, in the backward, with no zero fills or stacking by autograd.
    tl.store(LOSS, s_sl1 + s_con)
    tl.store(SL1, s_sl1)
    tl.store(CON, s_con)


@triton.autotune(configs=_configs(bwd=True),
                 key=["B", "BG", "D", "WITH_DOT", "DOT_PREC", "SHARED_TILE"])
@triton.jit
def _embedding_distill_loss_bwd_kernel(
    P, T, G, GRAD,  # pred, local targets (B, D); global targets (BG, D); grad_pred (B, D)
    COEF_SL1, COEF_P, COEF_C,  # fp32 (B,), (B,), (B, BG) from the rows kernel
    OUT, GRAD_LS,  # fp32 forward out (4,); grad of logit_scale (0-dim)
    G_LOSS, G_SL1, G_CON,  # upstream gradients of loss, smooth_l1, contrastive (0-dim fp32)
    B, BG, D,
    beta, inv_beta,
    HAS_G_LOSS: tl.constexpr,  # False: that output got no gradient (its pointer is a dummy)
    HAS_G_SL1: tl.constexpr,
    HAS_G_CON: tl.constexpr,
    WITH_DOT: tl.constexpr,
    DOT_PREC: tl.constexpr,  # "tf32" when pred and the targets are half precision
    SHARED_TILE: tl.constexpr,  # the candidate rows are this program's target rows
    BLOCK_B: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_b = tl.program_id(1)
    zero = tl.sum(tl.zeros([16], dtype=tl.float32))  # a typed fp32 scalar 0
    u_loss = zero
    u_sl1 = zero
    u_con = zero
    if HAS_G_LOSS:
        u_loss = tl.load(G_LOSS).to(tl.float32)
    if HAS_G_SL1:
        u_sl1 = tl.load(G_SL1).to(tl.float32)
    if HAS_G_CON:
        u_con = tl.load(G_CON).to(tl.float32)
    u_sl1 += u_loss
    u_con += u_loss
    rows_b = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    ok_b = rows_b < B
    ok_d = cols < D
    m_b = ok_b[:, None] & ok_d[None, :]
    offs = rows_b.to(tl.int64)[:, None] * D + cols[None, :]
    p = tl.load(P + offs, mask=m_b, other=0.0).to(tl.float32)
    t = tl.load(T + offs, mask=m_b, other=0.0).to(tl.float32)
    diff = p - t
    # torch's smooth_l1 derivative; diff * 0 keeps NaN inputs NaN (torch.sign(nan) is nan).
    sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, diff * 0.0))
    slope = tl.where(tl.abs(diff) < beta, diff * inv_beta, sign)
    c_sl1 = tl.load(COEF_SL1 + rows_b, mask=ok_b, other=0.0) * u_sl1
    c_p = tl.load(COEF_P + rows_b, mask=ok_b, other=0.0) * u_con
    acc = c_sl1[:, None] * slope + c_p[:, None] * p
    if WITH_DOT:
        if SHARED_TILE:  # single GPU, one tile: the candidate rows are the target tile `t`
            c = tl.load(
                COEF_C + rows_b.to(tl.int64)[:, None] * BG + rows_b[None, :],
                mask=ok_b[:, None] & ok_b[None, :],
                other=0.0,
            ) * u_con
            acc = tl.dot(c, t, acc, input_precision=DOT_PREC)
        else:
            for g0 in range(0, BG, BLOCK_G):
                rows_g = g0 + tl.arange(0, BLOCK_G)
                ok_g = rows_g < BG
                c = tl.load(
                    COEF_C + rows_b.to(tl.int64)[:, None] * BG + rows_g[None, :],
                    mask=ok_b[:, None] & ok_g[None, :],
                    other=0.0,
                ) * u_con
                g_rows = tl.load(
                    G + rows_g.to(tl.int64)[:, None] * D + cols[None, :],
                    mask=ok_g[:, None] & ok_d[None, :],
                    other=0.0,
                ).to(tl.float32)
                acc = tl.dot(c, g_rows, acc, input_precision=DOT_PREC)
        g_ls = u_con * tl.load(OUT + 3)
    else:
        g_ls = zero
    if (pid_d == 0) & (pid_b == 0):
        tl.store(GRAD_LS, g_ls)  # (always written: the op's output is never uninitialized)
    tl.store(GRAD + offs, acc.to(GRAD.dtype.element_ty), mask=m_b)


def _shared_tile(gathered, with_dot, tiles_b, tiles_g, block_b, block_g) -> bool:
    # Without a process group the candidates are the local targets; with one tile of each, the
    # program's target rows and candidate rows are the same tile.
    return gathered is None and with_dot and tiles_b == 1 and tiles_g == 1 and block_b == block_g


# The rows kernel's (chunks x candidates) tile: at most this many fp32 elements per load (x2:
# the dot and |t|^2 partials), spread over 16 warps (32 per thread per tensor).
ROWS_TILE_ELEMENTS = 16384


def rows_kernel_tiles(num_chunks: int, block_gc: int) -> tuple[int, int, int]:
    """(BLOCK_C, num_warps, NUM_STAGES) of the rows kernel. When ROWS_TILE_ELEMENTS-wide tiles
    cover the C chunk partials in one or two rounds (C = 4 x SMs = 528 on an H100: one round
    up to 16 candidates, two at 32), each program loads them that way, every round's loads in
    flight at once (run 4-6 measured 10-16 us for the kernel with 64-chunk blocks pipelined
    three deep, docs/PERF.md). Otherwise (many candidates: B_global >= 64) the previous
    4,096-element blocks pipelined three deep, whose staging fits in shared memory (wide tiles
    three deep would not: 264 KiB on sm_90)."""
    wide = max(1, min(next_power_of_2(num_chunks), ROWS_TILE_ELEMENTS // block_gc))
    if triton.cdiv(num_chunks, wide) <= 2:
        tile = wide * block_gc
        return wide, 16 if tile >= 8192 else 8 if tile >= 2048 else 4, 1
    return max(1, min(64, 4096 // block_gc)), 8 if block_gc >= 1024 else 4, 3


def _row_block(n: int, cap: int = 64) -> int:
    # tl.dot needs every tile dimension >= 16.
    return max(16, min(cap, next_power_of_2(n)))


def embedding_distill_loss_triton_fwd(
    pred, target, gathered, mask, gathered_mask, logit_scale, beta, contrastive_weight,
    max_logit_scale, offset, world_size, seed_mode, with_dot,
):
    """Launch the three forward kernels. Returns (out (4,), coef_sl1, coef_p, coef_c)."""
    batch, numel = pred.shape
    others = target if gathered is None else gathered
    num_global = others.shape[0] if with_dot else gathered_mask.shape[0]
    block_b = _row_block(batch)
    block_g = _row_block(num_global) if with_dot else 16
    tiles_b = triton.cdiv(batch, block_b)
    tiles_g = triton.cdiv(num_global, block_g) if with_dot else 1
    # Enough programs to fill every SM a few times over; at least 64 columns per chunk.
    want = max(1, CHUNKS_PER_SM * num_sms(pred.device) // (tiles_b * tiles_g))
    num_chunks = max(1, min(want, triton.cdiv(numel, 64)))
    f32 = dict(device=pred.device, dtype=torch.float32)
    sl1_part = torch.empty((num_chunks, batch), **f32)
    pp_part = torch.empty((num_chunks, batch), **f32)
    dot_part = torch.empty((num_chunks, batch, num_global) if with_dot else (1,), **f32)
    tt_part = torch.empty((num_chunks, num_global) if with_dot else (1,), **f32)
    dot_native = not interpreter_enabled() and pred.dtype in _HALF and others.dtype == pred.dtype
    inv_beta = 1.0 / beta if beta > 0 else 0.0
    shared = _shared_tile(gathered, with_dot, tiles_b, tiles_g, block_b, block_g)
    _embedding_distill_loss_fwd_kernel[(num_chunks, tiles_b, tiles_g)](
        pred, target, others,
        sl1_part, pp_part, dot_part, tt_part,
        batch, num_global, numel, num_chunks,
        float(beta), inv_beta,
        WITH_DOT=with_dot, DOT_NATIVE=dot_native, SHARED_TILE=shared,
        BLOCK_B=block_b, BLOCK_G=block_g, DEFER_SUMS=DEFER_ROW_SUMS,
        INTERLEAVE=INTERLEAVE_CHUNKS,
    )
    row_out = torch.empty((3, batch), **f32)
    coef_sl1 = torch.empty((batch,), **f32)
    coef_p = torch.empty((batch,), **f32)
    coef_c = torch.empty((batch, num_global if with_dot else 0), **f32)
    block_gc = max(16, next_power_of_2(num_global))
    block_c, rows_warps, rows_stages = rows_kernel_tiles(num_chunks, block_gc)
    _embedding_distill_loss_rows_kernel[(batch,)](
        sl1_part, pp_part, dot_part, tt_part,
        mask, gathered_mask, logit_scale if with_dot else mask,
        row_out, coef_sl1, coef_p, coef_c if with_dot else coef_p,
        batch, num_global, num_chunks, offset, world_size, numel,
        float(contrastive_weight), float(max_logit_scale),
        SEED_MODE=seed_mode, WITH_DOT=with_dot,
        BLOCK_C=block_c, BLOCK_GC=block_gc, BLOCK_BM=max(16, next_power_of_2(batch)),
        NUM_STAGES=rows_stages, num_warps=rows_warps,
    )
    out = torch.empty((4,), **f32)
    loss, sl1, con = (torch.empty((), **f32) for _ in range(3))
    _embedding_distill_loss_total_kernel[(1,)](
        row_out, out, loss, sl1, con, batch, BLOCK=min(1024, max(16, next_power_of_2(batch)))
    )
    return loss, sl1, con, out, coef_sl1, coef_p, coef_c


def embedding_distill_loss_triton_bwd(
    pred, target, gathered, coef_sl1, coef_p, coef_c, out, g_loss, g_sl1, g_con, beta, with_dot
):
    """Launch the backward kernel. g_*: the upstream gradients of loss, smooth_l1 and
    contrastive, None for an output that got none. Returns (grad_pred in pred's dtype,
    grad_logit_scale fp32)."""
    batch, numel = pred.shape
    others = target if gathered is None else gathered
    num_global = others.shape[0]
    block_b = _row_block(batch)
    grad = torch.empty_like(pred)
    grad_ls = torch.empty((), device=pred.device, dtype=torch.float32)
    g32 = [None if g is None else g.float().reshape(()) for g in (g_loss, g_sl1, g_con)]
    grid = lambda meta: (triton.cdiv(numel, meta["BLOCK_D"]), triton.cdiv(batch, block_b))  # noqa: E731
    # tf32 rounds the fp32 coefficients to 10 mantissa bits (~5e-4 relative): below a half
    # precision grad_pred's own rounding, but not an fp32 one's (fp32 heads against bf16 cached
    # targets, as pre-training runs): ieee then. The dot's FLOPs are negligible either way.
    half_io = others.dtype in _HALF and pred.dtype in _HALF
    prec = "tf32" if (half_io and not interpreter_enabled()) else "ieee"
    block_g = _row_block(num_global, cap=32)
    shared = _shared_tile(gathered, with_dot, triton.cdiv(batch, block_b),
                          triton.cdiv(num_global, block_g), block_b, block_g)
    _embedding_distill_loss_bwd_kernel[grid](
        pred, target, others, grad,
        coef_sl1, coef_p, coef_c if with_dot else coef_p,
        out, grad_ls, *(out if g is None else g for g in g32),
        batch, num_global, numel,
        float(beta), 1.0 / beta if beta > 0 else 0.0,
        HAS_G_LOSS=g32[0] is not None, HAS_G_SL1=g32[1] is not None,
        HAS_G_CON=g32[2] is not None, WITH_DOT=with_dot, DOT_PREC=prec, SHARED_TILE=shared,
        BLOCK_B=block_b, BLOCK_G=block_g,
    )
    return grad, grad_ls


# ---- registered custom ops: torch.compile(fullgraph=True) sees one opaque node each ----


@torch.library.custom_op("olakernels::embedding_distill_loss_fwd", mutates_args=())
def embedding_distill_loss_fwd(
    pred: torch.Tensor,
    target: torch.Tensor,
    gathered: torch.Tensor | None,
    mask: torch.Tensor,
    gathered_mask: torch.Tensor,
    logit_scale: torch.Tensor | None,
    beta: float,
    contrastive_weight: float,
    max_logit_scale: float,
    offset: int,
    world_size: int,
    seed_mode: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor]:
    """Fused forward. Returns (loss, smooth_l1, contrastive, out, coef_sl1, coef_p, coef_c):
    the three losses as 0-dim fp32 tensors (differentiable), out = [loss, smooth_l1,
    contrastive, d(contrastive)/d(logit_scale)] and the coefficients for the backward."""
    return embedding_distill_loss_triton_fwd(
        pred, target, gathered, mask, gathered_mask, logit_scale, beta, contrastive_weight,
        max_logit_scale, offset, world_size, seed_mode, logit_scale is not None,
    )


@embedding_distill_loss_fwd.register_fake
def _(pred, target, gathered, mask, gathered_mask, logit_scale, beta, contrastive_weight,
      max_logit_scale, offset, world_size, seed_mode):
    batch = pred.shape[0]
    num_global = (target if gathered is None else gathered).shape[0]
    cols = num_global if logit_scale is not None else 0
    f32 = dict(dtype=torch.float32)
    return (*(pred.new_empty((), **f32) for _ in range(3)), pred.new_empty((4,), **f32),
            pred.new_empty((batch,), **f32), pred.new_empty((batch,), **f32),
            pred.new_empty((batch, cols), **f32))


@torch.library.custom_op("olakernels::embedding_distill_loss_bwd", mutates_args=())
def embedding_distill_loss_bwd(
    pred: torch.Tensor,
    target: torch.Tensor,
    gathered: torch.Tensor | None,
    coef_sl1: torch.Tensor,
    coef_p: torch.Tensor,
    coef_c: torch.Tensor,
    out: torch.Tensor,
    g_loss: torch.Tensor | None,
    g_sl1: torch.Tensor | None,
    g_con: torch.Tensor | None,
    beta: float,
    with_dot: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused backward; g_*: upstream gradients of loss, smooth_l1, contrastive (None: none).
    Returns (grad_pred in pred's dtype, grad_logit_scale fp32 0-dim)."""
    return embedding_distill_loss_triton_bwd(
        pred, target, gathered, coef_sl1, coef_p, coef_c, out, g_loss, g_sl1, g_con, beta,
        with_dot)


@embedding_distill_loss_bwd.register_fake
def _(pred, target, gathered, coef_sl1, coef_p, coef_c, out, g_loss, g_sl1, g_con, beta,
      with_dot):
    return torch.empty_like(pred), pred.new_empty((), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    pred, target, gathered, *_rest = inputs
    logit_scale, beta = inputs[5], inputs[6]
    out, coef_sl1, coef_p, coef_c = output[3:]
    ctx.save_for_backward(pred, target, gathered, coef_sl1, coef_p, coef_c, out)
    ctx.beta = beta
    ctx.with_dot = logit_scale is not None
    ctx.mark_non_differentiable(out, coef_sl1, coef_p, coef_c)
    # An unused loss output gets None, not a zero tensor (one fill kernel each): the backward
    # kernel skips it (HAS_G_*).
    ctx.set_materialize_grads(False)


def _backward(ctx, g_loss, g_sl1, g_con, *_unused):
    pred, target, gathered, coef_sl1, coef_p, coef_c, out = ctx.saved_tensors
    if g_loss is None and g_sl1 is None and g_con is None:
        return (None,) * 12
    grad_pred, grad_ls = embedding_distill_loss_bwd(
        pred, target, gathered, coef_sl1, coef_p, coef_c, out, g_loss, g_sl1, g_con, ctx.beta,
        ctx.with_dot)
    # logit_scale reaches only the contrastive term: no gradient when that gets none (as eager)
    con_used = ctx.with_dot and (g_loss is not None or g_con is not None)
    return (grad_pred, None, None, None, None, grad_ls if con_used else None,
            None, None, None, None, None, None)


embedding_distill_loss_fwd.register_autograd(_backward, setup_context=_setup_context)
