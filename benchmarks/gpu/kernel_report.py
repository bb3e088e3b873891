# What the GPU compiler makes of each kernel, without a GPU: registers, spills, shared memory.
"""Compiles every olakernels Triton kernel (olakernels/_aot.py: the launchers' own tiles) for an
H100/H200 (sm_90) or an MI300X (gfx942) on the CPU, specialized as Triton's JIT does, and prints
one row per launch configuration:

    regs    registers per thread (ptxas -v with the flags Triton passes; ROCm: VGPRs)
    spill   bytes of spill stores + loads per thread (ROCm: spilled VGPRs x 4); local memory
            traffic in the hot loop is the usual reason a GEMM-like kernel runs well under the
            tensor cores' rate
    smem    shared memory (LDS) per program, KiB, and whether it fits the target
    /SM     resident programs per H100 SM (registers, shared memory, threads): 1 means the
            epilogue of one tile cannot hide behind the main loop of another. ROCm: the
            compiler's occupancy in waves per SIMD instead
    cp.async  asynchronous copies in the TTGIR (CUDA): 0 for a loop that loads means it is
            not software-pipelined (ROCm pipelines through registers: always 0 there)
    mma     wgmma (Hopper warp-group MMA), mma (mma.sync / MFMA) or none

Use it to check a tile or kernel change before a GPU window; docs/PERF.md keeps the last table.

    python benchmarks/gpu/kernel_report.py [--target sm_90|gfx942] [--filter lce.] [--markdown]
"""
from __future__ import annotations

import argparse
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("kernel_report: unset TRITON_INTERPRET (the interpreter replaces the kernels)")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from olakernels import _aot  # noqa: E402


def report(target: str, name_filter: str = "", specialize: bool = True) -> list[dict]:
    rows = []
    for v in _aot.all_variants(_aot.TARGETS[target]):
        if name_filter not in v.name:
            continue
        try:
            st = _aot.kernel_stats(_aot.compile_variant(v, _aot.TARGETS[target], specialize))
        except Exception as exc:  # a failing compile is a row too
            rows.append(dict(kernel=v.name, error=f"{type(exc).__name__}: {exc}"[:160]))
            continue
        fits = st.shared_bytes <= _aot.SHARED_LIMIT[target]
        rows.append(dict(kernel=v.name, regs=st.registers, spill=st.spill_bytes,
                         smem=f"{st.shared_bytes / 1024:.0f}" + ("" if fits else " (too big)"),
                         per_sm=st.programs_per_sm() if target == "sm_90" else
                         st.waves_per_simd,
                         async_copies=st.async_copies, mma=st.mma))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", choices=sorted(_aot.TARGETS), default="sm_90")
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    ap.add_argument("--no-specialize", action="store_true",
                    help="compile as for sizes that are not multiples of 16")
    ap.add_argument("--markdown", action="store_true", help="a markdown table (for PERF.md)")
    args = ap.parse_args(argv)
    rows = report(args.target, args.filter, not args.no_specialize)
    cols = ("regs", "spill", "smem", "per_sm", "async_copies", "mma")
    heads = ("regs", "spill B", "smem KiB", "/SM", "cp.async", "mma")
    if args.markdown:
        print("| kernel | " + " | ".join(heads) + " |")
        print("|---" * (len(heads) + 1) + "|")
    else:
        width = max(len(r["kernel"]) for r in rows) if rows else 10
        print(f"{'kernel':{width}} " + " ".join(f"{h:>9}" for h in heads))
    failed = 0
    for r in rows:
        if "error" in r:
            failed += 1
            print(f"{r['kernel']}: FAILED {r['error']}")
            continue
        vals = ["-" if r[c] is None else str(r[c]) for c in cols]
        if args.markdown:
            print(f"| `{r['kernel']}` | " + " | ".join(vals) + " |")
        else:
            print(f"{r['kernel']:{width}} " + " ".join(f"{x:>9}" for x in vals))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
