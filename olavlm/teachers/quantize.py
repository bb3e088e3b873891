# Storage formats of cached targets: bf16, and float8 e4m3 with one scale per row.
"""Turning teacher outputs into what a cache shard stores, and measuring what fp8 loses.

fp8 (``float8_e4m3fn``) keeps one fp32 scale per row of the (R, C) view of each target
(``R = shape[0]``: a depth token, a seg channel, the gen vector), ``scale = amax(|row|) / 448``.
The scale is at least ``FP8_MIN_SCALE = 2^-117`` (a row of tiny values would otherwise get a
scale that underflows to 0, and 0/0 = NaN), so every nonzero dequantized value, ``>= 2^-9
scale``, is a normal fp32 number; an all-zero row gets scale 1 and reads back as exact zeros.
Stated bound, per element, read in fp32: ``|x - dequant(quant(x))| <= 2^-4 |x| + 2^-10
scale``. Normal e4m3 values have 3 mantissa bits, so rounding to nearest is off by at most half
a spacing, 2^-4 of |x|; below 2^-6 * scale values are subnormal with a spacing of 2^-9 * scale,
half of it 2^-10 * scale. Read in bf16 (``TargetCache``'s default, what training gets), the
dequantized value ``y`` is rounded once more, by at most ``2^-8 |y|``, and ``|y| <= |x| + b``
for the fp32 bound ``b``: the bound becomes ``b + 2^-8 (|x| + b)`` (``fp8_error_bound(...,
dtype=torch.bfloat16)``). On layer-normed features (the depth target) this gives a relative RMS
error of ~2-3% against bf16's ~0.2%, for half the bytes.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch

__all__ = [
    "FP8_MAX",
    "FP8_MIN_SCALE",
    "FP8_REL_ERROR",
    "FP8_SUBNORMAL_ERROR",
    "Fp8ErrorStats",
    "dequantize_fp8",
    "fp8_error_bound",
    "quantize_fp8",
    "stored_dtypes",
    "to_storage",
]

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_REL_ERROR = 2.0**-4
FP8_SUBNORMAL_ERROR = 2.0**-10
FP8_MIN_SCALE = 2.0**-117  # 2^-9 (the smallest e4m3 subnormal) x this is fp32's smallest normal


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, scale): ``x`` (N, R, ...) as float8_e4m3fn with one fp32 scale per (n, r) row,
    ``scale = max(amax(|row|) / 448, FP8_MIN_SCALE)`` (1 for an all-zero row) and ``q = x /
    scale`` rounded to nearest; ``dequantize_fp8(q, scale)`` is ``q.float() * scale`` per row."""
    if x.ndim < 2:
        raise ValueError(f"x must be (N, R, ...), got shape {tuple(x.shape)}")
    rows = x.float().reshape(x.shape[0], x.shape[1], -1)
    amax = rows.abs().amax(dim=-1)
    scale = torch.where(amax > 0, (amax / FP8_MAX).clamp_min(FP8_MIN_SCALE),
                        torch.ones_like(amax))
    q = (rows / scale.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    rows = q.float().reshape(q.shape[0], q.shape[1], -1) * scale.unsqueeze(-1)
    return rows.reshape(q.shape).to(dtype)


def fp8_error_bound(x: torch.Tensor, scale: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The stated per-element bound (module docstring) for ``x`` quantized with ``scale`` and
    read back as ``dtype`` (fp32, or bf16: one more rounding, ``2^-8`` of the value)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    rows = x.float().reshape(x.shape[0], x.shape[1], -1).abs()
    bound = FP8_REL_ERROR * rows + FP8_SUBNORMAL_ERROR * scale.unsqueeze(-1)
    # The fp32 division and multiplication add a few ulps of |x| on top (the scale floor keeps
    # dequantized values normal, so no absolute term is needed beyond fp32's least value).
    bound = bound * (1 + 1e-6) + torch.finfo(torch.float32).smallest_normal * 2.0**-23
    if dtype == torch.bfloat16:
        bound = bound + 2.0**-8 * (rows + bound)
    return bound.reshape(x.shape)


class Fp8ErrorStats:
    """Sums of squared error and squared value, and the worst error / bound, per task."""

    def __init__(self):
        self.sums: dict[str, list[float]] = {}

    def update(self, task: str, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
        xf = x.float()
        err = xf - dequantize_fp8(q, scale)
        ratio = float((err.abs() / fp8_error_bound(xf, scale)).amax()) if x.numel() else 0.0
        ratio = math.inf if math.isnan(ratio) else ratio  # a NaN must not pass as "within"
        acc = self.sums.setdefault(task, [0.0, 0.0, 0.0])
        acc[0] += float(err.double().square().sum())
        acc[1] += float(xf.double().square().sum())
        acc[2] = max(acc[2], ratio)

    def merge(self, other: Mapping[str, Mapping[str, float]]) -> None:
        for task, d in other.items():
            acc = self.sums.setdefault(task, [0.0, 0.0, 0.0])
            acc[0] += d["sum_err2"]
            acc[1] += d["sum_x2"]
            acc[2] = max(acc[2], d["max_over_bound"])

    def as_dict(self) -> dict[str, dict[str, float]]:
        """{task: {"rel_rms": sqrt(sum err^2 / sum x^2), "max_over_bound": <= 1 when the
        bound holds, "sum_err2", "sum_x2"}}."""
        return {task: {"rel_rms": math.sqrt(e2 / x2) if x2 > 0 else 0.0,
                       "max_over_bound": worst, "sum_err2": e2, "sum_x2": x2}
                for task, (e2, x2, worst) in self.sums.items()}


def stored_dtypes(shapes: Mapping[str, tuple[int, ...]], storage: str):
    """{tensor name: (per-sample shape, dtype)} a shard stores for these target shapes."""
    out = {}
    for task, shape in shapes.items():
        if storage == "bf16":
            out[task] = (tuple(shape), torch.bfloat16)
        else:
            out[task] = (tuple(shape), torch.float8_e4m3fn)
            out[f"{task}.scale"] = ((shape[0],), torch.float32)
    return out


def to_storage(outputs: Mapping[str, torch.Tensor], storage: str,
               stats: Fp8ErrorStats | None = None) -> dict[str, torch.Tensor]:
    """Teacher outputs (any device) -> the CPU tensors a shard stores (see ``stored_dtypes``);
    quantization happens on the outputs' device, so only the stored bytes are copied."""
    out = {}
    for task, x in outputs.items():
        if storage == "bf16":
            out[task] = x.to(torch.bfloat16).cpu()
            continue
        q, scale = quantize_fp8(x)
        if stats is not None:
            stats.update(task, x, q, scale)
        out[task], out[f"{task}.scale"] = q.cpu(), scale.cpu()
    return out
