# Device ceilings: D2D copy bandwidth and bf16 GEMM rate, the roofs our kernels are judged against.
"""Measure what this GPU can do at best, so kernel results can be read as a fraction of it.

    python benchmarks/gpu/ceilings.py   (OLAVLM_GIT_SHA=<sha> where the tree has no .git)

Appends two rows (op='ceiling', provider='torch', modes 'copy' and 'gemm_bf16') to
results_dir()/ceiling.csv. On a machine without CUDA it prints a message and exits 0.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    from benchmarks.common import Record, append_records, do_bench, format_table, make_record
except ModuleNotFoundError:  # run as a script: only benchmarks/gpu/ is on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from benchmarks.common import Record, append_records, do_bench, format_table, make_record

COPY_BYTES = 2 * 2**30  # per tensor: far beyond any L2, so the copy streams from HBM
GEMM_N = 8192  # large enough to reach the tensor-core peak on H100/H200/MI300


def measure_copy(device: torch.device) -> Record:
    """D2D copy bandwidth, counting bytes read + written (2x the tensor size)."""
    numel = COPY_BYTES // 2  # bf16 is 2 bytes
    src = torch.randn(numel, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    # No L2 flush: the 4 GiB the copy touches already evicts everything.
    timing = do_bench(lambda: dst.copy_(src), device=device, flush_l2=False)
    return make_record(
        op="ceiling", provider="torch", mode="copy", shape=f"{numel} (2 GiB x2)",
        dtype=torch.bfloat16, timing=timing, num_bytes=2 * src.nbytes,
    )


def measure_gemm(device: torch.device) -> Record:
    """bf16 matmul rate on random normal data (zeros let the tensor cores run faster)."""
    n = GEMM_N
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    c = torch.empty(n, n, dtype=torch.bfloat16, device=device)
    timing = do_bench(lambda: torch.mm(a, b, out=c), device=device)
    return make_record(
        op="ceiling", provider="torch", mode="gemm_bf16", shape=f"{n}x{n}x{n}",
        dtype=torch.bfloat16, timing=timing, num_flops=2 * n**3,
    )


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: ceilings not measured")
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    records = [measure_copy(device)]
    torch.cuda.empty_cache()  # give the copy's 4 GiB back before the GEMM allocates
    records.append(measure_gemm(device))
    paths = append_records(records)
    print(format_table(records, ("mode", "shape", "dtype", "ms", "gbps", "tflops", "gpu_name",
                                 "git_sha"), {"gbps": "GB/s", "tflops": "TFLOP/s"}))
    print("appended to " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
