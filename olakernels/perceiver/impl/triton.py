# Triton LayerNorm (fp32 statistics) and exact-erf GELU, forward and backward, as custom ops.
"""Kernels for the perceiver heads' fast path (impl="triton").

LayerNorm: one program per block of rows; mean and 1/std are kept in fp32 for the backward,
which writes dx per row and per-program partial sums of dweight and dbias (summed in a fixed
order afterwards: deterministic, no atomics). GELU: the exact erf form, elementwise, fp32 math.
Under TRITON_INTERPRET=1 everything runs in the CPU interpreter (inputs converted to fp32
inside the kernels, as for every olakernels kernel).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..._triton import interpreter_enabled, next_power_of_2, num_sms


@triton.jit
def _layer_norm_fwd_kernel(
    X, W, B, Y, MEAN, RSTD, M, N, eps,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ok_r = rows < M
    ok_c = cols < N
    mask = ok_r[:, None] & ok_c[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / N
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / N + eps)
    w = tl.load(W + cols, mask=ok_c, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=ok_c, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + rows, mean, mask=ok_r)
    tl.store(RSTD + rows, rstd, mask=ok_r)


@triton.jit
def _layer_norm_bwd_kernel(
    DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, M, N, ROWS_PER_PROGRAM,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    ok_c = cols < N
    w = tl.load(W + cols, mask=ok_c, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    first = pid * ROWS_PER_PROGRAM
    for r0 in range(first, first + ROWS_PER_PROGRAM, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        ok_r = (rows < M) & (rows < first + ROWS_PER_PROGRAM)
        mask = ok_r[:, None] & ok_c[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=ok_r, other=0.0)
        rstd = tl.load(RSTD + rows, mask=ok_r, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dx = (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(DW_PART + pid * N + cols, dw, mask=ok_c)
    tl.store(DB_PART + pid * N + cols, db, mask=ok_c)


@triton.jit
def _gelu_fwd_kernel(X, Y, NUMEL, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _gelu_bwd_kernel(DY, X, DX, NUMEL, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NUMEL
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    # d/dx [x Phi(x)] = Phi(x) + x phi(x), Phi the normal CDF and phi its density.
    cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
    tl.store(DX + offs, (dy * (cdf + x * pdf)).to(DX.dtype.element_ty), mask=ok)


def _rows_block(n: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): rows per tile so a tile holds ~4K fp32 values."""
    block_n = next_power_of_2(n)
    block_m = max(1, min(16, 4096 // block_n))
    return block_m, block_n, 8 if block_n >= 2048 else 4


def layer_norm_fwd_launch(x2d, weight, bias, eps, fp32_out: bool = False):
    m, n = x2d.shape
    block_m, block_n, warps = _rows_block(n)
    y = torch.empty_like(x2d, dtype=torch.float32 if fp32_out else x2d.dtype)
    mean = torch.empty((m,), device=x2d.device, dtype=torch.float32)
    rstd = torch.empty((m,), device=x2d.device, dtype=torch.float32)
    _layer_norm_fwd_kernel[(triton.cdiv(m, block_m),)](
        x2d, weight, bias, y, mean, rstd, m, n, float(eps),
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return y, mean, rstd


def layer_norm_bwd_launch(dy, x2d, weight, mean, rstd):
    m, n = x2d.shape
    if m == 0:  # no rows (an empty input): no programs to split them over
        return torch.empty_like(x2d), weight.new_zeros(n), weight.new_zeros(n)
    block_m, block_n, warps = _rows_block(n)
    programs = max(1, min(4 * num_sms(x2d.device), triton.cdiv(m, block_m)))
    if interpreter_enabled():
        programs = min(programs, 4)
    rows_per_program = triton.cdiv(triton.cdiv(m, programs), block_m) * block_m
    programs = triton.cdiv(m, rows_per_program)
    dx = torch.empty_like(x2d)
    dw_part = torch.empty((programs, n), device=x2d.device, dtype=torch.float32)
    db_part = torch.empty((programs, n), device=x2d.device, dtype=torch.float32)
    _layer_norm_bwd_kernel[(programs,)](
        dy, x2d, weight, mean, rstd, dx, dw_part, db_part, m, n, rows_per_program,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return dx, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


def _gelu_grid(numel: int, block: int):
    return (triton.cdiv(numel, block),)


_GELU_BLOCK = 1024


@torch.library.custom_op("olakernels::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                   fp32_out: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm over the last dim of x (..., N): (y in x's dtype, or fp32 with ``fp32_out``
    as CUDA autocast's LayerNorm returns it; mean fp32, rstd fp32). The gradient of x is in
    x's dtype either way."""
    y, mean, rstd = layer_norm_fwd_launch(x.reshape(-1, x.shape[-1]).contiguous(), weight,
                                          bias, eps, fp32_out)
    return y.view(x.shape), mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps, fp32_out=False):
    m = x.numel() // x.shape[-1]
    # (contiguous, as the kernel's outputs: empty_like would keep a transposed x's strides)
    y_dtype = torch.float32 if fp32_out else x.dtype
    return (x.new_empty(x.shape, dtype=y_dtype), x.new_empty((m,), dtype=torch.float32),
            x.new_empty((m,), dtype=torch.float32))


@torch.library.custom_op("olakernels::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    dx, dw, db = layer_norm_bwd_launch(dy.reshape(-1, n).contiguous(),
                                       x.reshape(-1, n).contiguous(), weight, mean, rstd)
    return dx.view(x.shape), dw, db


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


def _ln_setup(ctx, inputs, output):
    x, weight, _bias, _eps, _fp32_out = inputs
    _y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.set_materialize_grads(False)  # (no zeros for mean/rstd)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        return None, None, None, None, None
    dx, dw, db = layer_norm_bwd(dy, x, weight, mean, rstd)
    return dx, dw, db, None, None


layer_norm_fwd.register_autograd(_ln_backward, setup_context=_ln_setup)


@torch.library.custom_op("olakernels::gelu_fwd", mutates_args=())
def gelu_fwd(x: torch.Tensor) -> torch.Tensor:
    """Exact (erf) GELU, fp32 math, output in x's dtype."""
    xc = x.contiguous()
    y = torch.empty_like(xc)
    _gelu_fwd_kernel[_gelu_grid(xc.numel(), _GELU_BLOCK)](xc, y, xc.numel(), BLOCK=_GELU_BLOCK)
    return y


@gelu_fwd.register_fake
def _(x):
    return x.new_empty(x.shape)


@torch.library.custom_op("olakernels::gelu_bwd", mutates_args=())
def gelu_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    xc, dyc = x.contiguous(), dy.contiguous()
    dx = torch.empty_like(xc)
    _gelu_bwd_kernel[_gelu_grid(xc.numel(), _GELU_BLOCK)](dyc, xc, dx, xc.numel(),
                                                          BLOCK=_GELU_BLOCK)
    return dx


@gelu_bwd.register_fake
def _(dy, x):
    return x.new_empty(x.shape)


def _gelu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _gelu_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return gelu_bwd(dy, x)


gelu_fwd.register_autograd(_gelu_backward, setup_context=_gelu_setup)
