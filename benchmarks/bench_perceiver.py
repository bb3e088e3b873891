# Benchmark of the perceiver embedding-predictor heads: the seed's eager math vs the fast paths.
"""OLA-VLM's pre-training heads (SPEC 2.2) at Llama-3-8B shape, bf16, fwd+bwd.

    pytest benchmarks/bench_perceiver.py --benchmark-only      # GPU: real shapes; CPU: tiny
    python benchmarks/bench_perceiver.py --preset full

One head per task (pre-training runs two per task at these shapes: double the times for the six
heads). Inputs: the tapped layer's hidden states (B, L - 16, H), H = 4096, L = 700; depth and
seg read a shared (576, H) task-token parameter as queries, gen the 8 gen-token states.
FLOPs: the minimal forward count (shared queries projected once) x 3 for forward + backward;
TFLOP/s = FLOPs / device time. Peak MiB: allocation above the inputs during one fwd+bwd.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if not torch.cuda.is_available():  # before triton is imported: kernels run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import common  # noqa: E402

from olakernels.perceiver import EmbeddingPredictorHead, TaskTokenResampler  # noqa: E402

DEVICE = common.bench_device()
OP = "perceiver"
PROVIDERS = ("reference", "torch", "triton")


@dataclass(frozen=True)
class Case:
    task: str
    batch: int
    tokens: int  # N, the predictor's input length
    hidden: int  # E, the LLM hidden size
    dim: int
    queries: int
    out: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def id(self) -> str:
        return f"{self.task}-B{self.batch}"


def cases(preset: str) -> list[Case]:
    if preset == "tiny":
        return [Case("depth", 2, 20, 32, 32, 8, 16), Case("gen", 2, 20, 32, 16, 1, 16)]
    h, n = 4096, 700 - 16
    specs = {"depth": (h, 576, 1024), "seg": (1536, 576, 1536), "gen": (1024, 1, 1024)}
    return [Case(task, b, n, h, *specs[task]) for task in ("depth", "seg", "gen") for b in (8, 32)]


def build(case: Case, device: str) -> torch.nn.Module:
    torch.manual_seed(0)
    projector = TaskTokenResampler(dim=case.dim, depth=1, dim_head=32, heads=4,
                                   num_queries=case.queries, embedding_dim=case.hidden,
                                   output_dim=case.out, ff_mult=1)
    head = EmbeddingPredictorHead(projector, num_mlps=3 if case.task == "depth" else 0)
    return head.to(device=device, dtype=case.dtype)


def forward_flops(case: Case) -> int:
    b, n, e, d, m, o = case.batch, case.tokens, case.hidden, case.dim, case.queries, case.out
    inner = 4 * 32
    flops = 2 * b * n * e * d + 2 * m * e * d  # proj_in: inputs, then the queries once
    if case.task == "gen":  # per-sample queries: the mean-pooled gen tokens
        flops += 2 * b * m * e * d - 2 * m * e * d
    shared = case.task != "gen"
    flops += 2 * (1 if shared else b) * m * d * 3 * inner  # q, k, v of the latents
    flops += 2 * b * n * d * 2 * inner  # k, v of the inputs
    flops += 4 * b * m * (n + m) * inner  # q k^T and p v
    flops += 2 * b * m * inner * d + 4 * b * m * d * d + 2 * b * m * d * o  # out, FF, proj_out
    if case.task == "depth":
        flops += 4 * b * m * o * o  # linear_1
    return flops


def measure(provider: str, case: Case, *, device: str, warmup: int, rep: int):
    head = build(case, device)
    head.projector.impl = provider
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(case.batch, case.tokens, case.hidden, generator=g).to(device, case.dtype)
    x.requires_grad_(True)  # the tapped hidden states carry gradient into the LLM
    if case.task == "gen":
        latents = torch.randn(case.batch, 8, case.hidden, generator=g).to(device, case.dtype)
    else:
        latents = torch.nn.Parameter(
            torch.randn(case.queries, case.hidden, generator=g).to(device, case.dtype))

    def setup():
        head.zero_grad(set_to_none=True)
        x.grad = None
        latents.grad = None  # (the shared latents are not the head's parameter)

    def step():
        head(x, latents).float().square().mean().backward()

    timing = common.do_bench(step, setup=setup, warmup=warmup, rep=rep, device=device)
    peak = common.peak_memory_delta(step, device=device, setup=setup)
    record = common.make_record(
        op=OP, provider=provider, mode="fwd_bwd", shape=f"{case.id}-N{case.tokens}-H{case.hidden}",
        dtype=case.dtype, timing=timing, num_flops=3 * forward_flops(case), peak_bytes=peak,
        note=case.task)
    return record, step, setup


def pytest_generate_tests(metafunc):
    from conftest import bench_preset  # noqa: PLC0415

    if "perceiver_case" in metafunc.fixturenames:
        selected = cases(bench_preset(metafunc.config))
        metafunc.parametrize("perceiver_case", selected, ids=[c.id for c in selected])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_perceiver(benchmark, provider, perceiver_case):
    warmup, rep = common.bench_reps((3, 20))
    record, step, setup = measure(provider, perceiver_case, device=DEVICE, warmup=warmup,
                                  rep=rep)
    common.finish_pytest_benchmark(benchmark, record, step, setup, rep)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "full"],
                        default="full" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    args = parser.parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        parser.error(f"--providers: unknown {unknown}; choose from {PROVIDERS}")
    warmup, rep = common.bench_reps((3, 20))
    records = [measure(p, case, device=DEVICE, warmup=warmup, rep=rep)[0]
               for case in cases(args.preset) for p in providers]
    common.append_records(records)
    print(common.format_table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
