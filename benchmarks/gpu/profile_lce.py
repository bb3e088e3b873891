# ruff: noqa: B023  (closures are called inside the loop iteration that defines them)
"""Per-kernel device time and TFLOP/s of linear_cross_entropy's Triton path, over tile configs.

    python benchmarks/gpu/profile_lce.py           # GPU: Llama-3 head, N=8192, 0% and 90% ignored
    python benchmarks/gpu/profile_lce.py --configs current,dw_torch   # Triton dW vs cuBLAS dW
    python benchmarks/gpu/profile_lce.py --configs current,grad_fwd   # gradients in the forward
    python benchmarks/gpu/profile_lce.py --configs current,blas   # the BLAS schedule
    python benchmarks/gpu/profile_lce.py --tiny    # CPU dry run (interpreter, the first six)

For each tile config (olakernels.linear_cross_entropy.impl.triton.BLOCKS_OVERRIDE) it runs one
warm-up fwd+bwd (compiles), then profiles one more and prints each kernel's device time and its
rate against the GEMM it performs on the labelled rows (2 * rows * V * H FLOPs). A config whose
warm-up takes over --max-seconds is reported and the sweep moves on. cuBLAS's rate on the same
GEMM (torch.matmul) is printed first as the ceiling. With dw_backend="torch" the dW GEMMs are
aten::mm (first chunk) + aten::addmm (the others): one "dweight (cuBLAS)" line sums them, its
rate still on the labelled rows' FLOPs, so it shows what the ignored rows of each chunk cost.
With grad_in_forward (configs grad_fwd*) the forward runs _lce_dlogits_kernel once per chunk to
write the logits (its line is that GEMM), then _lce_rows_grad_kernel (no GEMM, memory-bound),
dhidden and dweight; _lce_fwd_kernel does not run and the backward is two scaling kernels.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from olakernels.linear_cross_entropy import linear_cross_entropy  # noqa: E402
from olakernels.linear_cross_entropy.impl import triton as lce_triton  # noqa: E402

CONFIGS = {  # n, v: logits tile; m, h: dhidden/dweight output tile; k: reduction step;
    # dw_*: the dW kernel's own tiles (the H200 sweep's weak kernel), on top of GPU_BLOCKS
    "current": {},
    # The BLAS schedule (impl/blas_fused_grad.py) without a bound, so on every row: at 0%
    # ignored what the bounded trainer's dense batches run; at 90% the work liger-kernel does
    # (all rows), not what the bounded op does (only ~10% of them).
    "blas": dict(blas="always"),
    # The vocab schedule's grad_hidden (two fp32 halves per H tile since run 6) at 128 columns
    # (two halves of 64) instead of 256. Run 6's 452 TFLOP/s came from one 128 x 128
    # accumulator, which no config reproduces now.
    "slab_h128": dict(slab_h=128),
    # The backward's outer loop over row chunks with the fp32 (V, H) grad_weight accumulator
    # (the default before the vocabulary slabs): first after "current" to compare the two.
    "rows": dict(schedule="rows"),
    # grad_weight by cuBLAS (fp32 output) on whole chunks: second, so that a stage cut short by
    # its time limit still compares the two dW backends at 0% and 90% ignored.
    "dw_torch": dict(dw_backend="torch"),
    # Gradients in the forward (3 GEMM passes instead of 4), with either dW backend: right after
    # the two above, for the same reason (docs/PERF.md has the prediction).
    "grad_fwd": dict(grad_in_forward=True),
    "grad_fwd_dw_torch": dict(grad_in_forward=True, dw_backend="torch"),
    "dw256x128": dict(dw_m=256, dw_h=128),
    "dw_k128": dict(dw_k=128, dw_stages=3),
    "dw_s4": dict(dw_stages=4),
    "dw128x128w4": dict(dw_m=128, dw_h=128, dw_warps=4, dw_stages=4),
    # Two dW programs per SM (96 KiB of shared memory each, benchmarks/gpu/kernel_report.py):
    # one program's fp32 read-modify-write epilogue can hide behind the other's main loop.
    "dw128x128w4s3": dict(dw_m=128, dw_h=128, dw_warps=4, dw_stages=3),
}

KERNEL_GEMMS = ("fwd", "dlogits", "dhidden", "dhidden_slab", "dweight")  # _lce_{name}_kernel
TORCH_GEMMS = ("aten::mm", "aten::addmm")  # dw_backend="torch": the per-chunk dW GEMMs


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def cublas_rate(n, v, h, device):
    if device != "cuda":
        return float("nan")
    a = torch.randn(n, h, device=device, dtype=torch.bfloat16)
    b = torch.randn(v, h, device=device, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b.T
    sync(device)
    t0 = time.perf_counter()
    for _ in range(5):
        a @ b.T
    sync(device)
    return 2 * n * v * h / ((time.perf_counter() - t0) / 5) / 1e12


def memory_split(hid, w, labels) -> str:
    """Peak allocation above the inputs in the forward, what it holds for the backward, and the
    peak over forward + backward (run 7 measured 5.65 GB for the BLAS schedule's trainable head
    at N = 16,384 where ~3.4-3.9 GB were predicted: which half holds the rest)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = linear_cross_entropy(hid, w, labels, impl="triton")
    torch.cuda.synchronize()
    fwd_peak = torch.cuda.max_memory_allocated() - base
    held = torch.cuda.memory_allocated() - base
    loss.backward()
    torch.cuda.synchronize()
    total = torch.cuda.max_memory_allocated() - base
    hid.grad = None
    w.grad = None
    mib = 2 ** 20
    return (f"; peak above the inputs: forward {fwd_peak / mib:.0f} MiB (held for the backward "
            f"{held / mib:.0f}), forward + backward {total / mib:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--max-seconds", type=float, default=20.0)
    parser.add_argument("--configs", default=None,
                        help="comma-separated names of CONFIGS (default: all; --tiny: the first "
                             "six)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = args.tiny or device == "cpu"
    n, h, v = (64, 32, 200) if tiny else (8192, 4096, 128256)
    if args.configs:
        names = args.configs.split(",")
    else:  # the dry run checks the dW backends and the grad-in-forward mode, not the tile sweep
        names = list(CONFIGS)[:6] if tiny else list(CONFIGS)
    unknown = [name for name in names if name not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; known: {list(CONFIGS)}")
    print(f"shape N={n} H={h} V={v} bf16; cuBLAS bf16 N x V x H: "
          f"{cublas_rate(n, v, h, device):.0f} TFLOP/s")
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator(device="cpu").manual_seed(0)
    hidden = (torch.randn(n, h, generator=gen) * 0.5).to(device, torch.bfloat16)
    weight = (torch.randn(v, h, generator=gen) * h ** -0.5).to(device, torch.bfloat16)
    for ignored in (0.0, 0.9):
        labels = torch.randint(0, v, (n,), generator=gen)
        labels[torch.rand(n, generator=gen) < ignored] = -100
        labels = labels.to(device)
        rows = int((labels != -100).sum())
        for name in names:
            lce_triton.BLOCKS_OVERRIDE.clear()
            lce_triton.BLOCKS_OVERRIDE.update(CONFIGS[name])
            hid = hidden.clone().requires_grad_(True)
            w = weight.clone().requires_grad_(True)

            def step():
                loss = linear_cross_entropy(hid, w, labels, impl="triton")
                loss.backward()
                hid.grad = None
                w.grad = None
                return loss

            t0 = time.perf_counter()
            try:
                step()
                sync(device)
            except Exception as exc:  # a config that does not compile (shared memory) is skipped
                print(f"  {name}: failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            warm = time.perf_counter() - t0
            if warm > args.max_seconds:
                print(f"  {name}: warm-up took {warm:.1f}s; skipped")
                continue
            # Without the profiler: how long the host takes to issue the call (launches) and
            # the call's wall time (run 6 saw the vocab schedule's profiled wall 36 ms above its
            # kernels' sum): host ~ wall means the GPU waits for the host.
            hosts, walls = [], []
            for _ in range(3):
                sync(device)
                t0 = time.perf_counter()
                step()
                hosts.append(time.perf_counter() - t0)
                sync(device)
                walls.append(time.perf_counter() - t0)
            host, timed = sorted(hosts)[1], sorted(walls)[1]
            memory = memory_split(hid, w, labels) if device == "cuda" else ""
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            t0 = time.perf_counter()
            with profile(activities=acts) as prof:
                step()
                sync(device)
            wall = time.perf_counter() - t0
            flop = 2 * rows * v * h
            # Only the device's own events: a CPU op's self device time counts its kernels again.
            kernels = sum(e.self_device_time_total or 0.0 for e in prof.key_averages()
                          if e.device_type == torch.autograd.DeviceType.CUDA)
            print(f"\n## ignored {ignored:.0%} ({rows} labelled rows), config {name}: "
                  f"fwd+bwd wall {timed * 1e3:.1f} ms, host {host * 1e3:.1f} ms (median of 3, no "
                  f"profiler); profiled wall {wall * 1e3:.1f} ms, kernels "
                  f"{kernels / 1e3:.1f} ms (warm-up {warm:.1f}s){memory}")
            for evt in sorted(prof.key_averages(), key=lambda e: -(e.device_time_total or 0)):
                us = evt.device_time_total or 0.0
                if us <= 0:
                    continue
                kind = next((k for k in KERNEL_GEMMS if f"_lce_{k}_kernel" in evt.key), None)
                # (the names are not substrings of one another: _lce_dhidden_kernel is not in
                # _lce_dhidden_slab_kernel)
                rate = f"{flop / (us * 1e-6) / 1e12:7.1f} TFLOP/s" if kind else ""
                print(f"  {us / 1e3:9.3f} ms x{evt.count:<3d} {rate:17s} {evt.key[:70]}")
            if CONFIGS[name].get("dw_backend") == "torch":
                us = sum(e.device_time_total or 0.0 for e in prof.key_averages()
                         if e.key in TORCH_GEMMS)  # the aten ops, not their kernels: no double
                rate = flop / (us * 1e-6) / 1e12 if us > 0 else float("nan")
                print(f"  {us / 1e3:9.3f} ms      {rate:7.1f} TFLOP/s dweight (cuBLAS, "
                      f"mm + addmm); fp32-output GEMM ran: {dict(lce_triton._FP32_OUT_GEMM)}")
            if CONFIGS[name].get("blas") == "always":  # logits, dX and dW GEMMs, all by cuBLAS
                us = sum(e.device_time_total or 0.0 for e in prof.key_averages()
                         if e.key in TORCH_GEMMS)
                # No bound here, so every one of the N rows is multiplied: the first rate is
                # on the labelled rows (what the op must do), the second on all N (cuBLAS's own).
                rate = 3 * flop / (us * 1e-6) / 1e12 if us > 0 else float("nan")
                rate_all = rate * n / max(rows, 1)
                print(f"  {us / 1e3:9.3f} ms      {rate:7.1f} TFLOP/s BLAS GEMMs (logits, dX, "
                      f"dW: mm + addmm; 3 GEMMs on the labelled rows; {rate_all:.1f} TFLOP/s on "
                      f"all {n} rows multiplied); fp32-output GEMM ran: "
                      f"{dict(lce_triton._FP32_OUT_GEMM)}")
    lce_triton.BLOCKS_OVERRIDE.clear()


if __name__ == "__main__":
    main()
