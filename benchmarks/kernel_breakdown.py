# Where a step's device time goes: torch.profiler kernels, grouped by kind, for the GPU window.
"""``kernel_breakdown(fn, setup, device)`` runs ``setup(); fn()`` once under torch.profiler and
returns a printable summary: device time per kind of kernel (GEMMs, attention, our Triton
kernels, other Triton kernels, elementwise and reductions, copies) and the top kernels by
device time. Used by bench_step.py (``--profile MODES``) to see what keeps a step from the
GEMM-bound floor; on the CPU it runs the same code and reports that there are no device times.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

# Our Triton kernels, by the start of their names: as substrings, "_layer_norm_" and "_gelu_"
# also matched aten's vectorized_layer_norm_kernel and Inductor's fused gelu/layer-norm kernels.
OLAKERNELS_PREFIXES = ("_lce_", "_embedding_distill_loss", "_layer_norm_", "_gelu_",
                       "_rotary_embedding", "_silu_mul_")
# After those, first match wins; patterns are lower-case substrings of the kernel name.
KINDS = (
    ("attention", ("flash", "fmha", "attention", "attn")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "ampere_", "cublas",
              "wgmma", "hgemm", "matmul")),
    ("other Triton", ("triton_",)),
    ("copy / memset", ("memcpy", "memset", "copy_kernel", "direct_copy",
                       "catarray")),  # (not "cat": it is in "scatter")
    ("elementwise / reduce (aten)", ("elementwise", "reduce", "vectorized", "unrolled",
                                     "softmax", "norm", "index", "scatter", "gather", "sort")),
)


def kind_of(name: str) -> str:
    if name.startswith(OLAKERNELS_PREFIXES):
        return "olakernels (Triton)"
    low = name.lower()
    for kind, patterns in KINDS:
        if any(p in low for p in patterns):
            return kind
    return "other"


def kernel_breakdown(fn: Callable[[], None], setup: Callable[[], None] | None, device: str,
                     top: int = 25) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    if setup is not None:
        setup()
    if device == "cuda":
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    kernels = []
    for evt in prof.key_averages():
        if device == "cuda" and evt.device_type.name != "CUDA":
            continue
        us = getattr(evt, "device_time_total", 0.0) or 0.0
        if us > 0:
            kernels.append((evt.key, evt.count, us))
    if not kernels:
        return "kernel breakdown: no device times (not a GPU run)"
    # Annotations (aten ops, autograd nodes) carry device time too but overlap the kernels;
    # keep the launches themselves: names that are not aten::/autograd:: spans.
    kernels = [k for k in kernels if not k[0].startswith(("aten::", "autograd::", "Generated",
                                                          "olakernels::", "cudaLaunch"))]
    total = sum(us for _, _, us in kernels)
    by_kind: dict[str, float] = defaultdict(float)
    for name, _, us in kernels:
        by_kind[kind_of(name)] += us
    lines = [f"kernel breakdown: {total / 1e3:.1f} ms of kernels in one step"]
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {us / 1e3:9.2f} ms {us / total:6.1%}  {kind}")
    lines.append(f"top {top} kernels:")
    for name, count, us in sorted(kernels, key=lambda k: -k[2])[:top]:
        lines.append(f"  {us / 1e3:9.2f} ms x{count:<5d} {kind_of(name)[:12]:12s} {name[:90]}")
    return "\n".join(lines)
