# The workload `ncu` profiles in run.sh's `ncu` stage: the memory-bound kernels that sit under
# their bandwidth: one call of each op between cudaProfilerStart/Stop after its warm-up.
"""Why the embedding loss's forward reads at ~46% of the copy bandwidth on an H100 (run 7:
82 us for 113 MB at seg B=32), and the LM head's row kernel at ~1.3-1.9 TB/s: timing alone has
ruled out occupancy (2-16 programs per SM: no change), the tile width (BLOCK_D 64-1024) and the
per-tile reductions (4-5%). The hardware counters decide between what is left: DRAM efficiency
of 64 row streams per program (partition camping: the rows are 1.77 MB = 54 x 32 KiB apart),
L2 misses, or stalls. SASS of the loop (nvdisasm, offline): 318 instructions per 2,048 element
pairs, ~23% of the issue rate at the measured speed, so not instruction-bound.

    ncu --profile-from-start off --clock-control none --section ... \\
        python benchmarks/gpu/ncu_kernels.py          (run.sh: OLAVLM_STAGES=ncu)
    python benchmarks/gpu/ncu_kernels.py              (no ncu: runs the workload, profiles nothing)

On a CPU it runs tiny shapes in the interpreter (a dry run of the script, nothing measured).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from olakernels import embedding_distill_loss, linear_cross_entropy  # noqa: E402
from olakernels.testing import make_embedding_pair, make_lm_head_inputs  # noqa: E402


def profiled(name: str, fn, warmup: int = 3) -> None:
    """fn() warm (autotuned, compiled), then once between cudaProfilerStart and Stop (ncu
    --profile-from-start off profiles only there)."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    print(f"ncu_kernels: {name} done", flush=True)


def main() -> None:
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    shapes = {"seg-B32": (32, 1536, 24, 24), "depth-B8": (8, 576, 1024)} if cuda else \
        {"tiny": (4, 8, 6)}
    for name, shape in shapes.items():
        pred, target = make_embedding_pair(shape, dtype=torch.bfloat16, device=device, seed=0)
        scale = torch.tensor(2.0, device=device, requires_grad=True)  # the learnable logit scale
        pred.requires_grad_(True)

        def fwd_bwd(pred=pred, target=target, scale=scale):
            pred.grad = scale.grad = None
            embedding_distill_loss(pred, target, None, scale, impl="triton").loss.backward()

        profiled(f"embedding loss {name}", fwd_bwd)
    # The LM head's BLAS schedule on a frozen Llama-3 head: its Triton row kernel reads each
    # logits row twice and writes it once (memory-bound; the GEMMs are cuBLAS's).
    leading, h, v = ((2048,), 4096, 128256) if cuda else ((32,), 16, 50)
    hidden, weight, labels, _ = make_lm_head_inputs(leading, h, v, dtype=torch.bfloat16,
                                                    device=device, ignored=0.0)
    hidden.requires_grad_(True)

    def lm_head():
        hidden.grad = None
        linear_cross_entropy(hidden, weight, labels, impl="triton",
                             max_valid_tokens=labels.numel()).backward()

    profiled("LM head rows kernel", lm_head)


if __name__ == "__main__":
    main()
