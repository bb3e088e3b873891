# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
"""Per-kernel device time of embedding_distill_loss (triton path), to find the forward's fixed cost.

    python benchmarks/gpu/profile_embedding_loss.py            # GPU: real shapes
    python benchmarks/gpu/profile_embedding_loss.py --tiny     # CPU dry run (interpreter)
    python benchmarks/gpu/profile_embedding_loss.py --no-sweep # skip the per-config sweep

Prints, per case and mode, every kernel the call launches with its mean device time (each call
from a cold L2, as the benchmarks time it; run 7 and earlier profiled back-to-back calls with
the inputs warm in L2), and the sum of kernel time against the event-timed wall of the whole
call (back to back, warm): the difference is launch gaps less what the warm L2 saves. Then
the autotuner's choice for the forward kernel and, per autotune config, the forward
kernel's device time and GB/s on its minimal bytes (pred and target read once): whether any
tile reaches the copy bandwidth, and which; then the forward with its programs' column blocks
interleaved or contiguous (emb_triton.INTERLEAVE_CHUNKS), and with the chosen tile under 2 to
16 programs per SM (emb_triton.CHUNKS_PER_SM). Read with docs/PERF.md (embedding loss).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from olakernels import embedding_distill_loss  # noqa: E402
from olakernels.embedding_loss.impl import triton as emb_triton  # noqa: E402
from olakernels.testing import make_embedding_pair  # noqa: E402

FLUSH_KERNEL = "bitwise_not"  # the L2 flush's kernel: one the loss never launches


def profile(fn, steps: int, device: str):
    """Per-kernel device time over ``steps`` calls, each from a cold L2 as the benchmarks
    time it (a 256 MiB in-place bitwise_not between calls, left out of the rows): the inputs
    (19-113 MB) would otherwise sit in the 50-60 MB L2 between back-to-back calls."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    flush = torch.empty(64 * 2**20, dtype=torch.int32, device=device) if device == "cuda" \
        else None
    for _ in range(3):
        fn()
    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch_profile(activities=activities) as prof:
        for _ in range(steps):
            if flush is not None:
                flush.bitwise_not_()
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for evt in prof.key_averages():
        dev_us = getattr(evt, "device_time_total", 0.0) or 0.0
        if device == "cuda" and evt.device_type.name != "CUDA":
            continue
        if FLUSH_KERNEL in evt.key.lower().replace("bitwisenot", "bitwise_not"):
            continue
        rows.append((evt.key, evt.count // steps, dev_us / steps))
    return sorted(rows, key=lambda r: -r[2])


def event_time_us(fn, device: str, reps: int = 50) -> float:
    if device != "cuda":
        return float("nan")
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU dry run)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the per-config sweep")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = args.tiny or device == "cpu"
    shapes = {"seg-B32": (32, 1536, 24, 24), "depth-B8": (8, 576, 1024)}
    if tiny:
        shapes = {"tiny": (4, 8, 16)}
    for name, shape in shapes.items():
        pred, target = make_embedding_pair(shape, dtype=torch.bfloat16, device=device, seed=0)
        scale = torch.tensor(2.0, device=device, requires_grad=True)
        pred.requires_grad_(True)

        def fwd():
            with torch.no_grad():
                return embedding_distill_loss(pred, target, None, scale, impl="triton")[0]

        def fwd_bwd():
            loss = embedding_distill_loss(pred, target, None, scale, impl="triton")[0]
            loss.backward()
            pred.grad = None
            scale.grad = None

        for mode, fn in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            rows = profile(fn, 20 if not tiny else 1, device)
            wall = event_time_us(fn, device)
            kernel_sum = sum(r[2] for r in rows)
            print(f"\n## {name} {mode}: sum of kernels {kernel_sum:.1f} us, "
                  f"event-timed call (back to back, warm L2) {wall:.1f} us")
            for key, count, us in rows[:20]:
                print(f"  {us:9.1f} us  x{count:<3d} {key[:90]}")
        if not args.no_sweep:
            fwd_bytes = pred.numel() * pred.element_size() + target.numel() * target.element_size()
            sweep_forward_configs(name, fwd, fwd_bytes, device, tiny)


def sweep_forward_configs(name: str, fwd, fwd_bytes: int, device: str, tiny: bool) -> None:
    """The forward kernel's device time under each autotune config alone."""
    kernel = emb_triton._embedding_distill_loss_fwd_kernel
    chosen = {str(k): str(v) for k, v in kernel.cache.items()}
    print(f"\n## {name} fwd: autotuner's choice {chosen}", flush=True)
    configs, cache = kernel.configs, dict(kernel.cache)
    try:
        for cfg in configs:
            kernel.configs = [cfg]  # one config: the autotuner uses it without benchmarking
            kernel.cache.clear()
            rows = profile(fwd, 20 if not tiny else 1, device)
            us = sum(r[2] for r in rows if "fwd_kernel" in r[0])
            rate = fwd_bytes / (us * 1e-6) / 1e9 if us > 0 else float("nan")
            print(f"  {us:9.1f} us  {rate:7.0f} GB/s  {cfg}", flush=True)
    finally:
        kernel.configs = configs
        kernel.cache.clear()
        kernel.cache.update(cache)
    print(f"## {name} fwd: column blocks interleaved over the programs vs one contiguous "
          "chunk each (emb_triton.INTERLEAVE_CHUNKS; the autotuner picks a tile for each)",
          flush=True)
    interleaved = emb_triton.INTERLEAVE_CHUNKS
    try:
        for interleave in (False, True):
            emb_triton.INTERLEAVE_CHUNKS = interleave
            rows = profile(fwd, 20 if not tiny else 1, device)
            fwd_us = sum(r[2] for r in rows if "fwd_kernel" in r[0])
            rate = fwd_bytes / (fwd_us * 1e-6) / 1e9 if fwd_us > 0 else float("nan")
            print(f"  INTERLEAVE_CHUNKS={interleave}: fwd {fwd_us:8.1f} us {rate:7.0f} GB/s",
                  flush=True)
        print(f"  autotuner's choices (the key holds INTERLEAVE): "
              f"{ {str(k): str(v) for k, v in kernel.cache.items()} }", flush=True)
    finally:
        emb_triton.INTERLEAVE_CHUNKS = interleaved
    default = emb_triton.CHUNKS_PER_SM
    print(f"## {name} fwd: the chosen tile under more or fewer programs per SM", flush=True)
    try:
        for per_sm in (2, 4, 8, 16):
            emb_triton.CHUNKS_PER_SM = per_sm
            rows = profile(fwd, 20 if not tiny else 1, device)
            fwd_us = sum(r[2] for r in rows if "fwd_kernel" in r[0])
            rows_us = sum(r[2] for r in rows if "rows_kernel" in r[0])
            rate = fwd_bytes / (fwd_us * 1e-6) / 1e9 if fwd_us > 0 else float("nan")
            print(f"  {per_sm:2d} per SM: fwd {fwd_us:8.1f} us {rate:7.0f} GB/s, rows kernel "
                  f"{rows_us:6.1f} us (it sums one partial per chunk)", flush=True)
    finally:
        emb_triton.CHUNKS_PER_SM = default


if __name__ == "__main__":
    main()
