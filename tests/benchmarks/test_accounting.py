# The benchmarks' accounting against independent counts: FLOP formulas, PERF.md's floor numbers,
# and the report's pairing of rows.
from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks import report  # noqa: E402

PERF = " ".join((REPO_ROOT / "docs" / "PERF.md").read_text().split())  # lines joined


def _section(title: str) -> str:
    start = PERF.index(f"## {title}")
    end = PERF.find(" ## ", start + 3)
    return PERF[start:] if end < 0 else PERF[start:end]


def _agrees(doc: str, value: float) -> bool:
    """``value`` rounded as the doc writes it ("1.24", "2.2", "65", "16,384") is ``doc``."""
    doc = doc.replace(",", "")
    decimals = len(doc.split(".")[1]) if "." in doc else 0
    return abs(value - float(doc)) <= 0.5 * 10**-decimals * (1 + 1e-9)


# --------------------------------------------------------------------------------------------
# report.py pairs the right rows
# --------------------------------------------------------------------------------------------


def _row(provider, ms, sha, when, op="ola_step", shape="llama3_8b-B8-L676"):
    return {"op": op, "provider": provider, "mode": "fwd_bwd", "shape": shape,
            "dtype": "bfloat16", "gpu_name": "NVIDIA H200", "ms": ms, "git_sha": sha,
            "timestamp": f"2026-11-{when:02d}T00:00:00+00:00"}


def test_report_counts_the_steps_old_fused_rows_as_fused_cached():
    """bench_step's "fused" is today's "fused_cached" (its ALIASES): a newer fused_cached row
    supersedes it, instead of both showing as two providers with two speedups."""
    rows = [_row("reference", 700.0, "a", 1), _row("fused", 399.0, "a", 1),
            _row("seed", 1761.0, "b", 2), _row("fused_cached", 297.0, "b", 2)]
    latest = report.latest_rows(rows)
    assert sorted(r["provider"] for r in latest) == ["fused_cached", "reference", "seed"]
    ups = {u["provider"]: u["speedup"] for u in report.speedups(rows)}
    assert ups == {"fused_cached": f"{1761 / 297:.2f}x", "reference": "2.52x (other runs)"}
    # an old fused row with nothing newer is still shown, under today's name
    ups = {u["provider"]: u["speedup"] for u in report.speedups(rows[:3])}
    assert ups["fused_cached"] == f"{1761 / 399:.2f}x (other runs)"


def test_report_baseline_skips_an_untimed_seed():
    """An out-of-memory seed step (ms NaN) must not hide every speedup of its group: the next
    baseline with a time (the reference) is used, as bench_step's own table does."""
    rows = [_row("seed", float("nan"), "a", 1), _row("reference", 900.0, "a", 1),
            _row("fused_cached", 300.0, "a", 1)]
    ups = {u["provider"]: (u["baseline"], u["speedup"]) for u in report.speedups(rows)}
    assert ups == {"fused_cached": ("reference", "3.00x")}


# --------------------------------------------------------------------------------------------
# FLOP formulas against counted FLOPs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["depth", "seg", "gen"])
def test_perceiver_forward_flops_are_the_fast_paths_counted_flops(load_bench, task):
    """forward_flops = the matmul FLOPs torch's counter sees in the fast path (shared queries
    projected once) + SDPA's two products 4 b m (n + m) inner, which the CPU SDPA does not
    report to the counter; the backward's counted matmuls are twice the forward's."""
    from torch.utils.flop_counter import FlopCounterMode

    bench = load_bench("bench_perceiver")
    case = {"depth": bench.Case("depth", 3, 20, 32, 32, 8, 16),
            "seg": bench.Case("seg", 3, 20, 32, 24, 8, 24),
            "gen": bench.Case("gen", 3, 20, 32, 16, 1, 16)}[task]
    head = bench.build(case, "cpu").float()
    head.projector.impl = "torch"
    x = torch.randn(case.batch, case.tokens, case.hidden, requires_grad=True)
    if task == "gen":  # per-sample queries: 8 gen-token states, mean-pooled to one
        latents = torch.randn(case.batch, 8, case.hidden, requires_grad=True)
    else:
        latents = torch.randn(case.queries, case.hidden, requires_grad=True)
    with FlopCounterMode(display=False) as fwd:
        out = head(x, latents)
    with FlopCounterMode(display=False) as bwd:
        out.square().mean().backward()
    attention = 4 * case.batch * case.queries * (case.tokens + case.queries) * 4 * 32
    assert fwd.get_total_flops() + attention == bench.forward_flops(case)
    assert bwd.get_total_flops() == 2 * fwd.get_total_flops()


