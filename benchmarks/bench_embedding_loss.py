# Benchmark of embedding_distill_loss: seed eager reference, its torch.compile, torch, triton.
"""Embedding distillation loss benchmark (fwd and fwd+bwd, bf16, OLA-VLM target shapes).

Run on a GPU either way:
    pytest benchmarks/bench_embedding_loss.py --benchmark-only        # pytest-benchmark
    python benchmarks/bench_embedding_loss.py --preset full           # plain CLI
Both append one CSV row per (provider, case, mode) to benchmarks/results/embedding_loss.csv.

Minimal bytes (single GPU, so the candidate targets are the local ones):
    fwd:     read pred and target once             B * D * (s_pred + s_target)
    fwd_bwd: read them twice, write grad_pred once 2 * B * D * (s_pred + s_target) + B * D * s_pred
FLOPs (the B x B dot products dominate): fwd 2 * B^2 * D, fwd_bwd 4 * B^2 * D.
Time: "ms" is device time (CUDA events, cold L2, host launch overhead hidden as in a training
step where the host runs ahead); the note carries the eager wall time of a synchronized call.
Memory: peak allocation during the call above what was allocated before; "extra" subtracts the
unavoidable output (grad_pred in fwd_bwd).
Providers: "reference" is the seed's eager math (mask_mode="seed", exactly the seed's code);
"reference_compile" is torch.compile of it; "torch" and "triton" are ours (default
mask_mode="per_sample", the same loss on these all-image batches).
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

from olakernels import embedding_distill_loss  # noqa: E402
from olakernels.embedding_loss.impl.reference import embedding_distill_loss_ref  # noqa: E402
from olakernels.testing import make_embedding_pair  # noqa: E402

DEVICE = common.bench_device()
OP = "embedding_loss"
PROVIDERS = ("reference", "reference_compile", "torch", "triton")
MODES = ("fwd", "fwd_bwd")


@dataclass(frozen=True)
class Case:
    task: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"{self.task}-B{self.shape[0]}-{str(self.dtype).removeprefix('torch.')}"

    @property
    def per_sample(self) -> int:
        n = 1
        for s in self.shape[1:]:
            n *= s
        return n


def cases(preset: str) -> list[Case]:
    if preset == "tiny":  # CPU smoke run: executes every provider, times nothing meaningful
        return [
            Case("depth", (2, 8, 16), torch.bfloat16),
            Case("seg", (2, 12, 2, 2), torch.bfloat16),
        ]
    # Real OLA-VLM targets: depth (576, 1024) from DINOv2-L, seg (1536, 24, 24) from Swin-L.
    return [
        Case(task, (b,) + per_sample, torch.bfloat16)
        for task, per_sample in (("depth", (576, 1024)), ("seg", (1536, 24, 24)))
        for b in (8, 32)
    ]


def min_bytes(case: Case, mode: str) -> int:
    b, d, s = case.shape[0], case.per_sample, case.dtype.itemsize
    read_once = b * d * 2 * s
    return read_once if mode == "fwd" else 2 * read_once + b * d * s


def min_flops(case: Case, mode: str) -> int:
    b, d = case.shape[0], case.per_sample
    return (2 if mode == "fwd" else 4) * b * b * d


_compiled_ref = None


def _loss_fn(provider: str):
    global _compiled_ref
    if provider == "reference":
        return lambda p, t, m, s: embedding_distill_loss_ref(p, t, m, s, mask_mode="seed")[0]
    if provider == "reference_compile":
        if _compiled_ref is None:
            _compiled_ref = torch.compile(embedding_distill_loss_ref, dynamic=True)
        return lambda p, t, m, s: _compiled_ref(p, t, m, s, mask_mode="seed")[0]
    return lambda p, t, m, s: embedding_distill_loss(p, t, m, s, impl=provider).loss


def measure(provider: str, case: Case, mode: str, *, device: str, warmup: int, rep: int):
    """Time one (provider, case, mode); returns (record, fn, setup) for pytest-benchmark."""
    pred, target = make_embedding_pair(case.shape, dtype=case.dtype, device=device)
    mask = torch.ones(case.shape[0], device=device)
    scale = torch.tensor(2.0, device=device, requires_grad=True)
    loss_fn = _loss_fn(provider)

    def setup():
        pred.grad = None
        scale.grad = None

    def fn():
        loss = loss_fn(pred, target, mask, scale)
        if mode == "fwd_bwd":
            loss.backward()
        return loss

    timing = common.do_bench(fn, setup=setup, warmup=warmup, rep=rep, device=device)
    wall_ms = common.wall_time(fn, setup=setup, rep=max(rep // 3, 1), device=device)
    setup()
    peak = common.peak_memory_delta(fn, device=device, setup=setup)
    grad_bytes = pred.numel() * pred.element_size() if mode == "fwd_bwd" else 0
    record = common.make_record(
        op=OP, provider=provider, mode=mode, shape=case.shape, dtype=case.dtype, timing=timing,
        num_bytes=min_bytes(case, mode), num_flops=min_flops(case, mode), peak_bytes=peak,
        extra_bytes=None if peak is None else peak - grad_bytes,
        note=f"{case.task}; eager wall ms {wall_ms:.4g}",
    )
    return record, fn, setup


# ---- pytest-benchmark entry: pytest benchmarks/ --benchmark-only ----


def pytest_generate_tests(metafunc):
    from conftest import bench_preset  # noqa: PLC0415

    if "case" in metafunc.fixturenames:
        selected = cases(bench_preset(metafunc.config))
        metafunc.parametrize("case", selected, ids=[c.id for c in selected])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_embedding_loss(benchmark, provider, case, mode):
    if provider == "reference_compile" and not torch.cuda.is_available():
        pytest.skip("torch.compile provider is timed on GPU only")
    warmup, rep = common.bench_reps()
    record, fn, setup = measure(provider, case, mode, device=DEVICE, warmup=warmup, rep=rep)
    common.finish_pytest_benchmark(benchmark, record, fn, setup, rep,
                                   ("ms", "gbps", "tflops", "peak_mib", "extra_mib"))


# ---- CLI ----


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=["tiny", "full"],
                        default="full" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    providers = [p for p in args.providers.split(",") if p]
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        parser.error(f"--providers: unknown {unknown}; choose from {PROVIDERS}")
    warmup, rep = common.bench_reps()
    records = []
    for case in cases(args.preset):
        for mode in args.modes.split(","):
            for provider in providers:  # interleaved: every provider sees the same GPU state
                records.append(measure(provider, case, mode, device=DEVICE, warmup=warmup,
                                       rep=rep)[0])
    common.append_records(records)
    print(common.format_table(records))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
