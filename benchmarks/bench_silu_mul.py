# Benchmark of silu_mul: eager silu(gate) * up, its torch.compile, liger-kernel, ours.
"""SwiGLU gating benchmark (fwd and fwd+bwd, bf16, real decoder shapes).

Run on a GPU either way:
    pytest benchmarks/bench_silu_mul.py --benchmark-only    # pytest-benchmark
    python benchmarks/bench_silu_mul.py --preset full       # plain CLI
Both append one CSV row per (provider, case, mode) to benchmarks/results/silu_mul.csv.

gate and up are (T, I) with T = B * L tokens (Phi-3: the halves of gate_up_proj's output).
Minimal bytes (s = element size):
    fwd:     read gate and up, write y                     3 * T * I * s
    fwd_bwd: + read gate, up and dy, write dgate and dup   8 * T * I * s
             (Phi-3 too: a backward can write both gradients into the (T, 2I) leaf's gradient,
             so autograd's join of the two halves is overhead, not part of the floor)
Providers: "eager" is ``F.silu(gate) * up`` under autograd (keeps 3 tensors), "eager_compile"
its torch.compile, "liger" liger-kernel's LigerSiLUMulFunction (if installed), "ours" the
Triton kernels, "ours_inplace" the same with the backward writing the gradients over gate and up
(``inplace_backward=True``, what LeanSwiGLUMLP uses; the api takes it for non-leaf tensors only,
so this calls the autograd Function directly on the benchmark's leaves, as liger-kernel
overwrites them too: the values drift over the repetitions, the timing does not care).
Phi-3 ("chunked halves"): as in the model, the leaf is the (T, 2I) projection output and gate,
up = leaf.chunk(2, -1) runs inside the timed step, so every provider's backward also joins the
two gradients into the leaf's (T, 2I) gradient (chunk's backward). With the halves themselves
as leaves (run 7), autograd copied the in-place provider's strided gradients into contiguous
ones, which the model never does: 0.47 against 0.25 ms, an artefact of the benchmark.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if not torch.cuda.is_available():  # before triton is imported: kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import common  # noqa: E402

from olakernels import silu_mul  # noqa: E402

DEVICE = common.bench_device()
OP = "silu_mul"
PROVIDERS = ("eager", "eager_compile", "liger", "ours", "ours_inplace")
MODES = ("fwd", "fwd_bwd")
GPU_ONLY = ("eager_compile", "liger")  # timed on GPUs only


@dataclass(frozen=True)
class Case:
    model: str
    tokens: int
    intermediate: int
    chunked: bool = False  # Phi-3: gate and up are the halves of one (T, 2I) tensor
    dtype: torch.dtype = torch.bfloat16

    @property
    def id(self) -> str:
        return f"{self.model}-T{self.tokens}"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.tokens, self.intermediate)


def cases(preset: str) -> list[Case]:
    if preset == "tiny":  # CPU smoke run: executes every provider, times nothing meaningful
        return [Case("tiny", 6, 40, chunked=True)]
    # The pre-training step's 8 x 676 tokens.
    return [Case("llama3_8b", 5408, 14336), Case("qwen2_7b", 5408, 18944),
            Case("phi3_mini", 5408, 8192, chunked=True)]


def min_bytes(case: Case, mode: str) -> int:
    per = case.tokens * case.intermediate * case.dtype.itemsize
    if mode == "fwd":
        return 3 * per
    # Phi-3's providers also join the two gradients into the (T, 2I) leaf's (chunk's backward),
    # as in the model: time they all spend above the floor, not bytes it needs
    return 8 * per


def make_inputs(case: Case, device: str):
    g = torch.Generator().manual_seed(0)
    if case.chunked:
        both = torch.randn(case.tokens, 2 * case.intermediate, generator=g)
        return both.to(device, case.dtype).chunk(2, dim=-1)
    return (torch.randn(case.shape, generator=g).to(device, case.dtype),
            torch.randn(case.shape, generator=g).to(device, case.dtype))


def _eager(gate, up):
    return F.silu(gate) * up


_compiled = None


def _fn(provider: str):
    """(gate, up) -> y, or None when the provider is unavailable."""
    global _compiled
    if provider == "eager":
        return _eager
    if provider == "eager_compile":
        if _compiled is None:
            _compiled = torch.compile(_eager)
        return _compiled
    if provider == "liger":
        try:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        except ImportError:
            return None
        return LigerSiLUMulFunction.apply
    if provider == "ours_inplace":
        from olakernels.silu_mul.impl.triton import SiLUMulTritonFunction

        return lambda g, u: SiLUMulTritonFunction.apply(g, u, True)
    return lambda g, u: silu_mul(g, u, impl="triton")


def measure(provider: str, case: Case, mode: str, *, device: str, warmup: int, rep: int):
    """Time one (provider, case, mode); returns (record, fn, setup), or None if unavailable."""
    op = _fn(provider)
    if op is None:
        return None
    gate, up = make_inputs(case, device)
    if mode == "fwd_bwd" and case.chunked:  # the leaf: gate_up_proj's (T, 2I) output
        leaves = [torch.cat([gate, up], dim=-1).requires_grad_(True)]
    elif mode == "fwd_bwd":  # leaves, like the outputs of gate_proj / up_proj
        leaves = [gate.detach().requires_grad_(True), up.detach().requires_grad_(True)]
    else:
        leaves = [gate, up]
    grad = torch.ones(case.shape, device=device, dtype=case.dtype)

    def setup():
        for leaf in leaves:
            leaf.grad = None

    def fn():
        g, u = leaves[0].chunk(2, dim=-1) if len(leaves) == 1 else leaves
        y = op(g, u)
        if mode == "fwd_bwd":
            y.backward(grad)
        return y

    timing = common.do_bench(fn, setup=setup, warmup=warmup, rep=rep, device=device)
    setup()
    peak = common.peak_memory_delta(fn, device=device, setup=setup)
    record = common.make_record(
        op=OP, provider=provider, mode=mode, shape=case.shape, dtype=case.dtype, timing=timing,
        num_bytes=min_bytes(case, mode), num_flops=None, peak_bytes=peak,
        note=f"{case.model}{'; halves of a (T, 2I) leaf' if case.chunked else ''}")
    return record, fn, setup


# ---- pytest-benchmark entry: pytest benchmarks/ --benchmark-only ----


def pytest_generate_tests(metafunc):
    from conftest import bench_preset  # noqa: PLC0415

    if "case" in metafunc.fixturenames:
        selected = cases(bench_preset(metafunc.config))
        metafunc.parametrize("case", selected, ids=[c.id for c in selected])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_silu_mul(benchmark, provider, case, mode):
    common.run_case_or_skip(benchmark, measure, provider, case, mode, device=DEVICE,
                            gpu_only=GPU_ONLY, columns=("ms", "gbps", "peak_mib"))


# ---- CLI ----


def main(argv=None) -> int:
    return common.run_cli(argv, description=__doc__.splitlines()[0], providers=PROVIDERS,
                          modes=MODES, cases=cases, measure=measure, device=DEVICE,
                          gpu_only=GPU_ONLY)


if __name__ == "__main__":
    raise SystemExit(main())