# --------------------------------------------------------------------------------------------
# docs/PERF.md's floors follow from the benchmarks' formulas
# --------------------------------------------------------------------------------------------


def test_perf_embedding_loss_floor_table(load_bench):
    bench = load_bench("bench_embedding_loss")
    table = re.findall(r"\| (depth|seg) B=(\d+) \| ([\d,]+) \| ([\d.]+) MB \| ([\d.]+) MB \| "
                       r"([\d.]+) / ([\d.]+) us \| ([\d.]+) / ([\d.]+) us \|",
                       _section("embedding_distill_loss"))
    assert len(table) == 4
    cases = {(c.task, c.shape[0]): c for c in bench.cases("full")}
    for task, b, d, fwd_mb, both_mb, *floors in table:
        case = cases[(task, int(b))]
        fwd, both = bench.min_bytes(case, "fwd"), bench.min_bytes(case, "fwd_bwd")
        # independent count: pred and target read once (bf16); twice + grad_pred written
        assert fwd == 2 * case.shape[0] * case.per_sample * 2
        assert both == 2 * fwd + case.shape[0] * case.per_sample * 2
        assert int(d.replace(",", "")) == case.per_sample
        assert _agrees(fwd_mb, fwd / 1e6) and _agrees(both_mb, both / 1e6)
        for got, nbytes, rate in zip(floors, (fwd, both) * 2, (3.0e12,) * 2 + (4.28e12,) * 2,
                                     strict=True):
            assert _agrees(got, nbytes / rate * 1e6), (task, b, got)


def test_perf_linear_cross_entropy_floor_table(load_bench):
    bench = load_bench("bench_linear_cross_entropy")
    table = re.findall(r"\| (Llama-3|Phi-3) N=(\d+), (\d+)% ignored \| ([\d,]+) \| "
                       r"([\d.]+) TFLOP \| ([\d.]+) ms \|", _section("linear_cross_entropy"))
    assert len(table) == 4
    for head, n, ignored, rows, tflop, ms in table:
        h, v = bench.HEADS[{"Llama-3": "llama3", "Phi-3": "phi3"}[head]]
        case = bench.Case(head, int(n), h, v, int(ignored) / 100, True)
        assert int(rows.replace(",", "")) == bench.labelled(case)
        # logits, grad_hidden and grad_weight: three n x V x H GEMMs
        assert bench.min_flops(case) == 3 * 2 * bench.labelled(case) * v * h
        assert _agrees(tflop, bench.min_flops(case) / 1e12)
        assert _agrees(ms, bench.min_flops(case) / 790e12 * 1e3)


def test_perf_perceiver_floor_table(load_bench):
    bench = load_bench("bench_perceiver")
    section = _section("perceiver (embedding-predictor heads)")
    table = re.findall(r"\| (depth|seg|gen) \| [^|]+ \| ([\d.]+) TFLOP \| ([\d.]+) ms \| "
                       r"([\d.]+) TFLOP \| ([\d.]+) ms \|", section)
    assert len(table) == 3
    cases = {(c.task, c.batch): c for c in bench.cases("full")}
    for task, *cells in table:
        for b, (tflop, ms) in zip((8, 32), (cells[:2], cells[2:]), strict=True):
            flops = 3 * bench.forward_flops(cases[(task, b)])
            assert _agrees(tflop, flops / 1e12) and _agrees(ms, flops / 790e12 * 1e3)
    # what the seed adds for depth: proj_in, to_q and to_kv of the 576 shared queries B-1 times
    more = re.search(r"\+2 \* \(B - 1\) \* 576 \* 4096 \* \(4096 \+ 3 \* 128\) per forward: "
                     r"(\d+)% more at B=32, (\d+)% at B=8", section)
    assert more is not None
    for b, pct in zip((32, 8), more.groups(), strict=True):
        extra = 2 * (b - 1) * 576 * 4096 * (4096 + 3 * 128)
        assert _agrees(pct, 100 * extra / bench.forward_flops(cases[("depth", b)]))


