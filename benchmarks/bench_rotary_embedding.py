# Benchmark of rotary_embedding: the decoders' eager RoPE, its torch.compile, liger-kernel, ours.
"""Rotary embedding benchmark (fwd and fwd+bwd, bf16, real decoder shapes).

Run on a GPU either way:
    pytest benchmarks/bench_rotary_embedding.py --benchmark-only    # pytest-benchmark
    python benchmarks/bench_rotary_embedding.py --preset full       # plain CLI
Both append one CSV row per (provider, case, mode) to benchmarks/results/rotary_embedding.csv.

Inputs are laid out as Hugging Face's attention makes them: q = q_proj(x).view(B, L, H, D)
.transpose(1, 2) (and k), cos/sin (B, L, D). Minimal bytes (s = element size, T = B * L):
    fwd:     read q and k, write q' and k'           2 * T * (Hq + Hk) * D * s  (+ cos, sin)
    fwd_bwd: the same again for the gradients        4 * T * (Hq + Hk) * D * s  (+ cos, sin x2)
Providers: "eager" is transformers' apply_rotary_pos_emb formula (olakernels' reference),
"eager_compile" its torch.compile, "liger" liger-kernel's rope (if installed), "ours" the
Triton kernel.
"""
from __future__ import annotations

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

from olakernels import rotary_embedding  # noqa: E402
from olakernels.rotary_embedding import rotary_embedding_ref  # noqa: E402

DEVICE = common.bench_device()
OP = "rotary_embedding"
PROVIDERS = ("eager", "eager_compile", "liger", "ours")
MODES = ("fwd", "fwd_bwd")
GPU_ONLY = ("eager_compile", "liger")  # timed on GPUs only


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    length: int
    q_heads: int
    k_heads: int
    head_dim: int
    dtype: torch.dtype = torch.bfloat16

    @property
    def id(self) -> str:
        return f"{self.model}-B{self.batch}-L{self.length}"

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.batch, self.length, self.q_heads, self.k_heads, self.head_dim)


def cases(preset: str) -> list[Case]:
    if preset == "tiny":  # CPU smoke run: executes every provider, times nothing meaningful
        return [Case("tiny", 2, 5, 4, 2, 16)]
    # The pre-training step's B = 8 x 676 positions; Llama-3-8B (GQA 32/8), Qwen2-7B (28/4),
    # Phi-3-mini (32/32, head_dim 96).
    return [Case("llama3_8b", 8, 676, 32, 8, 128), Case("qwen2_7b", 8, 676, 28, 4, 128),
            Case("phi3_mini", 8, 676, 32, 32, 96)]


def min_bytes(case: Case, mode: str) -> int:
    s = case.dtype.itemsize
    tokens = case.batch * case.length
    qk = tokens * (case.q_heads + case.k_heads) * case.head_dim * s
    tables = 2 * tokens * case.head_dim * s
    return 2 * qk + tables if mode == "fwd" else 4 * qk + 2 * tables


def make_inputs(case: Case, device: str):
    g = torch.Generator().manual_seed(0)
    b, length, hq, hk, d = case.shape
    q = torch.randn(b, length, hq, d, generator=g).to(device, case.dtype).transpose(1, 2)
    k = torch.randn(b, length, hk, d, generator=g).to(device, case.dtype).transpose(1, 2)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(length).float()[:, None] * inv_freq
    emb = torch.cat((freqs, freqs), -1)[None].expand(b, -1, -1)
    return q, k, emb.cos().to(device, case.dtype), emb.sin().to(device, case.dtype)


_compiled = None


def _rope_fn(provider: str):
    """(q, k, cos, sin) -> (q', k'), or None when the provider is unavailable."""
    global _compiled
    if provider == "eager":
        return rotary_embedding_ref
    if provider == "eager_compile":
        if _compiled is None:
            _compiled = torch.compile(rotary_embedding_ref)
        return _compiled
    if provider == "liger":
        try:
            from liger_kernel.transformers.rope import liger_rotary_pos_emb
        except ImportError:
            return None
        return liger_rotary_pos_emb
    return lambda q, k, c, s: rotary_embedding(q, k, c, s, impl="triton")


def measure(provider: str, case: Case, mode: str, *, device: str, warmup: int, rep: int):
    """Time one (provider, case, mode); returns (record, fn, setup), or None if unavailable."""
    rope = _rope_fn(provider)
    if rope is None:
        return None
    q, k, cos, sin = make_inputs(case, device)
    if mode == "fwd_bwd":
        q.requires_grad_(True)
        k.requires_grad_(True)
    grads = (torch.ones_like(q), torch.ones_like(k))

    def setup():
        q.grad = k.grad = None

    def fn():
        out = rope(q, k, cos, sin)
        if mode == "fwd_bwd":
            torch.autograd.backward(out, grads)
        return out

    timing = common.do_bench(fn, setup=setup, warmup=warmup, rep=rep, device=device)
    setup()
    peak = common.peak_memory_delta(fn, device=device, setup=setup)
    record = common.make_record(
        op=OP, provider=provider, mode=mode, shape=case.shape, dtype=case.dtype, timing=timing,
        num_bytes=min_bytes(case, mode), num_flops=None, peak_bytes=peak,
        note=f"{case.model}; q,k transposed views as in HF attention")
    return record, fn, setup


# ---- pytest-benchmark entry: pytest benchmarks/ --benchmark-only ----


def pytest_generate_tests(metafunc):
    from conftest import bench_preset  # noqa: PLC0415

    if "case" in metafunc.fixturenames:
        selected = cases(bench_preset(metafunc.config))
        metafunc.parametrize("case", selected, ids=[c.id for c in selected])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_rotary_embedding(benchmark, provider, case, mode):
    common.run_case_or_skip(benchmark, measure, provider, case, mode, device=DEVICE,
                            gpu_only=GPU_ONLY, columns=("ms", "gbps", "peak_mib"))


# ---- CLI ----


def main(argv=None) -> int:
    return common.run_cli(argv, description=__doc__.splitlines()[0], providers=PROVIDERS,
                          modes=MODES, cases=cases, measure=measure, device=DEVICE,
                          gpu_only=GPU_ONLY)


if __name__ == "__main__":
    raise SystemExit(main())