def test_perf_rotary_embedding_floor(load_bench):
    bench = load_bench("bench_rotary_embedding")
    case = bench.cases("full")[0]
    assert case.model == "llama3_8b"
    m = re.search(r"q ([\d.]+) MB, k ([\d.]+) MB, tables ([\d.]+) MB: forward ([\d.]+) MB, "
                  r"forward \+ backward ([\d.]+) MB: (\d+) / (\d+) us at the H200's measured "
                  r"4280 GB/s copy, ~(\d+) / ~(\d+) us at an H100's ~3 TB/s",
                  _section("rotary_embedding"))
    assert m is not None
    t = case.batch * case.length
    q, k, tables = t * 32 * 128 * 2, t * 8 * 128 * 2, 2 * t * 128 * 2  # bf16; cos and sin
    fwd, both = bench.min_bytes(case, "fwd"), bench.min_bytes(case, "fwd_bwd")
    assert fwd == 2 * (q + k) + tables and both == 2 * fwd
    for doc, value in zip(m.groups(), (q / 1e6, k / 1e6, tables / 1e6, fwd / 1e6, both / 1e6,
                                       fwd / 4280e9 * 1e6, both / 4280e9 * 1e6,
                                       fwd / 3e12 * 1e6, both / 3e12 * 1e6), strict=True):
        assert _agrees(doc, value), (doc, value)


def test_perf_silu_mul_floor(load_bench):
    bench = load_bench("bench_silu_mul")
    case = bench.cases("full")[0]
    assert (case.model, case.tokens, case.intermediate) == ("llama3_8b", 5408, 14336)
    m = re.search(r"([\d.]+) MB per operand, forward ([\d.]+) MB, forward \+ backward "
                  r"([\d.]+) GB: ([\d.]+) ms at the H200's 4280 GB/s, ~([\d.]+) ms at an "
                  r"H100's ~3 TB/s", _section("silu_mul"))
    assert m is not None
    per = case.tokens * case.intermediate * 2
    fwd, both = bench.min_bytes(case, "fwd"), bench.min_bytes(case, "fwd_bwd")
    # forward: gate, up read, y written; backward: gate, up, dy read, dgate, dup written
    assert (fwd, both) == (3 * per, 3 * per + 5 * per)
    for doc, value in zip(m.groups(), (per / 1e6, fwd / 1e6, both / 1e9, both / 4280e9 * 1e3,
                                       both / 3e12 * 1e3), strict=True):
        assert _agrees(doc, value), (doc, value)


def test_perf_step_floor(load_bench):
    """The step floor's numbers: step_flops at llama3_8b B=8 (a stand-in model object with the
    attributes make_batch and step_flops read) and its decoder parts counted here."""
    bench = load_bench("step_parts")
    from olavlm.models.config import default_heads

    preset = bench.PRESETS["llama3_8b"]
    heads = default_heads()
    model = SimpleNamespace(num_image_tokens=576, tasks=["gen", "depth", "seg"],
                            vision_tower=SimpleNamespace(image_size=16),  # images: not counted
                            config=SimpleNamespace(heads=heads, num_task_tokens=8),
                            layers={"gen": [12, 20], "depth": [18, 20], "seg": [10, 18]})
    batch = bench.make_batch(model, preset, 8, "cpu")
    m = re.search(r"~(\d+) TFLOP, ~(\d+)% of it the frozen decoder's blocks \(forward \+ input "
                  r"gradients over ([\d,]+) real positions: GEMMs ([\d.]+), causal attention "
                  r"([\d.]+)\)", _section("OLA-VLM training step"))
    assert m is not None
    tokens = sum(batch.lengths)
    per_token = 4096 * (2 * 4096 + 2 * 1024) + 3 * 4096 * 14336  # q, o, k, v, SwiGLU
    gemms = 4 * per_token * tokens * 32  # forward + input gradient, frozen weights
    attention = 6 * sum(n * n for n in batch.lengths) * 4096 * 32  # causal: 2 l^2 H, x3
    total = bench.step_flops(model, preset, batch)
    for doc, value in zip(m.groups(), (total / 1e12, 100 * (gemms + attention) / total, tokens,
                                       gemms / 1e12, attention / 1e12), strict=True):
        assert _agrees(doc, value), (doc, value)
